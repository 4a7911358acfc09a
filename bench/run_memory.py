"""Peak memory of running bundles: `lcm-run` in its own process per bundle and backend, at one size.

Each bundle runs twice per backend, each time in a new process under `worker.py measure` (wall time, peak RSS from
wait4, and a 0.5 s sampler of RSS and anonymous memory): first with an empty compile cache (a new user's first
start: the backend optimises or compiles and writes its cache), then with that cache warm (every later start). The
anonymous figure is the memory that is not mapped model files; the rest of the RSS is weights mapped from the
bundle or the cache, pages the kernel may drop.

    python bench/run_memory.py sdxl=/path/to/bundle ssd1b=/path/to/other --size 512 --variant int8

Writes run-memory-results.json beside RESULTS.md and its section in it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

from lcm_export.runtime.cache import CACHE_ENVIRONMENT_VARIABLE

BENCH = Path(__file__).resolve().parent
SECTION_START = "<!-- run-memory: start (bench/run_memory.py writes this section) -->"
SECTION_END = "<!-- run-memory: end -->"


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", metavar="NAME=BUNDLE", help="bundles to run, each with a label")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--variant", default="auto")
    parser.add_argument("--output", type=Path, default=BENCH)
    parser.add_argument(
        "--note", action="append", default=[], metavar="NAME=TEXT", help="what a bundle is (kept with its rows)"
    )
    arguments = parser.parse_args(argv)
    for entry in arguments.note:
        if "=" not in entry:
            parser.error(f"--note {entry!r}: pass NAME=TEXT")
    for entry in arguments.bundles:
        if "=" not in entry or not Path(entry.split("=", 1)[1], "manifest.json").is_file():
            parser.error(f"{entry!r}: pass NAME=BUNDLE, BUNDLE a folder written by lcm-export")
    return arguments


def measure_run(bundle: Path, backend: str, arguments: argparse.Namespace, cache: Path, work: Path) -> dict:
    """One `lcm-run` process (2 timed runs after a warm-up) under worker.py measure."""
    profile = work / "profile.json"
    command = [
        sys.executable,
        str(BENCH / "worker.py"),
        "measure",
        "--",
        str(Path(sys.executable).with_name("lcm-run")),
        str(bundle),
        "a lighthouse at dusk",
        "--height",
        str(arguments.size),
        "--width",
        str(arguments.size),
        "--backend",
        backend,
        "--variant",
        arguments.variant,
        "--runs",
        "2",
        "--warmup",
        "1",
        "--profile",
        "--quiet",
        "--json",
        str(profile),
        "-o",
        str(work / "image.png"),
    ]
    env = {**os.environ, CACHE_ENVIRONMENT_VARIABLE: str(cache)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{bundle} on {backend}: lcm-run failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report = json.loads(profile.read_text())
    result["variants"] = report["backend"]["options"].get("variants")
    return result


def _machine_label(machine: dict[str, Any]) -> str:
    flags = ", ".join(flag for flag, present in machine.get("isa", {}).items() if present)
    return f"{machine['cpu']} ({flags})"


def code_version() -> str:
    """The commit the measured code is at (``+`` when the work tree has changes), or "unknown"."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=BENCH, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    return commit + ("+" if git("status", "--porcelain", "--untracked-files=no") else "") if commit else "unknown"


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": common.machine_info(), "size": arguments.size, "rows": [], "notes": {}}
    label = _machine_label(results["machine"])
    names = [entry.split("=", 1)[0] for entry in arguments.bundles]
    earlier = arguments.output / "run-memory-results.json"
    if earlier.is_file():  # rows of earlier runs at the same size stay, with their date and machine
        previous = json.loads(earlier.read_text())
        if previous.get("size") == arguments.size:
            before = _machine_label(previous.get("machine", results["machine"]))
            rows = [{"machine": before, **row} for row in previous.get("rows", [])]
            results["rows"] = [row for row in rows if row["bundle"] not in names or row["machine"] != label]
            results["notes"] = previous.get("notes", {})
    results["notes"].update(dict(entry.split("=", 1) for entry in arguments.note))
    today, code = time.strftime("%Y-%m-%d"), code_version()
    for entry in arguments.bundles:
        name, bundle = entry.split("=", 1)
        for backend in arguments.backends:
            with tempfile.TemporaryDirectory(prefix="lcm-run-memory-") as scratch:
                cache, work = Path(scratch, "cache"), Path(scratch)
                for start in ("first", "warm"):
                    measured = measure_run(Path(bundle), backend, arguments, cache, work)
                    row = {"bundle": name, "backend": backend, "start": start, "date": today, "machine": label}
                    row["code"] = code
                    results["rows"].append({**row, **measured})
                    print(json.dumps(results["rows"][-1])[:300], flush=True)
    return results


def section_lines(results: dict[str, Any]) -> list[str]:
    machines = list(dict.fromkeys(row["machine"] for row in results["rows"]))
    lines = [
        SECTION_START,
        f"## Peak memory at run time, {results['size']} px (bench/run_memory.py)",
        "",
        f"`lcm-run BUNDLE PROMPT` at {results['size']} px, 4 steps, one warm-up and 2 runs, each line its own "
        "process: `first` with an empty compile cache, `warm` the next start with it. Anonymous: memory that is "
        "not mapped files (the rest of the RSS is weights mapped from the bundle or the cache). Machines:",
        "",
        *(f"- {chr(ord('A') + index)}: {machine}" for index, machine in enumerate(machines)),
        "",
        "| bundle | backend | start | components | peak RSS (GB) | anonymous peak (GB) | process (s) | machine | "
        "measured | code |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        variants = ", ".join(f"{name} {variant}" for name, variant in (row.get("variants") or {}).items())
        lines.append(
            f"| {row['bundle']} | {row['backend']} | {row['start']} | {variants} | {row['peak_rss_gb']:.2f} | "
            f"{row.get('anon_peak_gb', float('nan')):.2f} | {row['seconds']:.0f} | "
            f"{chr(ord('A') + machines.index(row['machine']))} | {row.get('date', 'earlier')} | "
            f"{row.get('code', '—')} |"
        )
    notes = {
        name: text
        for name, text in results.get("notes", {}).items()
        if any(row["bundle"] == name for row in results["rows"])
    }
    if notes:
        lines += ["", *(f"- {name}: {text}" for name, text in notes.items())]
    lines.append(SECTION_END)
    return lines


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    results = run(arguments)
    common.publish_section(
        arguments.output, "run-memory-results.json", results, section_lines(results), SECTION_START, SECTION_END
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
