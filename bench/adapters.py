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
ROUNDS = {256: 5, 512: 3}  # alternating base / adapter pipeline calls per size for the cost per call
PER_CALL_ROUNDS = 15  # --per-call-only: the style adapter's cost per call, a longer alternating run
INT8_ALPHA = 8  # the INT8 part's LoRA: alpha/r = 1/8
INT8_PROMPTS = ("a photo of a cat", "a lighthouse on a cliff at dusk", "a bowl of fruit on a table")
# (backend, adapter_mode, adapters): "auto" runs the LCM-LoRA-shaped adapter merged (inputs on onnxruntime,
# rebuild on OpenVINO) and the style one as factors; "factors" the LCM-LoRA-shaped one as factors too.
RUNS = (
    ("onnxruntime", "auto", ("lcm-lora-r64", "style-r16")),
    ("onnxruntime", "factors", ("lcm-lora-r64",)),
    ("openvino", "auto", ("lcm-lora-r64", "style-r16")),
    ("openvino", "factors", ("lcm-lora-r64",)),
)
# Then each factors run again in a new process, its compiled-model cache now warm (every start after the first on
# a device): the switches alone.
WARM_RUNS = (
    ("onnxruntime", "auto", ("style-r16",)),
    ("onnxruntime", "factors", ("lcm-lora-r64",)),
    ("openvino", "auto", ("style-r16",)),
    ("openvino", "factors", ("lcm-lora-r64",)),
)
TOUCH_GB = 16  # memory written once before the runs (see main)


def rss_gb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def measure_backend(
    bundle: Path, adapters: dict[str, Path], backend: str, cache: Path, mode: str, per_call: bool = True
) -> dict:
    """One backend's numbers in one adapter mode (run in its own process: see main), per adapter: the switches
    (base -> adapter, weight 1 -> 0.5, back to base, base -> adapter again), the RSS, the images after switching
    back; then (``per_call``) the U-Net per call with each adapter against a second pipeline on the base weights,
    calls alternating between the two (a drift of the machine's speed over the run lands on both)."""
    import numpy as np

    from lcm_export.runtime import Pipeline

    def load(**options):
        return Pipeline.load(bundle, backend=backend, precision="fp32", threads=2, cache_dir=cache, **options)

    started = time.perf_counter()
    pipe = load(adapter_mode=mode)
    load_seconds = time.perf_counter() - started

    def unet_call(which, size: int) -> tuple[list[float], np.ndarray]:
        output = which("a photo of a cat", height=size, width=size, num_inference_steps=STEPS, seed=1)
        return output.timings["unet"], output.images

    def switch(adapters: dict) -> float:
        started = time.perf_counter()
        pipe.set_adapters(adapters)
        return time.perf_counter() - started

    unet_call(pipe, SIZE)  # first call: lazy re-layouts
    base_image = unet_call(pipe, SIZE)[1]
    rss_base = rss_gb()
    rows = {}
    for label, path in adapters.items():
        on = switch({path: 1.0})
        rss_adapter = rss_gb()
        adapter_image = unet_call(pipe, SIZE)[1]  # also the first call after the switch
        runs_as = pipe.adapter_state.modes.get("unet", mode)
        weight = switch({path: 0.5})
        off = switch({})
        again_base = unet_call(pipe, SIZE)[1]
        again = switch({path: 1.0})
        again_adapter = unet_call(pipe, SIZE)[1]
        switch({})
        rows[label] = {
            "mode": runs_as,
            "switch_seconds": {"base_to_adapter": on, "adapter_weight_change": weight, "adapter_to_base": off,
                               "again": again},
            "rss_gb_adapter": rss_adapter,
            "adapter_changes_image": float(np.abs(adapter_image - base_image).max()),
            "base_again_max_abs": float(np.abs(again_base - base_image).max()),
            "adapter_again_max_abs": float(np.abs(again_adapter - adapter_image).max()),
        }  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # before the second pipeline
    if not per_call:
        return {
            "backend": backend,
            "mode": mode,
            "load_seconds": load_seconds,
            "adapters": rows,
            "rss_gb": {"base": rss_base, "peak": peak},
        }
    reference = load()  # the base weights, for the cost per call
    unet_call(reference, SIZE)
    base_times: dict[int, list[float]] = {size: [] for size in SIZES}
    for label, path in adapters.items():
        switch({path: 1.0})
        unet_call(pipe, SIZE)
        adapter_times: dict[int, list[float]] = {size: [] for size in SIZES}
        for size in SIZES:
            for _ in range(ROUNDS[size]):
                base_times[size] += unet_call(reference, size)[0]
                adapter_times[size] += unet_call(pipe, size)[0]
        rows[label]["unet_seconds_adapter"] = {size: float(np.median(times)) for size, times in adapter_times.items()}
        rows[label]["unet_seconds_base_alternating"] = {
            size: float(np.median(base_times[size][-len(adapter_times[size]) :])) for size in SIZES
        }
        rows[label]["per_call_cost"] = {
            size: rows[label]["unet_seconds_adapter"][size] / rows[label]["unet_seconds_base_alternating"][size] - 1
            for size in SIZES
        }
    return {
        "backend": backend,
        "mode": mode,
        "load_seconds": load_seconds,
        "unet_seconds_base": {size: float(np.median(times)) for size, times in base_times.items()},
        "adapters": rows,
        "rss_gb": {"base": rss_base, "peak": peak},
    }


def measure_per_call(bundle: Path, adapter: Path, backend: str, cache: Path, rounds: int) -> dict:
    """The cost per call of ``adapter`` ("auto") alone, in a longer run: a pipeline with it and one on the base
    weights, ``rounds`` alternating calls per size; medians and the quartiles of each side's steps."""
    import numpy as np

    from lcm_export.runtime import Pipeline

    def load(**options):
        return Pipeline.load(bundle, backend=backend, precision="fp32", threads=2, cache_dir=cache, **options)

    pipes = {"base": load(), "adapter": load(adapters={str(adapter): 1.0})}
    result: dict = {"mode": pipes["adapter"].adapter_state.modes.get("unet"), "rounds": rounds, "sizes": {}}
    for size in SIZES:
        times: dict[str, list[float]] = {"base": [], "adapter": []}
        ratios: list[float] = []  # per round: the adapter's U-Net time over the base's, calls side by side
        for pipe in pipes.values():  # warm both at this size
            pipe("a photo of a cat", height=size, width=size, num_inference_steps=STEPS, seed=1)
        for _ in range(rounds):
            pair = {}
            for which, pipe in pipes.items():
                output = pipe("a photo of a cat", height=size, width=size, num_inference_steps=STEPS, seed=1)
                times[which] += output.timings["unet"]
                pair[which] = sum(output.timings["unet"])
            ratios.append(pair["adapter"] / pair["base"])
        medians = {which: float(np.median(values)) for which, values in times.items()}
        result["sizes"][str(size)] = {
            "unet_seconds": medians,
            "quartiles": {
                which: [float(q) for q in np.percentile(values, (25, 75))] for which, values in times.items()
            },
            "per_call_cost": medians["adapter"] / medians["base"] - 1,
            # drift (other load, the CPU's clock) moves both calls of a round alike: the median of the rounds'
            # ratios, and their quartiles
            "per_call_cost_paired": float(np.median(ratios)) - 1,
            "paired_quartiles": [float(q) - 1 for q in np.percentile(ratios, (25, 75))],
        }
    return result


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


def touch_memory() -> None:
    """Write TOUCH_GB of memory once and free it: on a VM, the first write to a page since boot costs the host's
    fault (measured here: 7 s for 3.2 GB against 0.5 s for the same write later), which would land in the first
    switch's merge and is no property of the runtime."""
    import numpy as np

    block = np.ones(TOUCH_GB * 250_000_000, dtype=np.float32)
    del block


def factor_share(bundle: Path, path: Path) -> float:
    """The adapter's U-Net factors as a share of the U-Net's adaptable weights (what adapter_mode "auto" looks at)."""
    from lcm_export.runtime.adapters import factor_shares, load_adapter, read_weight_map
    from lcm_export.runtime.manifest import load_manifest

    manifest = load_manifest(bundle, verify="size")
    maps = {name: read_weight_map(bundle, manifest, name) for name in manifest.components}
    maps = {name: found for name, found in maps.items() if found is not None}
    return factor_shares(maps["unet"], [(load_adapter(path, bundle, maps), 1.0)])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("--measure", "--measure-switches"):
        per_call = sys.argv[1] == "--measure"
        bundle, backend, cache, mode, *adapters = sys.argv[2:]
        chosen = dict(value.split("=", 1) for value in adapters)
        print(json.dumps(measure_backend(Path(bundle), chosen, backend, Path(cache), mode, per_call)))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--measure-per-call":
        bundle, adapter, backend, cache, rounds = sys.argv[2:7]
        print(json.dumps(measure_per_call(Path(bundle), Path(adapter), backend, Path(cache), int(rounds))))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--measure-int8":
        print(json.dumps(measure_int8(*(Path(value) for value in sys.argv[2:5]))))
        return
    int8_only, switch_only = "--int8-only" in sys.argv, "--switch-only" in sys.argv
    per_call_only = "--per-call-only" in sys.argv
    sys.argv = [value for value in sys.argv if value not in ("--int8-only", "--switch-only", "--per-call-only")]
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/benchwork/adapters")
    if per_call_only:  # the style adapter's cost per call in a longer run; the rest kept from the last run
        results = json.loads((BENCH_DIR / "adapters-results.json").read_text())
        style = work / f"style-r{STYLE_RANK}.adapter"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        results["style_per_call"] = {}
        for backend in ("onnxruntime", "openvino"):
            command = [sys.executable, str(Path(__file__).resolve()), "--measure-per-call", str(work / "bundle-fp32")]
            command += [str(style), backend, str(work / f"cache-{backend}"), str(PER_CALL_ROUNDS)]
            run = subprocess.run(command, check=True, env=env, stdout=subprocess.PIPE, text=True)
            results["style_per_call"][backend] = json.loads(run.stdout.strip().splitlines()[-1])
            print(json.dumps(results["style_per_call"][backend]), flush=True)
        results["style_per_call_machine"] = common.machine_info()
        common.publish_section(
            BENCH_DIR, "adapters-results.json", results, section_lines(results), SECTION_START, SECTION_END
        )
        return
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
    if "export_seconds" not in results and previous.get("export_seconds") is not None:
        results["export_seconds"] = previous["export_seconds"]  # the bundle was exported by an earlier run
    if int8_only:  # keep the switch measurements of the last full run
        results["backends"] = previous.get("backends", {})
    for kept in ("style_per_call", "style_per_call_machine", "style_per_call_note"):  # from --per-call-only
        if kept in previous:
            results[kept] = previous[kept]
    if not int8_only:
        touch_memory()
    files = {"lcm-lora-r64": adapter, "style-r16": style}
    results["adapters"] = {
        label: {"size_bytes": path.stat().st_size, "factor_share": factor_share(bundle, path)}
        for label, path in files.items()
    }
    for backend, mode, labels in () if int8_only else RUNS:
        cache = work / f"cache-{backend}"
        command = [python, str(Path(__file__).resolve()), "--measure", str(bundle), backend, str(cache), mode]
        command += [f"{label}={files[label]}" for label in labels]
        run = subprocess.run(command, check=True, env=env, stdout=subprocess.PIPE, text=True)
        results["backends"][f"{backend} {mode}"] = json.loads(run.stdout.strip().splitlines()[-1])
        print(json.dumps(results["backends"][f"{backend} {mode}"]), flush=True)
    results["warm_start"] = {} if not int8_only else previous.get("warm_start", {})
    for backend, mode, labels in () if int8_only else WARM_RUNS:
        cache = work / f"cache-{backend}"
        command = [python, str(Path(__file__).resolve()), "--measure-switches", str(bundle), backend, str(cache)]
        command += [mode, *(f"{label}={files[label]}" for label in labels)]
        run = subprocess.run(command, check=True, env=env, stdout=subprocess.PIPE, text=True)
        results["warm_start"][f"{backend} {mode}"] = json.loads(run.stdout.strip().splitlines()[-1])
        print(json.dumps(results["warm_start"][f"{backend} {mode}"]), flush=True)
    if switch_only and "int8" in previous:  # keep the INT8 part of the last full run
        results["int8"] = previous["int8"]
        results["int8"].setdefault("machine", previous.get("machine", {}))  # where it was measured
    else:
        results["int8"] = int8_part(work, python, env, model)
    print(json.dumps(results["int8"]), flush=True)
    results["machine"] = common.machine_info()
    lines = section_lines(results)
    common.publish_section(BENCH_DIR, "adapters-results.json", results, lines, SECTION_START, SECTION_END)


def earlier_run(measured_on: dict | None, machine: dict) -> str:
    """A sentence saying where a part kept from an earlier run was measured, when that is not this machine."""
    if not measured_on or measured_on == machine:
        return ""
    isa = ", ".join(flag for flag, present in measured_on.get("isa", {}).items() if present)
    return f"Measured in an earlier run on {measured_on.get('cpu', 'another CPU')} ({isa}). "


def switch_cells(switch: dict) -> str:
    """A row's four switch times as table cells: base -> adapter, weight 1 -> 0.5, back to base, again."""
    keys = ("base_to_adapter", "adapter_weight_change", "adapter_to_base", "again")
    return " | ".join(f"{switch[key]:.2f} s" for key in keys)


def switched_back_exactly(row: dict) -> bool:
    """The images after switching back equal the first ones, base and adapter."""
    return row["base_again_max_abs"] == 0 and row["adapter_again_max_abs"] == 0


def section_lines(results: dict) -> list[str]:
    machine = results["machine"]
    isa = ", ".join(flag for flag, present in machine.get("isa", {}).items() if present)
    adapters = results.get("adapters", {})
    described = "; ".join(
        f"`{label}` {entry['size_bytes'] / 1e6:.1f} MB, its factors {entry['factor_share']:.2%} of the U-Net's "
        "adaptable weights"
        for label, entry in adapters.items()
    )
    lines = [
        SECTION_START,
        "## Run-time adapters (bench/adapters.py)",
        "",
        f"SD1.5-shaped random LCM, fp32 bundle ({results['bundle_size_bytes'] / 1e9:.2f} GB). Adapters: "
        f"`lcm-lora-r64` is a rank-{RANK} LoRA on LCM-LoRA's U-Net targets (every attention, feed-forward, "
        f"projection, ResNet convolution and time embedding), `style-r16` a rank-{STYLE_RANK} LoRA on the attention "
        f"projections (a style LoRA's shape); {described}. {results['steps']} steps, 2 threads, "
        f"{machine.get('cpu', 'CPU')} ({isa}). Switch times at {SIZE} px from a warm page cache, the compiled-model "
        "caches empty at the start: the first switch to an adapter opens the graph it runs on (onnxruntime: "
        "optimises and saves it, the first time on a device; OpenVINO: compiles it, at every first switch in a "
        "process). Back to the base, factors stay bound as zeros (no session opens). U-Net time per call: the "
        "median of the calls' steps, the adapter at weight 1 against a second pipeline on the base weights, calls "
        "alternating between the two. RSS: the process with the one pipeline, before the second is loaded.",
        "",
        "| backend | adapter_mode | adapter | runs as | switch base -> adapter | weight 1 -> 0.5 | back to base | "
        "again | "
        + " | ".join(f"U-Net/call {size} px: base / adapter (cost)" for size in SIZES)
        + " | RSS base -> adapter |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(SIZES) + "---|",
    ]
    exact = True
    for entry in results["backends"].values():
        for label, row in entry.get("adapters", {}).items():
            switch = row["switch_seconds"]
            base, adapted = row["unet_seconds_base_alternating"], row["unet_seconds_adapter"]
            calls = " | ".join(
                f"{base[str(size)]:.3f} / {adapted[str(size)]:.3f} s ({row['per_call_cost'][str(size)]:+.1%})"
                for size in SIZES
            )
            lines.append(
                f"| {entry['backend']} | {entry['mode']} | {label} | {row['mode']} | {switch_cells(switch)} | "
                f"{calls} | {entry['rss_gb']['base']:.1f} -> {row['rss_gb_adapter']:.1f} GB |"
            )
            exact = exact and switched_back_exactly(row)
    warm = results.get("warm_start") or {}
    if warm:
        lines += [
            "",
            "The same switches in a new process, the compiled-model cache warm from the runs above (every start "
            "after the first on a device; the first switch opens the factor graph from that cache on onnxruntime, "
            "and compiles it on OpenVINO, which does not cache factor graphs):",
            "",
            "| backend | adapter_mode | adapter | runs as | load (s) | switch base -> adapter | weight 1 -> 0.5 | "
            "back to base | again |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for entry in warm.values():
            for label, row in entry["adapters"].items():
                lines.append(
                    f"| {entry['backend']} | {entry['mode']} | {label} | {row['mode']} | {entry['load_seconds']:.1f} | "
                    f"{switch_cells(row['switch_seconds'])} |"
                )
                exact = exact and switched_back_exactly(row)
    first_load = next(iter(results["backends"].values()), {}).get("load_seconds")
    lines += [
        "",
        f"Images after switching back equal the first ones {'exactly (max abs 0.0)' if exact else 'NOT exactly'}, "
        "base and adapter alike. Export of the bundle "
        f"{results.get('export_seconds', float('nan')):.0f} s; `lcm-export adapter` "
        f"{results['adapter_seconds']:.0f} s"
        + (f"; the first load of the bundle, cache empty, {first_load:.0f} s." if first_load else "."),
    ]
    long_run = results.get("style_per_call")
    if long_run:
        cells = "; ".join(
            f"{backend} ({entry['mode']}) "
            + ", ".join(
                f"{size} px {values['unet_seconds']['base']:.3f} / {values['unet_seconds']['adapter']:.3f} s "
                f"({values['per_call_cost']:+.1%}"
                + (
                    f"; per round {values['per_call_cost_paired']:+.1%}, quartiles "
                    f"{values['paired_quartiles'][0]:+.1%} / {values['paired_quartiles'][1]:+.1%})"
                    if "per_call_cost_paired" in values
                    else ")"
                )
                for size, values in entry["sizes"].items()
            )
            for backend, entry in long_run.items()
        )
        rounds = next(iter(long_run.values()))["rounds"]
        lines += [
            "",
            earlier_run(results.get("style_per_call_machine"), machine).replace("an earlier run", "another run")
            + f"`style-r16`'s cost per call in a longer run (`--per-call-only`: {rounds} calls of each pipeline "
            f"per size, alternating, U-Net medians base / adapter; per round: the median over the rounds of the "
            f"adapter's U-Net time over the base's in the same round): {cells}.",
        ]
        if results.get("style_per_call_note"):
            lines += ["", str(results["style_per_call_note"])]
    int8 = results.get("int8")
    if int8:
        lines += [
            "",
            earlier_run(int8.get("machine"), machine)
            + f"INT8 (fast INT8 bundles: INT8 U-Net calibrated at {SIZE} px, TAESD-shaped decoder), {SIZE} px, "
            "4 steps, "
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
