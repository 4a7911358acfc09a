"""The JavaScript runtime in Node and in Chromium against the Python runtime, on one bundle (issue 25).

    python bench/web.py --bundle DIR [--size 256] [--runs 3] [--steps 4] [--engines python,node,wasm,chromium]
                        [--webgpu] [--precision auto|fp32|int8] [--output bench/web-results.json] [--note TEXT]

Engines, each in its own process, loaded once (one after another, so that each load runs alone) and then alternating
image by image — one warm-up round, then ``--runs`` timed rounds, the same prompt, seed, steps and size everywhere:

- ``python``: the Python runtime on onnxruntime (``Pipeline.load(bundle, backend="onnxruntime", precision="fp32")``,
  variant ``--precision``, default auto);
- ``node``: the JS runtime (js/src) in Node on onnxruntime-node;
- ``wasm``: the JS runtime in Node on onnxruntime-web's WASM backend, ``threads`` = the core count;
- ``chromium``: the demo page served by ``lcm-run serve`` in headless Chromium (js/demo, playwright-core), WASM with
  threads (the page is cross-origin isolated; ``?threads=`` = the core count); ``--webgpu`` adds ``webgpu`` (the
  same page on Chromium's WebGPU, SwiftShader where there is no GPU).

``--precision`` picks the stored variant everywhere (the JS runtime's ``precision``, the Python runtime's ``variant``):
"auto" runs what each runtime prefers (on a ``--target web`` INT8 bundle: the INT8 U-Net on all four), "fp32" asks
the float weights (on WASM an fp32 SD1.5 U-Net is 3.4 GB of its 4 GB memory: the load is what is measured).

Per engine: seconds per image (median, min-max, measured in the worker around one generate call), load seconds,
the ratio to the Python runtime's median, peak memory (Python/Node: the process's peak RSS, VmHWM; Chromium: the
peak of its process tree's summed RSS, sampled every 0.2 s, and the page's performance.memory /
measureUserAgentSpecificMemory), and the max abs difference of its last image against the Python runtime's.
Writes ``--output`` and prints a markdown table (bench/RESULTS.md, "Web: Node and Chromium against the Python
runtime"). The Node side is bench/web-worker.mjs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
NODE_WORKER = BENCH_DIR / "web-worker.mjs"
PROMPT = "a photo of a lighthouse on a cliff at dusk, detailed"
SEED = 7
ENGINES = ["python", "node", "wasm", "chromium"]
LABELS = {
    "python": "Python runtime, onnxruntime (CPU)",
    "node": "JS runtime, Node, onnxruntime-node",
    "wasm": "JS runtime, Node, onnxruntime-web WASM",
    "chromium": "JS runtime, headless Chromium, WASM",
    "webgpu": "JS runtime, headless Chromium, WebGPU (SwiftShader)",
}


def python_worker(bundle: str, size: int, steps: int, variant: str) -> int:
    """The Python engine's loop: the same JSON line protocol as web-worker.mjs."""
    from lcm_export.runtime import Pipeline

    pipe = None
    image = None
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "load":
                started = time.perf_counter()
                pipe = Pipeline.load(bundle, backend="onnxruntime", variant=variant, precision="fp32")
                variants = {name: choice.precision for name, choice in pipe.variants.items()}
                answer = {"load_s": time.perf_counter() - started, "backend": "onnxruntime", "variants": variants}
            elif command["cmd"] == "run":
                started = time.perf_counter()
                out = pipe(PROMPT, num_inference_steps=steps, seed=SEED, height=size, width=size)
                answer = {"seconds": time.perf_counter() - started}
                image = np.ascontiguousarray(out.images[0], dtype=np.float32)
            elif command["cmd"] == "image":
                image.tofile(command["path"])
                answer = {}
            elif command["cmd"] == "quit":
                break
            else:
                answer = {}
        except Exception as error:  # reported to the coordinator, which records it as the engine's failure
            answer = {"error": f"{type(error).__name__}: {error}"[:2000]}
        print(json.dumps(answer), flush=True)
    return 0


def _peak_rss(pid: int) -> int:
    """VmHWM (the process's peak resident set) in bytes, 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Engine:
    """One engine's process, its line protocol and a sampler of its process tree's memory."""

    def __init__(self, name: str, command: list[str], env: dict[str, str] | None = None):
        import psutil

        self.name = name
        self.log = tempfile.NamedTemporaryFile("w", prefix=f"web-{name}-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            command,
            cwd=REPO_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.handle = psutil.Process(self.process.pid)
        self.tree_peak = 0
        self.children_peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                children = self.handle.children(recursive=True)
                own = self.handle.memory_info().rss
                rest = 0
                for child in children:
                    try:
                        rest += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.tree_peak = max(self.tree_peak, own + rest)
                self.children_peak = max(self.children_peak, rest)
            except psutil.Error:
                return
            self._stop.wait(0.2)

    def ask(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            return {"error": f"the process ended (exit {self.process.wait()}); see {self.log.name}"}
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.ask({"cmd": "quit"})
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._stop.set()
        self.log.close()


def start_engine(
    name: str, bundle: Path, url: str | None, size: int, steps: int, threads: int, precision: str
) -> Engine:
    if name == "python":
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--bundle", str(bundle)]
        command += ["--size", str(size), "--steps", str(steps), "--precision", precision]
        return Engine(name, command, {"PYTHONPATH": str(REPO_DIR)})
    engine = "chromium" if name in ("chromium", "webgpu") else name
    where = ["--url", url] if engine == "chromium" else ["--bundle", str(bundle)]
    command = ["node", str(NODE_WORKER), engine, *where, "--prompt", PROMPT, "--seed", str(SEED)]
    command += ["--steps", str(steps), "--size", str(size), "--threads", str(threads), "--precision", precision]
    return Engine(name, command, {"WEBGPU": "1"} if name == "webgpu" else None)


def serve(bundle: Path) -> tuple[subprocess.Popen, str]:
    """``lcm-run serve BUNDLE --port 0``; returns the process and its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "lcm_export.runtime.cli", "serve", str(bundle), "--port", "0"],
        cwd=REPO_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_DIR)},
    )
    line = process.stdout.readline()
    if " at http://" not in line:
        process.kill()
        raise SystemExit(f"lcm-run serve did not start: {line!r}")
    return process, line.split(" at ", 1)[1].split()[0]


def table(report: dict) -> str:
    rows = [
        "| engine | U-Net | s/image median (min-max) | load s | x Python | peak memory GB | max abs vs Python |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in report["engines"].items():
        label = LABELS[name]
        unet = (result.get("variants") or {}).get("unet", "?")
        if "error" in result:
            memory = result.get("peak_memory_gb", 0)
            rows.append(f"| {label} | {unet} | failed: {result['error'][:160]} | | | {memory:.2f} | |")
            continue
        seconds = result["seconds"]
        memory = result["peak_memory_gb"]
        difference = result.get("max_abs_vs_python")
        rows.append(
            f"| {label} | {unet} | {statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f}) "
            f"| {result['load_s']:.1f} | {result['ratio_to_python']:.2f} | {memory:.2f} "
            f"| {'-' if difference is None else f'{difference:.1e}'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--webgpu", action="store_true", help="also Chromium on WebGPU (SwiftShader here: slow)")
    parser.add_argument("--precision", default="auto", help="the stored variant: auto (default), fp32, fp16 or int8")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "web-results.json")
    parser.add_argument("--note", default="", help="written into the results, e.g. what else loaded the machine")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return python_worker(str(args.bundle), args.size, args.steps, args.precision)

    names = [name for name in args.engines.split(",") if name] + (["webgpu"] if args.webgpu else [])
    threads = os.cpu_count() or 1
    server, url = serve(args.bundle) if {"chromium", "webgpu"} & set(names) else (None, None)
    engines: dict[str, Engine] = {}
    results: dict[str, dict] = {name: {} for name in names}
    scratch = Path(tempfile.mkdtemp(prefix="web-bench-"))
    try:
        for name in names:  # one load at a time, so that each runs alone
            print(f"[web] loading {name}", file=sys.stderr, flush=True)
            engine = engines[name] = start_engine(
                name, args.bundle, url, args.size, args.steps, threads, args.precision
            )
            answer = engine.ask({"cmd": "load"})
            results[name].update(answer)
            print(f"[web] {name}: {answer}", file=sys.stderr, flush=True)
        for round_index in range(1 + args.runs):  # round 0 is the warm-up
            for name in names:
                if "error" in results[name]:
                    continue
                answer = engines[name].ask({"cmd": "run"})
                if "error" in answer:
                    results[name]["error"] = answer["error"]
                    continue
                print(f"[web] round {round_index} {name}: {answer['seconds']:.2f} s", file=sys.stderr, flush=True)
                key = "warmup_s" if round_index == 0 else "seconds"
                if round_index == 0:
                    results[name][key] = answer["seconds"]
                else:
                    results[name].setdefault(key, []).append(answer["seconds"])
                    results[name]["timings_ms"] = answer.get("timings")
        images = {}
        for name in names:
            if "error" in results[name]:
                continue
            path = scratch / f"{name}.raw"
            engines[name].ask({"cmd": "image", "path": str(path)})
            if path.is_file():
                images[name] = np.fromfile(path, dtype=np.float32)
            if name in ("chromium", "webgpu"):
                results[name]["page_memory"] = engines[name].ask({"cmd": "memory"})
    finally:
        for name, engine in engines.items():
            pid = engine.process.pid
            process_peak = _peak_rss(pid)
            engine.close()
            results[name]["process_peak_rss_gb"] = process_peak / 1e9
            results[name]["tree_peak_rss_sampled_gb"] = engine.tree_peak / 1e9
            browser = name in ("chromium", "webgpu")
            # Node/Python: the process's own peak; Chromium: its process tree's (sampled, the Node driver included)
            peak = engine.tree_peak if browser else max(process_peak, engine.tree_peak)
            results[name]["peak_memory_gb"] = peak / 1e9
            results[name]["log"] = engine.log.name
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    base = results.get("python", {})
    for name, result in results.items():
        if "seconds" in result and "seconds" in base:
            result["ratio_to_python"] = statistics.median(result["seconds"]) / statistics.median(base["seconds"])
        if name in images and "python" in images and images[name].shape == images["python"].shape:
            result["max_abs_vs_python"] = float(np.max(np.abs(images[name] - images["python"])))
        if "seconds" not in result and "error" not in result:
            result["error"] = "no timed run"
    report = {
        "bundle": str(args.bundle),
        "size": args.size,
        "steps": args.steps,
        "runs": args.runs,
        "prompt": PROMPT,
        "seed": SEED,
        "threads": threads,
        "precision": args.precision,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "note": args.note,
        "engines": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
