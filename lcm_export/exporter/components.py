"""Per-component specs and the torch modules that implement them.

Each exported component is a :class:`ExportableComponent`: a :class:`ComponentSpec` (names, dtypes, symbolic
shapes, tolerance) and a small ``torch.nn.Module`` whose ``forward`` takes the spec's inputs in order and returns
its outputs in order. I/O names follow optimum's ONNX diffusers layout so optimum-style loaders can open bundles.

``timestep_cond`` appears only when the U-Net has ``time_cond_proj_dim``. SDXL (and SSD-1B) adds ``text_embeds``
(the second encoder's projected pooled output) and ``time_ids`` (the six size ids) to the U-Net, and its two text
encoders give every hidden state as optimum's SDXL export does (``hidden_states.0`` .. ``hidden_states.L`` for L
layers, after the pooled output first for the projected encoder): optimum's ``ORTTextEncoder`` reads all of them
and diffusers' SDXL pipelines take the pooled embedding from a 2-d first output. Our runtime reads
``hidden_states.{L-1}`` (entry -2 of ``output_hidden_states``, what SDXL's U-Net attends to).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from lcm_export.exporter.controlnet import controlnet_module, unet_residual_inputs
from lcm_export.exporter.loading import LoadedPipeline
from lcm_export.runtime.conditioning import SDXL_SIZE_IDS
from lcm_export.runtime.manifest import CONTROLNET_COMPONENT
from lcm_export.runtime.specs import ComponentSpec, TensorSpec

# TensorRT-RTX 1.7 cannot build an fp16 causal mask filled with -inf when the attention head size is above 8 and
# not a multiple of 8. The fill is made finite wherever the head size is not a multiple of 8 (at 8 or less that
# builds the same kernels); multiples keep the -inf, with which CLIP-L (64) builds the engine it always had.
MASK_FILL_HEAD_MULTIPLE = 8


@dataclass
class ExportableComponent:
    """A spec and the torch module that implements it.

    ``finite_mask_fills``: in fp16, write its attention masks' ``-inf`` as -65504
    (:func:`lcm_export.exporter.onnx_export.use_finite_mask_fills`), for graphs TensorRT-RTX cannot build otherwise.
    """

    spec: ComponentSpec
    module: Any  # torch.nn.Module with forward(*inputs in spec order) -> tuple of outputs in spec order
    atol: float = 1e-4  # max abs error of the ONNX export against PyTorch, relative to the output's scale
    keep_fp32: bool = False  # activations overflow in fp16 (a VAE with force_upcast): an fp16 export keeps it fp32
    finite_mask_fills: bool = False


def penultimate_hidden_state_name(encoder: Any) -> str:
    """optimum's name of a CLIP text encoder's penultimate hidden state: ``hidden_states.{layers - 1}``."""
    return f"hidden_states.{encoder.config.num_hidden_layers - 1}"


def _text_encoder_named(loaded: LoadedPipeline, name: str) -> ExportableComponent:
    """``input_ids`` -> the text encoder's outputs under optimum's names, in optimum's order.

    SD: ``last_hidden_state`` and ``pooler_output``. SDXL: ``last_hidden_state``, ``pooler_output`` and every hidden
    state ``hidden_states.0`` .. ``hidden_states.L``; the second encoder (``CLIPTextModelWithProjection``) gives
    ``text_embeds`` (projected pooled output) first, then ``last_hidden_state`` and the hidden states.
    """
    import torch

    encoder = loaded.module(name)
    hidden = encoder.config.hidden_size
    head_size = hidden // encoder.config.num_attention_heads
    cfg = 2 if loaded.guidance == "cfg" else 1
    all_hidden_states = loaded.family == "sdxl"
    projected = hasattr(encoder, "text_projection")  # CLIPTextModelWithProjection: text_embeds

    class TextEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            output = self.encoder(input_ids=input_ids, output_hidden_states=all_hidden_states, return_dict=True)
            states = tuple(output.hidden_states) if all_hidden_states else ()  # L + 1 of (B, S, D)
            if projected:
                return output.text_embeds, output.last_hidden_state, *states  # (B, P), (B, S, D), ...
            return output.last_hidden_state, output.pooler_output, *states  # (B, S, D), (B, D), ...

    last = TensorSpec("last_hidden_state", "float32", ("batch", "sequence", hidden))
    if projected:
        outputs = [TensorSpec("text_embeds", "float32", ("batch", encoder.config.projection_dim)), last]
    else:
        outputs = [last, TensorSpec("pooler_output", "float32", ("batch", hidden))]
    if all_hidden_states:
        layers = encoder.config.num_hidden_layers
        outputs += [
            TensorSpec(f"hidden_states.{index}", "float32", ("batch", "sequence", hidden))
            for index in range(layers + 1)
        ]
    spec = ComponentSpec(
        name=name,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=tuple(outputs),
        batch_multiplier=cfg,
    )
    return ExportableComponent(
        spec, TextEncoder().eval(), atol=1e-4, finite_mask_fills=head_size % MASK_FILL_HEAD_MULTIPLE != 0
    )


def _text_encoder(loaded: LoadedPipeline) -> ExportableComponent:
    return _text_encoder_named(loaded, "text_encoder")


def _text_encoder_2(loaded: LoadedPipeline) -> ExportableComponent:
    return _text_encoder_named(loaded, "text_encoder_2")


def unet_inputs(loaded: LoadedPipeline) -> tuple[TensorSpec, ...]:
    """The U-Net's inputs in order, from its config (no weights needed): the ControlNets' specs share them."""
    config = loaded.unet.config
    channels = config.in_channels
    has_cond = config.time_cond_proj_dim is not None
    inputs = [
        TensorSpec("sample", "float32", ("batch", channels, "latent_height", "latent_width")),
        # One timestep per row (B,): rows may sit at different steps (the frame loop's step batching). optimum's
        # pipelines feed a (1,) timestep to a non-scalar input, which the graph broadcasts to the batch.
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", config.cross_attention_dim)),
    ]
    if loaded.family == "sdxl":  # the "text_time" added embedding: pooled text (B, P) and size ids (B, 6)
        pooled_width = int(loaded.pipeline.text_encoder_2.config.projection_dim)
        inputs.append(TensorSpec("text_embeds", "float32", ("batch", pooled_width)))
        inputs.append(TensorSpec("time_ids", "float32", ("batch", SDXL_SIZE_IDS)))
    if has_cond:
        inputs.append(TensorSpec("timestep_cond", "float32", ("batch", config.time_cond_proj_dim)))
    # With --controlnet: the residuals of the ControlNets (summed) for the down blocks and the mid block.
    inputs.extend(unet_residual_inputs(loaded))
    return tuple(inputs)


def _unet(loaded: LoadedPipeline) -> ExportableComponent:
    import torch

    from lcm_export.runtime.specs import MID_BLOCK_RESIDUAL

    unet = loaded.module("unet")
    config = unet.config
    cfg = 2 if loaded.guidance == "cfg" else 1
    sdxl = loaded.family == "sdxl"
    inputs = unet_inputs(loaded)
    names = [tensor.name for tensor in inputs]
    residual_names = [tensor.name for tensor in unet_residual_inputs(loaded)]

    class UNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, *conditioning):
            extra = dict(zip(names[3:], conditioning, strict=True))
            added = {"text_embeds": extra["text_embeds"], "time_ids": extra["time_ids"]} if sdxl else None
            residuals = {}
            if residual_names:  # the residual U-Net (--controlnet)
                residuals = {
                    "down_block_additional_residuals": tuple(extra[name] for name in residual_names[:-1]),
                    "mid_block_additional_residual": extra[MID_BLOCK_RESIDUAL],
                }
            output = self.unet(
                sample,
                timestep,
                encoder_hidden_states,
                timestep_cond=extra.get("timestep_cond"),
                added_cond_kwargs=added,
                return_dict=False,
                **residuals,
            )[0]
            return (output,)  # (B, C, h, w)

    # torch.export binds inputs to the forward's signature: name every input (no *args), as the spec orders them.
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names]
    UNet.forward.__signature__ = inspect.Signature(parameters)

    spec = ComponentSpec(
        name="unet",
        inputs=tuple(inputs),
        outputs=(TensorSpec("out_sample", "float32", ("batch", config.out_channels, "latent_height", "latent_width")),),
        batch_multiplier=cfg,
    )
    return ExportableComponent(spec, UNet().eval(), atol=1e-4)


def vae_overflows_in_fp16(vae: Any) -> bool:
    """diffusers' rule for running a VAE in fp16: its config's ``force_upcast``.

    diffusers' pipelines decode (and encode) in fp32 when the VAE's config sets ``force_upcast``: SD and SDXL
    AutoencoderKLs do (it is AutoencoderKL's default, also where a config has no such key), since SDXL's
    overflows in fp16 (NaN, black images). fp16-fixed VAEs (madebyollin/sdxl-vae-fp16-fix) and TAESD
    (AutoencoderTiny's default) set it false and run in fp16. An fp16 export follows the same rule.
    """
    return bool(getattr(vae.config, "force_upcast", True))


def _decoder(vae: Any) -> ExportableComponent:
    """A VAE's decoder under optimum's names, ``latent_sample`` -> ``sample`` (B, 3, H, W) in [-1, 1].

    Serves AutoencoderKL and AutoencoderTiny alike: both ``decode`` to [-1, 1], so the runtime post-processes
    them the same way. Kept fp32 in an fp16 export where the VAE's config says so (:func:`vae_overflows_in_fp16`).
    """
    import torch

    class VaeDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.vae.decode(latent_sample, return_dict=False)[0],)  # (B, 3, H, W) in [-1, 1]

    latent = vae.config.latent_channels
    spec = ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent_sample", "float32", ("batch", latent, "latent_height", "latent_width")),),
        outputs=(TensorSpec("sample", "float32", ("batch", vae.config.out_channels, "image_height", "image_width")),),
    )
    return ExportableComponent(spec, VaeDecoder().eval(), atol=3e-4, keep_fp32=vae_overflows_in_fp16(vae))


def _vae_decoder(loaded: LoadedPipeline) -> ExportableComponent:
    """The AutoencoderKL decoder: the pipeline's, or the ``--vae`` one's (``module("vae")`` loads either)."""
    return _decoder(loaded.module("vae"))


def _vae_encoder(loaded: LoadedPipeline) -> ExportableComponent:
    import torch

    vae = loaded.module("vae")

    class VaeEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor]:
            # Mean and log-variance of the latent distribution, concatenated on channels: (B, 2C, h, w).
            return (self.vae.encode(sample, return_dict=False)[0].parameters,)

    latent = vae.config.latent_channels
    spec = ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("sample", "float32", ("batch", vae.config.in_channels, "image_height", "image_width")),),
        outputs=(TensorSpec("latent_parameters", "float32", ("batch", 2 * latent, "latent_height", "latent_width")),),
    )
    return ExportableComponent(spec, VaeEncoder().eval(), atol=3e-4, keep_fp32=vae_overflows_in_fp16(vae))


def _tiny_vae_decoder(loaded: LoadedPipeline) -> ExportableComponent:
    """The AutoencoderTiny (TAESD) decoder under the VAE decoder's names.

    ``AutoencoderTiny.decode`` soft-clamps the latents (``tanh(x / 3) * 3``) and returns the image in [-1, 1]
    like AutoencoderKL's. TAESD is fp16-safe (its config's ``force_upcast`` is false).
    """
    return _decoder(loaded.tiny_vae)


def _tiny_vae_encoder(loaded: LoadedPipeline) -> ExportableComponent:
    """The AutoencoderTiny encoder: ``sample`` in [-1, 1] -> ``latents`` (B, C, h, w), deterministic.

    TAESD's encoder gives latents, not a distribution, so the output is named after diffusers'
    ``AutoencoderTinyOutput.latents`` rather than the KL encoder's ``latent_parameters``; multiplied by the
    manifest's ``vae_scaling_factor`` they are U-Net latents, as in diffusers' img2img with ``vae=AutoencoderTiny``.
    """
    import torch

    tiny = loaded.tiny_vae

    class TinyVaeEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = tiny

        def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.vae.encode(sample, return_dict=False)[0],)  # (B, C, h, w)

    latent = tiny.config.latent_channels
    spec = ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("sample", "float32", ("batch", tiny.config.in_channels, "image_height", "image_width")),),
        outputs=(TensorSpec("latents", "float32", ("batch", latent, "latent_height", "latent_width")),),
    )
    return ExportableComponent(spec, TinyVaeEncoder().eval(), atol=3e-4, keep_fp32=vae_overflows_in_fp16(tiny))


COMPONENT_BUILDERS = {
    "text_encoder": _text_encoder,
    "text_encoder_2": _text_encoder_2,
    "unet": _unet,
    "vae_decoder": _vae_decoder,
    "vae_encoder": _vae_encoder,
}
# With --tiny-vae, the AutoencoderTiny's decoder and encoder replace the pipeline VAE's.
TINY_VAE_BUILDERS = {
    "vae_decoder": _tiny_vae_decoder,
    "vae_encoder": _tiny_vae_encoder,
}


# The pipeline module whose weights each component runs (the VAE's decoder and encoder share one).
COMPONENT_MODULES = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}


def pipeline_module_of(loaded: LoadedPipeline, name: str) -> str | None:
    """The pipeline module component ``name`` runs, or None where it runs the ``--tiny-vae`` AutoencoderTiny or a
    ControlNet (loaded from its own folder when its component is built, freed with it)."""
    if (loaded.tiny_vae is not None and name in TINY_VAE_BUILDERS) or CONTROLNET_COMPONENT.fullmatch(name):
        return None
    return COMPONENT_MODULES[name]


def build_components(loaded: LoadedPipeline, names: list[str]) -> dict[str, ExportableComponent]:
    """The exportable components of ``loaded``, in ``names`` order (their modules' weights loaded)."""
    builders = COMPONENT_BUILDERS if loaded.tiny_vae is None else {**COMPONENT_BUILDERS, **TINY_VAE_BUILDERS}
    return {
        name: _controlnet(loaded, name) if CONTROLNET_COMPONENT.fullmatch(name) else builders[name](loaded)
        for name in names
    }


def _controlnet(loaded: LoadedPipeline, name: str) -> ExportableComponent:
    """A ControlNet of ``--controlnet`` (:mod:`lcm_export.exporter.controlnet`): the U-Net's inputs and the control
    image in, the residuals out."""
    spec, module = controlnet_module(loaded, name, unet_inputs(loaded))
    return ExportableComponent(spec, module, atol=1e-4)
