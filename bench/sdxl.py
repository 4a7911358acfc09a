"""The SDXL-family benchmark (issues 17 and 28): ours against diffusers and optimum-intel's OpenVINO on the same
weights, in one run, at 512 px (``--sizes 512 1024`` adds 1024 px).

    python bench/run.py --sdxl                       # builds the model, exports both sides, times every engine
    python bench/sdxl.py --runs 2 --sizes 512        # the same
    python bench/run.py --sdxl --family ssd1b --sizes 512 768 --engines fast-int8   # issue 28's fast INT8 rows

The model is ``bench/models.py --sdxl`` (``--family sdxl``, the default): LCM-SDXL's shapes (2.57B-parameter U-Net
with the guidance embedding, CLIP-L and OpenCLIP bigG text towers, SDXL's VAE), random weights stored in fp16 as the
hub's fp16 variants are; ``--family ssd1b``: SSD-1B's U-Net (1.3B parameters) with the same text towers and VAE.
``--tiny``: the family's structure with narrow layers (``models.py --sdxl-tiny``), a smoke test of every path whose
timings mean nothing (results into the work dir, not bench/). Each side gets the model its own way:

- ours: ``lcm-export MODEL`` (fp32 ONNX, every component checked against PyTorch), ``bundle-sdxl``; for the fast
  INT8 rows ``lcm-export MODEL --tiny-vae TAESD --precision int8 --keep-fp32`` (``bundle-sdxl-fast-int8``: the INT8
  U-Net and the float one beside it, TAESD-shaped decoder: TAESDXL's architecture);
- optimum-intel: ``optimum-cli export openvino --weight-format fp16`` (``worker.py optimum-export-fp16``), the same
  values as the checkpoint. Its default would compress the U-Net's weights to int8 (more than 1B parameters):
  not the same weights, so not used. Its fast INT8 (``worker.py optimum-int8``, the strongest peer recipe): that IR
  with TAESD's decoder converted to IR as its VAE decoder, the U-Net quantised by NNCF on the U-Net inputs recorded
  from optimum-intel's own pipeline running the prompts, steps, guidance and size our fast INT8 bundle's manifest
  records for its calibration;
- diffusers: ``StableDiffusionXLPipeline`` on the folder in fp32 (its LCMScheduler comes with it).

A U-Net of 10 GB in fp32 leaves room for one engine at a time on this machine: each engine runs alone in its own
process (``bench/worker.py``), one after another, in an order that puts compared engines next to each other: load
(no compiled-model cache on either OpenVINO side: the disk cannot hold the compiled U-Nets beside the models), then
``--warmup`` untimed runs and ``--runs`` timed ones, each round with the same prompt, initial latents and per-step
noise for every engine (so their timed images can be compared round by round), then its peak RSS and anonymous peak
(the memory that is not mapped model files). Engines whose configuration is the same on this machine (``auto``
resolving to a backend that has its own row) run once and appear under each name. ``--engines NAME...`` runs only
those again: the other rows stay from the previous run, marked with its date. The table, ratios and image checks,
with issue 28's goals, go into the family's own section of ``bench/RESULTS.md`` (between markers that
``bench/run.py`` keeps) and ``bench/sdxl-results.json`` (``ssd1b-results.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import numpy as np

from lcm_export.calibration.quality import psnr

TITLES = {"sdxl": "SDXL", "ssd1b": "SSD-1B"}


@dataclass(frozen=True)
class Family:
    """One model of the SDXL family and where its files and results go (the SDXL names are the first run's)."""

    name: str  # "sdxl" or "ssd1b"
    tiny: bool = False  # the smoke-test model of the same structure (bench/models.py --sdxl-tiny)

    @property
    def key(self) -> str:
        """The stem of its folders and files: its model is ``models.py --KEY``, in WORK/KEY."""
        return f"{self.name}-tiny" if self.tiny else self.name

    @property
    def title(self) -> str:
        """What the section's heading calls it."""
        tiny = " (tiny: a smoke test, its timings mean nothing)" if self.tiny else ""
        return f"{TITLES[self.name]}-shaped pipeline{tiny}"

    @property
    def bundle(self) -> str:
        return f"bundle-{self.key}"

    @property
    def fast_int8_bundle(self) -> str:
        return f"bundle-{self.key}-fast-int8"

    @property
    def optimum_ir(self) -> str:
        return f"optimum-ov-{self.key}"

    @property
    def metrics(self) -> str:
        return f"{self.key}-exports.json"

    @property
    def results_json(self) -> str:
        return f"{self.key}-results.json"

    @property
    def section_start(self) -> str:
        options = (f" --family {self.name}" if self.name != "sdxl" else "") + (" --tiny" if self.tiny else "")
        return f"<!-- {self.key}-speed: start (bench/sdxl.py{options} writes this section) -->"

    @property
    def section_end(self) -> str:
        return f"<!-- {self.key}-speed: end -->"


SECTION_START, SECTION_END = Family("sdxl").section_start, Family("sdxl").section_end
# Every family's section of bench/RESULTS.md (bench/run.py keeps them when it rewrites the file).
SECTIONS = tuple((Family(name).section_start, Family(name).section_end) for name in TITLES)

# name -> (label, kind, the export it runs); the order is the run order (compared engines side by side).
ENGINES = {
    "optimum-default": ("OpenVINO via optimum-intel, default", "optimum-intel", "optimum"),
    "ours-default": ("ours default (auto backend, default precision)", "lcm-export", "ours"),
    "ours-openvino-fp32": ("ours OpenVINO fp32", "lcm-export", "ours"),
    "optimum-f32": ("OpenVINO via optimum-intel, f32", "optimum-intel", "optimum"),
    "ours-onnxruntime": ("ours onnxruntime fp32", "lcm-export", "ours"),
    "diffusers": ("diffusers StableDiffusionXLPipeline fp32 (torch)", "diffusers", None),
    # Issue 28: fast INT8 (INT8 U-Net + TAESD) against the peer's (NNCF INT8 U-Net + TAESD), each side's float
    # U-Net with the same decoder as its PSNR reference.
    "ours-fast-int8": ("ours fast INT8 (INT8 U-Net + TAESD; auto: {auto})", "lcm-export", "ours-fast-int8"),
    "optimum-fast-int8": (
        "OpenVINO via optimum-intel, NNCF INT8 U-Net + TAESD",
        "optimum-intel",
        "optimum-fast-int8",
    ),
    "ours-fast-int8-openvino": ("ours fast INT8 (INT8 U-Net + TAESD), OpenVINO", "lcm-export", "ours-fast-int8"),
    "ours-fast-int8-onnxruntime": (
        "ours fast INT8 (INT8 U-Net + TAESD), onnxruntime",
        "lcm-export",
        "ours-fast-int8",
    ),
    "ours-fast-fp32": (
        "ours fast fp32 (the same bundle's float U-Net + TAESD, onnxruntime fp32)",
        "lcm-export",
        "ours-fast-int8",
    ),
    "optimum-fast-f32": (
        "OpenVINO via optimum-intel, float U-Net + TAESD, f32",
        "optimum-intel",
        "optimum-fast-int8",
    ),
}
DEFAULT_ENGINES = ("optimum-default", "ours-default", "ours-onnxruntime", "diffusers")
# Issue 28's comparison (`--engines fast-int8`): fast INT8 on each backend, the peer's, both float references, and
# diffusers fp32.
FAST_INT8_ENGINES = (
    "diffusers",
    "ours-fast-int8",
    "optimum-fast-int8",
    "ours-fast-int8-openvino",
    "ours-fast-int8-onnxruntime",
    "ours-fast-fp32",
    "optimum-fast-f32",
)
# (faster candidate, reference, goal): the ratio is reference time / candidate time (> 1: the candidate is faster);
# the goal (issue 28's, end to end) where there is one.
RATIOS = (
    ("ours-default", "diffusers", None),
    ("ours-onnxruntime", "diffusers", None),
    ("ours-default", "optimum-default", None),
    ("ours-openvino-fp32", "optimum-f32", None),
    ("ours-fast-int8", "optimum-fast-int8", 1.2),
    ("ours-fast-int8", "diffusers", 4.0),
    ("ours-fast-int8-openvino", "optimum-fast-int8", 1.2),
    ("ours-fast-int8-openvino", "diffusers", 4.0),
    ("ours-fast-int8-onnxruntime", "optimum-fast-int8", 1.2),
    ("ours-fast-int8-onnxruntime", "diffusers", 4.0),
    ("ours-fast-int8", "ours-fast-fp32", None),
    ("optimum-fast-int8", "optimum-fast-f32", None),
)
# Image pairs: the same weights, latents and noise (equal precisions should agree closely; INT8 against its float).
IMAGE_PAIRS = (
    ("ours-onnxruntime", "diffusers"),
    ("ours-openvino-fp32", "optimum-f32"),
    ("ours-default", "optimum-default"),
    ("ours-default", "ours-onnxruntime"),
    ("ours-fast-int8", "ours-fast-fp32"),
    ("ours-fast-int8-openvino", "ours-fast-fp32"),
    ("ours-fast-int8-onnxruntime", "ours-fast-fp32"),
    ("optimum-fast-int8", "optimum-fast-f32"),
)
# Issue 28: our fast INT8 image at least as close to our fp32 one (PSNR) as the peer's INT8 to its f32.
PEER_PSNR = "optimum-fast-int8 vs optimum-fast-f32"
PSNR_AT_LEAST_PEER = (
    "ours-fast-int8 vs ours-fast-fp32",
    "ours-fast-int8-openvino vs ours-fast-fp32",
    "ours-fast-int8-onnxruntime vs ours-fast-fp32",
)
# Each export's line in the section.
EXPORT_LABELS = {
    "ours": "ours: `lcm-export MODEL` (fp32 ONNX)",
    "ours-fast-int8": "ours fast INT8: `lcm-export MODEL --tiny-vae TAESD --precision int8 --keep-fp32`",
    "optimum": "optimum-intel IR, fp16 weights",
    "optimum-fast-int8": "the peer's fast INT8: TAESD's decoder to IR, `nncf.quantize` of the U-Net IR",
}


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SDXL-family pipeline: ours vs diffusers vs optimum-intel.")
    parser.add_argument("--family", choices=list(TITLES), default="sdxl", help="which model (default sdxl)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="smoke test: the family's structure with narrow layers (timings mean nothing)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=8.0)
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/lcm-export/bench").expanduser())
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where RESULTS.md and the JSON go (default bench/; --tiny: the work dir)",
    )
    parser.add_argument("--no-optimum", action="store_true", help="ours and diffusers only")
    parser.add_argument(
        "--engines",
        nargs="+",
        default=list(DEFAULT_ENGINES),
        choices=[*ENGINES, "all", "fast-int8"],
        help=f"which rows (default: {' '.join(DEFAULT_ENGINES)}; 'fast-int8': issue 28's, "
        f"{' '.join(FAST_INT8_ENGINES)}; 'all': every row)",
    )
    parser.add_argument(
        "--calibration-size", type=int, default=None, help="our fast INT8 export's prompts (default: the exporter's)"
    )
    parser.add_argument(
        "--calibration-resolution", type=int, default=None, help="and its size in px (default: the exporter's)"
    )
    parser.add_argument("--re-export", action="store_true", help="export both sides again")
    parser.add_argument("--report-only", action="store_true", help="RESULTS.md's section again from the JSON")
    return parser.parse_args(argv)


def engine_names(requested: list[str]) -> list[str]:
    """``--engines`` with its sets expanded, in the run order."""
    names = set(requested)
    if "all" in names:
        names |= set(ENGINES)
    if "fast-int8" in names:
        names |= set(FAST_INT8_ENGINES)
    return [name for name in ENGINES if name in names]


def ensure_model(work_dir: Path, family: Family, taesd: bool) -> dict[str, Any] | None:
    """The family's random model (built once; the full-size ones take 10+ GB of memory for a minute) and, for the
    fast rows, the TAESD-shaped AutoencoderTiny (``models.build_taesd``: TAESDXL's architecture)."""
    wanted = [family.key, *(["taesd"] if taesd else [])]
    missing = [name for name in wanted if not (work_dir / name / "bench-model-complete.json").is_file()]
    if not missing:
        return None
    command = [sys.executable, str(common.BENCH_DIR / "models.py"), str(work_dir), *(f"--{name}" for name in missing)]
    common.log(f"{family.key}: building the model: {shlex.join(command)}")
    return common.measured(command, work_dir / "logs" / f"{family.key}-model.log")


def _bytes_on_disk(folder: Path) -> int:
    """The files of ``folder``, not what its symlinks point to (the peer's fast IR links the rest of its IR)."""
    return sum(
        (Path(root) / name).stat().st_size
        for root, _, files in os.walk(folder)
        for name in files
        if not (Path(root) / name).is_symlink()
    )


def peer_int8_job(work_dir: Path, family: Family, vae_scale_factor: int) -> dict[str, Any]:
    """``worker.py optimum-int8``'s job: the peer's fast IR and its NNCF INT8, calibrated on the prompts, steps,
    guidance and size that our fast INT8 bundle's manifest records for its own calibration."""
    from lcm_export.calibration.prompts import CALIBRATION_PROMPTS

    manifest = json.loads((work_dir / family.fast_int8_bundle / "manifest.json").read_text())
    variant = next(v for v in manifest["components"]["unet"]["variants"] if v["precision"] == "int8")
    calibration = variant["produced_by"]["calibration"]
    return {
        "ir": str(work_dir / family.optimum_ir),
        "taesd": str(work_dir / "taesd"),
        "fast": str(work_dir / f"{family.optimum_ir}-fast"),
        "int8": str(work_dir / f"{family.optimum_ir}-fast-int8"),
        "pipeline": "OVStableDiffusionXLPipeline",
        "vae_scale_factor": vae_scale_factor,
        "prompts": list(CALIBRATION_PROMPTS[: calibration["prompts"]]),
        "size": calibration["size"][0],
        "steps": calibration["steps"],
        "guidance": calibration["guidance"],
    }


def exports(
    arguments: argparse.Namespace,
    family: Family,
    needed: set[str],
    optimum_python: str | None,
    vae_scale_factor: int,
) -> dict[str, Any]:
    """What ``needed`` names (of ours, ours-fast-int8, optimum, optimum-fast-int8), each exported in its own process
    (wall time, peak RSS), reused while its command is unchanged."""
    work_dir = arguments.work_dir
    metrics_path = work_dir / family.metrics
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}

    def export(name: str, command: list[str], done: Path, **extra: Any) -> None:
        if done.is_file() and metrics.get(name, {}).get("command") == shlex.join(command) and not arguments.re_export:
            common.log(f"{family.key}: export {name}: reusing {done.parent}")
            return
        common.log(f"{family.key}: export {name}: {shlex.join(command)}")
        result = common.measured(command, work_dir / "logs" / f"{family.key}-export-{name}.log")
        metrics[name] = {**result, "command": shlex.join(command), "date": time.strftime("%Y-%m-%d %H:%M"), **extra}
        metrics[name]["bytes"] = _bytes_on_disk(done.parent)
        common.log(f"{family.key}: export {name}: {result['seconds']:.0f} s, peak RSS {result['peak_rss_gb']:.2f} GB")
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")

    exporter = [sys.executable, "-m", "lcm_export.exporter.cli", str(work_dir / family.key)]
    if "ours" in needed:
        bundle = work_dir / family.bundle
        export("ours", [*exporter, "-o", str(bundle), "--overwrite", "--quiet"], bundle / "manifest.json")
    if "ours-fast-int8" in needed:
        fast = work_dir / family.fast_int8_bundle
        calibration = []
        if arguments.calibration_size is not None:
            calibration += ["--calibration-size", str(arguments.calibration_size)]
        if arguments.calibration_resolution is not None:
            calibration += ["--calibration-resolution", str(arguments.calibration_resolution)]
        command = [*exporter, "--tiny-vae", str(work_dir / "taesd"), "--precision", "int8", "--keep-fp32"]
        export(
            "ours-fast-int8",
            [*command, *calibration, "-o", str(fast), "--overwrite", "--quiet"],
            fast / "manifest.json",
        )
    if optimum_python and "optimum" in needed:
        command = [optimum_python, str(common.WORKER), "optimum-export-fp16", str(work_dir / family.key)]
        ir = work_dir / family.optimum_ir
        export("optimum", [*command, str(ir)], ir / "model_index.json")
    if optimum_python and "optimum-fast-int8" in needed:
        job = peer_int8_job(work_dir, family, vae_scale_factor)
        command = [optimum_python, str(common.WORKER), "optimum-int8", json.dumps(job)]
        export("optimum-fast-int8", command, Path(job["int8"]) / "unet" / "openvino_model.xml", job=job)
    return metrics


def engine_specs(work_dir: Path, family: Family, names: list[str], optimum_python: str | None) -> list[common.Engine]:
    from lcm_export.runtime.backends import choose_backend

    ov_default = common.openvino_default_precision()
    auto = choose_backend("auto", {"onnx"})  # resolved, so that rows equal on this machine share a key (and a run)

    def ours(backend: str, precision: str, bundle: str = family.bundle) -> dict[str, Any]:
        return {
            "engine": "lcm-export",
            "bundle": str(work_dir / bundle),
            "backend": backend,
            "precision": precision,  # "int8": the INT8 variants at the device's float; "fp32": the float ones
            "static_shape": True,
            "cache_dir": "",
        }

    optimum = {
        "engine": "optimum-intel",
        "model": str(work_dir / family.optimum_ir),
        "pipeline": "OVStableDiffusionXLPipeline",
        "precision": "fp32" if ov_default == "f32" else "auto",
        "cache_dir": "",
    }
    fast = family.fast_int8_bundle
    specs = {
        "optimum-default": optimum,
        "ours-default": ours("auto", "auto"),
        "ours-openvino-fp32": ours("openvino", "fp32"),
        "optimum-f32": {**optimum, "precision": "fp32"},
        "ours-onnxruntime": ours("onnxruntime", "fp32"),
        "diffusers": {
            "engine": "diffusers",
            "model": str(work_dir / family.key),
            "pipeline": "StableDiffusionXLPipeline",
        },
        "ours-fast-int8": ours(auto, "int8", fast),
        "optimum-fast-int8": {**optimum, "model": str(work_dir / f"{family.optimum_ir}-fast-int8")},
        "ours-fast-int8-openvino": ours("openvino", "int8", fast),
        "ours-fast-int8-onnxruntime": ours("onnxruntime", "int8", fast),
        # The --keep-fp32 bundle's float U-Net: variant "fp32" (worker.py's "fp32" mode), computed in float32.
        "ours-fast-fp32": ours("onnxruntime", "fp32", fast),
        "optimum-fast-f32": {**optimum, "model": str(work_dir / f"{family.optimum_ir}-fast"), "precision": "fp32"},
    }
    engines = []
    for name, (label, kind, _) in ENGINES.items():
        if name not in names or (kind == "optimum-intel" and optimum_python is None):
            continue
        python = optimum_python if kind == "optimum-intel" else sys.executable
        engines.append(common.Engine(name, label.format(auto=auto), kind, python, specs[name]))
    return engines


def image_path(images: Path, name: str, round_index: int) -> Path:
    """Where ``name``'s image of timed round ``round_index`` is saved (the first round's under the engine's name)."""
    return images / (f"{name}.npy" if round_index == 0 else f"{name}-round{round_index}.npy")


def run_engine(
    engine: common.Engine,
    settings: common.Settings,
    family: Family,
    size: int,
    images: Path,
    vae_scale_factor: int,
) -> dict[str, Any]:
    """Load alone, warm up, time ``settings.runs`` runs; each timed run's image is saved."""
    logs = settings.work_dir / "logs" / f"{family.key}-{size}"
    available = common.mem_available_gb()
    tag = f"{family.key} {size}px {engine.name}"
    common.log(f"{tag}: load ({available:.1f} GB available)")
    cache = settings.work_dir / "cache" / f"{family.key}-{engine.name}-{size}"  # compiled graphs: none (cache_dir "")
    worker = common.Worker(engine, size, settings, cache, logs / f"{engine.name}.log")
    ready = worker.ready()
    common.log(f"{tag}: loaded in {ready['load_s']:.1f} s ({ready['info']})")
    runs = []
    for round_index in range(-settings.warmup, settings.runs):
        save = image_path(images, engine.name, round_index) if round_index >= 0 else None
        reply = worker.send(
            {**common.run_command(settings, size, round_index, save), "vae_scale_factor": vae_scale_factor}
        )
        if round_index >= 0:
            runs.append(reply)
        common.log(
            f"{tag}: {'warm-up' if round_index < 0 else f'run {round_index + 1}'} "
            f"{reply['total']:.1f} s (U-Net {reply.get('unet', 0):.1f}, VAE {reply.get('vae_decode', 0):.1f})"
        )
    bye = worker.quit()
    return {
        "label": engine.label,
        "spec": engine.spec,
        "load_s": ready["load_s"],
        "import_s": ready["import_s"],
        "info": ready["info"],
        "runs": runs,
        "median": common.stage_medians(runs),
        "unet_calls": runs[0].get("unet_calls") if runs else None,
        "peak_rss_gb": bye["peak_rss_gb"],
        "peak_anon_gb": bye["peak_anon_gb"],
        "available_before_gb": available,
    }


def compare_images(images: Path, aliases: dict[str, str], rounds: int) -> dict[str, dict[str, float]]:
    """Max abs difference and PSNR (images in [0, 1]) of each of IMAGE_PAIRS that both ran: over every timed round
    both saved (a new prompt, latents and noise each), the largest difference and the mean and least PSNR. A pair
    whose first engine is another's run under a second name is left out (its figures are that engine's)."""
    checks = {}
    for first, second in IMAGE_PAIRS:
        if aliases.get(first, first) != first:
            continue
        differences, values = [], []
        for round_index in range(max(rounds, 1)):
            a = image_path(images, aliases.get(first, first), round_index)
            b = image_path(images, aliases.get(second, second), round_index)
            if a.is_file() and b.is_file():
                x, y = np.load(a).astype(np.float64), np.load(b).astype(np.float64)
                differences.append(float(np.abs(x - y).max()))
                values.append(psnr(y, x))
        if values:
            checks[f"{first} vs {second}"] = {
                "max_abs": max(differences),
                "psnr_db": float(np.mean(values)),
                "psnr_db_min": min(values),
                "prompts": len(values),
            }
    return checks


def ratio_rows(rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of RATIOS whose engines both have a row (an engine that is another's run under a second name: none)."""
    ratios = []
    for ours, reference, goal in RATIOS:
        if ours in rows and reference in rows and not rows[ours].get("same_as"):
            total = rows[reference]["median"]["total"] / rows[ours]["median"]["total"]
            ratios.append(
                {
                    "ours": ours,
                    "reference": reference,
                    "total": total,
                    "unet": rows[reference]["median"]["unet"] / rows[ours]["median"]["unet"],
                    "goal": goal,
                    "met": None if goal is None else total >= goal,
                }
            )
    return ratios


def psnr_goals(checks: dict[str, dict[str, float]]) -> None:
    """Issue 28's image goal on each of our fast INT8 pairs, in place: mean PSNR at least the peer's."""
    peer = checks.get(PEER_PSNR)
    for pair in PSNR_AT_LEAST_PEER:
        if pair in checks and peer is not None:
            checks[pair]["goal_psnr_db"] = peer["psnr_db"]
            checks[pair]["met"] = checks[pair]["psnr_db"] >= peer["psnr_db"]


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _met(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "no")


def results_family(results: dict[str, Any]) -> Family:
    """The family of a results file (the first SDXL results have no such key)."""
    return Family(results.get("family", "sdxl"), results.get("tiny", False))


def section_lines(results: dict[str, Any]) -> list[str]:
    settings, family = results["settings"], results_family(results)
    machine = results.get("machine", {})
    isa = ", ".join(flag for flag, present in machine.get("isa", {}).items() if present)
    lines = [
        family.section_start,
        f"## {family.title}: ours vs diffusers vs optimum-intel (issues 17 and 28, run {results['date']})",
        "",
        "```",
        settings["command"],
        "```",
        "",
        f"{TITLES[family.name]}-shaped random LCM (bench/models.py `--{family.key}`, fp16 on disk), "
        f"{machine.get('cpu', 'CPU')} ({isa}), {settings['steps']} steps, guidance {settings['guidance']} (the "
        f"U-Net's guidance embedding: no CFG batch), batch 1, {settings['threads']} threads; each engine alone in its "
        f"own process, one after another (memory); median of {settings['runs']} runs after {settings['warmup']} "
        "warm-up; the same prompt, latents and noise in each round for every engine. Loads without a compiled-model "
        "cache on both OpenVINO sides. Peak "
        "RSS counts mapped model files; the anonymous peak does not.",
        "",
    ]
    for name, export in results["exports"].items():
        lines.append(
            f"- Export, {EXPORT_LABELS.get(name, name)}: {export['seconds']:.0f} s, peak RSS "
            f"{export['peak_rss_gb']:.2f} GB, {export['bytes'] / 1e9:.1f} GB on disk ({export['date']})."
        )
    lines.append("")
    for size, block in results["sizes"].items():
        lines += [
            f"### {size}×{size}",
            "",
            "| engine | backend, precision | load (s) | run (s) | U-Net, all calls (s) | VAE decode (s) | "
            "text encoders (s) | peak RSS (GB) | anonymous peak (GB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in block["engines"].values():
            info = row["info"]
            precision = ", ".join(info.get("inference_precision", []))
            if "unet" in info.get("variants", {}):  # ours: which U-Net weights ran
                precision += f", U-Net {info['variants']['unet']}"
            median = row["median"]
            when = f" (run {row['from_run']})" if row.get("from_run") else ""
            same = f" (the same run as {row['same_as']})" if row.get("same_as") else ""
            lines.append(
                f"| {row['label']}{when}{same} | {info.get('backend')}, {precision} | {row['load_s']:.1f} | "
                f"{_seconds(median['total'])} | {_seconds(median['unet'])} | {_seconds(median['vae_decode'])} | "
                f"{median['text_encoder']:.2f} | {row['peak_rss_gb']:.2f} | {row['peak_anon_gb']:.2f} |"
            )
        lines += [
            "",
            "| ratio (reference time / ours) | end to end | U-Net | goal (end to end) | goal met |",
            "|---|---|---|---|---|",
        ]
        for ratio in block["ratios"]:
            goal = f"≥ {ratio['goal']:g}×" if ratio.get("goal") is not None else ""
            lines.append(
                f"| {ratio['reference']} / {ratio['ours']} | {ratio['total']:.2f}× | {ratio['unet']:.2f}× | {goal} | "
                f"{_met(ratio.get('met'))} |"
            )
        lines += [
            "",
            "| images (timed runs) | prompts | max abs | PSNR (dB), mean | PSNR (dB), least | goal | goal met |",
            "|---|---|---|---|---|---|---|",
        ]
        for pair, check in block["images"].items():
            goal = f"≥ the peer's {check['goal_psnr_db']:.2f}" if "goal_psnr_db" in check else ""
            least = f"{check['psnr_db_min']:.1f}" if "psnr_db_min" in check else "—"
            lines.append(
                f"| {pair} | {check.get('prompts', 1)} | {check['max_abs']:.2e} | {check['psnr_db']:.2f} | {least} | "
                f"{goal} | {_met(check.get('met'))} |"
            )
        lines.append("")
    lines += [f"- {note}" for note in notes(results)]
    lines.append(family.section_end)
    return lines


def notes(results: dict[str, Any]) -> list[str]:
    """What the table needs to be read right, with the figures it rests on."""
    family, exports = results_family(results), results["exports"]
    rows = {name for block in results["sizes"].values() for name in block["engines"]}
    images = {pair for block in results["sizes"].values() for pair in block["images"]}
    lines = ["Ratios above 1: ours is faster."]
    if "ours-default" in rows:
        lines[0] += (
            " `ours default` resolves `auto` on this machine (OpenVINO where installed and the CPU has a float faster "
            "than f32, else onnxruntime) and the plugin's default precision (bf16 on a CPU with AVX-512 BF16, f32 "
            "without); optimum-intel's default row runs the same plugin default. fp32 against fp32: ours onnxruntime "
            "against diffusers, ours OpenVINO fp32 against optimum-intel f32 (`--engines all`)."
        )
    if "ours-openvino-fp32 vs optimum-f32" in images:
        lines.append(
            "Images: our fp32 rows share weights, latents and noise with diffusers', so they differ by float rounding "
            "only. optimum-intel's f32 image is as far from ours as its bf16 one: the difference is on its side; it "
            "exports an fp16 checkpoint by tracing it in fp16 (its patched 16-bit export), the likely cause (not "
            "isolated). bf16 rows differ from fp32 ones by bf16's rounding, amplified through 4 steps of a "
            "random-weight model."
        )
    if rows & {"ours-fast-int8", "optimum-fast-int8"}:
        peer = exports.get("optimum-fast-int8", {}).get("job")
        calibration = (
            f"{len(peer['prompts'])} prompts × {peer['steps']} steps at {peer['size']} px, guidance {peer['guidance']}"
            if peer
            else "our calibration's prompts, steps, guidance and size"
        )
        lines.append(
            "Fast INT8 (issue 28): ours is the `--precision int8 --keep-fp32` bundle with the TAESD-shaped decoder "
            "(TAESDXL's architecture) run with its INT8 U-Net (`variant=\"int8\"`) at the backend's default "
            'precision; `ours fast fp32` is the same bundle\'s float U-Net (`variant="fp32"`, onnxruntime fp32). '
            "The peer's (FastSD CPU's recipe, OpenVINO's LCM notebook): optimum-intel's fp16 IR with TAESD's decoder "
            "converted to IR in place of the VAE decoder and its U-Net quantised by `nncf.quantize` "
            "(`model_type=TRANSFORMER`, bias correction off) on the U-Net inputs recorded from optimum-intel's own "
            f"pipeline running what our manifest records for our calibration ({calibration}); `optimum-intel, float "
            "U-Net + TAESD, f32` is that IR before quantisation. Each side's PSNR is its INT8 image against its own "
            "float one (same weights, decoder, latents and noise), over every timed round's prompt; the two sides' "
            "images are not compared with each other (the peer's float image differs from ours already, above)."
        )
    if any(block["engines"].get(name, {}).get("same_as") for block in results["sizes"].values() for name in rows):
        lines.append(
            "A row marked 'the same run as' another has the same configuration on this machine (`auto` resolved to "
            "that backend): it ran once, and its ratios and image checks are the other row's."
        )
    if "ours" in exports and "optimum" in exports:
        cold = (
            " a first load right after the export, with the 14 GB bundle read cold from disk, took 186 s on OpenVINO "
            "(SDXL, 2026-11-30)."
            if family.name == "sdxl" and not family.tiny
            else ""
        )
        lines.append(
            "Load: ours checks every file's sha256 the first time a bundle is loaded and remembers it by size and "
            f"time;{cold} optimum-intel reads {exports['optimum']['bytes'] / 1e9:.1f} GB of fp16 IR, ours "
            f"{exports['ours']['bytes'] / 1e9:.1f} GB of fp32 ONNX."
        )
    for size, block in results["sizes"].items():
        engines = block["engines"]
        if "ours-default" in engines and "optimum-default" in engines:
            ours, peer = engines["ours-default"], engines["optimum-default"]
            lines.append(
                f"Memory at {size} px: ours on OpenVINO peaks at {ours['peak_anon_gb']:.2f} GB anonymous against "
                f"optimum-intel's {peer['peak_anon_gb']:.2f} GB. Ours hands the plugin fp32 weights (read from the "
                "ONNX) that it converts to its inference precision while compiling, with the model still held; "
                "optimum-intel's IR carries fp16 weights mapped from its .bin. Without a compile cache (as here, for "
                "disk space) our static-shape model is compiled from memory; with the runtime's default cache it is "
                "saved as IR once and compiled from that file (not measured at this size)."
            )
    lines.append(
        f"Load average (1, 5, 15 min) before the run {results['load_average_before']}, after "
        f"{results['load_average_after']}."
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    arguments = parse_arguments(argv)
    family = Family(arguments.family, arguments.tiny)
    work_dir = arguments.work_dir
    # A smoke test never touches bench/'s committed results unless told to.
    output = arguments.output or (work_dir if arguments.tiny else common.BENCH_DIR)
    results_path = output / family.results_json
    if arguments.report_only:  # the section again from the family's JSON (nothing run)
        results = json.loads(results_path.read_text())
        lines = section_lines(results)
        common.write_section(output / "RESULTS.md", lines, family.section_start, family.section_end)
        return 0
    names = engine_names(arguments.engines)
    command = "python bench/run.py --sdxl " + shlex.join(argv)
    optimum_python = None
    if not arguments.no_optimum and any(ENGINES[name][1] == "optimum-intel" for name in names):
        optimum_python = common.ensure_optimum_venv()
    engines = engine_specs(work_dir, family, names, optimum_python)
    needed = {ENGINES[engine.name][2] for engine in engines} - {None}
    if "optimum-fast-int8" in needed:  # the peer's INT8 starts from its IR and calibrates like our fast INT8
        needed |= {"optimum", "ours-fast-int8"}
    model = ensure_model(work_dir, family, taesd=bool(needed & {"ours-fast-int8", "optimum-fast-int8"}))
    vae = json.loads((work_dir / family.key / "vae" / "config.json").read_text())
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)  # the worker draws latents of size / factor
    export_metrics = exports(arguments, family, needed, optimum_python, vae_scale_factor)
    settings = common.Settings(
        sizes=tuple(arguments.sizes),
        runs=arguments.runs,
        warmup=arguments.warmup,
        threads=arguments.threads,
        steps=arguments.steps,
        guidance=arguments.guidance,
        work_dir=work_dir,
        output_dir=output,
        optimum=optimum_python is not None,
        memory_budget_gb=None,
        re_export=arguments.re_export,
        command=command,
    )
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "family": family.name,
        "tiny": family.tiny,
        "settings": {
            **{key: str(value) if isinstance(value, Path) else value for key, value in vars(arguments).items()},
            "command": command,
        },
        "machine": common.machine_info(),
        "model_build": model,
        "exports": {name: export_metrics[name] for name in EXPORT_LABELS if name in export_metrics},
        "load_average_before": [round(value, 2) for value in os.getloadavg()],
        "sizes": {},
    }
    for size in arguments.sizes:
        images = work_dir / "images" / f"{family.key}-{size}"
        for engine in engines:  # the images of the engines that run again
            for path in [images / f"{engine.name}.npy", *images.glob(f"{engine.name}-round*.npy")]:
                path.unlink(missing_ok=True)
        # Engines with the same configuration on this machine run once; the others' rows are that run's.
        runners: dict[str, str] = {}
        aliases = {engine.name: runners.setdefault(engine.config_key(size), engine.name) for engine in engines}
        rows = {}
        for engine in engines:
            if aliases[engine.name] == engine.name:
                rows[engine.name] = run_engine(engine, settings, family, size, images, vae_scale_factor)
            else:
                rows[engine.name] = {
                    **rows[aliases[engine.name]],
                    "label": engine.label,
                    "same_as": aliases[engine.name],
                }
        # Engines not named this time keep their rows (and images) from the previous run, marked with its date; one
        # that was another's run under a second name follows that engine when it ran again.
        fresh = set(rows)
        for name, row in previous.get("sizes", {}).get(str(size), {}).get("engines", {}).items():
            if name in fresh:
                continue
            if row.get("same_as") in fresh:
                rows[name] = {**rows[row["same_as"]], "label": row["label"], "same_as": row["same_as"]}
            else:
                rows[name] = {**row, "from_run": row.get("from_run", previous["date"])}
            if row.get("same_as"):
                aliases[name] = row["same_as"]
        rows = {name: rows[name] for name in ENGINES if name in rows}
        checks = compare_images(images, aliases, arguments.runs)
        psnr_goals(checks)
        results["sizes"][str(size)] = {"engines": rows, "ratios": ratio_rows(rows), "images": checks}
    results["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    common.publish_section(
        output, family.results_json, results, section_lines(results), family.section_start, family.section_end
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
