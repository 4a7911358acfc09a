"""An export on a full disk, and the next export after one was killed: one line each, nothing left behind.

The full disks are size-limited tmpfs mounts (root only: CI runs as root); a tiny bundle is about 17 MB, its
tokenizer (about 5 MB) written first, then the ONNX files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's units: 2m, 64k) mounted at ``path`` for the block."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def export_cli(*args: str | Path, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lcm_export.exporter.cli", *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(environment or {})},
    )


def our_scratch(temporary: Path) -> list[str]:
    """What the export left in the temporary folder (torch keeps files of its own there, e.g. .ses)."""
    return sorted(name for name in os.listdir(temporary) if name.startswith(("lcm-export-", "tmp")))


def one_line(result: subprocess.CompletedProcess, prefix: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "warning:"))]
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "size",
    [
        "2m",  # fills in the tokenizer's save (the tokenizers library's own Exception, os error 28)
        "10m",  # fills in the ONNX files (an OSError)
    ],
)
def test_a_full_output_disk_is_one_line_and_leaves_nothing(tiny_lcm_dir: Path, tmp_path: Path, size: str) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    with small_disk(tmp_path / "disk", size) as disk:
        output = disk / "out"
        result = export_cli(tiny_lcm_dir, "--output", output, environment={"TMPDIR": str(temporary)})
        assert result.returncode == 1, result.stderr
        line = one_line(result, "error:")
        assert line.startswith(f"error: --output '{output}': no space left on device (its filesystem filled after ")
        assert line.endswith("nothing was kept): free space there or pass another --output"), line
        assert sorted(os.listdir(disk)) == []
    assert our_scratch(temporary) == []


def test_a_full_temporary_folder_is_one_line_naming_it(tmp_path: Path) -> None:
    """Built-in models are built, and every component traced, in the temporary folder: TMPDIR is named."""
    with small_disk(tmp_path / "tmp", "1m") as temporary:
        result = export_cli("builtin:tiny-lcm", "--output", tmp_path / "out", environment={"TMPDIR": str(temporary)})
        assert result.returncode == 1, result.stderr
        assert one_line(result, "error:") == (
            f"error: no space left on device in the temporary folder '{temporary}' (the export's scratch files; "
            "nothing was kept): free space there or set TMPDIR to a folder with room"
        )
        assert our_scratch(temporary) == []
    assert sorted(os.listdir(tmp_path)) == ["tmp"]


def test_the_next_export_removes_what_a_killed_export_left(tmp_path: Path) -> None:
    """SIGKILL leaves the staging folder (no handler runs); the next export into the same place removes it with
    one warning, and leaves the staging folder of an export that is still running."""
    output = tmp_path / "out"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    killed = subprocess.Popen(
        [sys.executable, "-m", "lcm_export.exporter.cli", "builtin:tiny-lcm", "--output", str(output), "--quiet"],
        env={**os.environ, "TMPDIR": str(temporary)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stale = tmp_path / f".out.partial-{killed.pid}"
    deadline = time.monotonic() + 300
    while not stale.is_dir() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert stale.is_dir(), "the export ended before its staging folder was seen"
    assert not output.exists()

    concurrent = subprocess.Popen(["sleep", "600"])  # a live process: as if its export were still running
    try:
        live = tmp_path / f".out.partial-{concurrent.pid}"
        live.mkdir()
        (live / "unet").mkdir()
        result = export_cli("builtin:tiny-lcm", "--output", output, environment={"TMPDIR": str(temporary)})
        assert result.returncode == 0, result.stderr
        line = one_line(result, "warning:")
        assert line.startswith(f"warning: removed '{stale}' ("), line
        assert line.endswith(f"MB), the staging folder of an export that did not finish (process {killed.pid} is gone)")
        assert not stale.exists()
        assert (live / "unet").is_dir()  # never the folder of a live export
    finally:
        concurrent.kill()
        concurrent.wait()

    from lcm_export.runtime.pipeline import Pipeline

    images = Pipeline.load(output)("a cat", num_inference_steps=1, seed=0).images
    assert images.shape[0] == 1
