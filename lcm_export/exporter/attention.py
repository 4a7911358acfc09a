"""Head-sliced attention for the exported U-Net (``lcm-export --attention-slicing``).

Exported as one ``scaled_dot_product_attention``, each attention layer materialises its scores for every head at
once: (batch, heads, tokens, tokens) floats, twice (the scores and their softmax). At 512 px the SD1.5 U-Net's
first self-attention has 4096 tokens and 8 heads: 2 x 537 MB, most of a fast INT8 run's working memory. Computed
one head after another the graph holds one head's scores at a time (2 x 67 MB); the arithmetic is the same, so
are the outputs (the export is checked against PyTorch's unsliced model as always). This is diffusers'
``enable_attention_slicing`` made part of the graph, for CPUs where memory, not compute, limits the size.
INT8 exports for the ONNX target slice by default only the self-attention layers whose scores are large at the
model's default size (``LARGE_SCORES_BYTES``): those hold the run's peak; slicing the rest only costs time.

The measured effect on the SD1.5-shaped fast INT8 bundle is in bench/RESULTS.md. TensorRT fuses the unsliced
attention pattern into its own kernels; slicing is meant for the ONNX CPU backends.
"""

from __future__ import annotations

from typing import Any

ATTENTION_SLICING = "head-sliced"
# INT8 exports for the CPU backends slice, by default, the self-attention layers whose scores at the model's
# default size would take at least this much per image (float32): SD1.5's 4096-token layers at 512 px (537 MB) and
# SDXL's at 1024 px (671 MB), not the layers a quarter of their tokens (33-84 MB), where slicing only costs time.
LARGE_SCORES_BYTES = 256 * 2**20


def slice_attention(unet: Any, latent_size: tuple[int, int] | None = None, min_bytes: int = 0) -> int:
    """Give the attention layers of ``unet`` the head-sliced processor; returns how many layers it changed.

    Every layer by default; with ``latent_size`` (the latents' height and width at the model's default size) only
    the self-attention layers whose scores (heads x tokens x tokens float32 per image) reach ``min_bytes``.
    """
    from diffusers.models.attention_processor import Attention

    processor = _processor()
    count = 0
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        if latent_size is not None and scores_bytes(unet, name, module, latent_size) < min_bytes:
            continue
        module.set_processor(processor)
        count += 1
    return count


def scores_bytes(unet: Any, name: str, attention: Any, latent_size: tuple[int, int]) -> int:
    """The float32 bytes of one image's attention scores in the layer ``name`` of ``unet`` at ``latent_size``: its
    heads x tokens x keys, with the tokens of its block's resolution (each down block but the last halves it);
    a cross-attention layer's keys are the text's few tokens, counted as 77."""
    parts = name.split(".")
    levels = len(unet.config.block_out_channels) - 1
    if parts[0] == "down_blocks":
        level = int(parts[1])
    elif parts[0] == "up_blocks":
        level = levels - int(parts[1])
    else:  # the mid block, at the lowest resolution
        level = levels
    height, width = (-(-side // 2**level) for side in latent_size)
    tokens = height * width
    keys = 77 if attention.is_cross_attention else tokens
    return attention.heads * tokens * keys * 4


def _processor() -> Any:
    import torch
    import torch.nn.functional as F
    from diffusers.models.attention_processor import AttnProcessor2_0

    class HeadSlicedAttnProcessor(AttnProcessor2_0):
        """diffusers' ``AttnProcessor2_0`` with its one attention call split into one call per head."""

        def __call__(
            self,
            attn: Any,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            temb: torch.Tensor | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> torch.Tensor:
            residual = hidden_states
            if attn.spatial_norm is not None:
                hidden_states = attn.spatial_norm(hidden_states, temb)
            input_ndim = hidden_states.ndim
            if input_ndim == 4:
                batch_size, channel, height, width = hidden_states.shape
                hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            batch_size, sequence_length, _ = source.shape
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
                attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
            head_dim = key.shape[-1] // attn.heads
            query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            heads = []
            for head in range(attn.heads):
                window = slice(head, head + 1)
                mask = None if attention_mask is None else attention_mask[:, window]
                heads.append(
                    F.scaled_dot_product_attention(
                        query[:, window], key[:, window], value[:, window], attn_mask=mask, dropout_p=0.0
                    )
                )
            hidden_states = torch.cat(heads, dim=1)
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
            if input_ndim == 4:
                hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
            if attn.residual_connection:
                hidden_states = hidden_states + residual
            return hidden_states / attn.rescale_output_factor

    return HeadSlicedAttnProcessor()
