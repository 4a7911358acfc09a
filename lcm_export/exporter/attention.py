"""Head-sliced attention for the exported U-Net (``lcm-export --attention-slicing``).

Exported as one ``scaled_dot_product_attention``, each attention layer materialises its scores for every head at
once: (batch, heads, tokens, tokens) floats, twice (the scores and their softmax). At 512 px the SD1.5 U-Net's
first self-attention has 4096 tokens and 8 heads: 2 x 537 MB, most of a fast INT8 run's working memory. Computed
one head after another the graph holds one head's scores at a time (2 x 67 MB); the arithmetic is the same, so
are the outputs (the export is checked against PyTorch's unsliced model as always). This is diffusers'
``enable_attention_slicing`` made part of the graph, for CPUs where memory, not compute, limits the size.

The measured effect on the SD1.5-shaped fast INT8 bundle is in bench/RESULTS.md. TensorRT fuses the unsliced
attention pattern into its own kernels; slicing is meant for the ONNX CPU backends.
"""

from __future__ import annotations

from typing import Any

ATTENTION_SLICING = "head-sliced"


def slice_attention(unet: Any) -> int:
    """Give every attention layer of ``unet`` the head-sliced processor; returns how many layers it changed."""
    from diffusers.models.attention_processor import Attention

    processor = _processor()
    count = 0
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)
            count += 1
    return count


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
