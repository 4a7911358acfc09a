"""Export a pipeline into a bundle folder, atomically.

Everything is written into a hidden staging folder beside the output; ``manifest.json`` is written last and the
folder is renamed into place only when every component was exported, checked against PyTorch and built for the
target. A failed or interrupted export leaves no folder that looks like a bundle.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import glob
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcm_export.calibration.prompts import CALIBRATION_PROMPTS
from lcm_export.errors import ExportError, is_disk_full
from lcm_export.exporter.components import build_components, penultimate_hidden_state_name, pipeline_module_of
from lcm_export.exporter.controlnet import (
    ControlNetSource,
    attach_controlnets,
    check_controlnet_sources,
    controlnet_info,
)
from lcm_export.exporter.ecosystem import TOKENIZER_LIBRARY_CLASS, write_tokenizer
from lcm_export.exporter.loading import (
    LoadedPipeline,
    attach_tiny_vae,
    attach_vae,
    check_vae_options,
    load_pipeline,
)
from lcm_export.exporter.lora import LORA_COMPONENTS
from lcm_export.exporter.onnx_export import (
    DEFAULT_OPSET,
    convert_to_fp16,
    export_to_onnx,
    pytorch_reference,
    repack_onnx,
    save_onnx,
    validate_onnx,
)
from lcm_export.exporter.schedule import guidance_frequencies, img2img_mode, lcm_scheduler_from, scheduler_info
from lcm_export.exporter.weight_map import float_weight_names, weight_fingerprints, write_weight_map
from lcm_export.runtime.manifest import (
    DEFAULT_GUIDANCE_SCALE,
    FORMAT_NAME,
    MANIFEST_NAME,
    Artifact,
    Component,
    Conditioning,
    Manifest,
    PipelineInfo,
    TextEncoderInfo,
    TokenizerInfo,
    file_entry,
)
from lcm_export.runtime.specs import ShapeRange
from lcm_export.targets import BuildRequest, get_target

DEFAULT_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
MAX_STEPS_LIMIT = 1000  # one schedule per step count up to the training timesteps; the model's own cap applies too
OPSETS = range(14, 21)  # scaled_dot_product_attention needs 14; torch's TorchScript exporter stops at 20


@dataclass(frozen=True)
class LoraSource:
    """One LoRA to fuse: a safetensors file or a hub id, and its weight λ."""

    source: str
    weight: float = 1.0


@dataclass(frozen=True)
class ExportConfig:
    """Everything one export needs; the CLI only builds this and calls :func:`export_bundle`."""

    model: str
    output: Path
    target: str = "onnx"
    precision: str | None = None  # None: the target's default (fp32 for ONNX, fp16 for engines and Core ML)
    loras: tuple[LoraSource, ...] = ()
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    max_steps: int = 8
    opset: int = DEFAULT_OPSET
    # Shapes engines are built for (ONNX stays dynamic): N or (MIN, OPT, MAX); None = the model's default size.
    batch: tuple[int, int, int] = (1, 1, 1)
    height: tuple[int, int, int] | None = None
    width: tuple[int, int, int] | None = None
    dynamic: bool = False  # no explicit ranges: batch 1-4 and 0.5x-1.5x the default size
    tiny_vae: str | None = None  # an AutoencoderTiny (TAESD) whose decoder and encoder replace the VAE's
    vae: str | None = None  # an AutoencoderKL (e.g. an fp16-fixed one) replacing the pipeline's VAE
    # the U-Net's attention one head at a time (exporter/attention.py): True every layer, False none; None (the
    # default) the layers with the largest scores for INT8 on the ONNX target, none elsewhere
    attention_slicing: bool | None = None
    overwrite: bool = False
    quiet: bool = False
    target_options: dict[str, Any] = field(default_factory=dict)  # per-target settings (TensorRT, CoreML)
    # INT8 (precision "int8"): calibration prompts (None: the shipped set), how many to use, the square size the
    # trajectories run at (None: the model's default), and whether the float U-Net stays as a second variant.
    calibration_prompts: tuple[str, ...] | None = None
    calibration_size: int | None = None
    calibration_resolution: int | None = None
    keep_fp32: bool = False
    # the text encoders' weights as int8 (calibration/weight_only.py); None: on for INT8 with --target onnx
    int8_text_encoders: bool | None = None
    controlnets: tuple[ControlNetSource, ...] = ()  # --controlnet CN[:SCALE]: the residual U-Net and each ControlNet

    def int8_settings(self, spatial_multiple: int, default_size: int) -> Any:
        """The calibration's settings (checked here: the resolution needs the model's spatial multiple; without
        one, :func:`~lcm_export.calibration.int8.default_calibration_resolution` of the model's default size)."""
        from lcm_export.calibration.int8 import Int8Settings, default_calibration_resolution
        from lcm_export.calibration.onnx_qdq import RECIPES

        prompts = self.calibration_prompts or CALIBRATION_PROMPTS
        count = self.calibration_size or min(8, len(prompts))
        size = self.calibration_resolution
        if size is None:
            size = default_calibration_resolution(default_size, spatial_multiple)
        elif size % spatial_multiple:
            raise ExportError(
                f"--calibration-resolution {size}: pass a multiple of {spatial_multiple} (this model's VAE and U-Net)"
            )
        recipe = RECIPES.get(self.target, RECIPES["onnx"])
        # The full VAE decoder where INT8 was measured to pay: the CPU backends that read the ONNX bundle.
        decoder = self.target == "onnx"
        # The text encoders' weights as int8 unless asked otherwise, on the same backends (weight-only: no
        # activation is quantised, so CLIP's outlier channels in the hidden states are not clipped).
        encoders = decoder if self.int8_text_encoders is None else self.int8_text_encoders
        return Int8Settings(
            prompts=tuple(prompts[:count]),
            height=size,
            width=size,
            recipe=recipe,
            quantize_decoder=decoder,
            quantize_text_encoders=encoders,
        )


def resolved_precision(config: ExportConfig) -> str:
    """The precision asked for, else the target's default (fp32 for ONNX, fp16 for engines and Core ML)."""
    return config.precision or get_target(config.target).default_precision


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_output_folder(output: Path, overwrite: bool) -> None:
    """``--output`` must be new, or (with ``overwrite``) an lcm-export bundle or an empty folder.

    ``--overwrite`` replaces a bundle; it never deletes a folder of other files that happens to be named there.
    """
    if not output.exists():
        return
    if not output.is_dir():
        raise ExportError(f"--output '{output}' is a file: pass a folder path")
    if not overwrite:
        raise ExportError(f"--output '{output}' already exists: pass --overwrite or another folder")
    entries = sorted(path.name for path in output.iterdir())
    if not entries:
        return
    try:
        is_bundle = json.loads((output / MANIFEST_NAME).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        is_bundle = False
    if not is_bundle:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ExportError(
            f"--output '{output}' is not an lcm-export bundle (it holds {shown}): --overwrite only replaces a "
            "bundle or an empty folder; pass another folder"
        )


def check_config(config: ExportConfig) -> None:
    """Reject bad options before any model is loaded."""
    target = get_target(config.target)  # an unknown target is a one-line error
    if resolved_precision(config) not in target.precisions:
        written = (
            f" (--target {target.name} writes the {config.precision} variants beside the fp32 ones)"
            if config.precision in target.extra_onnx_precisions
            else ""
        )
        raise ExportError(f"--precision {config.precision}: pick one of {', '.join(target.precisions)}{written}")
    if not _is_int(config.max_steps) or not 1 <= config.max_steps <= MAX_STEPS_LIMIT:
        raise ExportError(
            f"--max-steps {config.max_steps}: pass an integer from 1 to {MAX_STEPS_LIMIT} (schedules for 1..N "
            "steps are precomputed; 8 is the default)"
        )
    if not _is_int(config.opset) or config.opset not in OPSETS:
        raise ExportError(
            f"--opset {config.opset}: pick one from {OPSETS[0]} to {OPSETS[-1]} (default {DEFAULT_OPSET})"
        )
    for name, values in (("batch", config.batch), ("height", config.height), ("width", config.width)):
        if values is None:
            continue
        if len(values) != 3 or not all(_is_int(v) for v in values) or not 0 < values[0] <= values[1] <= values[2]:
            raise ExportError(f"--{name} {values}: pass an integer or MIN:OPT:MAX with 0 < MIN <= OPT <= MAX")
    check_output_folder(config.output, config.overwrite)
    int8 = resolved_precision(config) == "int8"
    if not int8 and (config.keep_fp32 or config.calibration_prompts or config.calibration_size):
        raise ExportError("--keep-fp32 and --calibration-* apply to --precision int8: add it or drop them")
    if config.int8_text_encoders is not None and (not int8 or config.target != "onnx"):
        flag = "--int8-text-encoders" if config.int8_text_encoders else "--float-text-encoders"
        raise ExportError(
            f"{flag} applies to --precision int8 with --target onnx (the CPU backends): add them or drop it"
        )
    if config.calibration_prompts is not None and not config.calibration_prompts:
        raise ExportError("--calibration-prompts: the file holds no prompt (one per line)")
    if config.calibration_size is not None:
        available = len(config.calibration_prompts or CALIBRATION_PROMPTS)
        if not _is_int(config.calibration_size) or not 1 <= config.calibration_size <= available:
            raise ExportError(
                f"--calibration-size {config.calibration_size}: pass 1 to {available} (the prompts there are)"
            )
    if config.calibration_resolution is not None and (
        not _is_int(config.calibration_resolution) or not 8 <= config.calibration_resolution <= 4096
    ):
        raise ExportError(
            f"--calibration-resolution {config.calibration_resolution}: pass a size from 8 to 4096 pixels"
        )
    unknown = [name for name in config.components if name not in DEFAULT_COMPONENTS]
    if unknown:
        raise ExportError(f"unknown component(s) {', '.join(unknown)}: pick from {', '.join(DEFAULT_COMPONENTS)}")
    check_vae_options(config.vae, config.tiny_vae)  # a wrong --vae or --tiny-vae fails before the pipeline loads
    check_controlnet_sources(config.controlnets)
    target.preflight(config.target_options)  # installed, options valid: before the model is loaded


def engine_shape_range(config: ExportConfig, info: PipelineInfo, sequence: int) -> ShapeRange:
    """The min/opt/max shapes engines are built for, from the config and the model's default size."""

    def around(default: int) -> tuple[int, int, int]:
        if not config.dynamic:
            return (default, default, default)
        multiple = info.spatial_multiple
        low = max(multiple, default // 2 // multiple * multiple)
        high = (default * 3 // 2 + multiple - 1) // multiple * multiple
        return (low, default, high)

    height = config.height or around(info.default_height)
    width = config.width or around(info.default_width)
    batch = (
        (1, config.batch[1], max(config.batch[2], 4)) if config.dynamic and config.batch == (1, 1, 1) else config.batch
    )
    for name, values in (("height", height), ("width", width)):
        if any(value % info.spatial_multiple for value in values):
            raise ExportError(
                f"--{name} {':'.join(map(str, values))}: every value must be a multiple of {info.spatial_multiple} "
                "(the VAE and U-Net down-sampling of this model)"
            )
    return ShapeRange(batch, height, width, sequence)


def _progress(items: list[str], quiet: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, disable=quiet, unit="component")


def component_names(config: ExportConfig, loaded: LoadedPipeline) -> list[str]:
    """The components this export writes: the configured ones, with every text encoder of the model's family
    where the configuration names the text encoder (SDXL's ``text_encoder_2`` goes with ``text_encoder``)."""
    names: list[str] = []
    for name in config.components:
        if name == "text_encoder":
            names.extend(encoder for encoder, _ in loaded.text_encoders)
        else:
            names.append(name)
        if name == "unet":  # the ControlNets go with the U-Net that takes their residuals
            names.extend(control.component for control in loaded.controlnets)
    return names


def _write_ecosystem_files(loaded: LoadedPipeline, staging: Path, names: list[str]) -> None:
    """Tokenizers, scheduler config, per-component config.json and model_index.json, laid out like optimum."""
    pipeline = loaded.pipeline
    for _, tokenizer in loaded.text_encoders:  # loadable by transformers 4.x and 5.x
        write_tokenizer(getattr(pipeline, tokenizer), staging / tokenizer)
    scheduler = lcm_scheduler_from(pipeline.scheduler.config)
    scheduler.save_pretrained(str(staging / "scheduler"))
    vae = loaded.bundle_vae  # the pipeline's AutoencoderKL, or the --tiny-vae AutoencoderTiny
    configs = {
        **{encoder: getattr(pipeline, encoder).config.to_dict() for encoder, _ in loaded.text_encoders},
        "unet": dict(pipeline.unet.config),
        "vae_decoder": dict(vae.config),
        "vae_encoder": dict(vae.config),
        **{control.component: control.config for control in loaded.controlnets},
    }
    # "_name_or_path" is the exporting machine's local path: not the bundle's to carry (and without it the same
    # model exports to the same bytes).
    for name in names:
        (staging / name).mkdir(parents=True, exist_ok=True)
        component_config = {key: value for key, value in configs[name].items() if key != "_name_or_path"}
        (staging / name / "config.json").write_text(json.dumps(component_config, indent=2, default=str) + "\n")
    index = {key: value for key, value in dict(pipeline.config).items() if key != "_name_or_path"}
    index["_class_name"] = type(pipeline).__name__
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    for _, tokenizer in loaded.text_encoders:
        index[tokenizer] = list(TOKENIZER_LIBRARY_CLASS)
    for drop in ("vae", "safety_checker", "feature_extractor", "image_encoder"):
        index.pop(drop, None)
    index["vae_decoder"] = ["diffusers", type(vae).__name__]
    if "vae_encoder" in names:
        index["vae_encoder"] = ["diffusers", type(vae).__name__]
    for control in loaded.controlnets:
        index[control.component] = ["diffusers", "ControlNetModel"]
    (staging / "model_index.json").write_text(json.dumps(index, indent=2, default=str) + "\n")


def _tokenizer_info(loaded: LoadedPipeline, staging: Path, name: str) -> TokenizerInfo:
    tokenizer = getattr(loaded.pipeline, name)
    if not (staging / name / "tokenizer.json").is_file():
        raise ExportError(f"the {name} could not be saved as tokenizer.json (a fast CLIP tokenizer is required)")
    return TokenizerInfo(
        name=name,
        path=f"{name}/tokenizer.json",
        max_length=int(tokenizer.model_max_length),
        pad_id=int(tokenizer.pad_token_id),
    )


def _onnx_producer(config: ExportConfig, precision: str, kept_fp32: bool, sliced_attention: int = 0) -> dict[str, Any]:
    """What made an ONNX variant: the exporter, opset, the library versions that decide its bytes, options that
    change the graph but not what it computes, and why a component of an fp16 export stayed fp32."""
    import importlib.metadata

    producer: dict[str, Any] = {
        "tool": "torch.onnx.export (TorchScript)",
        "opset": config.opset,
        "torch": importlib.metadata.version("torch"),
        "checked_against": "pytorch fp32",
    }
    if precision == "fp16":
        producer["fp16_conversion"] = f"onnxruntime float16 converter {importlib.metadata.version('onnxruntime')}"
    if kept_fp32:
        producer["kept_fp32"] = _KEPT_FP32
    if sliced_attention:
        from lcm_export.exporter.attention import ATTENTION_SLICING

        producer["attention"] = ATTENTION_SLICING
        producer["attention_sliced_layers"] = sliced_attention
    return producer


def _slice_attention(config: ExportConfig, loaded: Any) -> int:
    """Head-slice the U-Net's attention as ``config`` asks (every layer, or by default for INT8 on the ONNX target
    the layers whose scores reach ``LARGE_SCORES_BYTES`` per image at the model's default size); returns how many
    layers were sliced."""
    from lcm_export.exporter.attention import LARGE_SCORES_BYTES, slice_attention

    if config.attention_slicing:
        return slice_attention(loaded.module("unet"))
    if config.attention_slicing is None and resolved_precision(config) == "int8" and config.target == "onnx":
        side = int(loaded.unet.config.sample_size)
        return slice_attention(loaded.module("unet"), (side, side), LARGE_SCORES_BYTES)
    return 0


_KEPT_FP32 = "its VAE config sets force_upcast (diffusers runs it in fp32: it overflows in fp16)"


def _checked_variant(
    config: ExportConfig,
    staging: Path,
    name: str,
    component: Any,
    check_values: dict[str, int],
    reference: Any,
    onnx_path: Path,
    spec: Any,
    kept_fp32: bool,
    sliced_attention: int = 0,
) -> tuple[Artifact, Any]:
    """The ONNX file at ``onnx_path`` checked against PyTorch (an error when it does not match), as a variant;
    with the validation report. ``kept_fp32``: an fp32 variant where fp16 was asked (its producer says why)."""
    report = validate_onnx(component, onnx_path, spec, check_values, reference)
    if report.failures:
        details = "; ".join(
            f"{out}: max abs {report.max_abs_error[out]:.3g} > {report.tolerance[out]:.3g}" for out in report.failures
        )
        raise ExportError(f"{name}: the ONNX export does not match PyTorch ({details})")
    io_dtype = "float16" if any(t.dtype == "float16" for t in spec.outputs) else "float32"
    precision = "fp16" if io_dtype == "float16" else "fp32"
    data_files = sorted(onnx_path.parent.glob(glob.escape(onnx_path.name) + "_data*"), key=_data_file_order)
    files = [onnx_path, *data_files]
    variant = Artifact(
        format="onnx",
        path=onnx_path.relative_to(staging).as_posix(),
        precision=precision,
        io_dtype=io_dtype,
        files=tuple(path.relative_to(staging).as_posix() for path in files),
        produced_by=_onnx_producer(config, precision, kept_fp32=kept_fp32, sliced_attention=sliced_attention),
    )
    return variant, report


def _data_file_order(path: Path) -> tuple[int, str]:
    """``model.onnx_data`` before ``model.onnx_data_2`` before ``model.onnx_data_10``."""
    suffix = path.name.rsplit("_data", 1)[1].lstrip("_")
    return (int(suffix) if suffix.isdigit() else 1, path.name)


def _provenance(config: ExportConfig) -> dict[str, Any]:
    import importlib.metadata

    import lcm_export

    versions = {}
    for package in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "peft"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    vae_source = {"source_vae": config.vae or config.tiny_vae} if config.vae or config.tiny_vae else {}
    if config.controlnets:
        vae_source["source_controlnets"] = [control.source for control in config.controlnets]
    return {
        "source_model": config.model,
        **vae_source,  # --vae or --tiny-vae as passed (pipeline.vae says which kind)
        "exporter": f"lcm-export {lcm_export.__version__}",
        "opset": config.opset,
        "versions": versions,
    }


def _silence_library_progress() -> None:
    """``quiet`` also means no diffusers/transformers loading bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


# Beside the output ``NAME``: the folder an export writes into, ``.NAME.partial-PID``, and the previous bundle while
# it is being replaced, ``.NAME.old-PID`` (PID: the exporting process).
STAGING_INFIX = "partial"
RETIRED_INFIX = "old"


def _side_folder(output: Path, infix: str, pid: int) -> Path:
    return output.parent / f".{output.name}.{infix}-{pid}"


def process_is_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (in this PID namespace); another user's process counts."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only the existence and permission checks
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _size_text(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def remove_stale_side_folders(output: Path) -> list[Path]:
    """Remove what exports into ``output`` left behind when they were killed before they could clean up (SIGKILL,
    out-of-memory killer, power loss): staging and retired folders beside it whose process is gone. A live
    export's folders (a concurrent export into the same place) are never touched. Each removal is one warning
    (a staging folder is a bundle's size: gigabytes); returns the folders removed."""
    removed = []
    for infix in (STAGING_INFIX, RETIRED_INFIX):
        prefix = f".{output.name}.{infix}-"
        for path in sorted(output.parent.glob(glob.escape(prefix) + "*")):
            pid = path.name[len(prefix) :]
            if not pid.isdigit() or path.is_symlink() or not path.is_dir():
                continue
            # This process's own PID: an export of an earlier process that had it (this one has not started).
            if int(pid) != os.getpid() and process_is_alive(int(pid)):
                continue
            size = _tree_size(path)
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
                what = "the staging folder" if infix == STAGING_INFIX else "the replaced bundle"
                warnings.warn(
                    f"removed '{path}' ({_size_text(size)}), {what} of an export that did not finish "
                    f"(process {pid} is gone)",
                    stacklevel=2,
                )
    return removed


def _filename_of(error: BaseException) -> Path | None:
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, OSError) and current.filename:
            return Path(os.fsdecode(current.filename))
        current = current.__cause__ or current.__context__
    return None


def _is_under(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def disk_full_error(error: BaseException, output: Path, staging: Path) -> ExportError:
    """The one-line error for a full disk: which filesystem filled (the output's, the temporary folder's where
    the export keeps scratch files, or another path a library wrote to) and what to do."""
    temporary = Path(tempfile.gettempdir())
    filename = _filename_of(error)
    if filename is None:  # a library's exception without a path: the fuller of the two filesystems written to
        free = {}
        for place in (output.parent, temporary):
            try:
                free[place] = shutil.disk_usage(place).free
            except OSError:
                pass
        output_fills = free.get(output.parent, 0) <= free.get(temporary, 0) or (
            output.parent.stat().st_dev == temporary.stat().st_dev
        )
    else:
        output_fills = _is_under(filename, output.parent) and not _is_under(filename, temporary)
        if not output_fills and not _is_under(filename, temporary):
            return ExportError(f"no space left on device writing '{filename}': free space on its filesystem")
    if output_fills:
        written = _tree_size(staging) if staging.exists() else 0
        return ExportError(
            f"--output '{output}': no space left on device (its filesystem filled after {_size_text(written)} of "
            "the bundle; nothing was kept): free space there or pass another --output"
        )
    return ExportError(
        f"no space left on device in the temporary folder '{temporary}' (the export's scratch files; nothing was "
        "kept): free space there or set TMPDIR to a folder with room"
    )


def export_bundle(config: ExportConfig) -> Manifest:
    """Export ``config.model`` to a bundle at ``config.output``; returns the manifest written.

    A full disk anywhere (the output's filesystem, the temporary folder) is an :class:`ExportError` naming it; the
    staging folder is removed whatever the failure, and the next export removes those of killed exports."""
    check_config(config)
    if config.quiet:
        _silence_library_progress()
    output = config.output
    created = [folder for folder in (output.parent, *output.parent.parents) if not folder.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_side_folders(output)
    staging = _side_folder(output, STAGING_INFIX, os.getpid())
    succeeded = False
    try:
        with tempfile.TemporaryDirectory(prefix="lcm-export-") as scratch:  # built-in models are built here
            try:
                manifest = _export_into(config, staging, Path(scratch))
            except Exception as error:
                if is_disk_full(error):  # measured while the staging and scratch folders still hold their files
                    raise disk_full_error(error, output, staging) from error
                raise
        if output.exists():
            retired = _side_folder(output, RETIRED_INFIX, os.getpid())
            output.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)
        staging.rename(output)
        succeeded = True
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not succeeded:
            for folder in created:  # the folders this export made for its output, deepest first, while empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def _export_into(config: ExportConfig, staging: Path, scratch: Path) -> Manifest:
    loras: list[dict[str, Any]] = []
    if config.loras:
        from lcm_export.exporter.lora import check_lora_sources

        check_lora_sources(config.loras)
    loaded = load_pipeline(config.model, has_loras=bool(config.loras), workdir=scratch)
    if config.vae is not None:  # checked against the U-Net before any weight is read
        loaded = attach_vae(loaded, config.vae)
    if config.loras:
        from lcm_export.exporter.lora import fuse_loras

        loras = fuse_loras(loaded, config.loras)
    if config.tiny_vae is not None:
        loaded = attach_tiny_vae(loaded, config.tiny_vae, with_encoder="vae_encoder" in config.components)
    if config.controlnets:  # checked against the U-Net and the VAE before any ControlNet weight is read
        loaded.controlnets = attach_controlnets(loaded, config.controlnets)
    staging.mkdir(parents=True)
    names = component_names(config, loaded)
    _write_ecosystem_files(loaded, staging, names)

    multiple = loaded.spatial_multiple
    default_height = int(loaded.unet.config.sample_size) * loaded.vae_scale_factor
    trace_values = ShapeRange.static(1, multiple * 2, multiple * 2).symbol_values("opt", loaded.vae_scale_factor)
    check_values = ShapeRange.static(2, multiple * 3, multiple * 2).symbol_values("opt", loaded.vae_scale_factor)
    tokenizers = tuple(_tokenizer_info(loaded, staging, tokenizer) for _, tokenizer in loaded.text_encoders)
    if len({tokenizer.max_length for tokenizer in tokenizers}) != 1:
        raise ExportError(
            "the tokenizers pad to different lengths ("
            + ", ".join(f"{tokenizer.name} {tokenizer.max_length}" for tokenizer in tokenizers)
            + "): their hidden states cannot be concatenated"
        )
    sequence = tokenizers[0].max_length
    trace_values["sequence"] = check_values["sequence"] = sequence

    components: dict[str, Component] = {}
    weight_names: dict[str, dict[str, Any]] = {}  # per component: ONNX initializer -> torch weight (weight_map.py)
    # One component's weights in memory at a time: each module is loaded when its component is built, runs once
    # on the check shapes (its PyTorch reference outputs are kept), is traced, and is released right after the
    # trace of its last component, before the weights are repacked or converted and before onnxruntime opens the
    # file to check it. Targets that convert from the torch modules afterwards (Core ML) keep them.
    target = get_target(config.target)
    keep_modules = target.needs_modules
    bar = _progress(names, config.quiet, "export ONNX")
    for position, name in enumerate(bar):
        bar.set_postfix_str(f"{name}: load")  # a full-size U-Net spends minutes in each stage
        sliced = _slice_attention(config, loaded) if name == "unet" else 0
        component = build_components(loaded, [name])[name]
        bar.set_postfix_str(f"{name}: trace")
        reference = pytorch_reference(component, check_values)
        module = pipeline_module_of(loaded, name)
        done_with_module = module is not None and all(
            pipeline_module_of(loaded, later) != module for later in names[position + 1 :]
        )
        release = functools.partial(loaded.release, module) if done_with_module and not keep_modules else None
        onnx_path = staging / name / "model.onnx"
        onnx_precision = "fp32" if resolved_precision(config) == "int8" else resolved_precision(config)
        fingerprints = (
            weight_fingerprints(getattr(loaded.pipeline, module), fp16=onnx_precision == "fp16")
            if name in LORA_COMPONENTS
            else {}
        )
        spec = export_to_onnx(
            component,
            onnx_path,
            trace_values,
            precision=onnx_precision,
            opset=config.opset,
            release=release,
            max_file_bytes=target.max_file_bytes,
        )
        weight_names[name] = float_weight_names(onnx_path, fingerprints) if fingerprints else {}
        bar.set_postfix_str(f"{name}: check")
        wants_fp16 = onnx_precision == "fp16" or "fp16" in target.extra_onnx_precisions
        kept_fp32 = component.keep_fp32 and wants_fp16
        checked = functools.partial(
            _checked_variant, config, staging, name, component, check_values, reference, sliced_attention=sliced
        )
        variants = [checked(onnx_path, spec, kept_fp32)]
        if "fp16" in target.extra_onnx_precisions and onnx_precision == "fp32" and not component.keep_fp32:
            bar.set_postfix_str(f"{name}: fp16")  # the fp16 rule of the ONNX target, from the checked fp32 file
            fp16_path = onnx_path.with_name("model-fp16.onnx")
            converted = convert_to_fp16(onnx_path, finite_mask_fills=component.finite_mask_fills)
            save_onnx(converted, fp16_path, max_file_bytes=target.max_file_bytes)
            del converted
            fp16_spec = spec.with_dtypes("float16")
            variants.append(checked(fp16_path, fp16_spec, False))
        del component, reference
        components[name] = Component(
            spec=spec.with_dtypes("float32"),  # the model's logical I/O; the variant carries its own dtype
            variants=tuple(variant for variant, _ in variants),
            validation={"against": "pytorch fp32", **variants[0][1].to_json()},
        )

    pipeline_info = PipelineInfo(
        family=loaded.family,
        guidance=loaded.guidance,
        time_cond_proj_dim=loaded.unet.config.time_cond_proj_dim,
        latent_channels=int(loaded.unet.config.in_channels),
        vae=loaded.vae_kind,
        vae_scale_factor=loaded.vae_scale_factor,
        vae_scaling_factor=loaded.vae_scaling_factor,
        vae_shift_factor=loaded.vae_shift_factor,
        spatial_multiple=multiple,
        default_height=default_height,
        default_width=default_height,
        default_guidance_scale=DEFAULT_GUIDANCE_SCALE[loaded.guidance],
    )
    conditioning = dataclasses.replace(
        _conditioning(loaded, pipeline_info),
        guidance_frequencies=guidance_frequencies(pipeline_info.time_cond_proj_dim),
    )

    control = controlnet_info(loaded)  # before the int8 export drops the pipeline
    scheduler = scheduler_info(
        dict(loaded.pipeline.scheduler.config), config.max_steps, img2img_mode(loaded.family, loaded.guidance)
    )

    def write_manifest(components: dict[str, Component], target: str = config.target) -> Manifest:
        """The manifest of what ``staging`` holds now (written again after each stage that adds files); before
        the target's build, what it holds is an ONNX bundle (``target="onnx"``)."""
        files = tuple(
            file_entry(staging, path)
            for path in sorted(staging.rglob("*"))
            if path.is_file() and path.name != MANIFEST_NAME
        )
        manifest = Manifest(
            target=target,
            precision=resolved_precision(config),
            pipeline=pipeline_info,
            scheduler=scheduler,
            tokenizers=tokenizers,
            components=components,
            files=files,
            provenance=_provenance(config),
            loras=tuple(loras),
            conditioning=conditioning,
            backend_variants=_backend_variants(get_target(config.target).backend_variants, components),
            controlnet=control,
        )
        manifest.write(staging)
        return manifest

    if resolved_precision(config) == "int8":
        if not get_target(config.target).needs_modules:
            loaded.pipeline = None  # the torch side is done with: calibration runs the bundle
            gc.collect()
        components = _add_int8_variants(config, staging, components, pipeline_info, write_manifest)
    adaptable = {name: frozenset(names) for name, names in weight_names.items() if names}
    components = _build_target(config, staging, components, pipeline_info, loaded, sequence, adaptable)
    for name, names in weight_names.items():  # where run-time adapters apply (docs/bundle-format.md)
        components[name] = write_weight_map(staging, name, components[name], names) or components[name]
    return write_manifest(components)


def _backend_variants(
    wanted: Mapping[str, tuple[str, ...]], components: Mapping[str, Component]
) -> dict[str, tuple[str, ...]]:
    """The target's backend_variants with the precisions no variant of the bundle has left out."""
    have = {variant.precision for component in components.values() for variant in component.variants}
    kept = {backend: tuple(p for p in order if p in have) for backend, order in wanted.items()}
    return {backend: order for backend, order in kept.items() if order}


def _conditioning(loaded: LoadedPipeline, pipeline_info: PipelineInfo) -> Conditioning:
    """How the exported U-Net is conditioned (without the guidance frequencies, added by the caller).

    SDXL, as diffusers' ``StableDiffusionXLPipeline`` builds it: both encoders' penultimate hidden states
    concatenated, the second encoder's ``text_embeds`` as the pooled text, the size ids as ``time_ids``; an absent
    negative prompt is zeros where the pipeline says ``force_zeros_for_empty_prompt``.
    """
    if loaded.family == "sd":
        return Conditioning.of_sd(pipeline_info)
    pipeline = loaded.pipeline
    encoders = tuple(
        TextEncoderInfo(
            component=encoder,
            tokenizer=tokenizer,
            hidden_state=penultimate_hidden_state_name(getattr(pipeline, encoder)),
            pooled="text_embeds" if encoder == "text_encoder_2" else None,
        )
        for encoder, tokenizer in loaded.text_encoders
    )
    inputs = {"encoder_hidden_states": "text_hidden_states", "text_embeds": "pooled_text", "time_ids": "size_ids"}
    if pipeline_info.time_cond_proj_dim is not None:
        inputs["timestep_cond"] = "guidance_embedding"
    zeros = bool(pipeline.config.get("force_zeros_for_empty_prompt", False))
    return Conditioning(encoders, inputs, "zeros" if zeros else "encode")


def _add_int8_variants(
    config: ExportConfig,
    staging: Path,
    components: dict[str, Component],
    pipeline_info: PipelineInfo,
    write_manifest: Any,
) -> dict[str, Component]:
    """Calibrate on the float bundle's own trajectories, add the INT8 U-Net (and full VAE decoder, see
    ``lcm_export.calibration.int8``) as the preferred variants, measure the images against the float ones; the
    float variants stay as second ones with ``keep_fp32``. The quality report is the U-Net's variant's."""
    from tqdm.auto import tqdm

    from lcm_export.calibration.int8 import REPORT_BUDGET_SHARE, quality_report, quantize_components

    write_manifest(components, "onnx")  # the float ONNX bundle, complete: what the calibration runs
    settings = config.int8_settings(
        pipeline_info.spatial_multiple, min(pipeline_info.default_height, pipeline_info.default_width)
    )
    bars: dict[str, Any] = {}

    def progress(label: str, done: int, total: int) -> None:
        bar = bars.get(label) or bars.setdefault(label, tqdm(total=total, desc=label, disable=config.quiet))
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()  # its elapsed time stops here

    def with_int8(int8: dict[str, Artifact], keep_float: bool) -> dict[str, Component]:
        """The components with each INT8 variant first, before the float ones where ``keep_float``."""
        return {
            **components,
            **{
                name: dataclasses.replace(
                    components[name], variants=(variant, *components[name].variants) if keep_float else (variant,)
                )
                for name, variant in int8.items()
            },
        }

    int8 = quantize_components(staging, settings, progress)
    max_file_bytes = get_target(config.target).max_file_bytes
    if max_file_bytes is not None:  # onnxruntime's quantizer writes one "<name>.data" of any size
        int8 = {name: _with_files_at_most(staging, variant, max_file_bytes) for name, variant in int8.items()}
    write_manifest(with_int8(int8, keep_float=True), "onnx")
    # The report takes at most half the quantisation's time (its runs at the bundle's size can cost more).
    quantisation_seconds = sum(variant.produced_by.get("seconds", 0.0) for variant in int8.values())
    report = quality_report(staging, settings, progress, budget_seconds=REPORT_BUDGET_SHARE * quantisation_seconds)
    for bar in bars.values():
        bar.close()
    int8["unet"] = dataclasses.replace(int8["unet"], details={**int8["unet"].details, "quality": report})
    # Float variants stay with --keep-fp32, and where the target wants them beside INT8 (web: fp16 for WebGPU).
    keep_float = config.keep_fp32 or bool(get_target(config.target).extra_onnx_precisions)
    if not keep_float:
        for name in int8:
            for float_variant in components[name].variants:
                for file in float_variant.files:
                    (staging / file).unlink(missing_ok=True)
    return with_int8(int8, keep_float=keep_float)


def _with_files_at_most(staging: Path, variant: Artifact, max_file_bytes: int) -> Artifact:
    """``variant``'s ONNX file with its external data rewritten as files of at most ``max_file_bytes``."""
    model_path = staging / variant.path
    repack_onnx(model_path, model_path, consume=True, max_file_bytes=max_file_bytes)
    for file in variant.files:
        if file != variant.path:
            (staging / file).unlink(missing_ok=True)  # the quantizer's data file, copied (consume) or unused
    data_files = sorted(model_path.parent.glob(glob.escape(model_path.name) + "_data*"), key=_data_file_order)
    files = (variant.path, *(path.relative_to(staging).as_posix() for path in data_files))
    return dataclasses.replace(variant, files=files)


def _build_target(
    config: ExportConfig,
    staging: Path,
    components: dict[str, Component],
    pipeline_info: PipelineInfo,
    loaded: LoadedPipeline,
    sequence: int,
    adaptable: Mapping[str, frozenset[str]] | None = None,
) -> dict[str, Component]:
    """Hand the checked ONNX files (and, for targets that convert from torch, the modules) to the target;
    ``adaptable``: per component, the ONNX initializers run-time adapters change (its weight map's)."""
    target = get_target(config.target)
    request = BuildRequest(
        staging=staging,
        components=components,
        pipeline=pipeline_info,
        shape_range=engine_shape_range(config, pipeline_info, sequence),
        options=config.target_options,
        modules=(
            {name: c.module for name, c in build_components(loaded, list(components)).items()}
            if target.needs_modules
            else {}
        ),
        quiet=config.quiet,
        adaptable=dict(adaptable or {}),
    )
    return target.build(request)
