"""The CPU benchmark in one command: build the SD1.5-shaped random LCM, export it, time every engine side by side.

    python bench/run.py --sizes 256 512      # the full run (results committed under bench/)
    python bench/run.py --quick              # smoke test: 256 px, 2 runs, no optimum-intel

Stages, each skipped when its output already exists in the work folder (``--work-dir``, default
``~/.cache/lcm-export/bench``): the random SD1.5-shaped pipeline and TAESD-shaped AutoencoderTiny
(``bench/models.py``); two bundles exported with ``lcm-export`` (full VAE, and ``--tiny-vae``), each export timed
with its peak RSS in its own process; optimum-intel in its own venv (``bench/.venv-optimum``, installed here from
``constraints/bench-optimum-intel.txt``) and its OpenVINO IR export of the same pipeline.

Then, per image size: every engine is first loaded alone with an empty compile cache (first load; one warm-up run
measures its memory), then loaded again for the timed runs (second load, warm cache). Engines whose memory fits
together run in one group, alternating A B C ... A B C ..., one ``run`` command at a time, each engine in its own
process (``bench/worker.py``): same prompt, latents and noise for all engines in a round, another prompt each
round (no prompt-cache advantage). Medians of ``--runs`` after ``--warmup``. Engines with the same effective
configuration on this machine (e.g. "default" precision that resolves to f32 on a CPU without bf16) run once and
are reported under each name.

Writes ``RESULTS.md`` (tables, ratios against the issue's targets, the exact command), ``results.json`` and
``results.png`` into ``--output`` (default: this folder).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import sdxl
import stream
from common import (
    BENCH_DIR,
    GIGABYTE,
    OPTIMUM_LOCK,
    OPTIMUM_VENV,
    WORKER,
    Engine,
    Settings,
    Worker,
    build_models,
    ensure_optimum_venv,
    export_jobs,
    log,
    machine_info,
    measured,
    mem_available_gb,
    openvino_default_precision,
    optimum_python,
    relock_optimum,
    run_command,
    stage_medians,
)

# -- stages -------------------------------------------------------------------------------------------------


def bundle_summary(bundle: Path) -> dict[str, Any]:
    """Bytes on disk per component folder and in all, and the INT8 variant's calibration and quality report."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    sizes = {
        folder.name: sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        for folder in bundle.iterdir()
        if folder.is_dir()
    }
    summary: dict[str, Any] = {"bytes": sum(path.stat().st_size for path in bundle.rglob("*") if path.is_file())}
    summary["component_bytes"] = sizes
    for variant in manifest["components"]["unet"]["variants"]:
        if variant["precision"] == "int8":
            summary["unet_int8_bytes"] = sum((bundle / path).stat().st_size for path in variant["files"])
            summary["calibration"] = variant.get("produced_by", {}).get("calibration")
            summary["quality"] = variant.get("quality")
    for variant in manifest["components"]["vae_decoder"]["variants"]:
        if variant["precision"] == "int8":  # the full VAE decoder (not TAESD's)
            summary["vae_decoder_int8_bytes"] = sum((bundle / path).stat().st_size for path in variant["files"])
            summary["vae_decoder_int8_psnr_db"] = variant.get("produced_by", {}).get("decoded_psnr_db")
    return summary


def export_bundles(settings: Settings) -> dict[str, Any]:
    """Export every bundle of ``export_jobs`` with lcm-export, each timed in its own process (reused while its
    command is unchanged)."""
    metrics_path = settings.work_dir / "exports.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    model = settings.work_dir / "sd15-lcm"
    jobs = export_jobs(settings.work_dir, settings.calibration_size, settings.calibration_resolution)
    for name, extra in jobs.items():
        bundle = settings.work_dir / f"bundle-{name}"
        command = [sys.executable, "-m", "lcm_export.exporter.cli", str(model), "-o", str(bundle), "--overwrite"]
        command += [*extra, "--quiet"]
        known = metrics.get(name, {})
        if (
            (bundle / "manifest.json").is_file()
            and known.get("command") == shlex.join(command)
            and not settings.re_export
        ):
            log(f"export {name}: reusing {bundle} (exported in {known['seconds']:.0f} s)")
            continue
        log(f"export {name}: {shlex.join(command)}")
        result = measured(command, settings.work_dir / "logs" / f"export-{name}.log")
        metrics[name] = {**result, "command": shlex.join(command), "date": time.strftime("%Y-%m-%d %H:%M")}
        metrics[name]["bundle"] = bundle_summary(bundle)
        log(f"export {name}: {result['seconds']:.0f} s, peak RSS {result['peak_rss_gb']:.2f} GB")
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def setup_optimum(settings: Settings) -> dict[str, Any]:
    """optimum-intel's venv (from its lock, created once) and its OpenVINO IR export of the same pipeline (once)."""
    python = ensure_optimum_venv()
    versions = subprocess.run(
        [
            python,
            "-c",
            "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('optimum-intel', 'openvino', 'torch', 'diffusers', 'transformers')}))",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    info: dict[str, Any] = {"versions": json.loads(versions.stdout)}
    ov_dir = settings.work_dir / "optimum-ov"
    metrics_path = settings.work_dir / "optimum-export.json"
    if not (ov_dir / "model_index.json").is_file() or not metrics_path.is_file():
        command = [python, str(WORKER), "optimum-export", str(settings.work_dir / "sd15-lcm"), str(ov_dir)]
        log(f"optimum-intel export: {shlex.join(command)}")
        result = measured(command, settings.work_dir / "logs" / "optimum-export.log")
        metrics_path.write_text(json.dumps(result, indent=2) + "\n")
        log(f"optimum-intel export: {result['seconds']:.0f} s, peak RSS {result['peak_rss_gb']:.2f} GB")
    info["export"] = json.loads(metrics_path.read_text())
    info["model"] = str(ov_dir)
    info.update(build_optimum_int8(settings, python, ov_dir))
    return info


def build_optimum_int8(settings: Settings, python: str, ov_dir: Path) -> dict[str, Any]:
    """The peer's fast pipelines from optimum-intel's IR: TAESD decoder (float U-Net), and the same with an NNCF
    INT8 U-Net calibrated like ours (the prompts, steps, guidance and size our fast INT8 bundle's manifest records),
    built once per calibration, timed with its peak RSS in its own process (``worker.py optimum-int8``)."""
    from lcm_export.calibration.prompts import CALIBRATION_PROMPTS

    manifest = json.loads((settings.work_dir / "bundle-fast-int8" / "manifest.json").read_text())
    variant = next(v for v in manifest["components"]["unet"]["variants"] if v["precision"] == "int8")
    calibration = variant["produced_by"]["calibration"]
    job = {
        "ir": str(ov_dir),
        "taesd": str(settings.work_dir / "taesd"),
        "fast": str(settings.work_dir / "optimum-ov-fast"),
        "int8": str(settings.work_dir / "optimum-ov-fast-int8"),
        "prompts": list(CALIBRATION_PROMPTS[: calibration["prompts"]]),
        "size": calibration["size"][0],
        "steps": calibration["steps"],
        "guidance": calibration["guidance"][0],
    }
    metrics_path = settings.work_dir / "optimum-int8.json"
    known = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if known.get("job") != job or not (Path(job["int8"]) / "model_index.json").exists():
        command = [python, str(WORKER), "optimum-int8", json.dumps(job)]
        log(f"optimum-intel INT8 (NNCF) + TAESD: {len(job['prompts'])} prompts at {job['size']} px")
        result = measured(command, settings.work_dir / "logs" / "optimum-int8.log")
        known = {**result, "job": job, "date": time.strftime("%Y-%m-%d %H:%M")}
        metrics_path.write_text(json.dumps(known, indent=2) + "\n")
        log(f"optimum-intel INT8: {result['seconds']:.0f} s, peak RSS {result['peak_rss_gb']:.2f} GB")
    unet = Path(job["int8"]) / "unet"
    known["unet_int8_bytes"] = sum(path.stat().st_size for path in unet.iterdir() if path.is_file())
    return {"int8": known, "model_fast": job["fast"], "model_fast_int8": job["int8"]}


def define_engines(settings: Settings, optimum: dict[str, Any] | None) -> list[Engine]:
    """Every row: ours (parity, default, fast, each backend), diffusers, optimum-intel (default, f32)."""
    from lcm_export.runtime.backends import choose_backend

    python = sys.executable
    work = settings.work_dir
    auto = choose_backend("auto", {"onnx"})
    ov_default = openvino_default_precision()

    def ours(backend: str, precision: str, bundle: str, low_memory: bool = False) -> dict[str, Any]:
        # What the precision option resolves to, so equal computations share a key (and a run).
        if precision == "int8":
            pass  # the bundle's INT8 variant, on either backend
        elif backend == "onnxruntime":
            precision = "fp32"  # the CPU provider runs the bundle's fp32 graph
        elif backend == "openvino" and precision == "auto" and ov_default == "f32":
            precision = "fp32"
        return {
            "engine": "lcm-export",
            "bundle": str(work / bundle),
            "backend": backend,
            "precision": precision,
            "static_shape": True,  # the size is known at load: static shapes (see README)
            "low_memory": low_memory,
        }

    def engine(name: str, label: str, kind: str, spec: dict[str, Any], order: int, venv: str = python, **more):
        return Engine(name, label, kind, venv, spec, order, **more)

    diffusers = {"engine": "diffusers", "model": str(work / "sd15-lcm")}
    engines = [
        engine("ours-default", f"ours default ({auto})", "lcm-export", ours(auto, "auto", "bundle-full"), 1),
        engine("ours-fast", f"ours fast (tiny VAE, {auto})", "lcm-export", ours(auto, "auto", "bundle-fast"), 2),
        engine("diffusers", "diffusers fp32 (torch)", "diffusers", diffusers, 3),
        engine("ours-parity", f"ours parity ({auto}, fp32)", "lcm-export", ours(auto, "fp32", "bundle-full"), 4),
        engine(
            "ours-openvino-default", "ours OpenVINO default", "lcm-export", ours("openvino", "auto", "bundle-full"), 6
        ),
        engine("ours-openvino-fp32", "ours OpenVINO fp32", "lcm-export", ours("openvino", "fp32", "bundle-full"), 6),
        engine(
            "ours-onnxruntime", "ours onnxruntime fp32", "lcm-export", ours("onnxruntime", "fp32", "bundle-full"), 7
        ),
        engine(
            "ours-low-memory",
            f"ours default, --low-memory ({auto})",
            "lcm-export",
            ours(auto, "auto", "bundle-full", low_memory=True),
            8,
            shares_cache_of="ours-default",  # low_memory changes no compiled graph, only how memory is allocated
        ),
        engine("ours-int8", "ours INT8 (onnxruntime)", "lcm-export", ours("onnxruntime", "int8", "bundle-int8"), 1),
        engine(
            "ours-fast-int8",
            "ours fast INT8 (tiny VAE, onnxruntime)",
            "lcm-export",
            ours("onnxruntime", "int8", "bundle-fast-int8"),
            2,
        ),
        engine(
            "ours-fast-fp32",
            "ours fast fp32 (onnxruntime; the INT8 rows' image reference)",
            "lcm-export",
            ours("onnxruntime", "fp32", "bundle-fast"),
            2,
        ),
        engine(
            "ours-fast-int8-sliced",
            "ours fast INT8, --attention-slicing --low-memory (onnxruntime)",
            "lcm-export",
            ours("onnxruntime", "int8", "bundle-fast-int8-sliced", low_memory=True),
            2,
        ),
        engine("ours-openvino-int8", "ours OpenVINO INT8", "lcm-export", ours("openvino", "int8", "bundle-int8"), 6),
        engine(
            "ours-openvino-fast-int8",
            "ours OpenVINO fast INT8 (tiny VAE)",
            "lcm-export",
            ours("openvino", "int8", "bundle-fast-int8"),
            1.5,  # first of its group, beside the peer INT8: the two alternate under the same load
        ),
    ]
    if optimum is not None:
        venv = optimum_python()
        default = {
            "engine": "optimum-intel",
            "model": optimum["model"],
            "precision": "fp32" if ov_default == "f32" else "auto",
        }
        engines += [
            engine("optimum-default", "OpenVINO via optimum-intel, default", "optimum-intel", default, 0, venv),
            engine(
                "optimum-f32",
                "OpenVINO via optimum-intel, f32",
                "optimum-intel",
                {**default, "precision": "fp32"},
                5,
                venv,
            ),
            engine(
                "optimum-fast-int8",
                "OpenVINO via optimum-intel, NNCF INT8 U-Net + TAESD",
                "optimum-intel",
                {**default, "model": optimum["model_fast_int8"]},
                1.5,
                venv,
            ),
            engine(
                "optimum-fast",
                "OpenVINO via optimum-intel, float U-Net + TAESD (image reference)",
                "optimum-intel",
                {**default, "model": optimum["model_fast"]},
                2,
                venv,
                timed=False,
            ),
            engine(
                "optimum-fast-f32",
                "OpenVINO via optimum-intel, f32 U-Net + TAESD (the INT8 row's fp32 image reference)",
                "optimum-intel",
                {**default, "model": optimum["model_fast"], "precision": "fp32"},
                2,
                venv,
            ),
        ]
    return sorted(engines, key=lambda engine: engine.group_order)


def selected(engines: list[Engine], only: tuple[str, ...]) -> list[Engine]:
    """The engines ``--engines`` names (all when it names none)."""
    unknown = set(only) - {engine.name for engine in engines}
    if unknown:
        raise SystemExit(f"error: --engines: unknown {', '.join(sorted(unknown))}")
    return [engine for engine in engines if not only or engine.name in only]


def bench_size(settings: Settings, size: int, engines: list[Engine]) -> dict[str, Any]:
    """First loads, memory probe, then the alternating timed runs of every distinct engine at ``size``."""
    distinct: dict[str, Engine] = {}
    aliases: dict[str, str] = {}
    for engine in engines:
        key = engine.config_key(size)
        distinct.setdefault(key, engine)
        aliases[engine.name] = distinct[key].name
    runnable = list(distinct.values())
    logs = settings.work_dir / "logs" / str(size)
    images = settings.work_dir / "images" / str(size)
    shutil.rmtree(images, ignore_errors=True)
    results: dict[str, dict[str, Any]] = {engine.name: {"runs": []} for engine in runnable}

    # 1. First load of each engine alone, with an empty compile cache; one run measures its memory at this size.
    names = {engine.name for engine in runnable}
    for engine in runnable:
        cache = settings.work_dir / "cache" / f"{engine.cache_name()}-{size}"
        if engine.shares_cache_of not in names:  # a cache of its own (or its owner does not run): start empty
            shutil.rmtree(cache, ignore_errors=True)
        log(f"{size}px {engine.name}: first load ({'empty cache' if not cache.exists() else 'shared warm cache'})")
        worker = Worker(engine, size, settings, cache, logs / f"{engine.name}.log")
        ready = worker.ready()
        # The same seed and prompt for every engine: its image is the one the image checks compare.
        worker.send(run_command(settings, size, 10_000, images / f"{engine.name}.npy"))
        bye = worker.quit()
        # Second load right away, in a new process: a restart of the app (warm compile cache, files recently read).
        second_ready = ready
        if engine.timed:
            second = Worker(engine, size, settings, cache, logs / f"{engine.name}.log")
            second_ready = second.ready()
            second.quit()
        results[engine.name].update(
            load_first_s=ready["load_s"],
            load_second_s=second_ready["load_s"] if engine.timed else None,
            import_s=ready["import_s"],
            info=ready["info"],
            info_second=second_ready["info"],
            probe_peak_rss_gb=bye["peak_rss_gb"],
        )
        log(
            f"{size}px {engine.name}: first load {ready['load_s']:.1f} s, second {second_ready['load_s']:.1f} s, "
            f"peak RSS with one run {bye['peak_rss_gb']:.2f} GB"
        )

    # 2. Groups that fit in memory together, in the order that keeps compared engines side by side.
    budget = settings.memory_budget_gb or 0.8 * mem_available_gb()
    groups: list[list[Engine]] = []
    for engine in (engine for engine in runnable if engine.timed):
        need = results[engine.name]["probe_peak_rss_gb"] * 1.1
        if groups and sum(results[e.name]["probe_peak_rss_gb"] * 1.1 for e in groups[-1]) + need <= budget:
            groups[-1].append(engine)
        else:
            groups.append([engine])
    log(f"{size}px groups within {budget:.1f} GB: " + " | ".join(", ".join(e.name for e in g) for g in groups))

    # 3. Second load (warm cache), warm-up, then runs alternating across the group's engines.
    for index, group in enumerate(groups):
        later = {engine.cache_name() for other in groups[index + 1 :] for engine in other}
        workers = {}
        for engine in group:
            cache = settings.work_dir / "cache" / f"{engine.cache_name()}-{size}"
            worker = Worker(engine, size, settings, cache, logs / f"{engine.name}.log")
            results[engine.name]["load_in_group_s"] = worker.ready()["load_s"]
            workers[engine.name] = worker
        for round_index in range(-settings.warmup, settings.runs):
            for name, worker in workers.items():
                # Every timed round's image too (a new prompt and seed each round, the same for every engine):
                # PSNR pairs are averaged over these prompts, not taken from one image.
                save = images / f"{name}-round{round_index}.npy" if round_index >= 0 else None
                reply = worker.send(run_command(settings, size, round_index, save))
                if round_index >= 0:
                    results[name]["runs"].append(reply)
                log(
                    f"{size}px {name}: {'warm-up' if round_index < 0 else f'run {round_index + 1}/{settings.runs}'} "
                    f"{reply['total']:.2f} s (U-Net {reply.get('unet', 0):.2f}, VAE {reply.get('vae_decode', 0):.2f})"
                )
        for engine in group:
            bye = workers[engine.name].quit()
            results[engine.name].update(peak_rss_gb=bye["peak_rss_gb"], peak_anon_gb=bye["peak_anon_gb"])
            # Compiled/optimised caches are gigabytes per engine and size: gone once no later engine reads them.
            if engine.cache_name() not in later:
                shutil.rmtree(settings.work_dir / "cache" / f"{engine.cache_name()}-{size}", ignore_errors=True)
    for result in results.values():
        if result["runs"]:  # engines run only for their image have none
            result["median"] = stage_medians(result["runs"])
    rows = {engine.name: {**results[aliases[engine.name]], "same_as": aliases[engine.name]} for engine in engines}
    checks = image_checks(images, aliases, settings.runs)
    return {"rows": rows, "groups": [[e.name for e in g] for g in groups], "images": checks}


# PSNR pairs (quantised or default precision, its float reference with the same weights and decoder).
PSNR_PAIRS = (
    ("ours-default", "ours-parity"),
    ("ours-openvino-default", "ours-openvino-fp32"),
    ("ours-int8", "ours-onnxruntime"),
    # INT8 against the same weights in fp32 (the measure): our onnxruntime fp32 run, the peer's f32 run
    ("ours-fast-int8", "ours-fast-fp32"),
    ("ours-fast-int8-sliced", "ours-fast-fp32"),
    ("ours-openvino-fast-int8", "ours-fast-fp32"),
    ("optimum-fast-int8", "optimum-fast-f32"),
    # and against each side's default float run (bf16 on a bf16 CPU: both sides' default)
    ("ours-fast-int8", "ours-fast"),
    ("optimum-fast-int8", "optimum-fast"),
)


def psnr_key(image: str, reference: str) -> str:
    return f"{image} vs {reference} PSNR dB"


def image_checks(folder: Path, aliases: dict[str, str], rounds: int = 0) -> dict[str, Any]:
    """Parity (max abs difference against diffusers, first-load image) and PSNR of each of ``PSNR_PAIRS``: the mean
    over every prompt both engines ran (the first-load image and each timed round's), with its minimum and count."""
    import numpy as np

    from lcm_export.calibration.quality import psnr

    def load(name: str, suffix: str = ""):
        path = folder / f"{aliases.get(name, name)}{suffix}.npy"
        return np.load(path) if path.is_file() else None

    checks: dict[str, Any] = {}
    reference = load("diffusers")
    for name in ("ours-parity", "ours-openvino-fp32", "ours-onnxruntime", "ours-low-memory"):
        image = load(name)
        if reference is not None and image is not None:
            checks[f"{name} vs diffusers max abs"] = float(np.abs(image - reference).max())
    suffixes = ["", *(f"-round{index}" for index in range(rounds))]
    for default, parity in PSNR_PAIRS:
        values = []
        for suffix in suffixes:
            first, second = load(default, suffix), load(parity, suffix)
            if first is not None and second is not None:
                values.append(psnr(second, first))
        if values:
            checks[psnr_key(default, parity)] = float(np.mean(values))
            if len(values) > 1:
                checks[psnr_key(default, parity) + f" min of {len(values)} prompts"] = float(np.min(values))
    return checks


# -- report -------------------------------------------------------------------------------------------------


def ratios(sizes: dict[str, Any], exports: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    checks: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: str, met: bool | None) -> None:
        checks.append({"check": name, "value": value, "target": target, "met": met})

    def ratio(rows: dict[str, Any], numerator: str, denominator: str) -> float | None:
        """End-to-end median of ``numerator`` over ``denominator`` (None when either did not run)."""
        if "median" not in rows.get(numerator, {}) or "median" not in rows.get(denominator, {}):
            return None
        return rows[numerator]["median"]["total"] / rows[denominator]["median"]["total"]

    def unet_per_call(row: dict[str, Any] | None) -> float | None:
        if not row or "median" not in row:
            return None
        return row["median"]["unet"] / (row["runs"][0].get("unet_calls") or 1)

    for size, data in sizes.items():
        rows = data["rows"]

        value = ratio(rows, "ours-parity", "optimum-f32")
        add(f"{size}px parity / OpenVINO f32", value, "≤ 1.05", None if value is None else value <= 1.05)
        value = ratio(rows, "ours-default", "optimum-default")
        add(f"{size}px default / OpenVINO default", value, "≤ 1.05", None if value is None else value <= 1.05)
        value = ratio(rows, "diffusers", "ours-fast")
        add(f"{size}px fast speed-up over diffusers fp32", value, "≥ 4", None if value is None else value >= 4)
        value = ratio(rows, "optimum-default", "ours-fast")
        add(f"{size}px fast speed-up over OpenVINO default", value, "≥ 1.5", None if value is None else value >= 1.5)
        for name in ("ours-default", "ours-fast"):
            value = rows[name].get("load_second_s") if name in rows else None
            add(f"{size}px {name} second load (s)", value, "≤ 3", None if value is None else value <= 3)
        if size == max(sizes):
            ours = rows.get("ours-default", {}).get("peak_rss_gb")
            theirs = rows.get("optimum-default", {}).get("peak_rss_gb")
            add(f"{size}px default peak RSS (GB)", ours, "≤ 4", None if ours is None else ours <= 4)
            low = rows.get("ours-low-memory", {}).get("peak_rss_gb")
            add(f"{size}px default --low-memory peak RSS (GB)", low, "≤ 4", None if low is None else low <= 4)
            met = None if ours is None or theirs is None else ours < theirs
            add(
                f"{size}px default peak RSS below OpenVINO default's ({theirs and round(theirs, 2)} GB)", ours, "<", met
            )
        add_int8_checks(rows, size, size == max(sizes), add, ratio, unet_per_call, data["images"])
    for name, metrics in exports.items():
        limit = 600 if "int8" in name else 300  # INT8: the export with its calibration and quality report
        add(f"export {name} time (s)", metrics["seconds"], f"≤ {limit}", metrics["seconds"] <= limit)
        add(f"export {name} peak RSS (GB)", metrics["peak_rss_gb"], "≤ 12", metrics["peak_rss_gb"] <= 12)
    return checks


# Our fast INT8 rows, one per CPU backend: onnxruntime, and OpenVINO (what `auto` runs where OpenVINO is installed
# and the CPU has a fast float, as the peer runs).
FAST_INT8_ROWS = (("ours-fast-int8", "onnxruntime"), ("ours-openvino-fast-int8", "OpenVINO"))


def add_int8_checks(rows, size, largest, add, ratio, unet_per_call, images) -> None:
    """The INT8 issue's targets: U-Net speed-up, fast INT8 against diffusers and the peer, memory, image quality."""
    # ours-int8 / ours-onnxruntime: the same backend; ours-fast runs `auto`'s backend (OpenVINO bf16 on a bf16 CPU).
    pairs = (
        ("ours-int8", "ours-onnxruntime"),
        ("ours-fast-int8", "ours-fast"),
        ("ours-openvino-fast-int8", "ours-fast"),
    )
    for int8, float_ in pairs:
        quantised, reference = unet_per_call(rows.get(int8)), unet_per_call(rows.get(float_))
        value = reference / quantised if quantised and reference else None
        add(f"{size}px U-Net per call {float_} / {int8}", value, "≥ 1.5", None if value is None else value >= 1.5)
    for name, backend in (*FAST_INT8_ROWS, ("ours-fast-int8-sliced", "--attention-slicing --low-memory")):
        value = ratio(rows, "diffusers", name)
        add(
            f"{size}px fast INT8 ({backend}) speed-up over diffusers fp32",
            value,
            "≥ 3.5",
            None if value is None else value >= 3.5,
        )
    for name, backend in FAST_INT8_ROWS:
        value = ratio(rows, name, "optimum-fast-int8")
        add(
            f"{size}px fast INT8 ({backend}) / peer INT8 (optimum-intel NNCF + TAESD)",
            value,
            "≤ 1",
            None if value is None else value <= 1,
        )
    if largest:
        for name, label in (("ours-fast-int8", ""), ("ours-fast-int8-sliced", " (--attention-slicing --low-memory)")):
            value = rows.get(name, {}).get("peak_rss_gb")
            add(f"{size}px fast INT8{label} peak RSS (GB)", value, "≤ 2", None if value is None else value <= 2)
    peer = images.get(psnr_key("optimum-fast-int8", "optimum-fast-f32"))
    for name, backend in FAST_INT8_ROWS:
        ours = images.get(psnr_key(name, "ours-fast-fp32"))
        met = None if ours is None or peer is None else ours >= peer
        add(
            f"{size}px PSNR (dB) fast INT8 ({backend}) vs its fp32, ours ≥ peer's ({peer and round(peer, 2)} dB)",
            ours,
            "≥ peer",
            met,
        )


def _number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def size_table_lines(results: dict[str, Any], heading: str = "##") -> list[str]:
    """Per size: the engines' table, the groups that ran together and the image checks."""
    lines: list[str] = []
    for size, data in results["sizes"].items():
        lines += [
            f"{heading} {size}×{size}",
            "",
            "| engine | backend, precision | end to end (s) | runs min–max (s) | U-Net total (s) | VAE decode (s) | "
            "text (s) | first load (s) | second load (s) | peak RSS (GB) | anonymous peak (GB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in data["rows"].items():
            info = row.get("info", {})
            backend = f"{info.get('backend', '?')}, {'/'.join(info.get('inference_precision', []))}"
            alias = f" (= {row['same_as']})" if row["same_as"] != name else ""
            if "median" not in row:  # run once for its image only
                median = {"total": None, "unet": None, "vae_decode": None, "text_encoder": None}
            else:
                median = row["median"]
            totals = [run["total"] for run in row.get("runs", [])]
            spread = f"{min(totals):.1f}–{max(totals):.1f}" if totals else "—"
            lines.append(
                f"| {results['labels'][name]}{alias} | {backend} | **{_number(median['total'])}** | {spread} | "
                f"{_number(median['unet'])} | {_number(median['vae_decode'])} | {_number(median['text_encoder'])} | "
                f"{_number(row.get('load_first_s'), 1)} | {_number(row.get('load_second_s'), 1)} | "
                f"{_number(row.get('peak_rss_gb'))} | {_number(row.get('peak_anon_gb'))} |"
            )
        lines += ["", f"Groups run together: {' | '.join(', '.join(g) for g in data['groups'])}."]
        if data["images"]:
            lines.append("Images: " + "; ".join(f"{k} {v:.3g}" for k, v in data["images"].items()) + ".")
        lines.append("")
    return lines


def target_lines(checks: list[dict[str, Any]], measured_only: bool = False) -> list[str]:
    lines = ["| check | measured | target | met |", "|---|---|---|---|"]
    for check in checks:
        if measured_only and check["met"] is None:
            continue
        met = {True: "yes", False: "**no**", None: "n/a"}[check["met"]]
        lines.append(f"| {check['check']} | {_number(check['value'])} | {check['target']} | {met} |")
    return lines


def write_markdown(results: dict[str, Any], path: Path) -> None:
    machine = results["machine"]
    isa = ", ".join(flag for flag, present in machine.get("isa", {}).items() if present) or "?"
    lines = [
        "# CPU benchmark: lcm-export against diffusers and OpenVINO (optimum-intel)",
        "",
        "```",
        results["settings"]["command"],
        "```",
        "",
        f"Machine: {machine.get('cpu')} ({machine.get('logical_cpus')} logical CPUs; ISA: {isa}), "
        f"{machine.get('memory_gb')} GB; {machine.get('platform')}. Run {results['date']}.",
        f"Versions: {json.dumps(machine.get('versions', {}))}"
        + (f"; optimum venv: {json.dumps(results['optimum']['versions'])}" if results.get("optimum") else ""),
        "",
        f"Model: random weights in LCM_Dreamshaper_v7's shapes (parameters: {json.dumps(results['models'])}). "
        f"{results['settings']['steps']} steps, guidance {results['settings']['guidance']}, batch 1, "
        f"{results['settings']['threads']} threads; median of {results['settings']['runs']} runs after "
        f"{results['settings']['warmup']} warm-up, engines alternating, each in its own process.",
        "",
    ]
    lines += size_table_lines(results)
    lines += work_and_rate_lines(results)
    lines += ["## Targets (issue 10; INT8 issue)", "", *target_lines(results["checks"])]
    lines += ["", "## Exports", ""]
    for name, metrics in results["exports"].items():
        bundle = metrics.get("bundle", {})
        size = f", bundle {bundle['bytes'] / GIGABYTE:.2f} GB" if bundle else ""
        if "unet_int8_bytes" in bundle:
            size += f" (INT8 U-Net {bundle['unet_int8_bytes'] / GIGABYTE:.2f} GB)"
        lines.append(
            f"- {name}: {metrics['seconds']:.0f} s, peak RSS {metrics['peak_rss_gb']:.2f} GB{size} — "
            f"`{metrics['command']}`"
        )
        if bundle.get("calibration"):
            lines.append(f"  - calibration: {json.dumps(bundle['calibration'])}")
        if bundle.get("quality"):
            lines.append(
                f"  - manifest quality report (INT8 vs float, same decoder): {quality_summary(bundle['quality'])}"
            )
    if results.get("optimum"):
        export = results["optimum"]["export"]
        lines.append(f"- optimum-intel IR export: {export['seconds']:.0f} s, peak RSS {export['peak_rss_gb']:.2f} GB")
        int8 = results["optimum"].get("int8")
        if int8:
            job = int8["job"]
            lines.append(
                f"- peer INT8 (TAESD decoder to IR, then `nncf.quantize` of optimum-intel's U-Net IR on the inputs "
                f"of {len(job['prompts'])} prompts × {job['steps']} steps at {job['size']} px, guidance "
                f"{job['guidance']}, "
                f"recorded from optimum-intel's own pipeline): {int8['seconds']:.0f} s, peak RSS "
                f"{int8['peak_rss_gb']:.2f} GB, INT8 U-Net IR {int8['unet_int8_bytes'] / GIGABYTE:.2f} GB"
            )
    lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]] + [""]
    for supplement in results.get("supplementary", []):
        lines += [
            f"## Supplementary run ({supplement['date']}, separate invocation: not alternated with the rows above)",
            "",
            f"```\n{supplement['settings']['command']}\n```",
            "",
            *size_table_lines(supplement, heading="###"),
            *target_lines(ratios(supplement["sizes"], {}), measured_only=True),
            "",
        ]
        lines += [f"- {note}" for note in notes(supplement) if "Not re-run" not in note and "spread" in note] + [""]
    from models import SDXL_EXPORT_SECTION_END, SDXL_EXPORT_SECTION_START

    old = path.read_text() if path.is_file() else ""
    # Sections written elsewhere stay as they were: the frame loop's (bench/stream.py), the SDXL export memory's,
    # the SDXL family's speed benches' (bench/sdxl.py, one per family).
    kept = (
        (stream.SECTION_START, stream.SECTION_END),
        (SDXL_EXPORT_SECTION_START, SDXL_EXPORT_SECTION_END),
        *sdxl.SECTIONS,
    )
    for start, end in kept:
        if start in old and end in old:
            lines += ["", start + old.split(start, 1)[1].split(end, 1)[0] + end, ""]
    path.write_text("\n".join(lines))


def quality_summary(quality: dict[str, Any]) -> str:
    """One line from the manifest's INT8 quality report: mean and min PSNR per prompt set and guidance."""
    parts = [
        f"{name} g{guidance}: PSNR {metrics['psnr_db_mean']} dB mean / {metrics['psnr_db_min']} min "
        f"({metrics['prompts']} prompts)"
        for name, by_guidance in quality.get("sets", {}).items()
        for guidance, metrics in by_guidance.items()
    ]
    return f"{quality.get('size')} px, {quality.get('steps')} steps: " + "; ".join(parts)


def work_and_rate_lines(results: dict[str, Any]) -> list[str]:
    """FLOPs per stage, each engine's U-Net rate against this CPU's matmul rate, and what fast ≥ 4× would need."""
    work, matmul = results.get("work"), results.get("matmul")
    if not work or not matmul:
        return []
    giga = 1e9
    peak = matmul["best"]
    measured = ", ".join(f"{name} {value:.0f}" for name, value in matmul.items() if name not in ("best", "threads"))
    lines = [
        "## Work and rate",
        "",
        "FLOPs per call (2 per multiply-add; torch's FlopCounterMode on the configs, no weights) and the float32 "
        f"rate of a 4096² matmul on {matmul['threads']} threads on this CPU: **{peak:.0f} GFLOP/s** ({measured}).",
        "",
        "| size | text encoder | U-Net | VAE decoder | TAESD decoder |",
        "|---|---|---|---|---|",
    ]
    for size, counts in work.items():
        cells = [counts.get(stage) for stage in ("text_encoder", "unet", "vae_decoder", "taesd_decoder")]
        lines.append(f"| {size} | " + " | ".join(_number(c and c / giga, 1) for c in cells) + " |")
    lines.append("")
    for size, data in results["sizes"].items():
        counts = work.get(str(size))
        if not counts:
            continue
        rows = data["rows"]
        rates = []
        for name, row in rows.items():
            if row.get("same_as", name) != name or not row.get("runs"):
                continue
            calls = row["runs"][0].get("unet_calls") or results["settings"]["steps"]
            rate = counts["unet"] * calls / row["median"]["unet"] / giga
            rates.append(f"{name} {rate:.0f} ({rate / peak:.0%})")
        lines.append(f"{size} px, U-Net GFLOP/s (share of the matmul rate): {'; '.join(rates)}.")
        if "median" in rows.get("diffusers", {}) and "median" in rows.get("ours-fast", {}):
            fast = rows["ours-fast"]
            target = rows["diffusers"]["median"]["total"] / 4
            rest = fast["median"]["total"] - fast["median"]["unet"]
            calls = fast["runs"][0].get("unet_calls") or results["settings"]["steps"]
            if target > rest:
                needed = counts["unet"] * calls / (target - rest) / giga
                lines.append(
                    f"Fast mode 4× diffusers at {size} px means ≤ {target:.2f} s end to end; with fast mode's "
                    f"{rest:.2f} s outside the U-Net, its {calls} calls must run at {needed:.0f} GFLOP/s: "
                    f"{needed / peak:.2f}× this CPU's float32 matmul rate."
                )
        lines.append("")
    return lines


def write_chart(results: dict[str, Any], path: Path) -> None:
    """Stacked bars per engine and size: text encoder, U-Net, VAE decode, the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results["sizes"])
    figure, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 5), squeeze=False)
    colors = {"text_encoder": "#8da0cb", "unet": "#fc8d62", "vae_decode": "#66c2a5", "other": "#bbbbbb"}
    for axis, size in zip(axes[0], sizes, strict=True):
        rows = results["sizes"][size]["rows"]
        names = [name for name in rows if "median" in rows[name]]
        left = [0.0] * len(names)
        for stage, color in colors.items():
            values = []
            for name in names:
                median = rows[name]["median"]
                known = median["text_encoder"] + median["unet"] + median["vae_decode"]
                values.append(max(median["total"] - known, 0.0) if stage == "other" else median[stage])
            axis.barh([results["labels"][n] for n in names], values, left=left, color=color, label=stage)
            left = [a + b for a, b in zip(left, values, strict=True)]
        for index, total in enumerate(left):
            axis.text(total, index, f" {total:.1f} s", va="center", fontsize=8)
        axis.invert_yaxis()
        axis.set_xlim(0, max(left) * 1.15)
        axis.set_title(f"{size}×{size}, {results['settings']['steps']} steps, {results['settings']['threads']} threads")
        axis.set_xlabel("seconds per image (median)")
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize=8)
    figure.suptitle(results["settings"]["command"], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def notes(results: dict[str, Any]) -> list[str]:
    found = [
        "Weights are random: timings are those of the real shapes; images only show that engines sharing the same "
        "weights agree.",
        "optimum-intel 2.2 (transformers 5.5) reads the text encoder saved by transformers 5.23 with re-initialised "
        "weights (key prefix change): its timings are valid, its images are not comparable.",
        "Our engines load with static shapes (the size is known at load); optimum-intel runs as its users run it, "
        "with dynamic shapes and no compile cache on CPU (its CACHE_DIR default is for GPUs).",
        "ours-low-memory reads ours-default's compile cache (low_memory changes no compiled graph): its first "
        "load is a warm one.",
        "Peak RSS counts file pages the runtimes map (weights read straight from disk, which the kernel can drop at "
        "any time); the anonymous peak is the memory the process itself allocated.",
    ]
    for size, data in results["sizes"].items():
        spreads = {
            name: (max(totals) - min(totals)) / row["median"]["total"]
            for name, row in data["rows"].items()
            if row["same_as"] == name and len(totals := [run["total"] for run in row.get("runs", [])]) > 1
        }
        if spreads:
            worst = max(spreads, key=spreads.get)
            found.append(
                f"At {size} px an engine's end-to-end times spread by up to {spreads[worst]:.0%} of its median across "
                f"its runs ({worst}): a ratio within that margin of its target is not decided by this run."
            )
    found += [
        "INT8 rows: the exporter's QDQ U-Net (per-channel s8 weights, u8 activations, ranges the mean of each U-Net "
        "call's min/max over the bundle's own 4-step trajectories; first/last conv, time embeddings and attention "
        "activation products float) on onnxruntime's CPU provider (OpenVINO where the row says so: it reads the same "
        "file with the convolution outputs float, `float_layer_outputs`); "
        "`--attention-slicing --low-memory`: the same recipe on a U-Net exported with attention one head at a time, "
        "run with onnxruntime's arenas off. Peer INT8: optimum-intel's pipeline with its U-Net IR quantised by "
        "`nncf.quantize` (model_type TRANSFORMER, bias correction off, as OpenVINO's LCM notebook) and TAESD's decoder "
        "converted to IR (openvino.convert_model of diffusers' AutoencoderTiny decoder) in place of the VAE decoder.",
        "PSNR of INT8 against float compares images from the same seed and prompt (the first-load run) with the same "
        "decoder, each side against its own fp32 run (ours-fast-fp32: onnxruntime fp32; optimum-fast-f32: OpenVINO "
        "with the f32 hint), and also against each side's default float run (bf16 on a bf16 CPU); those reference "
        "rows run only for their image. Random weights: PSNR shows how far "
        "quantisation moves the output of these weights, not the quality of a trained model's images.",
    ]
    if results.get("engines_not_run"):
        found.append(
            f"Not re-run in this run (`--engines`): {', '.join(results['engines_not_run'])}; their figures are those "
            "of the previous full run (bench/RESULTS.md in git history)."
        )
    default_precision = results.get("openvino_default_precision")
    if default_precision not in ("f32", None):
        found.append(
            f"OpenVINO runs {default_precision} by default on this CPU, so `auto` picks it: ours default and fast run "
            "OpenVINO here, while ours (fast) INT8 force onnxruntime; ours-fast / ours-fast-int8 is therefore a "
            "cross-backend ratio, and ours-onnxruntime / ours-int8 the same-backend one."
        )
    if default_precision == "f32":
        found.append(
            "This CPU has no bf16/fp16 path in OpenVINO (its default precision is f32): default and parity modes are "
            "the same computation here and run once; `auto` picks onnxruntime on such CPUs (see "
            "lcm_export/runtime/backends/openvino.py for the measurements)."
        )
    return found


def parse_settings(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description="Benchmark lcm-export against diffusers and optimum-intel on CPU.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per engine (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=8.0)
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/lcm-export/bench").expanduser())
    parser.add_argument("--output", type=Path, default=BENCH_DIR, help="where RESULTS.md, results.json/png go")
    parser.add_argument("--no-optimum", action="store_true", help="skip optimum-intel (its venv and export)")
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="default: 80%% of available memory")
    parser.add_argument("--re-export", action="store_true", help="export the bundles again (and time it)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 256 px, 2 runs, no optimum-intel")
    parser.add_argument("--calibration-size", type=int, default=8, help="INT8 bundles: calibration prompts")
    parser.add_argument("--calibration-resolution", type=int, default=256, help="INT8 bundles: calibration size (px)")
    parser.add_argument("--engines", nargs="+", default=[], help="run only these rows (default: every engine)")
    parser.add_argument(
        "--relock-optimum",
        action="store_true",
        help=f"rebuild {OPTIMUM_VENV.name} from the newest releases, rewrite {OPTIMUM_LOCK.name} and exit",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write RESULTS.md and the chart again from --output's results.json (adding work and matmul rate "
        "where missing), without timing anything",
    )
    parser.add_argument(
        "--supplementary",
        type=Path,
        nargs="+",
        default=[],
        help="with --report-only: results.json files of other runs to append (rows a time limit left out)",
    )
    add_sub_benchmark_flags(parser)  # read by main; here for --help
    args = parser.parse_args(argv)
    if args.relock_optimum:
        relock_optimum()
        raise SystemExit(0)
    if args.quick:
        args.sizes, args.runs, args.no_optimum = [256], 2, True
        if args.output == BENCH_DIR:  # never overwrite the committed results with a smoke test's
            args.output = args.work_dir / "quick"
    command = "python bench/run.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    return Settings(
        sizes=tuple(args.sizes),
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        steps=args.steps,
        guidance=args.guidance,
        work_dir=args.work_dir,
        output_dir=args.output,
        optimum=not args.no_optimum,
        memory_budget_gb=args.memory_budget_gb,
        re_export=args.re_export,
        command=command.strip(),
        report_only=args.report_only,
        calibration_size=args.calibration_size,
        calibration_resolution=args.calibration_resolution,
        only_engines=tuple(args.engines),
        supplementary=tuple(args.supplementary),
    )


def add_work_and_rate(results: dict[str, Any], settings: Settings) -> None:
    """FLOPs per stage at each size and this CPU's float32 matmul rate (``bench/flops.py``), where missing."""
    from flops import count_flops, matmul_rate

    work = results.setdefault("work", {})
    for size in results["sizes"] or settings.sizes:
        if str(size) not in work:
            log(f"{size}px: counting FLOPs per stage")
            work[str(size)] = count_flops(settings.work_dir, int(size))
    if "matmul" not in results:
        log("timing a float32 matmul (this CPU's rate)")
        results["matmul"] = matmul_rate(int(results["settings"]["threads"]))


def write_reports(results: dict[str, Any], settings: Settings) -> None:
    results["checks"] = ratios(results["sizes"], results["exports"])
    results["notes"] = notes(results)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    (settings.output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_markdown(results, settings.output_dir / "RESULTS.md")
    try:
        write_chart(results, settings.output_dir / "results.png")
    except ImportError:
        log("matplotlib is not installed: no chart (pip install matplotlib)")


def add_sub_benchmark_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that pick another benchmark than the CPU one; the rest of the command line is that one's."""
    group = parser.add_argument_group("other benchmarks (each takes its own options: add --help after the flag)")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--sdxl", action="store_true", help="the SDXL-shaped pipeline's benchmark (bench/sdxl.py)")
    choice.add_argument(
        "--stream-fps", action="store_true", help="the img2img frame loop's frames per second (bench/stream.py)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dispatch = argparse.ArgumentParser(add_help=False)
    add_sub_benchmark_flags(dispatch)
    choice, rest = dispatch.parse_known_args(argv)
    if choice.stream_fps:
        return stream.main(rest)
    if choice.sdxl:
        return sdxl.main(rest)
    settings = parse_settings(argv)
    if settings.report_only:
        path = settings.output_dir / "results.json"
        if not path.is_file():
            raise SystemExit(f"error: --report-only needs {path}: run the bench first")
        results = json.loads(path.read_text())
        results["sizes"] = {int(size): data for size, data in results["sizes"].items()}
        if results["settings"].get("only_engines") and "engines_not_run" not in results:
            every_engine = define_engines(settings, results.get("optimum"))
            results["engines_not_run"] = [e.name for e in every_engine if e.name not in results["engines"]]
        for extra in settings.supplementary:
            supplement = json.loads(extra.read_text())
            supplement["sizes"] = {int(size): data for size, data in supplement["sizes"].items()}
            supplement.pop("supplementary", None)
            # Added again on a later --report-only: it replaces the copy already kept (not a second section).
            key = (supplement["date"], supplement["settings"]["command"])
            kept = [old for old in results.get("supplementary", []) if (old["date"], old["settings"]["command"]) != key]
            results["supplementary"] = [*kept, supplement]
        add_work_and_rate(results, settings)
        write_reports(results, settings)
        print((settings.output_dir / "RESULTS.md").read_text())
        return 0
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    models = build_models(settings)
    exports = export_bundles(settings)
    optimum = setup_optimum(settings) if settings.optimum else None
    every_engine = define_engines(settings, optimum)
    engines = selected(every_engine, settings.only_engines)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(settings).items()},
        "machine": machine_info(),
        "models": models,
        "exports": exports,
        "optimum": optimum,
        "openvino_default_precision": openvino_default_precision(),
        "labels": {engine.name: engine.label for engine in engines},
        "engines": {engine.name: engine.spec for engine in engines},
        "engines_not_run": [engine.name for engine in every_engine if engine not in engines],
        "sizes": {},
    }
    add_work_and_rate(results, settings)  # before the engines: the matmul is timed on a quiet machine
    for size in settings.sizes:
        results["sizes"][size] = bench_size(settings, size, engines)
        results["wall_seconds"] = time.perf_counter() - started
        write_reports(results, settings)  # each size as it finishes: a run cut short keeps what it measured
    write_reports(results, settings)
    log(f"done in {results['wall_seconds'] / 60:.1f} min: {settings.output_dir / 'RESULTS.md'}")
    print((settings.output_dir / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
