"""``lcm-export adapter LORA --bundle BUNDLE --output FILE``: a LoRA as a small adapter file for one bundle.

The runtime applies it between calls without re-export (:mod:`lcm_export.runtime.adapters`). The LoRA is read
the way the export fuses one (:mod:`lcm_export.exporter.lora`: the formats diffusers loads, matched against the
model's modules first, so a LoRA for another model is a one-line error), here into weightless copies of the
bundle's own U-Net and text encoders built from the configs the bundle carries: diffusers' ``load_lora_weights``
places it and peft gives each layer's factors and alpha/r, exactly what ``fuse_lora`` would add. Each layer is
then keyed by the bundle's ONNX initializer name through the component's weight map, and the file is tied to the
bundle by the weight maps' sha256.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.errors import ExportError
from lcm_export.exporter.bundle import LoraSource
from lcm_export.exporter.loading import module_skeleton
from lcm_export.exporter.lora import (
    LORA_COMPONENTS,
    _quiet_library_logs,
    lora_components,
    match_lora,
    read_lora,
)
from lcm_export.runtime.adapters import ADAPTER_FORMAT, ADAPTER_VERSION, AdapterError, read_weight_map
from lcm_export.runtime.manifest import load_manifest, sha256_file

ADAPTER_NAME = "adapter"  # the peft adapter name the LoRA is loaded under


def _skeleton_pipeline(bundle_dir: Path, family: str) -> Any:
    """A diffusers pipeline holding the bundle's U-Net and text encoders, built from their configs with
    uninitialised CPU weights (never read: only the LoRA's own tensors are), so ``load_lora_weights`` runs."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = json.loads((bundle_dir / "model_index.json").read_text())
    modules = {
        name: module_skeleton(bundle_dir / name, index[name]).to_empty(device="cpu")
        for name in LORA_COMPONENTS
        if (bundle_dir / name / "config.json").is_file() and name in index
    }
    common = {"vae": None, "tokenizer": None, "scheduler": None}
    if family == "sdxl":
        return StableDiffusionXLPipeline(**common, tokenizer_2=None, **modules)
    return StableDiffusionPipeline(
        **common, **modules, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _layer_factors(layer: Any, label: str, module: str) -> tuple[np.ndarray, np.ndarray]:
    """(down (r, in·kh·kw), up (out, r) · alpha/r) of one peft LoRA layer, float32, in torch's layout."""
    if getattr(layer, "use_dora", {}).get(ADAPTER_NAME, False):
        raise ExportError(f"{label}: layer '{module}' is a DoRA layer, which run-time adapters do not apply: fuse it")
    down = layer.lora_A[ADAPTER_NAME].weight.detach().float()
    up = layer.lora_B[ADAPTER_NAME].weight.detach().float() * float(layer.scaling[ADAPTER_NAME])
    if getattr(layer.lora_B[ADAPTER_NAME], "bias", None) is not None:
        raise ExportError(f"{label}: layer '{module}' has a LoRA bias, which run-time adapters do not apply: fuse it")
    rank = down.shape[0]
    return down.reshape(rank, -1).numpy().copy(), up.reshape(up.shape[0], rank).numpy().copy()


def make_adapter(lora: LoraSource, bundle_dir: Path, output: Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the adapter file for ``lora`` and the bundle at ``bundle_dir`` to ``output``; returns a summary
    (layers per component, ranks, sizes). Every refusal is one :class:`ExportError` line; nothing is written then."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.numpy import save_file

    label = f"LORA '{lora.source}'"
    if output.exists() and not overwrite:
        raise ExportError(f"--output '{output}' already exists: pass --overwrite or another file")
    if output.is_dir():
        raise ExportError(f"--output '{output}' is a folder: pass a file path (e.g. style.safetensors)")
    manifest = load_manifest(bundle_dir)
    try:
        present = [name for name in LORA_COMPONENTS if name in manifest.components]
        maps = {name: read_weight_map(bundle_dir, manifest, name) for name in present}
    except AdapterError as error:
        raise ExportError(str(error)) from None
    weight_maps = {name: found for name, found in maps.items() if found is not None}
    if not weight_maps:
        raise ExportError(
            f"--bundle '{bundle_dir}' has no weight maps (exported before run-time adapters, or a target that keeps "
            "none): re-export it with this lcm-export"
        )
    pipeline = _skeleton_pipeline(bundle_dir, manifest.pipeline.family)
    text_model_prefixed = frozenset(
        name
        for name in lora_components(pipeline)
        if name.startswith("text_encoder") and hasattr(getattr(pipeline, name), "text_model")
    )
    parsed = read_lora(lora, text_model_prefixed)
    counts = match_lora(parsed, pipeline)  # names and shapes against the bundle's own modules
    with _quiet_library_logs():
        try:
            pipeline.load_lora_weights(str(parsed.path), adapter_name=ADAPTER_NAME)
        except (ValueError, RuntimeError, KeyError, OSError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"{label} could not be loaded by diffusers: {reason}") from None

    tensors: dict[str, np.ndarray] = {}
    unmapped: list[str] = []
    placed: dict[str, int] = {}
    ranks: set[int] = set()
    for component in lora_components(pipeline):
        weight_map = weight_maps.get(component)
        by_module = {entry.module: name for name, entry in weight_map.weights.items()} if weight_map else {}
        for module, layer in getattr(pipeline, component).named_modules():
            if not isinstance(layer, BaseTunerLayer) or ADAPTER_NAME not in getattr(layer, "lora_A", {}):
                continue
            initializer = by_module.get(module)
            if initializer is None:
                unmapped.append(f"{component} '{module}'")
                continue
            down, up = _layer_factors(layer, label, module)
            ranks.add(down.shape[0])
            tensors[f"{component}/{initializer}.down"] = down
            tensors[f"{component}/{initializer}.up"] = up
            placed[component] = placed.get(component, 0) + 1
    total = sum(counts.values())
    if unmapped:
        raise ExportError(
            f"{label}: {total - len(unmapped)} of its {total} layers match weights of BUNDLE '{bundle_dir}'; "
            f"{len(unmapped)} adapt modules the bundle has no weight for (e.g. {unmapped[0]}): fuse this LoRA at "
            "export instead (lcm-export MODEL --lora FILE)"
        )
    if not tensors:
        raise ExportError(f"{label}: none of its {len(parsed.layers)} layers matches a weight of this bundle")
    metadata = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "bundle": json.dumps({component: weight_maps[component].sha256 for component in sorted(placed)}),
        "source": lora.source,
        "lora_sha256": sha256_file(parsed.path),
        "lora_format": parsed.format,
        "layers": json.dumps(placed),
        "ranks": json.dumps(sorted(ranks)),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    os.close(handle)
    try:
        save_file(tensors, scratch, metadata=metadata)
        os.replace(scratch, output)
    finally:
        Path(scratch).unlink(missing_ok=True)
    return {"layers": placed, "ranks": sorted(ranks), "size_bytes": output.stat().st_size}
