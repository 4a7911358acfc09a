"""lcm-run on a full disk: every file it writes is one line naming its flag and path with no partial file left, and
a full cache disk only costs the cache (the run goes on uncached, one warning).

The full disks are tmpfs mounts (root only: CI runs as root) filled to the last byte by one file.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def full_disk(path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at ``path`` whose every block is taken by ``filler`` (new files still get an inode)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], check=True)
    try:
        with contextlib.suppress(OSError), open(path / "filler", "wb", buffering=0) as filler:
            while True:
                filler.write(b"\0" * 4096)
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def run_cli(*args: str | Path, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lcm_export.runtime.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(environment or {})},
    )


def one_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "warning:"))]
    assert len(lines) == 1, result.stderr
    return lines[0]


PROFILE = ("--profile", "--runs", "1", "--warmup", "0")


@pytest.mark.parametrize(
    ("flag", "name", "extra"),
    [
        ("--output", "x.png", ()),
        ("--json", "report.json", PROFILE),
        ("--chart", "chart.png", PROFILE),
        ("--backend-profile", "trace", PROFILE),
    ],
)
def test_a_full_output_disk_is_one_line_and_leaves_nothing(
    tiny_lcm_bundle: Path, tmp_path: Path, flag: str, name: str, extra: tuple[str, ...]
) -> None:
    with full_disk(tmp_path / "disk") as disk:
        target = disk / name
        outputs = () if flag == "--output" else ("--output", tmp_path / "x.png")
        result = run_cli(tiny_lcm_bundle, "a cat", "--steps", "1", "--quiet", *extra, *outputs, flag, target)
        assert result.returncode == 1, result.stderr
        assert one_line(result) == (
            f"error: {flag} '{target}' could not be written (No space left on device): free space there or pass "
            "another path"
        )
        assert sorted(os.listdir(disk)) == ["filler"]


def test_a_full_cache_disk_runs_uncached_with_one_warning(tiny_lcm_bundle: Path, tmp_path: Path) -> None:
    """The user cache (``~/.cache/lcm-export``) on a full disk: onnxruntime cannot save its optimised graph."""
    with full_disk(tmp_path / "home") as home:
        environment = {"HOME": str(home), "XDG_CACHE_HOME": "", "LCM_EXPORT_CACHE_DIR": ""}
        output = tmp_path / "x.png"
        result = run_cli(
            tiny_lcm_bundle, "a cat", "--steps", "1", "--backend", "onnxruntime", "--output", output, "--quiet",
            environment=environment,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert one_line(result) == (
            f"warning: the compiled-model cache '{home}/.cache/lcm-export/onnxruntime' could not be written (no "
            "space left on device): running uncached; free space there or set LCM_EXPORT_CACHE_DIR to another folder"
        )
        assert output.is_file() and output.stat().st_size > 0
        # No partial cache entry, and no temporary file of the bundle-hash cache either.
        left = [path.name for path in (home / ".cache" / "lcm-export").rglob("*") if path.is_file()]
        assert left == [], left
