"""Load a diffusers pipeline from a folder (or a hub id) and classify it.

What the exporter needs to know about a pipeline is gathered once into :class:`LoadedPipeline`: the torch
modules, the guidance mode (LCM's w-embedding or classifier-free guidance), the VAE's scale factor and scaling
factor read from the model, never assumed.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcm_export.errors import ExportError

BUILTIN_MODELS = {
    "builtin:tiny-lcm": "lcm",
    "builtin:tiny-sd": "sd",
}


@dataclass
class LoadedPipeline:
    """A loaded pipeline and the facts about it the export needs."""

    source: str  # what the user passed
    path: Path  # the folder it was loaded from
    pipeline: Any  # diffusers pipeline (fp32, eval mode)
    family: str  # "sd" (SD 1.x/2.x-shaped U-Net); "sdxl" would add text_encoder_2, text_embeds and time_ids
    guidance: str  # "embedding" (distilled LCM, timestep_cond) or "cfg" (base SD + LCM-LoRA)
    vae_scale_factor: int
    vae_scaling_factor: float
    vae_shift_factor: float | None
    spatial_multiple: int  # height/width must be a multiple of this (VAE x U-Net down-sampling)

    @property
    def unet(self) -> Any:
        return self.pipeline.unet


def resolve_model_path(model: str) -> Path:
    """A local folder for ``model``: itself, a built-in tiny model, or a hub download (where a network exists)."""
    if model in BUILTIN_MODELS:
        from lcm_export.exporter.tiny import TinyPipelineConfig, build_tiny_pipeline

        folder = Path(tempfile.mkdtemp(prefix="lcm-export-tiny-"))
        return build_tiny_pipeline(folder, TinyPipelineConfig(kind=BUILTIN_MODELS[model]))
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"MODEL '{model}' is a file: pass a diffusers pipeline folder (with model_index.json)")
        if not (path / "model_index.json").is_file():
            raise ExportError(
                f"MODEL '{model}' is not a diffusers pipeline folder (no model_index.json): "
                "pass a folder written by save_pretrained, or a hub id"
            )
        return path
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ExportError(f"MODEL '{model}' does not exist: pass a diffusers pipeline folder or a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as error:  # network, auth or missing repo: all user-facing
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(
            f"MODEL '{model}' is not a local folder and could not be downloaded from the hub ({reason}): "
            "download it where a network exists and pass the folder"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"cannot read '{path}': {error}") from None


def inspect_model_folder(model: str, path: Path, has_loras: bool) -> None:
    """Check a pipeline folder before loading weights, so a wrong model fails in a second, not a minute."""
    index = _read_json(path / "model_index.json")
    if "text_encoder_2" in index:
        raise ExportError(
            f"MODEL '{model}' is an SDXL-style pipeline (text_encoder_2): only SD1.x/2.x-shaped LCM pipelines "
            "are exported by this version"
        )
    if "unet" not in index or not (path / "unet" / "config.json").is_file():
        raise ExportError(f"MODEL '{model}' has no U-Net (unet/config.json): only U-Net LCM pipelines are supported")
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        if part not in index or not (path / part).is_dir():
            raise ExportError(f"MODEL '{model}' has no '{part}' folder: it is not a complete text-to-image pipeline")
    unet_config = _read_json(path / "unet" / "config.json")
    if unet_config.get("_class_name") != "UNet2DConditionModel":
        raise ExportError(
            f"MODEL '{model}': U-Net class {unet_config.get('_class_name')!r} is not supported "
            "(expected UNet2DConditionModel)"
        )
    if unet_config.get("time_cond_proj_dim") is None and not has_loras:
        raise ExportError(
            f"MODEL '{model}' is not an LCM (its U-Net has no time_cond_proj_dim): pass an LCM pipeline, "
            "or a base Stable Diffusion pipeline with --lora pointing at an LCM-LoRA"
        )


def load_pipeline(model: str, *, has_loras: bool = False) -> LoadedPipeline:
    """Load ``model`` in fp32 on the CPU and classify it."""
    path = resolve_model_path(model)
    inspect_model_folder(model, path, has_loras)

    import torch
    from diffusers import DiffusionPipeline

    try:
        pipeline = DiffusionPipeline.from_pretrained(
            str(path), torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0]
        raise ExportError(f"MODEL '{model}' could not be loaded by diffusers: {reason}") from None
    for module_name in ("unet", "vae", "text_encoder"):
        getattr(pipeline, module_name).eval().requires_grad_(False)

    unet_config = pipeline.unet.config
    vae_config = pipeline.vae.config
    vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)
    unet_down_factor = 2 ** (len(unet_config.down_block_types) - 1)
    shift = getattr(vae_config, "shift_factor", None)
    return LoadedPipeline(
        source=model,
        path=path,
        pipeline=pipeline,
        family="sd",
        guidance="embedding" if unet_config.time_cond_proj_dim is not None else "cfg",
        vae_scale_factor=vae_scale_factor,
        vae_scaling_factor=float(vae_config.scaling_factor),
        vae_shift_factor=float(shift) if shift is not None else None,
        spatial_multiple=vae_scale_factor * unet_down_factor,
    )
