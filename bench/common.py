"""What the benchmarks of this folder share: paths, the settings and engine rows, logging, timing a command in
its own process, the machine's description, the bench models, optimum-intel's venv, the worker processes and
RESULTS.md's sections. ``run.py`` (the CPU benchmark), ``sdxl.py`` and ``stream.py`` import it; it imports none of
them."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORKER = BENCH_DIR / "worker.py"
OPTIMUM_VENV = BENCH_DIR / ".venv-optimum"
# Every package of that venv pinned exactly (`--relock-optimum` rewrites it); the venv is reused while the marker
# file in it holds the hash of the lock and the requirements, and is otherwise built again from scratch.
OPTIMUM_LOCK = REPO_DIR / "constraints" / "bench-optimum-intel.txt"
OPTIMUM_MARKER = "lcm-export-lock.sha256"
# One pip command (torch pinned: an unpinned one pulls a multi-GB CUDA build); torchvision is then removed (the
# registry's build does not import on CPU torch; optimum-intel's export and inference work without it).
OPTIMUM_REQUIREMENTS = ["torch==2.13.0", "torchvision==0.28.*", "optimum-intel[openvino,diffusers]"]
OPTIMUM_REMOVED = ["torchvision"]
OPTIMUM_PROBE = "import openvino; from optimum.intel import OVLatentConsistencyModelPipeline"
PROMPT = "a photo of a lighthouse on a cliff at dusk, detailed, round {round}"
GIGABYTE = 1e9


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    runs: int
    warmup: int
    threads: int
    steps: int
    guidance: float
    work_dir: Path
    output_dir: Path
    optimum: bool
    memory_budget_gb: float | None
    re_export: bool
    command: str
    report_only: bool = False
    calibration_size: int = 8
    calibration_resolution: int = 256
    only_engines: tuple[str, ...] = ()  # empty: every engine
    supplementary: tuple[Path, ...] = ()


def export_jobs(work_dir: Path, calibration_size: int = 8, calibration_resolution: int = 256) -> dict[str, list[str]]:
    """Each bundle's exporter options beyond the model (``work_dir``: the SD1.5-shaped model and TAESD from
    models.py): full VAE, tiny VAE, and both with an INT8 U-Net."""
    tiny = ["--tiny-vae", str(work_dir / "taesd")]
    int8 = [
        "--precision",
        "int8",
        "--calibration-size",
        str(calibration_size),
        "--calibration-resolution",
        str(calibration_resolution),
    ]
    return {
        "full": [],
        "fast": tiny,
        "int8": [*int8, "--keep-fp32"],
        "fast-int8": [*tiny, *int8],
        # the memory-minded edge build: attention one head at a time (run with --low-memory)
        "fast-int8-sliced": [*tiny, *int8, "--attention-slicing"],
    }


@dataclass(frozen=True)
class Engine:
    """One row of the results: what runs, in which interpreter, with which settings."""

    name: str
    label: str
    kind: str  # "lcm-export", "diffusers" or "optimum-intel"
    python: str
    spec: dict[str, Any] = field(default_factory=dict)
    # engines compared with each other sit next to each other (groups are packed in this order)
    group_order: float = 0
    # Another engine whose compile cache this one reads (the same compiled graphs: saves gigabytes of disk); its
    # first load then finds a warm cache.
    shares_cache_of: str | None = None
    # False: loaded and run once for its image (a quality reference), not timed against the others.
    timed: bool = True

    def cache_name(self) -> str:
        return self.shares_cache_of or self.name

    def config_key(self, size: int) -> str:
        """Equal keys: the same computation on this machine (run once, reported under each name)."""
        spec = {key: value for key, value in self.spec.items() if key != "label"}
        if spec.get("static_shape"):
            spec["static_shape"] = [1, size, size]
        return json.dumps([self.kind, self.python, spec], sort_keys=True)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def measured(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``command`` through ``worker.py measure``: wall time and peak RSS of that process alone."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as handle:
        result = subprocess.run(
            [sys.executable, str(WORKER), "measure", "--", *command],
            stdout=subprocess.PIPE,
            stderr=handle,
            text=True,
            env=env,
        )
    if result.returncode != 0:
        raise SystemExit(f"bench: `{shlex.join(command)}` failed (exit {result.returncode}); see {log_path}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def mem_available_gb() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIGABYTE
    return 8.0


def machine_info() -> dict[str, Any]:
    """CPU, cores, the ISA flags that matter here, memory and library versions."""
    import importlib.metadata

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        flags = next(line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags"))
        info["cpu"] = names[0] if names else platform.processor()
        info["logical_cpus"] = len(names)
        wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
        info["isa"] = {flag: flag in flags for flag in wanted}
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIGABYTE, 1)
    versions = {}
    for package in ("lcm-export", "onnxruntime", "openvino", "torch", "diffusers", "transformers", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def build_models(settings: Settings) -> dict[str, Any]:
    """The random SD1.5-shaped LCM and TAESD-shaped AutoencoderTiny (reused when already built)."""
    log("models: SD1.5-shaped random LCM pipeline + TAESD-shaped AutoencoderTiny")
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / "models.py"), str(settings.work_dir)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def optimum_python() -> str:
    return str(OPTIMUM_VENV / "bin" / "python")


def _optimum_pip(*args: str) -> str:
    # The lock alone decides this venv's versions: a PIP_CONSTRAINT set for our own venv would clash with it.
    environment = {name: value for name, value in os.environ.items() if name != "PIP_CONSTRAINT"}
    command = [optimum_python(), "-m", "pip", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
        raise SystemExit(f"error: {shlex.join(command)} failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def _pins(lines: list[str]) -> dict[str, str]:
    """``name==version`` lines (comments, blanks and pip itself skipped) keyed by the normalised name."""
    pins = {}
    for line in lines:
        name, _, version = line.split("#", 1)[0].strip().partition("==")
        name = name.strip().lower().replace("_", "-").replace(".", "-")
        if version and name != "pip":  # pip comes with the venv, from the Python that made it
            pins[name] = version.strip()
    return pins


def _optimum_lock_hash() -> str:
    return hashlib.sha256(OPTIMUM_LOCK.read_bytes() + shlex.join(OPTIMUM_REQUIREMENTS).encode()).hexdigest()


def _install_optimum(constraints: Path | None) -> list[str]:
    """A fresh venv with OPTIMUM_REQUIREMENTS in one pip command; its ``pip freeze`` before OPTIMUM_REMOVED go."""
    shutil.rmtree(OPTIMUM_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(OPTIMUM_VENV)], check=True)
    lock = ["--constraint", str(constraints)] if constraints else []
    _optimum_pip("install", "--quiet", "--disable-pip-version-check", *lock, *OPTIMUM_REQUIREMENTS)
    frozen = _optimum_pip("freeze", "--all").splitlines()
    _optimum_pip("uninstall", "--quiet", "-y", *OPTIMUM_REMOVED)
    return frozen


def _mark_optimum_venv() -> None:
    """Check that optimum-intel's pipeline imports, then write the marker that lets later runs reuse the venv."""
    probe = subprocess.run([optimum_python(), "-c", OPTIMUM_PROBE], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"error: {OPTIMUM_VENV}: `{OPTIMUM_PROBE}` failed:\n{probe.stderr.strip()[-3000:]}")
    (OPTIMUM_VENV / OPTIMUM_MARKER).write_text(_optimum_lock_hash() + "\n")


def ensure_optimum_venv() -> str:
    """optimum-intel's venv with exactly OPTIMUM_LOCK's pins: reused while its marker holds the lock's hash."""
    python, marker = optimum_python(), OPTIMUM_VENV / OPTIMUM_MARKER
    if Path(python).exists() and marker.is_file() and marker.read_text().strip() == _optimum_lock_hash():
        return python
    lock = OPTIMUM_LOCK.relative_to(REPO_DIR)
    log(f"optimum-intel: creating {OPTIMUM_VENV} (pip install -c {lock} {shlex.join(OPTIMUM_REQUIREMENTS)})")
    started = time.perf_counter()
    frozen, locked = _pins(_install_optimum(OPTIMUM_LOCK)), _pins(OPTIMUM_LOCK.read_text().splitlines())
    if frozen != locked:
        differences = [
            f"{name} {frozen.get(name, 'missing')} (lock: {locked.get(name, 'absent')})"
            for name in sorted(frozen.keys() | locked.keys())
            if frozen.get(name) != locked.get(name)
        ]
        raise SystemExit(
            f"error: pip freeze of {OPTIMUM_VENV} differs from {lock}: {'; '.join(differences)} "
            "(regenerate the lock: python bench/run.py --relock-optimum)"
        )
    _mark_optimum_venv()
    log(f"optimum-intel: venv ready in {time.perf_counter() - started:.0f} s")
    return python


def relock_optimum() -> None:
    """Rebuild optimum-intel's venv from the newest releases (no lock) and rewrite OPTIMUM_LOCK from its freeze."""
    log(f"optimum-intel: relocking, fresh {OPTIMUM_VENV} (pip install {shlex.join(OPTIMUM_REQUIREMENTS)})")
    frozen = [line for line in _install_optimum(None) if _pins([line])]
    header = OPTIMUM_LOCK.read_text().split("\n\n", 1)[0] if OPTIMUM_LOCK.is_file() else "# bench optimum-intel lock"
    OPTIMUM_LOCK.write_text(header.rstrip("\n") + "\n\n" + "\n".join(frozen) + "\n")
    _mark_optimum_venv()
    log(f"optimum-intel: wrote {OPTIMUM_LOCK} ({len(frozen)} pins)")


def openvino_default_precision() -> str:
    """What OpenVINO's CPU plugin runs by default here ("f32" on CPUs without bf16/fp16)."""
    try:
        import openvino

        return openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    except Exception:
        return "unknown"


class Worker:
    """A running ``worker.py``: JSON commands in, JSON replies out, library output into a log file."""

    def __init__(self, engine: Engine, size: int, settings: Settings, cache_dir: Path, log_path: Path) -> None:
        spec = {**engine.spec, "threads": settings.threads}
        if spec.get("static_shape"):
            spec["static_shape"] = [1, size, size]
        env = {
            **os.environ,
            "LCM_EXPORT_CACHE_DIR": str(cache_dir),
            "OMP_NUM_THREADS": str(settings.threads),
            "MKL_NUM_THREADS": str(settings.threads),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore",
        }
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.log = open(log_path, "a")
        self.process = subprocess.Popen(
            [engine.python, str(WORKER), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            env=env,
            cwd=str(REPO_DIR),
        )
        self.name = engine.name

    def _reply(self) -> dict[str, Any]:
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self.process.wait()
            tail = self.log_path.read_text()[-2000:]
            raise SystemExit(f"bench: worker {self.name} died (exit {self.process.returncode}):\n{tail}")
        return json.loads(line)

    def ready(self) -> dict[str, Any]:
        return self._reply()

    def send(self, command: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        return self._reply()

    def quit(self) -> dict[str, Any]:
        reply = self.send({"cmd": "quit"})
        self.process.wait(timeout=120)
        self.log.close()
        return reply


def run_command(settings: Settings, size: int, round_index: int, save: Path | None = None) -> dict[str, Any]:
    return {
        "cmd": "run",
        "size": size,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "seed": round_index if round_index >= 0 else 20_000 - round_index,  # warm-up rounds are negative
        "prompt": PROMPT.format(round=round_index),
        "save": str(save) if save else None,
    }


def stage_medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per stage over timed runs (a stage an engine does not report counts 0)."""
    return {
        stage: statistics.median(run.get(stage, 0.0) for run in runs)
        for stage in ("total", "unet", "vae_decode", "text_encoder")
    }


def write_section(results_md: Path, lines: list[str], start: str, end: str) -> None:
    """Put a section written by its own script (``lines``, from marker ``start`` to ``end``) into RESULTS.md, in place
    of its previous version (appended when absent); the rest stays as it is."""
    text = results_md.read_text() if results_md.is_file() else ""
    block = "\n".join(lines)
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    results_md.write_text(text)


def publish_section(output: Path, json_name: str, results: dict[str, Any], lines: list[str], start: str, end: str):
    """A benchmark of its own (the frame loop, SDXL): its JSON beside RESULTS.md, its section in it, and on screen."""
    output.mkdir(parents=True, exist_ok=True)
    (output / json_name).write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_section(output / "RESULTS.md", lines, start, end)
    print("\n".join(lines))
