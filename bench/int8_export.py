"""INT8 export with the defaults (issue 28): time and peak RSS, and which calibration size serves which image size.

    python bench/int8_export.py --work-dir /work/benchwork/int8-export

On the bench's SD1.5-shaped random LCM with the TAESD-shaped tiny VAE (bench/models.py):

- ``lcm-export MODEL --tiny-vae TAESD --precision int8 --output B``: the README's INT8 line with no other flag, so
  it calibrates at the default size (256 px for this 512 px model, chosen by this bench's first run), timed in its
  own process with its peak RSS (``worker.py measure``); the exporter's own report says how long each phase took.
- The same with ``--calibration-resolution 512`` (the model's own size, the default before that run).
- The fp32 bundle (same tiny VAE) as the reference, and each INT8 bundle's images at 256 and 512 px against it:
  mean PSNR over the prompts, same seeds. That is "does a 256 px calibration serve a 512 px image as well", both
  ways.

Results: ``bench/int8-export-results.json`` and the "INT8 export with the defaults" section of bench/RESULTS.md.

``--family sdxl`` / ``--family ssd1b``: the SDXL-shaped or SSD-1B-shaped LCM (bench/models.py) with the TAESD-shaped
decoder (TAESDXL's architecture), ``--precision int8`` with no other flag (calibrated at 512 px, half the family's
1024 px), timed the same way against the SDXL-shape goals (≤ 30 min, ≤ 16 GB); the quality is the exporter's own
report (INT8 against float images at the calibration size). Results: ``bench/int8-export-<family>-results.json``
and its own section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import common
import models

SECTION_START = "<!-- int8-export: start (bench/int8_export.py writes this section) -->"
SECTION_END = "<!-- int8-export: end -->"
PROMPTS = ("a photo of a cat", "a lighthouse on a cliff at dusk", "a bowl of fruit on a table")
SIZES = (256, 512)
GOAL_SECONDS, GOAL_PEAK_GB = 600, 8.0  # the SD1.5-shape goals
SDXL_GOAL_SECONDS, SDXL_GOAL_PEAK_GB = 1800, 16.0  # and SDXL-shape goals
FAMILY_BUILDERS = {"sdxl": "build_sdxl_lcm", "ssd1b": "build_ssd1b_lcm"}


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="INT8 export with the defaults; calibration size against image size")
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/lcm-export/bench-int8-export").expanduser())
    parser.add_argument("--output", type=Path, default=common.BENCH_DIR)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--family", choices=("sd15", *FAMILY_BUILDERS), default="sd15")
    parser.add_argument("--evaluate", nargs=2, type=Path, metavar=("BUNDLE", "REFERENCE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def evaluate(bundle: Path, reference: Path, steps: int, threads: int) -> dict[str, Any]:
    """Mean PSNR of ``bundle``'s INT8 images against ``reference``'s fp32 ones, per image size (own process)."""
    from lcm_export.calibration.quality import psnr
    from lcm_export.runtime import Pipeline

    pipes = {
        "int8": Pipeline.load(bundle, backend="onnxruntime", variant="int8", precision="fp32", threads=threads),
        "fp32": Pipeline.load(reference, backend="onnxruntime", variant="fp32", precision="fp32", threads=threads),
    }
    results: dict[str, Any] = {}
    for size in SIZES:
        values = []
        for seed, prompt in enumerate(PROMPTS):
            images = {
                kind: pipe(prompt, height=size, width=size, num_inference_steps=steps, seed=seed).images[0]
                for kind, pipe in pipes.items()
            }
            values.append(psnr(images["fp32"], images["int8"]))
        results[str(size)] = {
            "mean_psnr_db": round(sum(values) / len(values), 2),
            "psnr_db": [round(v, 2) for v in values],
        }
    return results


def int8_phases(bundle: Path) -> dict[str, float]:
    """The INT8 variants' own timings, from the manifest: quantisation seconds per component (calibration and
    quantisation) and the quality report's seconds against its budget."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    phases: dict[str, float] = {}
    for name, component in manifest["components"].items():
        for variant in component["variants"]:
            if variant.get("precision") != "int8":
                continue
            phases[f"{name}_quantisation_s"] = variant.get("produced_by", {}).get("seconds")
            quality = variant.get("quality") or variant.get("details", {}).get("quality")
            if quality:
                phases["quality_report_s"] = quality.get("seconds")
                phases["quality_budget_s"] = quality.get("budget_seconds")
    return phases


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    work = arguments.work_dir
    work.mkdir(parents=True, exist_ok=True)
    model, taesd = work / "sd15-lcm", work / "taesd"
    counts = {"sd15-lcm": models.build_sd15_lcm(model), "taesd": models.build_taesd(taesd)}
    base = [sys.executable, "-m", "lcm_export.exporter.cli", str(model), "--tiny-vae", str(taesd), "--overwrite"]
    jobs = {
        "fp32": [],
        "int8-defaults": ["--precision", "int8"],  # the README's line: calibrated at 256 px, the default
        "int8-calibrated-512": ["--precision", "int8", "--calibration-resolution", "512"],
    }
    exports: dict[str, Any] = {}
    for name, extra in jobs.items():
        bundle, record = work / name, work / f"export-{name}.json"
        command = [*base, "--output", str(bundle), *extra]
        if (
            (bundle / "manifest.json").is_file()
            and record.is_file()
            and json.loads(record.read_text())["command"] == command
        ):
            exports[name] = json.loads(record.read_text())["result"]  # exported by an earlier run: its figures
        else:
            common.log(f"export {name}")
            exports[name] = common.measured(command, work / f"export-{name}.log")
            record.write_text(json.dumps({"command": command, "result": exports[name]}))
        exports[name]["phases"] = int8_phases(bundle)
        common.log(f"export {name}: {exports[name]['seconds']:.0f} s, peak RSS {exports[name]['peak_rss_gb']:.2f} GB")
    quality = {}
    for name in ("int8-defaults", "int8-calibrated-512"):
        command = [sys.executable, __file__, "--evaluate", str(work / name), str(work / "fp32")]
        command += ["--steps", str(arguments.steps), "--threads", str(arguments.threads)]
        finished = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        quality[name] = json.loads(finished.stdout.strip().splitlines()[-1])
        common.log(f"{name}: {json.dumps(quality[name])}")
    return {
        "machine": common.machine_info(),
        "models": counts,
        "exports": exports,
        "quality": quality,
        "steps": arguments.steps,
    }


def run_family(arguments: argparse.Namespace) -> dict[str, Any]:
    """The SDXL-family INT8 export with the defaults: time, peak RSS, phases and the exporter's quality report."""
    family = arguments.family
    work = arguments.work_dir / family
    work.mkdir(parents=True, exist_ok=True)
    model, taesd = work / f"{family}-lcm", work / "taesd"
    # Built in a child process: torch keeps the memory of a 10 GB build, which would count against the export.
    build = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import models; "
        "from pathlib import Path; "
        f"print(json.dumps({{{family!r}: models.{FAMILY_BUILDERS[family]}(Path({str(model)!r})), "
        f"'taesd': models.build_taesd(Path({str(taesd)!r}))}}))"
    )
    built = subprocess.run([sys.executable, "-c", build], check=True, stdout=subprocess.PIPE, text=True)
    counts = json.loads(built.stdout.strip().splitlines()[-1])
    bundle = work / "int8-defaults"
    command = [sys.executable, "-m", "lcm_export.exporter.cli", str(model), "--tiny-vae", str(taesd), "--overwrite"]
    command += ["--output", str(bundle), "--precision", "int8"]
    common.log(f"export {family} int8-defaults")
    result = common.measured(command, work / "export-int8-defaults.log")
    result["phases"] = int8_phases(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    unet = next(v for v in manifest["components"]["unet"]["variants"] if v.get("precision") == "int8")
    result["quality"] = unet.get("quality") or unet.get("details", {}).get("quality")
    result["calibration"] = unet.get("produced_by", {}).get("calibration")
    common.log(f"export {family}: {result['seconds']:.0f} s, peak RSS {result['peak_rss_gb']:.2f} GB")
    return {"machine": common.machine_info(), "family": family, "models": counts, "export": result}


def family_section_lines(results: dict[str, Any]) -> list[str]:
    machine, family, export = results["machine"], results["family"], results["export"]
    isa = ", ".join(flag for flag, present in machine.get("isa", {}).items() if present)
    time_met, memory_met = export["seconds"] <= SDXL_GOAL_SECONDS, export["peak_rss_gb"] <= SDXL_GOAL_PEAK_GB
    sampled = (
        f" (sampled: RSS peak at {export['sampled_rss_peak_at_s'] / 60:.1f} min; anonymous peak "
        f"{export['anon_peak_gb']:.2f} GB at {export['anon_peak_at_s'] / 60:.1f} min, the rest mapped files)"
        if "anon_peak_gb" in export
        else ""
    )
    quality = export.get("quality") or {}
    sets = "; ".join(
        f"{label} guidance {guidance}: {entry.get('psnr_db_mean', float('nan')):.2f} dB mean, "
        f"{entry.get('psnr_db_min', float('nan')):.2f} dB min"
        for label, by_guidance in quality.get("sets", {}).items()
        for guidance, entry in by_guidance.items()
    )
    phases = ", ".join(f"{key} {value:.0f}" for key, value in export["phases"].items() if value is not None)
    size = (export.get("calibration") or {}).get("size")
    return [
        f"<!-- int8-export-{family}: start (bench/int8_export.py --family {family} writes this section) -->",
        f"## INT8 export with the defaults, {family.upper()}-shaped (bench/int8_export.py --family {family})",
        "",
        f"{family.upper()}-shaped random LCM (U-Net {results['models'][family].get('unet', 0) / 1e9:.2f} B parameters) "
        f"with the TAESD-shaped decoder, {machine.get('cpu', 'CPU')} ({isa}), `lcm-export MODEL --tiny-vae TAESD "
        f"--precision int8 --output B` in its own process: {export['seconds'] / 60:.1f} min, peak RSS "
        f"{export['peak_rss_gb']:.2f} GB{sampled} (goals ≤ {SDXL_GOAL_SECONDS // 60} min: "
        f"{'met' if time_met else 'NOT met'}, ≤ {SDXL_GOAL_PEAK_GB:.0f} GB: {'met' if memory_met else 'NOT met'}); "
        f"calibrated at {size} px; phases (s): {phases}. The exporter's quality report "
        f"(INT8 against float images, same latents and noise): {sets or 'none'}.",
        f"<!-- int8-export-{family}: end -->",
    ]


def section_lines(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    isa = ", ".join(flag for flag, present in machine.get("isa", {}).items() if present)
    exports, quality = results["exports"], results["quality"]
    lines = [
        SECTION_START,
        "## INT8 export with the defaults (bench/int8_export.py)",
        "",
        f"SD1.5-shaped random LCM with the TAESD-shaped decoder, {machine.get('cpu', 'CPU')} ({isa}), each export in "
        "its own process (wall time and peak RSS of that process). `int8-defaults` is the README's "
        "`lcm-export MODEL --tiny-vae TAESD --precision int8 --output B` (calibrated at 256 px, the default for a "
        "512 px model); "
        f"the goals are ≤ {GOAL_SECONDS // 60} min and ≤ {GOAL_PEAK_GB:.0f} GB.",
        "",
        "| export | time | peak RSS | goal met | phases (s) |",
        "|---|---|---|---|---|",
    ]
    for name, entry in exports.items():
        within = entry["seconds"] <= GOAL_SECONDS and entry["peak_rss_gb"] <= GOAL_PEAK_GB
        met = "" if name == "fp32" else ("yes" if within else "no")
        phases = ", ".join(f"{key} {value:.0f}" for key, value in entry.get("phases", {}).items() if value is not None)
        lines.append(f"| {name} | {entry['seconds']:.0f} s | {entry['peak_rss_gb']:.2f} GB | {met} | {phases} |")
    lines += [
        "",
        f"Which calibration size serves which image size: mean PSNR of the INT8 images against the fp32 bundle's, "
        f"onnxruntime, {results['steps']} steps, {len(PROMPTS)} prompts, same seeds.",
        "",
        "| calibrated at | " + " | ".join(f"{size} px image" for size in SIZES) + " |",
        "|---|" + "---|" * len(SIZES),
    ]
    labels = {"int8-defaults": "256 px (the default)", "int8-calibrated-512": "512 px"}
    for name, entry in quality.items():
        cells = " | ".join(f"{entry[str(size)]['mean_psnr_db']:.2f} dB" for size in SIZES)
        lines.append(f"| {labels[name]} | {cells} |")
    return [*lines, SECTION_END]


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    if arguments.evaluate:
        print(json.dumps(evaluate(*arguments.evaluate, arguments.steps, arguments.threads)))
        return 0
    if arguments.family != "sd15":
        results = run_family(arguments)
        lines = family_section_lines(results)
        common.publish_section(
            arguments.output, f"int8-export-{arguments.family}-results.json", results, lines, lines[0], lines[-1]
        )
        return 0
    results = run(arguments)
    common.publish_section(
        arguments.output, "int8-export-results.json", results, section_lines(results), SECTION_START, SECTION_END
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
