"""A separate virtualenv with optimum-onnx's ONNX Runtime diffusers pipelines, pinned by ``constraints/optimum.txt``.

optimum-onnx 0.1 needs transformers < 4.58 and huggingface_hub < 1, and its pipelines need a diffusers that accepts
those (0.39): it cannot share the exporter's environment (transformers 5, diffusers 0.42). The venv is created once
and reused while the marker file inside it holds the hash of the lock file and of the install command; anything
else (a changed lock, an interrupted install) builds it again from scratch. Every install names ``torch==2.13.0``:
an unpinned torch would pull a multi-GB CUDA build, where pip's find-links here holds the CPU wheel.

Run as a script to create (or reuse) the venv, or with ``--relock`` to install the newest matching releases into it
without the lock and rewrite ``constraints/optimum.txt`` from its ``pip freeze``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE = REPO_ROOT / "constraints" / "optimum.txt"
DEFAULT_VENV = REPO_ROOT / ".venv-optimum"
# What the venv is for; the lock pins these and everything they pull in.
REQUIREMENTS = ("torch==2.13.0", "optimum-onnx[onnxruntime]", "diffusers")
MARKER_NAME = "lcm-export-lock.sha256"
# pip's own packages: they come with the venv (or its upgrade) and are not pinned by the lock.
UNPINNED = frozenset({"pip"})


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def lock_digest(lock_file: Path = LOCK_FILE) -> str:
    """The hash a reusable venv must carry: the lock's bytes, the requirements installed with it, the Python."""
    digest = hashlib.sha256(lock_file.read_bytes())
    digest.update("\n".join(REQUIREMENTS).encode())
    digest.update(f"python {sys.version_info.major}.{sys.version_info.minor}".encode())
    return digest.hexdigest()


def read_pins(lock_file: Path = LOCK_FILE) -> dict[str, str]:
    """``name==version`` lines of the lock, keyed by the normalised name (comments and blanks skipped)."""
    pins = {}
    for line in lock_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        if not separator or not version:
            raise ValueError(f"{lock_file}: '{line}' is not an exact name==version pin")
        pins[_normalised(name)] = version.strip()
    return pins


def _normalised(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[optimum venv] {message}", file=sys.stderr, flush=True)


def _run(command: list[str], what: str) -> str:
    # The lock alone decides this venv's versions: a constraints file set for the exporter's venv would clash.
    environment = {name: value for name, value in os.environ.items() if name != "PIP_CONSTRAINT"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {' '.join(command)}\n" + "\n".join(output[-30:]))
    return result.stdout


def frozen_pins(python: Path) -> list[str]:
    """``pip freeze --all`` of the venv as ``Name==version`` lines, pip's own packages left out."""
    frozen = _run([str(python), "-m", "pip", "freeze", "--all"], "pip freeze")
    lines = [line.strip() for line in frozen.splitlines() if "==" in line]
    return sorted((line for line in lines if _normalised(line.split("==")[0]) not in UNPINNED), key=str.lower)


def installed_versions(python: Path) -> dict[str, str]:
    """The venv's packages and versions, keyed by normalised name."""
    return {_normalised(line.split("==")[0]): line.split("==", 1)[1] for line in frozen_pins(python)}


def _pin_mismatches(python: Path, pins: dict[str, str]) -> list[str]:
    installed = installed_versions(python)
    problems = [
        f"{name} {installed.get(name, 'missing')} (lock: {version})"
        for name, version in pins.items()
        if installed.get(name) != version
    ]
    problems += [f"{name} {version} (not in the lock)" for name, version in installed.items() if name not in pins]
    return problems


def _create(venv: Path) -> Path:
    if venv.exists():
        shutil.rmtree(venv)
    _run([sys.executable, "-m", "venv", str(venv)], "creating the venv")
    return venv_python(venv)


def _pip_install(python: Path, constraints: Path | None) -> None:
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if constraints is not None:
        command += ["--constraint", str(constraints)]
    _run([*command, *REQUIREMENTS], "pip install")


def ensure_optimum_venv(venv: Path = DEFAULT_VENV, *, quiet: bool = False) -> Path:
    """Create (or reuse) the optimum venv at ``venv`` with the lock's exact pins; returns its python.

    Reused only when its marker holds :func:`lock_digest`; the marker is written last, after ``pip freeze`` showed
    exactly the lock's pins, so a venv whose install failed or was interrupted is rebuilt.
    """
    venv = Path(venv)
    python = venv_python(venv)
    marker = venv / MARKER_NAME
    expected = lock_digest()
    if python.exists() and marker.is_file() and marker.read_text().strip() == expected:
        _log(f"reusing {venv}", quiet)
        return python
    _log(f"creating {venv} (pip install -c {LOCK_FILE.relative_to(REPO_ROOT)} {' '.join(REQUIREMENTS)})", quiet)
    start = time.perf_counter()
    python = _create(venv)
    _pip_install(python, LOCK_FILE)
    problems = _pin_mismatches(python, read_pins())
    if problems:
        raise RuntimeError(
            f"{venv} does not hold exactly the pins of {LOCK_FILE}: {'; '.join(problems)} "
            f"(regenerate the lock with `python {Path(__file__).name} --relock`)"
        )
    marker.write_text(expected + "\n")
    _log(f"ready in {time.perf_counter() - start:.0f} s", quiet)
    return python


def relock(venv: Path = DEFAULT_VENV, *, quiet: bool = False) -> Path:
    """Install the requirements without the lock into a fresh ``venv`` and rewrite the lock from ``pip freeze``."""
    _log(f"relocking: fresh {venv}, pip install {' '.join(REQUIREMENTS)} (no constraints)", quiet)
    python = _create(Path(venv))
    _pip_install(python, None)
    lines = frozen_pins(python)
    header = LOCK_FILE.read_text().split("\n\n", 1)[0] if LOCK_FILE.is_file() else "# optimum-onnx venv lock"
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    LOCK_FILE.write_text(header.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
    (Path(venv) / MARKER_NAME).write_text(lock_digest() + "\n")
    _log(f"wrote {LOCK_FILE} ({len(lines)} pins)", quiet)
    return python


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", nargs="?", type=Path, default=DEFAULT_VENV, help=f"default: {DEFAULT_VENV}")
    parser.add_argument("--relock", action="store_true", help="install unpinned and rewrite the lock file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    python = (relock if args.relock else ensure_optimum_venv)(args.venv, quiet=args.quiet)
    print(python)


if __name__ == "__main__":
    main()
