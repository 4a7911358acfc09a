"""Run-time adapters on the SD1.5-shaped model: switch time, cost per call, memory, file size.

``python bench/adapters.py [WORK_DIR]`` (default /work/benchwork/adapters). Builds (once, reused) the random
SD1.5-shaped LCM of bench/models.py, a random LCM-LoRA-shaped LoRA (rank 64 on attention, projections,
feed-forward, ResNet convolutions and time embeddings: LCM-LoRA's targets), the fp32 bundle (``lcm-export``,
no VAE encoder) and the adapter file (``lcm-export adapter``). Then per backend (onnxruntime, OpenVINO f32), each
in its own process: load, time the U-Net per call on the base weights, ``set_adapters({adapter: 1})`` (the switch),
the U-Net per call with the adapter active, the RSS added, the switch back to the base and to the adapter again.
Writes bench/adapters-results.json and the "Run-time adapters" section of bench/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402  (bench/common.py, found through the path above)

SECTION_START = "<!-- adapters:start -->"
SECTION_END = "<!-- adapters:end -->"

LCM_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)  # fmt: skip
RANK = 64
STYLE_RANK = 16  # a style LoRA's shape: rank 16 on the attention projections only
STYLE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SIZE = 256  # px: the size the other CPU benchmarks time (switches, images)
SIZES = (256, 512)  # per-call cost at both
STEPS = 2
CALLS = 3  # timed pipeline calls per weight set
INT8_ALPHA = 8  # the INT8 part's LoRA: alpha/r = 1/8
INT8_PROMPTS = ("a photo of a cat", "a lighthouse on a cliff at dusk", "a bowl of fruit on a table")
RUNS = (("onnxruntime", "inputs"), ("onnxruntime", "rebuild"), ("openvino", "rebuild"))  # (backend, adapter_mode)


def rss_gb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def measure_backend(bundle: Path, adapter: Path, backend: str, cache: Path, mode: str, style: Path) -> dict:
    """One backend's numbers in one adapter mode (run in its own process: see main); ``style``: a style-LoRA-shaped
    adapter (rank 16, attention only) switched to from the LCM-LoRA-shaped one, and its cost per call."""
    import numpy as np

    from lcm_export.runtime import Pipeline

    started = time.perf_counter()
    pipe = Pipeline.load(bundle, backend=backend, precision="fp32", threads=2, cache_dir=cache, adapter_mode=mode)
    load_seconds = time.perf_counter() - started

    def unet_seconds(size: int) -> tuple[float, np.ndarray]:
        times, image = [], None
        for _ in range(CALLS):
            output = pipe("a photo of a cat", height=size, width=size, num_inference_steps=STEPS, seed=1)
            times.extend(output.timings["unet"])
            image = output.images
        return float(np.median(times)), image

    def per_call() -> dict[int, float]:
        return {size: unet_seconds(size)[0] for size in SIZES}

    unet_seconds(SIZE)  # first call: lazy re-layouts
    base_image = unet_seconds(SIZE)[1]
    base_unet = per_call()
    rss_base = rss_gb()
    started = time.perf_counter()
    pipe.set_adapters({adapter: 1.0})
    switch_on = time.perf_counter() - started
    rss_adapter = rss_gb()
    adapter_image = unet_seconds(SIZE)[1]  # also the first call after the switch
    adapter_unet = per_call()
    started = time.perf_counter()
    pipe.set_adapters({adapter: 0.5})
    switch_weight = time.perf_counter() - started
    started = time.perf_counter()
    pipe.set_adapters({})
    switch_off = time.perf_counter() - started
    _, again_base = unet_seconds(SIZE)
    started = time.perf_counter()
    pipe.set_adapters({adapter: 1.0})
    switch_again = time.perf_counter() - started
    _, again_adapter = unet_seconds(SIZE)
    started = time.perf_counter()
    pipe.set_adapters({style: 1.0})
    switch_style = time.perf_counter() - started
    style_unet = unet_seconds(SIZE)[0]
    return {
        "backend": backend,
        "mode": pipe.adapter_state.modes.get("unet", mode),
        "load_seconds": load_seconds,
        "unet_seconds_base": base_unet,
        "unet_seconds_adapter": adapter_unet,
        "per_call_cost": {size: adapter_unet[size] / base_unet[size] - 1 for size in SIZES},
        "switch_seconds": {
            "base_to_adapter": switch_on,
            "adapter_weight_change": switch_weight,
            "adapter_to_base": switch_off,
            "again": switch_again,
            "to_style_adapter": switch_style,
        },
        "unet_seconds_style_adapter": style_unet,
        "rss_gb": {
            "base": rss_base,
            "adapter": rss_adapter,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        },
        "adapter_changes_image": float(np.abs(adapter_image - base_image).max()),
        "base_again_max_abs": float(np.abs(again_base - base_image).max()),
        "adapter_again_max_abs": float(np.abs(again_adapter - adapter_image).max()),
    }


def measure_int8(int8_base: Path, int8_fused: Path, adapter: Path) -> dict:
    """INT8 with an adapter against the INT8 bundle exported with the LoRA fused, and both against that bundle's
    fp32 U-Net (the LoRA fused in float, the same TAESD-shaped decoder): run in its own process."""
    from lcm_export.calibration.quality import psnr
    from lcm_export.runtime import Pipeline

    def images(pipe) -> list:
        return [
            pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=4, seed=seed).images[0]
            for seed, prompt in enumerate(INT8_PROMPTS)
        ]

    float_adapted = images(Pipeline.load(int8_fused, backend="onnxruntime", variant="fp32", precision="fp32"))
    results: dict = {"prompts": list(INT8_PROMPTS), "backends": {}}
    for backend in ("onnxruntime", "openvino"):
        fused = images(Pipeline.load(int8_fused, backend=backend, variant="int8", precision="fp32"))
        pipe = Pipeline.load(int8_base, backend=backend, variant="int8", precision="fp32")
        base = images(pipe)
        started = time.perf_counter()
        pipe.set_adapters({adapter: 1.0})
        switch = time.perf_counter() - started
        adapted = images(pipe)

        def mean_psnr(first: list, second: list) -> float:
            return round(sum(psnr(a, b) for a, b in zip(first, second, strict=True)) / len(first), 2)

        results["backends"][backend] = {
            "mode": pipe.adapter_state.modes["unet"],
            "switch_seconds": round(switch, 2),
            "psnr_int8_adapter_vs_int8_fused_db": mean_psnr(adapted, fused),
            "psnr_int8_base_vs_int8_fused_db": mean_psnr(base, fused),
            "psnr_int8_fused_vs_fp32_fused_db": mean_psnr(fused, float_adapted),
            "psnr_int8_adapter_vs_fp32_fused_db": mean_psnr(adapted, float_adapted),
        }
    return results


def int8_part(work: Path, python: str, env: dict, model: Path) -> dict:
    """Export the INT8 bundles (base, and with the LoRA fused; U-Net INT8, the bench's TAESD-shaped decoder),
    make the adapter for the INT8 base, and measure (a process of its own)."""
    lora = work / f"lora-r{RANK}-alpha{INT8_ALPHA}.safetensors"  # 8x the switch bench's: a visible change
    if not lora.is_file():
        from lcm_export.exporter.tiny import build_tiny_lora

        build_tiny_lora(lora, model, rank=RANK, alpha=INT8_ALPHA, target_modules=LCM_LORA_TARGETS, seed=7)
    taesd = work / "taesd"
    if not (taesd / "config.json").is_file():
        import models

        models.build_taesd(taesd)
    exports = {"int8-base": [], "int8-fused": ["--lora", str(lora)]}
    timings = {}
    for name, extra in exports.items():
        if (work / name / "manifest.json").is_file():
            continue
        command = [
            python, "-m", "lcm_export.exporter.cli", str(model), "--output", str(work / name), "--no-vae-encoder",
            "--tiny-vae", str(taesd), "--precision", "int8", "--calibration-resolution", str(SIZE), "--quiet",
            "--keep-fp32", "--overwrite", *extra,
        ]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        timings[f"{name}_export_seconds"] = round(time.perf_counter() - started, 1)
    int8_adapter = work / "r64-int8.adapter"
    command = [python, "-m", "lcm_export.exporter.cli", "adapter", str(lora), "--bundle", str(work / "int8-base")]
    subprocess.run([*command, "--output", str(int8_adapter), "--overwrite"], check=True, env=env)
    run = subprocess.run(
        [python, str(Path(__file__).resolve()), "--measure-int8", str(work / "int8-base"), str(work / "int8-fused"),
         str(int8_adapter)],
        check=True, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    return {**timings, **json.loads(run.stdout.strip().splitlines()[-1])}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        bundle, adapter, backend, cache, mode, style = sys.argv[2:8]
        print(json.dumps(measure_backend(Path(bundle), Path(adapter), backend, Path(cache), mode, Path(style))))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--measure-int8":
        print(json.dumps(measure_int8(*(Path(value) for value in sys.argv[2:5]))))
        return
    int8_only, switch_only = "--int8-only" in sys.argv, "--switch-only" in sys.argv
    sys.argv = [value for value in sys.argv if value not in ("--int8-only", "--switch-only")]
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/benchwork/adapters")
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    model, lora, bundle, adapter = (
        work / "sd15",
        work / "lora-r64.safetensors",
        work / "bundle-fp32",
        work / "r64.adapter",
    )
    timings: dict[str, float] = {}
    if not (model / "model_index.json").is_file():
        subprocess.run(
            [
                python,
                "-c",
                f"from pathlib import Path; from bench.models import build_sd15_lcm as b; b(Path({str(model)!r}))",
            ],
            check=True,
            env=env,
            cwd=ROOT,
        )
    if not lora.is_file():
        from lcm_export.exporter.tiny import build_tiny_lora

        build_tiny_lora(lora, model, rank=RANK, alpha=1, target_modules=LCM_LORA_TARGETS, seed=7)
    if not (bundle / "manifest.json").is_file():
        started = time.perf_counter()
        subprocess.run(
            [
                python,
                "-m",
                "lcm_export.exporter.cli",
                str(model),
                "--output",
                str(bundle),
                "--no-vae-encoder",
                "--quiet",
                "--overwrite",
            ],
            check=True,
            env=env,
        )
        timings["export_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run(
        [
            python,
            "-m",
            "lcm_export.exporter.cli",
            "adapter",
            str(lora),
            "--bundle",
            str(bundle),
            "--output",
            str(adapter),
            "--overwrite",
        ],
        check=True,
        env=env,
    )
    timings["adapter_seconds"] = time.perf_counter() - started
    style_lora, style = work / f"lora-style-r{STYLE_RANK}.safetensors", work / f"style-r{STYLE_RANK}.adapter"
    if not style_lora.is_file():
        from lcm_export.exporter.tiny import build_tiny_lora

        build_tiny_lora(style_lora, model, rank=STYLE_RANK, alpha=STYLE_RANK, target_modules=STYLE_TARGETS, seed=8)
    command = [python, "-m", "lcm_export.exporter.cli", "adapter", str(style_lora), "--bundle", str(bundle)]
    subprocess.run([*command, "--output", str(style), "--overwrite"], check=True, env=env)
    manifest = json.loads((bundle / "manifest.json").read_text())
    bundle_bytes = sum(entry["size"] for entry in manifest["files"])
    results = {
        "model": "SD1.5-shaped random LCM (bench/models.py), fp32 bundle, no VAE encoder",
        "lora": {"rank": RANK, "targets": list(LCM_LORA_TARGETS), "size_bytes": lora.stat().st_size},
        "adapter_size_bytes": adapter.stat().st_size,
        "bundle_size_bytes": bundle_bytes,
        "size": SIZE,
        "steps": STEPS,
        **timings,
        "backends": {},
    }
    previous = json.loads((BENCH_DIR / "adapters-results.json").read_text()) if int8_only or switch_only else {}
    if int8_only:  # keep the switch measurements of the last full run
        results["backends"] = previous.get("backends", {})
    for backend, mode in () if int8_only else RUNS:
        cache = work / f"cache-{backend}"
        command = [python, str(Path(__file__).resolve()), "--measure", str(bundle), str(adapter), backend, str(cache)]
        run = subprocess.run([*command, mode, str(style)], check=True, env=env, stdout=subprocess.PIPE, text=True)
        results["backends"][f"{backend} {mode}"] = json.loads(run.stdout.strip().splitlines()[-1])
        print(json.dumps(results["backends"][f"{backend} {mode}"]), flush=True)
    if switch_only and "int8" in previous:  # keep the INT8 part of the last full run
        results["int8"] = previous["int8"]
    else:
        results["int8"] = int8_part(work, python, env, model)
    print(json.dumps(results["int8"]), flush=True)
    results["machine"] = common.machine_info()
    lines = section_lines(results)
    common.publish_section(BENCH_DIR, "adapters-results.json", results, lines, SECTION_START, SECTION_END)


def section_lines(results: dict) -> list[str]:
    machine = results["machine"]
    isa = ", ".join(flag for flag, present in machine.get("isa", {}).items() if present)
    lines = [
        SECTION_START,
        "## Run-time adapters (bench/adapters.py)",
        "",
        f"SD1.5-shaped random LCM, fp32 bundle ({results['bundle_size_bytes'] / 1e9:.2f} GB), "
        f"rank-{results['lora']['rank']} LoRA on LCM-LoRA's U-Net targets as an adapter file of "
        f"{results['adapter_size_bytes'] / 1e6:.0f} MB; "
        f"{results['steps']} steps, 2 threads, {machine.get('cpu', 'CPU')} ({isa}). Switch times at {SIZE} px (from a "
        "warm page cache); U-Net time per call is the median of the calls' steps, base weights against the adapter "
        "at weight 1.",
        "",
        "| backend | adapter_mode | switch base -> adapter | weight 1 -> 0.5 | back to base | again | "
        f"to a rank-{STYLE_RANK} attention adapter (U-Net/call {SIZE} px) | "
        + " | ".join(f"U-Net/call {size} px: base / adapter (cost)" for size in SIZES)
        + " | RSS base -> adapter (peak) |",
        "|---|---|---|---|---|---|---|" + "---|" * len(SIZES) + "---|",
    ]
    nan = float("nan")
    for entry in results["backends"].values():
        switch, rss = entry["switch_seconds"], entry["rss_gb"]
        calls = " | ".join(
            f"{entry['unet_seconds_base'][str(size)]:.3f} / {entry['unet_seconds_adapter'][str(size)]:.3f} s "
            f"({entry['per_call_cost'][str(size)]:+.1%})"
            for size in SIZES
        )
        lines.append(
            f"| {entry['backend']} | {entry['mode']} | {switch['base_to_adapter']:.2f} s | "
            f"{switch['adapter_weight_change']:.2f} s | {switch['adapter_to_base']:.2f} s | {switch['again']:.2f} s | "
            f"{switch.get('to_style_adapter', nan):.2f} s ({entry.get('unet_seconds_style_adapter', nan):.3f} s) | "
            f"{calls} | {rss['base']:.1f} -> {rss['adapter']:.1f} GB ({rss['peak']:.1f}) |"
        )
    entries = results["backends"].values()
    exact = all(entry["base_again_max_abs"] == 0 and entry["adapter_again_max_abs"] == 0 for entry in entries)
    lines += [
        "",
        f"Images after switching back equal the first ones {'exactly (max abs 0.0)' if exact else 'NOT exactly'}, "
        "base and adapter alike. Export of the bundle "
        f"{results.get('export_seconds', float('nan')):.0f} s; `lcm-export adapter` "
        f"{results['adapter_seconds']:.0f} s.",
    ]
    int8 = results.get("int8")
    if int8:
        lines += [
            "",
            f"INT8 (fast INT8 bundles: INT8 U-Net calibrated at {SIZE} px, TAESD-shaped decoder), {SIZE} px, 4 steps, "
            f"mean PSNR over {len(int8['prompts'])} prompts, rank-{RANK} LoRA with alpha {INT8_ALPHA}: the INT8 base "
            "bundle with the adapter at weight 1 against the INT8 bundle exported with the LoRA fused (calibrated on "
            "its own trajectories); for scale, the same base without the adapter, and each INT8 image against the "
            "fused bundle's fp32 U-Net (same decoder).",
            "",
            "| backend | adapter_mode | switch | INT8 + adapter vs INT8 fused | INT8 base vs INT8 fused | "
            "INT8 fused vs fp32 fused | INT8 + adapter vs fp32 fused |",
            "|---|---|---|---|---|---|---|",
        ]
        for backend, entry in int8["backends"].items():
            lines.append(
                f"| {backend} | {entry['mode']} | {entry['switch_seconds']:.1f} s | "
                f"{entry['psnr_int8_adapter_vs_int8_fused_db']:.2f} dB | "
                f"{entry['psnr_int8_base_vs_int8_fused_db']:.2f} dB | "
                f"{entry['psnr_int8_fused_vs_fp32_fused_db']:.2f} dB | "
                f"{entry['psnr_int8_adapter_vs_fp32_fused_db']:.2f} dB |"
            )
    return [*lines, SECTION_END]


if __name__ == "__main__":
    main()
