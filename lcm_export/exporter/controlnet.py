"""ControlNet at export: ``--controlnet CN[:SCALE]`` (repeatable), loaded, checked against the model, exported.

Each ControlNet becomes a component of its own (``controlnet``, ``controlnet_1``, ..: diffusers'
``MultiControlNetModel`` folders) whose spec is :func:`lcm_export.runtime.specs.controlnet_spec`, and the bundle's
U-Net takes their residuals as inputs (``down_block_residual_*``, ``mid_block_residual``: the residual U-Net). A
bundle exported without ``--controlnet`` keeps the plain U-Net. The conditioning scale is not in the graphs: the
runtime multiplies each ControlNet's residuals by it (as diffusers' ``ControlNetModel`` does in its forward), so
one export serves every scale and the guidance start/end window.

A ControlNet must fit the model: the same cross-attention size, the same family (SDXL's take the pooled text and
size ids), the U-Net's down blocks (its residuals are added to theirs) and a conditioning embedding that
down-samples by the VAE's scale factor (the control image is full size, the residuals latent size).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcm_export.errors import ExportError
from lcm_export.runtime.manifest import ControlNetInfo, ControlNetModelInfo, controlnet_component_name
from lcm_export.runtime.manifest.control import MAX_CONDITIONING_SCALE, MAX_CONTROLNETS
from lcm_export.runtime.specs import ComponentSpec, TensorSpec, control_residual_specs, controlnet_spec

CONTROLNET_CLASS = "ControlNetModel"


@dataclass(frozen=True)
class ControlNetSource:
    """One ``--controlnet``: a diffusers ``ControlNetModel`` folder or hub id, and its default conditioning scale."""

    source: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> ControlNetSource:
        """``CN`` or ``CN:SCALE`` (the scale after the last colon, where it is a number; a path may hold colons)."""
        head, _, tail = text.rpartition(":")
        if head:
            try:
                return cls(head, float(tail))
            except ValueError:
                pass
        return cls(text)


@dataclass(frozen=True)
class LoadedControlNet:
    """A ControlNet the export carries: where it is, its config, and its component name and default scale."""

    source: ControlNetSource
    path: Path
    config: dict[str, Any]
    component: str

    def load(self) -> Any:
        """The ``ControlNetModel`` with its weights, fp32, eval mode, no gradients."""
        import torch
        from diffusers import ControlNetModel

        try:
            model = ControlNetModel.from_pretrained(str(self.path), torch_dtype=torch.float32)
        except (OSError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ExportError(f"--controlnet '{self.source.source}' could not be loaded: {reason}") from None
        return model.eval().requires_grad_(False)


def check_controlnet_sources(sources: tuple[ControlNetSource, ...]) -> None:
    """Scales and counts, before anything is loaded."""
    if len(sources) > MAX_CONTROLNETS:
        raise ExportError(f"--controlnet given {len(sources)} times: pass at most {MAX_CONTROLNETS} ControlNets")
    for source in sources:
        if not math.isfinite(source.scale) or not 0 <= source.scale <= MAX_CONDITIONING_SCALE:
            raise ExportError(
                f"--controlnet '{source.source}:{source.scale:g}': the scale must be from 0 to "
                f"{MAX_CONDITIONING_SCALE:g} (diffusers' controlnet_conditioning_scale; 1.0 by default)"
            )


def _resolve(source: ControlNetSource) -> Path:
    """A local ControlNet folder (config.json naming ControlNetModel), or a hub download where a network exists."""
    from lcm_export.exporter.loading import snapshot_from_hub

    label = f"--controlnet '{source.source}'"
    path = Path(source.source).expanduser()
    if not path.exists():
        if source.source.count("/") != 1 or source.source.startswith((".", "/", "~")):
            raise ExportError(f"{label} does not exist: pass a diffusers ControlNetModel folder or a hub id")
        path = snapshot_from_hub(label, source.source, ["*.json", "*.safetensors"])
    if path.is_dir() and not (path / "config.json").is_file() and (path / "controlnet" / "config.json").is_file():
        path = path / "controlnet"  # a pipeline folder holding one ControlNet
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise ExportError(f"{label} is not a ControlNetModel folder (no config.json): pass one saved by diffusers")
    import json

    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"{label}: its config.json could not be read ({error})") from None
    if not isinstance(config, dict) or config.get("_class_name") != CONTROLNET_CLASS:
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise ExportError(f"{label} is a {found!r}, not a {CONTROLNET_CLASS}: pass a diffusers ControlNet folder")
    return path


def residual_layout(config: Any) -> tuple[tuple[int, int], ...]:
    """(channels, down-sampling factor) of each residual a U-Net's (or ControlNet's) down blocks give, in order:
    ``conv_in``, each block's resnets and its down-sampler (all but the last block), then the mid block."""
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    per_block = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    layout = [(channels[0], 1)]
    for index, width in enumerate(channels):
        layout += [(width, 2**index)] * per_block[index]
        if index < len(channels) - 1:
            layout.append((width, 2 ** (index + 1)))
    layout.append((channels[-1], 2 ** (len(channels) - 1)))
    return tuple(layout)


def _check_fits(label: str, config: dict[str, Any], unet: dict[str, Any], family: str, vae_scale_factor: int) -> None:
    """One line naming what does not fit: family, cross-attention size, latent channels, down blocks, image scale."""
    sdxl = family == "sdxl"
    if (config.get("addition_embed_type") == "text_time") != sdxl:
        made_for = "SDXL" if config.get("addition_embed_type") == "text_time" else "SD 1.x/2.x"
        model = "SDXL" if sdxl else "SD 1.x/2.x"
        raise ExportError(f"{label} is a ControlNet for {made_for}, but the model is {model}: pass one made for it")
    if config.get("cross_attention_dim") != unet.get("cross_attention_dim"):
        raise ExportError(
            f"{label} has cross-attention size {config.get('cross_attention_dim')}, the model's U-Net "
            f"{unet.get('cross_attention_dim')}: pass a ControlNet made for this model family"
        )
    if config.get("in_channels", 4) != unet.get("in_channels"):
        raise ExportError(
            f"{label} takes {config.get('in_channels')} latent channels, the model's U-Net {unet.get('in_channels')}"
        )
    if residual_layout(config) != residual_layout(unet):
        raise ExportError(
            f"{label} has down blocks of channels {list(config['block_out_channels'])} x {config['layers_per_block']}"
            f" layers, the model's U-Net {list(unet['block_out_channels'])} x {unet['layers_per_block']}: its "
            "residuals cannot be added; pass a ControlNet made for this model"
        )
    embedding = config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    factor = 2 ** (len(embedding) - 1)
    if factor != vae_scale_factor:
        raise ExportError(
            f"{label} down-samples its control image by {factor}, the model's VAE by {vae_scale_factor}: pass a "
            "ControlNet made for this model"
        )
    if config.get("global_pool_conditions"):
        raise ExportError(f"{label} pools its conditions (global_pool_conditions, a shuffle ControlNet): not supported")


def attach_controlnets(loaded: Any, sources: tuple[ControlNetSource, ...]) -> tuple[LoadedControlNet, ...]:
    """The ControlNets of ``sources`` checked against ``loaded`` (a :class:`LoadedPipeline`); weights load later,
    when each component is built."""
    unet = dict(loaded.unet.config)
    attached = []
    for index, source in enumerate(sources):
        path = _resolve(source)
        import json

        config = json.loads((path / "config.json").read_text())
        _check_fits(f"--controlnet '{source.source}'", config, unet, loaded.family, loaded.vae_scale_factor)
        attached.append(LoadedControlNet(source, path, config, controlnet_component_name(index)))
    return tuple(attached)


def unet_residual_inputs(loaded: Any) -> tuple[TensorSpec, ...]:
    """The residual inputs of the bundle's U-Net: none without ControlNets."""
    if not loaded.controlnets:
        return ()
    return control_residual_specs(residual_layout(dict(loaded.unet.config)))


def controlnet_module(loaded: Any, name: str, unet_spec_inputs: tuple[TensorSpec, ...]) -> tuple[ComponentSpec, Any]:
    """The ControlNet ``name``'s spec (from the U-Net's inputs) and a torch module taking its inputs in order."""
    import torch

    attached = next(control for control in loaded.controlnets if control.component == name)
    model = attached.load()
    sdxl = loaded.family == "sdxl"
    spec: ComponentSpec = controlnet_spec(
        name,
        unet_spec_inputs,
        int(attached.config.get("conditioning_channels", 3)),
        residual_layout(attached.config),
        2 if loaded.guidance == "cfg" else 1,
    )
    names = spec.input_names

    class ControlNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.controlnet = model

        def forward(self, sample, timestep, encoder_hidden_states, *rest):
            extra = dict(zip(names[3:], rest, strict=True))
            added = {"text_embeds": extra["text_embeds"], "time_ids": extra["time_ids"]} if sdxl else None
            down, mid = self.controlnet(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=extra["controlnet_cond"],
                conditioning_scale=1.0,
                added_cond_kwargs=added,
                return_dict=False,
            )
            return (*down, mid)

    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [inspect.Parameter(input_name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for input_name in names]
    ControlNet.forward.__signature__ = inspect.Signature(parameters)
    return spec, ControlNet().eval()


def controlnet_info(loaded: Any) -> ControlNetInfo | None:
    """The manifest's ``controlnet`` part for the ControlNets ``loaded`` carries (None without)."""
    if not loaded.controlnets:
        return None
    residuals = tuple(tensor.name for tensor in unet_residual_inputs(loaded))
    models = tuple(
        ControlNetModelInfo(control.component, control.source.scale, control.source.source)
        for control in loaded.controlnets
    )
    return ControlNetInfo(models, residuals)
