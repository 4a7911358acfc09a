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
SIZE = 256  # px: the size the other CPU benchmarks time (switches, images)
SIZES = (256, 512)  # per-call cost at both
STEPS = 2
CALLS = 3  # timed pipeline calls per weight set
RUNS = (("onnxruntime", "inputs"), ("onnxruntime", "rebuild"), ("openvino", "rebuild"))  # (backend, adapter_mode)


def rss_gb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def measure_backend(bundle: Path, adapter: Path, backend: str, cache: Path, mode: str) -> dict:
    """One backend's numbers in one adapter mode (run in its own process: see main)."""
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
        },
        "rss_gb": {
            "base": rss_base,
            "adapter": rss_adapter,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        },
        "adapter_changes_image": float(np.abs(adapter_image - base_image).max()),
        "base_again_max_abs": float(np.abs(again_base - base_image).max()),
        "adapter_again_max_abs": float(np.abs(again_adapter - adapter_image).max()),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        bundle, adapter, backend, cache, mode = sys.argv[2:7]
        print(json.dumps(measure_backend(Path(bundle), Path(adapter), backend, Path(cache), mode)))
        return
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
    for backend, mode in RUNS:
        cache = work / f"cache-{backend}"
        command = [python, str(Path(__file__).resolve()), "--measure", str(bundle), str(adapter), backend, str(cache)]
        run = subprocess.run([*command, mode], check=True, env=env, stdout=subprocess.PIPE, text=True)
        results["backends"][f"{backend} {mode}"] = json.loads(run.stdout.strip().splitlines()[-1])
        print(json.dumps(results["backends"][f"{backend} {mode}"]), flush=True)
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
        + " | ".join(f"U-Net/call {size} px: base / adapter (cost)" for size in SIZES)
        + " | RSS base -> adapter (peak) |",
        "|---|---|---|---|---|---|" + "---|" * len(SIZES) + "---|",
    ]
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
        SECTION_END,
    ]
    return lines


if __name__ == "__main__":
    main()
