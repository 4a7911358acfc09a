"""INT8 variants for a bundle: record real trajectories with the float bundle, quantise, measure the images.

The exporter calls :func:`quantize_components` on its staging folder once the float bundle is complete (a manifest
that loads), adds the returned variants, and calls :func:`quality_report` on the bundle holding both: PSNR and SSIM
of the final images, INT8 against float, on the calibration prompts and on held-out ones, per guidance.

Which components are quantised is where INT8 pays, measured on the SD1.5-shaped pipeline here: the U-Net, always
(most of a run); the full VAE decoder (AutoencoderKL) on the ONNX target (about 3x faster on the CPU backends, most
of an INT8-U-Net run at 512 px); not the tiny decoder (TAESD) nor the text encoders (small shares of a run even if
INT8 made them free), nor the VAE encoder (img2img; not measured), nor the decoder for TensorRT (a GPU's fp16 engine
is what those measurements cannot speak for). Measured: docs/design-notes.md#calibration-int8.

A ControlNet bundle calibrates on trajectories run with synthetic control images (:mod:`.control_images`), so the
residual U-Net's ranges include the residuals; its ControlNets are quantised too where ``quantize_controlnet``
(calibrated on their own recorded calls), and the quality report runs with control images (held-out ones for the
held-out prompts).
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.calibration.control_images import CALIBRATION_SEED, HELD_OUT_SEED, control_images
from lcm_export.calibration.onnx_qdq import QdqRecipe, RangeRecorder, quantize_qdq, ranges_ahead_supported
from lcm_export.calibration.prompts import CALIBRATION_PROMPTS, HELD_OUT_PROMPTS
from lcm_export.calibration.quality import psnr, ssim
from lcm_export.calibration.trajectories import Trajectories, TrajectorySettings, load_sample, record_trajectories
from lcm_export.runtime.backends import BackendOptions
from lcm_export.runtime.backends.onnxruntime import OnnxRuntimeSession
from lcm_export.runtime.denoiser import decoded_images
from lcm_export.runtime.manifest import Artifact, load_manifest
from lcm_export.runtime.pipeline import Pipeline
from lcm_export.runtime.variants import choose_variants

INT8_VARIANT = "int8-qdq"
INT8_FILE = "model-int8.onnx"
# Guidance the trajectories are recorded at, per guidance kind: a distilled LCM at diffusers' default; an LCM-LoRA
# bundle both without CFG (its default, 1.0) and with it (1.5: the unconditional half of the batch is recorded).
CALIBRATION_GUIDANCE = {"embedding": (8.5,), "cfg": (1.0, 1.5)}
REPORT_GUIDANCE = {"embedding": (4.0, 8.5), "cfg": (1.0, 1.5)}
# The quality report's time budget as a share of the quantisation's (bundle.py passes it): half bounds the SDXL-shaped
# export's report to about 4-5 pairs of 12 (at least one per set and guidance), whose PSNR spread over prompts is
# 0.3 dB (docs/design-notes.md#calibration-report-budget).
REPORT_BUDGET_SHARE = 0.5
# The components INT8 may quantise (see the module docstring), as messages name them and their samples; the
# ControlNets (controlnet, controlnet_1, ..) are named by their component and calibrated on their own calls.
COMPONENT_LABELS = {"unet": "U-Net", "vae_decoder": "VAE decoder"}
SAMPLE_LABELS = {"unet": "U-Net calls", "vae_decoder": "final latents"}
CONTROL_IMAGES = "synthetic, deterministic: Canny-like edge maps and smooth depth-like fields, alternating by prompt"


# The calibration's default square size: the model's default size up to this, half of it above (measured on the
# SD1.5-shaped model, bench/RESULTS.md "INT8 export with the defaults": calibrated at 256 px, its INT8 images at 256
# and 512 px are as close to fp32 as when calibrated at 512 px (53.96/54.07 dB against 53.89/53.59 dB), for 65% of
# the export time and of the peak memory).
CALIBRATION_FULL_SIZE_UP_TO = 256


def default_calibration_resolution(default_size: int, spatial_multiple: int) -> int:
    """The square size calibration trajectories run at when none is asked for: ``default_size`` if it is at most
    256 px, else half of it (SD1.5: 256, SDXL: 512) but not below 256, floored to the model's spatial multiple."""
    if default_size <= CALIBRATION_FULL_SIZE_UP_TO:
        return default_size
    half = max(default_size // 2, CALIBRATION_FULL_SIZE_UP_TO)
    return max(spatial_multiple, half // spatial_multiple * spatial_multiple)


@dataclass(frozen=True)
class Int8Settings:
    """What the calibration runs: prompts (how many of the default set, or a user's), steps, size."""

    prompts: tuple[str, ...] = CALIBRATION_PROMPTS[:8]
    held_out: tuple[str, ...] = HELD_OUT_PROMPTS[:4]
    # The quality report runs float and INT8 on this many calibration prompts (and every held-out one) per guidance:
    # on an SD1.5-shaped model at 256 px each pair of runs costs ~15 s on 2 cores, the report's whole cost.
    report_prompts: int = 2
    steps: int = 4
    height: int | None = None  # None: the bundle's default size
    width: int | None = None
    seed: int = 0
    recipe: QdqRecipe = field(default_factory=QdqRecipe)
    quantize_decoder: bool = True  # the full VAE decoder too (the exporter decides; see the module docstring)
    quantize_controlnet: bool = True  # a ControlNet bundle's ControlNets too (see the module docstring)
    quantize_text_encoders: bool = False  # the text encoders' weights too, weight-only (calibration/weight_only.py)


def _float_pipeline(bundle: Path, sessions: dict[str, Any] | None = None) -> Pipeline:
    """The float bundle as the runtime runs it (onnxruntime, fp32; no compile cache for a staging folder);
    ``sessions`` run instead of those components' own (the U-Net's :class:`RangeRecorder`)."""
    return Pipeline.load(
        bundle, backend="onnxruntime", variant="fp32", precision="fp32", cache=False, verify="size", sessions=sessions
    )


def quantize_components(
    bundle: Path, settings: Int8Settings, progress: Callable[[str, int, int], None] | None = None
) -> dict[str, Artifact]:
    """Record trajectories with the float bundle at ``bundle``, write ``unet/model-int8.onnx`` (and, where
    ``settings.quantize_decoder`` and the bundle's decoder is the full VAE, ``vae_decoder/model-int8.onnx``);
    returns the variants by component (not yet in the manifest).

    The U-Net's activation ranges are gathered in the loop that records the trajectories: the loop runs the
    U-Net as a :class:`RangeRecorder` (the float graph with a min and a max after every tensor to quantise), so
    the U-Net calls are run once, not once to record and again to measure. Sets of trajectories found in the
    cache are measured from their samples. The other components (the decoder, ControlNets) are measured on their
    recorded samples afterwards (a few small calls).
    """
    import onnxruntime

    from lcm_export.calibration.weight_only import quantize_weights_only

    manifest = load_manifest(bundle, verify="size")
    unet_float = choose_variants(manifest.components, ["unet"], "onnx", "fp32", bundle)["unet"].artifact
    with tempfile.TemporaryDirectory(prefix="lcm-export-calibration-") as scratch:
        started = time.perf_counter()
        recorder = (
            RangeRecorder(bundle / unet_float.path, settings.recipe, Path(scratch))
            if ranges_ahead_supported()
            else None
        )
        recorded, info, floats, calibration = _record(bundle, settings, progress, recorder)
        ranges: dict[str, Any] = {}
        how = "gathered in the loop that recorded the calibration trajectories"
        if recorder is not None:
            if recorder.calls != len(recorded.unet):  # some sets came from the cache: measure every sample
                how = "measured on the cached calibration samples"
                label = f"activation ranges of the U-Net on {len(recorded.unet)} U-Net calls"
                recorder.measure_samples(
                    lambda i: load_sample(recorded.unet[i]),
                    len(recorded.unet),
                    (lambda done, total: progress(label, done, total)) if progress else None,
                )
            ranges["unet"] = recorder.ranges()
            recorder.close()
            del recorder
            gc.collect()
        ranges_seconds = time.perf_counter() - started
    samples = {"unet": recorded.unet}
    if settings.quantize_decoder and info.vae == "autoencoder_kl":
        samples["vae_decoder"] = recorded.vae_decoder
    if settings.quantize_controlnet:
        samples.update(recorded.controlnets)
    encoders = [encoder.component for encoder in manifest.conditioning.text_encoders]
    encoder_floats = {name: floats[name] for name in encoders} if settings.quantize_text_encoders else {}
    variants = {}
    for name, paths in samples.items():
        component, samples_of = COMPONENT_LABELS.get(name, name), SAMPLE_LABELS.get(name, "calls")
        ranges_label = f"activation ranges of the {component} on {len(paths)} {samples_of}"
        label = f"quantising the {component}"
        step = (
            (lambda done, total, ranges_label=ranges_label: progress(ranges_label, done, total)) if progress else None
        )
        output = bundle / name / INT8_FILE
        before = set(output.parent.iterdir())
        report = quantize_qdq(
            bundle / floats[name].path,
            output,
            lambda i, paths=paths: load_sample(paths[i]),
            len(paths),
            settings.recipe,
            progress=step,
            on_ranges=(lambda label=label: progress(label, 0, 1)) if progress else None,
            ranges=ranges.get(name),
        )
        if name in ranges:  # gathered in the trajectories' loop: that time is this component's calibration
            report["ranges"] = how
            report["seconds"] = round(report["seconds"] + ranges_seconds, 1)
        if name == "vae_decoder":  # its own share of the image error, on the first calibration latents
            report["decoded_psnr_db"] = _decoder_psnr(bundle / floats[name].path, output, paths[:2])
        if progress:
            progress(label, 1, 1)
        variants[name] = _int8_variant(
            bundle,
            name,
            before,
            {
                "tool": f"onnxruntime.quantization.quantize_static {onnxruntime.__version__}",
                "from": floats[name].path,
                "calibration": {**calibration, "samples": len(paths)},
                **report,
            },
        )
    for name, artifact in encoder_floats.items():  # weight-only: no samples, nothing to calibrate
        label = f"quantising the weights of the {name.replace('_', ' ')}"
        if progress:
            progress(label, 0, 1)
        output = bundle / name / INT8_FILE
        before = set(output.parent.iterdir())
        report = quantize_weights_only(bundle / artifact.path, output)
        if progress:
            progress(label, 1, 1)
        produced_by = {"tool": "lcm_export.calibration.weight_only", "from": artifact.path, **report}
        variants[name] = _int8_variant(bundle, name, before, produced_by)
    return variants


def _record(
    bundle: Path,
    settings: Int8Settings,
    progress: Callable[[str, int, int], None] | None,
    recorder: RangeRecorder | None,
) -> tuple[Trajectories, Any, dict[str, Artifact], dict[str, Any]]:
    """The calibration trajectories of the float bundle (its U-Net run as ``recorder`` where given), with the
    pipeline's facts, the float variants by component and what the calibration ran; the pipeline is released."""
    pipe = _float_pipeline(bundle, {"unet": recorder} if recorder is not None else None)
    info = pipe.manifest.pipeline
    height, width = settings.height or info.default_height, settings.width or info.default_width
    controlnets = pipe.manifest.controlnet.components if pipe.manifest.controlnet is not None else ()
    floats = {name: choice.artifact for name, choice in pipe.variants.items()}
    recorded = Trajectories([], [])
    for guidance in CALIBRATION_GUIDANCE[info.guidance]:
        trajectory = TrajectorySettings(
            settings.prompts, settings.steps, guidance, height, width, settings.seed, len(controlnets)
        )
        label = f"calibration trajectories (guidance {guidance:g})"
        step = (lambda done, total, label=label: progress(label, done, total)) if progress else None
        recorded = recorded + record_trajectories(pipe, trajectory, progress=step)
    del pipe
    gc.collect()
    calibration = {
        "prompts": len(settings.prompts),
        "steps": settings.steps,
        "guidance": list(CALIBRATION_GUIDANCE[info.guidance]),
        "size": [height, width],
        "unet_calls": len(recorded.unet),
        **({"control_images": CONTROL_IMAGES} if controlnets else {}),
    }
    return recorded, info, floats, calibration


def _int8_variant(bundle: Path, name: str, before: set[Path], produced_by: dict[str, Any]) -> Artifact:
    """The INT8 variant just written to ``<name>/model-int8.onnx``: its files are those its folder did not hold
    ``before``."""
    folder = bundle / name
    files = sorted(path for path in folder.iterdir() if path not in before)
    return Artifact(
        format="onnx",
        path=f"{name}/{INT8_FILE}",
        precision="int8",
        name=INT8_VARIANT,
        io_dtype="float32",
        files=tuple(path.relative_to(bundle).as_posix() for path in files),
        produced_by=produced_by,
    )


def _decoder_psnr(float_path: Path, int8_path: Path, samples: list[Path]) -> list[float]:
    """PSNR (dB) of the INT8 decoder's images against the float decoder's on the same recorded latents, each run
    as the runtime runs it (onnxruntime's session, the runtime's post-processing)."""
    options = BackendOptions(cache=False)  # no compile cache for a staging folder
    sessions = [OnnxRuntimeSession(path, options, "vae_decoder") for path in (float_path, int8_path)]
    scores = []
    for sample in samples:
        feeds = load_sample(sample)
        images = [decoded_images(session.run(feeds)["sample"]) for session in sessions]
        scores.append(round(psnr(images[0], images[1]), 2))
    return scores


def quality_report(
    bundle: Path,
    settings: Int8Settings,
    progress: Callable[[str, int, int], None] | None = None,
    budget_seconds: float | None = None,
) -> dict[str, Any]:
    """PSNR/SSIM of the INT8 bundle's images against the float bundle's, same prompts, latents and noise.

    The float runs come first and their (small) images are kept; the float sessions are released before the INT8
    ones open, so the report's memory is one pipeline's, not two.

    ``budget_seconds`` bounds the report's time (the exporter passes :data:`REPORT_BUDGET_SHARE` of the
    quantisation's): the runs are ordered prompt by prompt across every set and guidance, and once the first float
    run's time is known, only as many pairs as fit the budget are run, never fewer than one per set and guidance.
    The report says how many ran.
    """
    started = time.perf_counter()
    float_pipe = _float_pipeline(bundle)
    info = float_pipe.manifest.pipeline
    height, width = settings.height or info.default_height, settings.width or info.default_width
    sets = (("calibration", settings.prompts[: settings.report_prompts]), ("held_out", settings.held_out))
    # Prompt by prompt across the sets and guidances, so that a budget cut keeps every set and guidance.
    runs = sorted(
        (
            (label, guidance, index, prompt)
            for label, prompts in sets
            for guidance in REPORT_GUIDANCE[info.guidance]
            for index, prompt in enumerate(prompts)
        ),
        key=lambda run: run[2],
    )
    planned = len(runs)
    groups = len({(label, guidance) for label, guidance, _, _ in runs})

    controlnets = len(float_pipe.manifest.controlnet.models) if float_pipe.manifest.controlnet is not None else 0
    image_seeds = {"calibration": CALIBRATION_SEED, "held_out": HELD_OUT_SEED}

    def generate(pipe: Pipeline, label: str, guidance: float, index: int, prompt: str) -> np.ndarray:
        call: dict[str, Any] = dict(num_inference_steps=settings.steps, height=height, width=width, seed=10_000 + index)
        if controlnets:  # the calibration prompts with their calibration images, the held-out ones with others
            call["control_image"] = control_images(index, controlnets, height, width, image_seeds[label])
        return pipe(prompt, guidance_scale=guidance, **call).images

    bar_label = f"quality report: {len(runs)} float and {len(runs)} INT8 runs"
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(bar_label, done, 2 * len(runs))

    references: list[np.ndarray] = []
    while len(references) < len(runs):
        label, guidance, index, prompt = runs[len(references)]
        run_started = time.perf_counter()
        references.append(generate(float_pipe, label, guidance, index, prompt))
        if len(references) == 1 and budget_seconds is not None:
            # What is left of the budget after this run, the INT8 pipeline's load (about the float one's) and this
            # pair's INT8 run, in pairs of a float and an INT8 run about as long as this one.
            now = time.perf_counter()
            run_seconds, load_seconds = now - run_started, run_started - started
            left = budget_seconds - (now - started) - load_seconds - run_seconds
            runs = runs[: max(groups, 1 + int(left // (2 * run_seconds)))]
            bar_label = f"quality report: {len(runs)} float and {len(runs)} INT8 runs"
        advance()
    del float_pipe
    gc.collect()
    int8_pipe = Pipeline.load(bundle, backend="onnxruntime", variant="int8", cache=False, verify="size")
    scores: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for (label, guidance, index, prompt), reference in zip(runs, references, strict=True):
        image = generate(int8_pipe, label, guidance, index, prompt)
        advance()
        scores.setdefault((label, guidance), []).append((psnr(reference, image), ssim(reference, image)))
    report: dict[str, Any] = {"size": [height, width], "steps": settings.steps, "runs": len(runs), "sets": {}}
    if budget_seconds is not None:
        report["budget_seconds"] = round(budget_seconds, 1)
        report["runs_planned"] = planned
    if controlnets:
        report["control_images"] = CONTROL_IMAGES
    for (label, guidance), pairs in scores.items():
        psnrs, ssims = zip(*pairs, strict=True)
        report["sets"].setdefault(label, {})[f"{guidance:g}"] = {
            "psnr_db_mean": round(float(np.mean(psnrs)), 2),
            "psnr_db_min": round(float(np.min(psnrs)), 2),
            "ssim_mean": round(float(np.mean(ssims)), 4),
            "ssim_min": round(float(np.min(ssims)), 4),
            "prompts": len(pairs),
        }
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report
