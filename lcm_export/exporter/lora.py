"""Fuse LoRAs (LCM-LoRA and style LoRAs) into a loaded pipeline before it is exported.

LCM-LoRA turns a base Stable Diffusion checkpoint into a few-step model: θ = θ_base + Σ λ_i·τ_i. The exported
U-Net (and text encoder, for LoRAs that touch it) must hold exactly the weights diffusers gives with
``load_lora_weights`` per adapter, ``set_adapters(names, adapter_weights)`` and ``fuse_lora()``, so that is what
:func:`fuse_loras` runs; the peft layers are then removed (``unload_lora_weights`` keeps the fused weights) so the
exported modules are the plain diffusers/transformers ones.

diffusers only *warns* about LoRA layers it cannot place (and drops them), and fails deep inside peft with a
size mismatch on a LoRA made for another model. Both are checked here first against the pipeline's own modules,
so a wrong LoRA is a one-line :class:`ExportError` naming it, before any export work.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcm_export.errors import ExportError
from lcm_export.runtime.manifest import sha256_file

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")  # diffusers' test for a kohya-ss file
# What diffusers' LoRA loader mixins load LoRAs into (SD: the first two; SDXL: all three), in this order.
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# Cross-attention width -> the model family it belongs to, to name the architecture a LoRA was made for.
CROSS_ATTENTION_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
SDXL_ONLY_COMPONENTS = ("text_encoder_2",)


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module as the LoRA file describes it: down (A) and up (B) matrix shapes."""

    component: str  # "unet", "text_encoder", "text_encoder_2", or a prefix this pipeline does not have
    module: str  # module path inside the component, as peft will look it up
    down_shape: tuple[int, ...] | None  # A: (r, in) for Linear, (r, in, kh, kw) for Conv2d
    up_shape: tuple[int, ...] | None  # B: (out, r) or (out, r, 1, 1)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA resolved to a local safetensors file and parsed into layers (diffusers' naming)."""

    source: str
    weight: float
    path: Path
    format: str  # "diffusers" or "kohya"
    layers: tuple[LoraLayer, ...]

    def label(self) -> str:
        return f"--lora '{self.source}'"


# -- resolving a source to a file -------------------------------------------------------------------------------


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name`` or ``owner/name/path/in/repo.safetensors``, and nothing that reads as a local path."""
    if source.startswith((".", "/", "~", "\\")) or "\\" in source:
        return False
    parts = source.split("/")
    if any(not part for part in parts):
        return False
    if len(parts) == 2:
        return not source.endswith(".safetensors")
    return len(parts) > 2 and source.endswith(".safetensors")


def _file_in_folder(source: str, folder: Path) -> Path:
    """The LoRA file inside a folder: diffusers' ``pytorch_lora_weights.safetensors`` or the only .safetensors."""
    if (folder / LORA_FILE_NAME).is_file():
        return folder / LORA_FILE_NAME
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ExportError(f"--lora '{source}' is a folder with no .safetensors file: pass the LoRA file itself")
    names = ", ".join(path.name for path in candidates[:4])
    raise ExportError(f"--lora '{source}' is a folder with several .safetensors files ({names}): pass one of them")


def _download_from_hub(source: str) -> Path:
    """Fetch a LoRA from the Hugging Face hub (where a network exists); every failure is one user-facing line."""
    parts = source.split("/")
    repo_id = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or None
    try:
        from huggingface_hub import hf_hub_download, list_repo_files
        from huggingface_hub.errors import RemoteEntryNotFoundError

        if filename is not None:
            return Path(hf_hub_download(repo_id, filename))
        try:
            return Path(hf_hub_download(repo_id, LORA_FILE_NAME))
        except RemoteEntryNotFoundError:
            candidates = [name for name in list_repo_files(repo_id) if name.endswith(".safetensors")]
            if len(candidates) != 1:
                found = ", ".join(candidates[:4]) or "none"
                raise ExportError(
                    f"--lora '{source}': the hub repo has no single LoRA .safetensors file (found: {found}): "
                    f"pass {repo_id}/<file>.safetensors"
                ) from None
            return Path(hf_hub_download(repo_id, candidates[0]))
    except ExportError:
        raise
    except Exception as error:  # network, auth, missing repo or file: all user-facing
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(
            f"--lora '{source}' is not a local file and could not be downloaded from the hub ({reason}): "
            "download the .safetensors file where a network exists and pass its path"
        ) from None


def resolve_lora_file(source: str) -> Path:
    """A local safetensors file for ``source``: a file, a folder holding one, or a hub id (downloaded)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _file_in_folder(source, path)
    if _looks_like_hub_id(source):
        return _download_from_hub(source)
    raise ExportError(
        f"--lora '{source}': file not found: pass a LoRA .safetensors file, a folder holding one, "
        "or a hub id (owner/name)"
    )


# -- reading a file --------------------------------------------------------------------------------------------


def _read_safetensors(source: str, path: Path) -> dict[str, Any]:
    """All tensors of a safetensors file; anything else (a pickled .bin/.ckpt, a text file) is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(
            f"--lora '{source}': '{path.name}' is not a safetensors file ({reason}): pass a LoRA saved as "
            ".safetensors (pickled .bin/.ckpt/.pt LoRAs are not loaded)"
        ) from None
    if not tensors:
        raise ExportError(f"--lora '{source}': '{path.name}' holds no tensors: pass a LoRA .safetensors file")
    return tensors


def file_format(keys: Iterable[str]) -> str:
    """``kohya`` when every key is a kohya-ss layer name (diffusers' own test), else ``diffusers``."""
    return "kohya" if all(key.startswith(KOHYA_PREFIXES) for key in keys) else "diffusers"


def _diffusers_state_dict(source: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """The LoRA in diffusers' naming (``unet.…`` / ``text_encoder.…``), converted by diffusers itself.

    The loader mixin is imported rather than ``StableDiffusionPipeline``: that import pulls in transformers'
    image processors (and their warnings) and this runs before the model is loaded.
    """
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    if not any("lora" in key for key in tensors):
        examples = ", ".join(sorted(tensors)[:2])
        raise ExportError(
            f"--lora '{source}' holds no LoRA layers (keys like {examples}): pass a LoRA file, not a model checkpoint"
        )
    try:
        state_dict, _alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(tensors))
    except (ValueError, KeyError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"--lora '{source}' is not a LoRA format diffusers can read ({reason})") from None
    foreign = sorted(key for key in state_dict if "lora" not in key)
    if foreign:  # load_lora_weights refuses such a file; say so before the model is loaded
        raise ExportError(
            f"--lora '{source}' mixes LoRA layers with {len(foreign)} other tensors (e.g. {foreign[0]}): "
            "pass a file that holds only LoRA layers"
        )
    return state_dict


def _peft_names(component: str, state_dict: dict[str, Any], text_model_prefixed: frozenset[str]) -> dict[str, Any]:
    """Rename one component's keys the way diffusers does before handing them to peft (``….lora_A.weight``)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if not state_dict:
        return state_dict
    if component == "unet":
        first_key = next(iter(state_dict))  # diffusers decides on the first key too
        return state_dict if "lora_A" in first_key else convert_unet_state_dict_to_peft(state_dict)
    if component in ("text_encoder", "text_encoder_2"):
        converted = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
        if component not in text_model_prefixed:  # CLIPTextModel is flattened in recent transformers
            converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
        return converted
    return state_dict


def _refuse_mixed_naming(source: str, component: str, named: dict[str, Any]) -> None:
    """A U-Net LoRA mixing peft's ``lora_A``/``lora_B`` with the older ``lora.down``/``lora.up`` names.

    diffusers renames the older style only when the *first* key uses it; otherwise it silently skips those
    layers. The renaming was mirrored in :func:`_peft_names`, so older-style names left here would be skipped.
    """
    skipped = sorted(key for key in named if any(marker in key for marker in ("lora.down.", "lora.up.")))
    if component == "unet" and skipped and len(skipped) < len(named):
        raise ExportError(
            f"--lora '{source}' mixes LoRA naming styles (lora_A/lora_B and lora.down/lora.up): diffusers would "
            f"skip {len(skipped)} of its {len(named)} tensors (e.g. {skipped[0]}): re-save it in one style"
        )


def _layers(state_dict: dict[str, Any], source: str, text_model_prefixed: frozenset[str]) -> tuple[LoraLayer, ...]:
    """Group a diffusers-named LoRA state dict into adapted modules with their A/B shapes."""
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        groups.setdefault(component, {})[rest] = tensor
    layers: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    for component, group in groups.items():
        try:
            named = _peft_names(component, group, text_model_prefixed)
        except ValueError:
            # diffusers recognises none of these names (it would fail on them): keep them as they are, so they
            # are reported as modules this pipeline lacks
            named = group
        _refuse_mixed_naming(source, component, named)
        for key, tensor in named.items():
            if key.endswith(".alpha"):
                continue
            for role in ("lora_A", "lora_B", "lora_magnitude_vector"):
                module, marker, parameter = key.partition(f".{role}")
                if marker and parameter in ("", ".weight", ".bias"):
                    shapes = layers.setdefault((component, module), {})
                    if parameter == ".weight" and role != "lora_magnitude_vector":
                        shapes[role] = tuple(tensor.shape)
                    break
            else:
                # not a LoRA matrix diffusers knows how to place: reported as a module this pipeline lacks
                module = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
                layers.setdefault((component, module), {})
    return tuple(
        LoraLayer(component, module, shapes.get("lora_A"), shapes.get("lora_B"))
        for (component, module), shapes in sorted(layers.items())
    )


def read_lora(lora: Any, text_model_prefixed: frozenset[str] = frozenset()) -> LoraFile:
    """Resolve, read and parse one :class:`LoraSource`; raises :class:`ExportError` on anything unusable.

    ``text_model_prefixed``: the text encoders whose modules sit under ``text_model.`` (recent transformers
    flattens ``CLIPTextModel`` but not ``CLIPTextModelWithProjection``, SDXL's second encoder).
    """
    path = resolve_lora_file(lora.source)
    tensors = _read_safetensors(lora.source, path)
    state_dict = _diffusers_state_dict(lora.source, tensors)
    parsed = LoraFile(
        lora.source,
        float(lora.weight),
        path,
        file_format(tensors),
        _layers(state_dict, lora.source, text_model_prefixed),
    )
    if not parsed.layers:
        raise ExportError(f"--lora '{lora.source}' holds no LoRA layers: pass a LoRA file, not a model checkpoint")
    return parsed


def check_lora_sources(loras: Iterable[Any]) -> None:
    """Check every ``--lora`` before the model is loaded: it exists (or downloads), is a readable LoRA file."""
    for lora in loras:
        if isinstance(lora.weight, bool) or not isinstance(lora.weight, (int, float)) or not math.isfinite(lora.weight):
            raise ExportError(f"--lora '{lora.source}': weight {lora.weight!r} is not a finite number: pass e.g. :0.5")
        read_lora(lora)


# -- matching a LoRA against the pipeline ------------------------------------------------------------------------


def _module_dims(module: Any) -> tuple[int, int, tuple[int, ...]] | None:
    """(in, out, kernel) of a Linear or Conv2d module; None for modules whose shapes are not checked here."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features, ()
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels, tuple(module.kernel_size)
    return None


def _shape_mismatch(layer: LoraLayer, module: Any) -> str | None:
    """Why ``layer`` cannot be added to ``module`` (its in/out widths differ), or None when it fits."""
    dims = _module_dims(module)
    if dims is None or layer.down_shape is None or layer.up_shape is None:
        return None
    model_in, model_out, kernel = dims
    lora_in, lora_out = layer.down_shape[1], layer.up_shape[0]
    lora_kernel = tuple(layer.down_shape[2:])
    if (lora_in, lora_out) == (model_in, model_out) and (not lora_kernel or lora_kernel == kernel):
        return None
    return f"{layer.component} '{layer.module}' is {lora_in}->{lora_out} in the LoRA, {model_in}->{model_out} here"


def lora_components(pipeline: Any) -> tuple[str, ...]:
    """The components of ``pipeline`` LoRAs are fused into (SDXL has a second text encoder)."""
    return tuple(component for component in LORA_COMPONENTS if getattr(pipeline, component, None) is not None)


def _family_hint(lora: LoraFile, mismatched: list[LoraLayer], pipeline: Any) -> str | None:
    """The model family a LoRA was made for, read from its cross-attention width or its components."""
    is_sdxl = getattr(pipeline, "text_encoder_2", None) is not None
    if not is_sdxl and any(
        layer.component in SDXL_ONLY_COMPONENTS or "add_embedding" in layer.module for layer in lora.layers
    ):
        return "made for SDXL (it adapts text_encoder_2 / add_embedding)"
    model_width = int(pipeline.unet.config.cross_attention_dim)
    for layer in mismatched:
        if layer.component == "unet" and layer.module.endswith(("attn2.to_k", "attn2.to_v")) and layer.down_shape:
            width = layer.down_shape[1]
            family = CROSS_ATTENTION_FAMILIES.get(width, "another model")
            return f"made for {family}: cross-attention width {width}, this model's is {model_width}"
    return None


def match_lora(lora: LoraFile, pipeline: Any) -> dict[str, int]:
    """Check every layer of ``lora`` against the pipeline's modules; returns adapted layers per component.

    A LoRA none of whose layers names a module of this pipeline, and a LoRA some of whose layers name missing
    modules or have other widths (a LoRA for another architecture) are refused: diffusers would drop the former
    with a warning and fail on the latter deep inside peft.
    """
    modules = {component: dict(getattr(pipeline, component).named_modules()) for component in lora_components(pipeline)}
    missing: list[LoraLayer] = []
    mismatched: list[tuple[LoraLayer, str]] = []
    counts: dict[str, int] = {}
    for layer in lora.layers:
        module = modules.get(layer.component, {}).get(layer.module) if layer.module else None
        if module is None:
            missing.append(layer)
            continue
        reason = _shape_mismatch(layer, module)
        if reason is not None:
            mismatched.append((layer, reason))
            continue
        counts[layer.component] = counts.get(layer.component, 0) + 1
    total = len(lora.layers)
    if not missing and not mismatched:
        return counts
    # cross-attention layers first: their input width names the text encoder the LoRA was trained with
    mismatched.sort(key=lambda item: not item[0].module.endswith(("attn2.to_k", "attn2.to_v")))
    example = missing[0] if missing else mismatched[0][0]
    if not counts and not mismatched:
        raise ExportError(
            f"{lora.label()}: none of its {total} layers matches a module of this pipeline "
            f"(e.g. {example.component} '{example.module}'): pass a LoRA made for this base model "
            "(Stable Diffusion U-Net / CLIP text encoder layer names)"
        )
    hint = _family_hint(lora, [layer for layer, _ in mismatched], pipeline)
    details = [hint] if hint else []
    if mismatched:
        details.append(f"{len(mismatched)} of {total} layers have other shapes, e.g. {mismatched[0][1]}")
    if missing:
        details.append(
            f"{len(missing)} of {total} layers name modules this model lacks, "
            f"e.g. {missing[0].component} '{missing[0].module}'"
        )
    raise ExportError(
        f"{lora.label()}: this LoRA is for a different architecture ({'; '.join(details)}): "
        "pass a LoRA made for this base model (e.g. latent-consistency/lcm-lora-sdv1-5 for SD 1.5)"
    )


# -- fusing ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_library_logs() -> Iterator[None]:
    """Silence diffusers', transformers' and peft's per-adapter chatter (missing-key reports, "no text encoder
    keys", "multiple adapters", a progress bar per adapter): every layer is checked here instead, and failures
    become one-line errors. Levels are restored afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    progress_bars = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if progress_bars:
            transformers_logging.enable_progress_bar()


def _adapted_layers(model: Any, adapter_name: str) -> int:
    """How many modules of ``model`` carry peft LoRA layers for ``adapter_name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(
        1
        for module in model.modules()
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_A", {})
    )


def _peft_layers_left(pipeline: Any) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(
        isinstance(module, BaseTunerLayer)
        for component in lora_components(pipeline)
        for module in getattr(pipeline, component).modules()
    )


def fuse_loras(loaded: Any, loras: Iterable[Any]) -> list[dict[str, Any]]:
    """Fuse ``loras`` into ``loaded.pipeline`` in place, as diffusers does; returns the manifest records.

    Every LoRA is read and matched against the pipeline before the pipeline is touched; then
    diffusers loads each as its own adapter, ``set_adapters`` gives each its weight, ``fuse_lora`` adds
    Σ weight·(alpha/r)·B·A into the U-Net and text encoder, and ``unload_lora_weights`` removes the peft wrappers
    while keeping the fused weights, so the modules exported afterwards are plain torch modules.
    """
    pipeline = loaded.pipeline
    if not hasattr(pipeline, "load_lora_weights"):
        raise ExportError(f"MODEL '{loaded.source}' ({type(pipeline).__name__}) does not take LoRAs in diffusers")
    text_model_prefixed = frozenset(
        component
        for component in lora_components(pipeline)
        if component.startswith("text_encoder") and hasattr(getattr(pipeline, component), "text_model")
    )
    parsed = [read_lora(lora, text_model_prefixed) for lora in loras]
    counts = [match_lora(lora, pipeline) for lora in parsed]  # names and shapes: the skeletons tell them
    for component in lora_components(pipeline):
        loaded.module(component)  # the weights the LoRAs are fused into, loaded once every LoRA matched

    adapter_names = [f"lora_{index}" for index in range(len(parsed))]
    with _quiet_library_logs():
        for lora, name, expected in zip(parsed, adapter_names, counts, strict=True):
            try:
                pipeline.load_lora_weights(str(lora.path), adapter_name=name)
            except (ValueError, RuntimeError, KeyError, OSError) as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ExportError(f"{lora.label()} could not be loaded by diffusers: {reason}") from None
            for component, count in expected.items():
                placed = _adapted_layers(getattr(pipeline, component), name)
                if placed < count:
                    raise ExportError(
                        f"{lora.label()}: diffusers placed {placed} of its {count} {component} layers: "
                        "the file's layer names are not ones diffusers maps onto this model"
                    )
        pipeline.set_adapters(adapter_names, adapter_weights=[lora.weight for lora in parsed])
        pipeline.fuse_lora(components=list(lora_components(pipeline)))
        pipeline.unload_lora_weights()
    if _peft_layers_left(pipeline):  # a diffusers/peft change would otherwise export peft wrappers
        raise RuntimeError("peft LoRA layers are left in the pipeline after unload_lora_weights()")
    for component in lora_components(pipeline):
        getattr(pipeline, component).eval().requires_grad_(False)

    records = []
    for lora, expected in zip(parsed, counts, strict=True):
        ranks = sorted({layer.down_shape[0] for layer in lora.layers if layer.down_shape})
        records.append(
            {
                "source": lora.source,
                "weight": lora.weight,
                "file": lora.path.name,
                "sha256": sha256_file(lora.path),
                "size_bytes": lora.path.stat().st_size,
                "format": lora.format,
                "modules": [component for component in LORA_COMPONENTS if expected.get(component)],
                "layers": {component: expected[component] for component in LORA_COMPONENTS if component in expected},
                "ranks": ranks,
            }
        )
    return records
