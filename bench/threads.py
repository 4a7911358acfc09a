"""One ``Pipeline`` shared by two threads against one thread: throughput on the SD1.5-shaped fast INT8 bundle.

    python bench/threads.py --work DIR [--size 256] [--images 8] [--rounds 3]

``DIR`` holds the SD1.5-shaped random pipeline and the TAESD-shaped tiny VAE (``python bench/models.py DIR``); the
fast INT8 bundle (INT8 U-Net + tiny VAE, calibrated at 256 px) is exported into ``DIR/bundle-fast-int8`` when it
is not there. For each backend the same pipeline generates ``--images`` images (prompts and seeds fixed) from one
thread, and from two threads sharing it; on OpenVINO also with its pool capped at one infer request (a lock per
session instead of a pool), the alternative the runtime chose against. The modes alternate within each round;
the result is images per second (median over rounds), the ratio to one thread, and whether every image equals the
one-thread image bit for bit. Writes ``bench/threads-results.json``; the table goes into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from common import export_jobs

BENCH_DIR = Path(__file__).resolve().parent
PROMPTS = [
    "a photo of a cat on a sofa",
    "a lighthouse at dusk",
    "a bowl of fruit, oil painting",
    "a city street in the rain",
    "a mountain lake at sunrise",
    "a red vintage car",
    "a watercolor fox",
    "an astronaut riding a horse",
]


def export_bundle(work: Path) -> Path:
    bundle = work / "bundle-fast-int8"
    if (bundle / "manifest.json").is_file():
        return bundle
    command = [sys.executable, "-m", "lcm_export.exporter.cli", str(work / "sd15-lcm"), "--output", str(bundle)]
    command += export_jobs(work)["fast-int8"]  # the main benchmark's fast INT8 bundle, the same options
    subprocess.run(command, check=True)
    return bundle


def generate_all(pipe, jobs: list[tuple[str, int]], size: int, threads: int) -> tuple[float, list[np.ndarray]]:
    """Seconds to make every job's image with ``threads`` threads taking jobs from one list, and the images."""
    images: list[np.ndarray | None] = [None] * len(jobs)
    next_job = iter(range(len(jobs)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                index = next(next_job, None)
            if index is None:
                return
            prompt, seed = jobs[index]
            images[index] = pipe(prompt, seed=seed, height=size, width=size).images[0]

    start = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start, [image for image in images if image is not None]


def _lock_sessions(pipe, locked: bool) -> None:
    """Put a lock around each of the pipeline's sessions (the runtime's choice for backends that are not
    thread-safe), or take it away."""
    from lcm_export.runtime.denoiser import LockedSession

    sessions = pipe.denoiser._sessions
    for name, session in sessions.items():
        inner = session.inner if isinstance(session, LockedSession) else session
        sessions[name] = LockedSession(inner) if locked else inner


def run_backend(bundle: Path, backend: str, size: int, count: int, rounds: int) -> dict:
    from lcm_export.runtime import Pipeline

    pipe = Pipeline.load(bundle, backend=backend)
    jobs = [(PROMPTS[index % len(PROMPTS)], index) for index in range(count)]
    modes = {"1 thread": 1, "2 threads": 2}
    capped_sessions = []
    if backend == "openvino":
        modes["2 threads, one request per session (lock)"] = 2
        capped_sessions = list(pipe.denoiser.sessions.values())
    if backend == "onnxruntime":  # concurrent run() calls (onnxruntime allows them) against a lock per session
        modes["2 threads, a lock per session"] = 2
    generate_all(pipe, jobs[:2], size, 1)  # warm-up: first-call allocations and re-layouts
    reference: list[np.ndarray] | None = None
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    equal: dict[str, bool] = dict.fromkeys(modes, True)
    for _ in range(rounds):
        for mode, threads in modes.items():
            for session in capped_sessions:
                session.max_requests = 1 if "lock" in mode else None
            if backend == "onnxruntime":
                _lock_sessions(pipe, "lock" in mode)
            elapsed, images = generate_all(pipe, jobs, size, threads)
            seconds[mode].append(elapsed)
            if reference is None:
                reference = images
            equal[mode] &= all(np.array_equal(a, b) for a, b in zip(reference, images, strict=True))
    one = statistics.median(seconds["1 thread"])
    return {
        "backend": backend,
        "variants": {name: choice.name for name, choice in pipe.variants.items()},
        "inference_precision": sorted({info.inference_precision or "f32" for info in pipe.session_info().values()}),
        "modes": {
            mode: {
                "seconds": values,
                "images_per_second": count / statistics.median(values),
                "ratio_to_one_thread": one / statistics.median(values),
                "images_equal_to_one_thread": equal[mode],
            }
            for mode, values in seconds.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["openvino", "onnxruntime"])
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "threads-results.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a worker process: one backend
    args = parser.parse_args(argv)
    bundle = export_bundle(args.work)
    if args.one:
        print(json.dumps(run_backend(bundle, args.one, args.size, args.images, args.rounds)))
        return 0
    results = []
    for backend in args.backends:  # each backend alone in its own process (memory, thread pools)
        command = [sys.executable, __file__, "--work", str(args.work), "--size", str(args.size)]
        command += ["--images", str(args.images), "--rounds", str(args.rounds), "--one", backend]
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "size": args.size,
        "images": args.images,
        "rounds": args.rounds,
        "results": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"| backend | mode | images/s (median of {args.rounds}) | vs one thread | images equal |")
    print("|---|---|---|---|---|")
    for result in results:
        for mode, figures in result["modes"].items():
            print(
                f"| {result['backend']} ({'/'.join(result['inference_precision'])}) | {mode} | "
                f"{figures['images_per_second']:.3f} | {figures['ratio_to_one_thread']:.2f}x | "
                f"{'yes' if figures['images_equal_to_one_thread'] else 'NO'} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
