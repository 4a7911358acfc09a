"""The frame loop's benchmark: frames per second of image-to-image on a stream of frames, ours with and without
step batching against optimum-intel's OpenVINO LCM img2img pipeline, on the same weights in the same run.

    python bench/run.py --stream-fps                 # 256 px, 2 and 4 steps, 12 timed frames per engine
    python bench/stream.py --frames 12 --steps 2 4   # the same

The model is the bench's SD1.5-shaped random LCM with the TAESD-shaped tiny VAE on both sides (``bench/run.py``
builds them): ours is the fast bundle exported again into ``bundle-fast-stream`` (its U-Net must take one timestep
per row, which step batching needs); the peer is optimum-intel's IR with TAESD's decoder (``optimum-ov-fast``, made
by ``bench/run.py``) and here also TAESD's encoder (``optimum-ov-fast-stream``). Two processes
(``bench/worker.py``) load once: ours, which runs both our rows on one pipeline, and optimum-intel's; then blocks of
``--frames`` timed frames (each after ``--warmup`` untimed ones) alternate between the three rows, ``--rounds``
times per step count with the order rotating, so that the rows share the machine's load alike.
Everyone gets the same synthetic frames (smooth colour fields drifting a few pixels per frame), strength 0.5.

Frames per second is frames over the wall time of the timed loop; latency per frame is from a frame going in to
its styled frame coming out (with step batching that spans the N - 1 frames after it). The table goes into its
own section of ``bench/RESULTS.md`` (between markers that ``bench/run.py`` keeps when it rewrites the file) and
``bench/stream-results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

SECTION_START = "<!-- stream-fps: start (bench/stream.py writes this section) -->"
SECTION_END = "<!-- stream-fps: end -->"
PROMPT = "a watercolour painting of a harbour at dawn"
STREAM_BUNDLE = "bundle-fast-stream"
OPTIMUM_STREAM_IR = "optimum-ov-fast-stream"


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Frames per second of the img2img frame loop (ours vs optimum-intel).")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--frames", type=int, default=12, help="timed frames per engine and step count")
    parser.add_argument("--warmup", type=int, default=2, help="untimed frames first")
    parser.add_argument(
        "--rounds", type=int, default=2, help="timed blocks per row and step count (ours: batched and not alternate)"
    )
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--guidance", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/lcm-export/bench").expanduser())
    parser.add_argument("--output", type=Path, default=common.BENCH_DIR, help="where RESULTS.md and the JSON go")
    parser.add_argument("--no-optimum", action="store_true", help="ours only")
    parser.add_argument("--engines", nargs="+", default=[], help="only these engines: ours, optimum (default: both)")
    return parser.parse_args(argv)


def export_stream_bundle(work_dir: Path) -> dict[str, Any]:
    """The fast bundle (tiny VAE) exported by today's exporter, whose U-Net takes one timestep per row; reused
    while it does."""
    bundle = work_dir / STREAM_BUNDLE
    manifest_path = bundle / "manifest.json"
    metrics_path = work_dir / "stream-export.json"
    if manifest_path.is_file() and metrics_path.is_file():
        unet = json.loads(manifest_path.read_text())["components"]["unet"]
        timestep = next(tensor for tensor in unet["inputs"] if tensor["name"] == "timestep")
        if timestep["shape"] == ["batch"]:
            common.log(f"stream: reusing {bundle}")
            return json.loads(metrics_path.read_text())
    command = [sys.executable, "-m", "lcm_export.exporter.cli", str(work_dir / "sd15-lcm"), "-o", str(bundle)]
    command += ["--overwrite", "--tiny-vae", str(work_dir / "taesd"), "--quiet"]
    common.log(f"stream: export {shlex.join(command)}")
    result = common.measured(command, work_dir / "logs" / "export-stream.log")
    result["command"] = shlex.join(command)
    metrics_path.write_text(json.dumps(result, indent=2) + "\n")
    common.log(f"stream: exported in {result['seconds']:.0f} s, peak RSS {result['peak_rss_gb']:.2f} GB")
    return result


def optimum_stream_ir(work_dir: Path, python: str, size: int) -> Path:
    """optimum-intel's fast IR (TAESD decoder) with TAESD's encoder as its VAE encoder too (built once)."""
    output = work_dir / OPTIMUM_STREAM_IR
    if (output / "vae_encoder" / "openvino_model.xml").is_file():
        return output
    fast = work_dir / "optimum-ov-fast"
    if not (fast / "vae_decoder" / "openvino_model.xml").is_file():
        raise SystemExit(f"bench: {fast} is missing: run `python bench/run.py` once (it builds optimum-intel's IR)")
    job = {"fast": str(fast), "taesd": str(work_dir / "taesd"), "output": str(output), "size": size}
    common.log(f"stream: optimum-intel IR with TAESD's encoder -> {output}")
    common.measured(
        [python, str(common.WORKER), "optimum-taesd-encoder", json.dumps(job)], work_dir / "logs" / "optimum-taesd.log"
    )
    return output


class Worker:
    """One engine's process (``bench/worker.py``): loaded once, then ``stream`` commands one at a time."""

    def __init__(self, name: str, python: str, spec: dict[str, Any], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.name, self.log_path = name, log_path
        self.log_file = open(log_path, "w")  # closed in quit()
        self.process = subprocess.Popen(
            [python, str(common.WORKER), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            cwd=common.REPO_DIR,
        )
        self.ready = self._receive()
        common.log(f"stream: {name} loaded in {self.ready['load_s']:.1f} s ({self.ready['info']})")

    def _receive(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"bench: engine {self.name} stopped (exit {self.process.wait()}); see {self.log_path}")
        return json.loads(line)

    def send(self, command: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._receive()

    def quit(self) -> dict[str, Any]:
        bye = self.send({"cmd": "quit"})
        self.process.wait(timeout=120)
        self.log_file.close()
        return bye


def run_interleaved(workers: dict[str, Worker], blocks: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every (worker, job) block in turn: the engines alternate block by block, under the same load."""
    replies = []
    for name, job in blocks:
        reply = workers[name].send({"cmd": "stream", **job})
        replies.append({**job, **reply})
        rate = reply["frames"] / reply["seconds"]
        common.log(f"stream: {job['row']} {job['steps']} steps, round {job['round'] + 1}: {rate:.2f} frames/s")
    return replies


def compare_outputs(replies: list[dict[str, Any]]) -> dict[str, float]:
    """Max abs difference between our batched and unbatched streams' frames (same frames, same draws: what step
    batching changes is only the U-Net's batched arithmetic), per step count, over every round."""
    import numpy as np

    differences: dict[str, float] = {}
    for reply in replies:
        if reply["row"] != "ours-stream-batched":
            continue
        plain = reply["save"].replace("ours-stream-batched", "ours-stream")
        difference = float(np.abs(np.load(reply["save"]) - np.load(plain)).max())
        key = str(reply["steps"])
        differences[key] = max(differences.get(key, 0.0), difference)
    return differences


def aggregate(replies: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Row -> step count -> every round's frames, seconds and latencies together."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for reply in replies:
        entry = rows.setdefault(reply["row"], {}).setdefault(
            str(reply["steps"]), {"frames": 0, "seconds": 0.0, "latencies": [], "rounds": []}
        )
        entry["frames"] += reply["frames"]
        entry["seconds"] += reply["seconds"]
        entry["latencies"] += reply["latencies"]
        entry["rounds"].append(round(reply["frames"] / reply["seconds"], 3))
        for key in ("unet_calls", "unet_rows"):
            if key in reply:
                entry[key] = entry.get(key, 0) + reply[key] if key == "unet_calls" else reply[key]
    return rows


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def section_lines(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    lines = [
        SECTION_START,
        f"## Frame loop: img2img frames per second ({settings['size']} px, run {results['date']})",
        "",
        "```",
        settings["command"],
        "```",
        "",
        f"SD1.5-shaped random LCM with the TAESD-shaped tiny VAE (encoder and decoder) on both sides, strength "
        f"{settings['strength']}, guidance {settings['guidance']}, {settings['threads']} threads, "
        f"{settings['rounds']} rounds of {settings['frames']} timed frames per row and step count, each after "
        f"{settings['warmup']} warm-up frames; the three rows alternate block by block (the order rotating each "
        "round), ours with and without step batching in one process (same compiled graphs), optimum-intel in its "
        "own, both loaded at once. Latency: a frame in to its styled frame out.",
        "",
        "| engine | steps | U-Net calls per frame (rows) | frames/s (per round) | latency median (s) | latency p90 (s) "
        "| peak RSS (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_steps in results["rows"].items():
        for steps, row in by_steps.items():
            latencies = row["latencies"]
            if "unet_calls" in row:
                calls = f"{row['unet_calls'] / row['frames']:g} (1)"
            elif name == "ours-stream-batched":
                calls = f"1 ({row['unet_rows']})"
            else:
                calls = f"{row['unet_rows']} (1)"
            rounds = ", ".join(f"{rate:.2f}" for rate in row["rounds"])
            lines.append(
                f"| {results['labels'][name]} | {steps} | {calls} | {row['frames'] / row['seconds']:.2f} ({rounds}) | "
                f"{statistics.median(latencies):.3f} | {percentile(latencies, 0.9):.3f} | "
                f"{results['peak_rss_gb'][name]:.2f} |"
            )
    differences = results.get("batched_vs_unbatched") or {}
    if differences:
        shown = ", ".join(f"{steps} steps {value:.2e}" for steps, value in differences.items())
        lines += ["", f"Our batched frames against our unbatched ones (same frames and draws), max abs: {shown}."]
    lines += ["", *[f"- {note}" for note in results["notes"]], "", SECTION_END]
    return lines


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    work_dir = arguments.work_dir
    command = "python bench/run.py --stream-fps " + shlex.join(sys.argv[1:] if argv is None else argv)
    common.build_models(
        common.Settings(
            sizes=(arguments.size,),
            runs=0,
            warmup=0,
            threads=arguments.threads,
            steps=4,
            guidance=arguments.guidance,
            work_dir=work_dir,
            output_dir=arguments.output,
            optimum=False,
            memory_budget_gb=None,
            re_export=False,
            command=command,
        )
    )
    export = export_stream_bundle(work_dir)
    ours = {
        "engine": "lcm-export",
        "bundle": str(work_dir / STREAM_BUNDLE),
        "backend": "auto",
        "precision": "auto",
        "threads": arguments.threads,
        "static_shape": None,  # step batching grows and shrinks the batch: dynamic shapes for both of ours
    }
    labels = {
        "ours-stream": "ours (no step batching)",
        "ours-stream-batched": "ours, step batching",
        "optimum-img2img": "OpenVINO via optimum-intel, LCM img2img",
    }
    job = {
        "size": arguments.size,
        "strength": arguments.strength,
        "guidance": arguments.guidance,
        "frames": arguments.frames,
        "warmup": arguments.warmup,
        "prompt": PROMPT,
    }
    logs = work_dir / "logs"
    # Blocks in turn: per step count and round, ours unbatched, ours batched and the peer, the order rotating
    # every round; ours runs both modes in one process (one pipeline: the same compiled graphs).
    engines: dict[str, tuple[str, dict[str, Any]]] = {"ours": (sys.executable, ours)}
    rows = {"ours-stream": "ours", "ours-stream-batched": "ours"}
    if not arguments.no_optimum:
        python = common.ensure_optimum_venv()
        model = optimum_stream_ir(work_dir, python, arguments.size)
        default = common.openvino_default_precision()
        spec = {
            "engine": "optimum-intel",
            "model": str(model),
            "img2img": True,
            "threads": arguments.threads,
            "precision": "fp32" if default == "f32" else "auto",
        }
        engines["optimum"] = (python, spec)
        rows["optimum-img2img"] = "optimum"
    if arguments.engines:
        engines = {name: engine for name, engine in engines.items() if name in arguments.engines}
        rows = {row: engine for row, engine in rows.items() if engine in engines}
    blocks = []
    for steps in arguments.steps:
        for index in range(arguments.rounds):
            names = list(rows)
            names = names[index % len(names) :] + names[: index % len(names)]
            for row in names:
                block = {**job, "steps": steps, "row": row, "round": index}
                if rows[row] == "ours":
                    block["batch_steps"] = row == "ours-stream-batched"
                    block["save"] = str(logs / f"{row}-{steps}-steps-{index}.npy")
                blocks.append((rows[row], block))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(arguments).items()},
            "command": command,
        },
        "machine": common.machine_info(),
        "export": export,
        "labels": labels,
        "specs": {name: spec for name, (_, spec) in engines.items()},
        "engines": {},
        "load_average_before": [round(value, 2) for value in os.getloadavg()],
    }
    workers = {
        name: Worker(name, python, spec, logs / f"stream-{name}.log") for name, (python, spec) in engines.items()
    }
    replies = run_interleaved(workers, blocks)
    for name, worker in workers.items():
        results["engines"][name] = {"load": worker.ready, **worker.quit()}
    results["rows"] = aggregate(replies)
    results["peak_rss_gb"] = {row: results["engines"][rows[row]]["peak_rss_gb"] for row in results["rows"]}
    results["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    results["batched_vs_unbatched"] = compare_outputs(replies)
    results["notes"] = [
        "Peak RSS: our two rows share one process (one pipeline loaded, both streams run on it). "
        "Both our rows load without static shapes (step batching changes the batch as the pipeline fills and "
        "flushes); optimum-intel runs dynamic shapes as its users run it. Our stream encodes the prompt once; the "
        "peer is given the prompt's embedding once too (`prompt_embeds`), so the rows compare the same work: TAESD "
        "encode, the U-Net steps, TAESD decode.",
        "With step batching a frame costs one U-Net call of N rows (N steps in flight) instead of N calls of one row; "
        "its latency spans the N - 1 frames that come in after it.",
        f"Load average (1, 5, 15 min) before the run {results['load_average_before']}, after "
        f"{results['load_average_after']}: other agents' work shared this 2-core machine, so the figures carry that "
        "noise.",
    ]
    common.publish_section(
        arguments.output, "stream-results.json", results, section_lines(results), SECTION_START, SECTION_END
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
