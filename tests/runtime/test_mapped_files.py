"""Releasing resident pages of file mappings a process no longer reads (lcm_export.runtime.backends.mapped_files)."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from lcm_export.runtime.backends import mapped_files

PAGE = mmap.PAGESIZE

MAPS = """\
7f0000000000-7f0000100000 r--s 00000000 fd:01 11 /cache/openvino/bf16/1234.blob
7f0000100000-7f0000200000 r--p 00000000 fd:01 12 /bundle/unet/model-int8.onnx
7f0000200000-7f0000300000 rw-p 00000000 fd:01 13 /cache/openvino/bf16/written.bin
7f0000300000-7f0000400000 r--p 00000000 fd:01 14 /cachex/other.bin
7f0000400000-7f0000500000 r-xp 00000000 fd:01 15 /usr/lib/libc.so.6
7f0000500000-7f0000600000 rw-p 00000000 00:00 0
7f0000600000-7f0000700000 r--p 00000000 fd:01 16 /bundle/unet/model-int8.onnx (deleted)
"""


def test_only_read_only_mappings_of_files_under_the_roots_are_chosen() -> None:
    ranges = mapped_files.read_only_mappings([Path("/cache"), Path("/bundle/")], MAPS)
    assert ranges == [
        (0x7F0000000000, 0x7F0000100000),
        (0x7F0000100000, 0x7F0000200000),
        (0x7F0000600000, 0x7F0000700000),
    ]
    assert mapped_files.read_only_mappings([], MAPS) == []
    assert mapped_files.private_writable_mappings([Path("/cache"), Path("/bundle/")], MAPS) == [
        (0x7F0000200000, 0x7F0000300000)
    ]


def _resident_kb(path: Path) -> int:
    """Rss of this process's mappings of ``path`` (kB), from /proc/self/smaps."""
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            current = fields[5] if len(fields) > 5 else ""
        elif fields[0] == "Rss:" and current == str(path):
            total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
def test_release_drops_resident_pages_and_the_contents_read_back_the_same(tmp_path) -> None:
    pages = 256
    data = np.random.default_rng(0).integers(0, 256, pages * PAGE, dtype=np.uint8)
    weights = tmp_path / "cache" / "weights.bin"
    weights.parent.mkdir()
    weights.write_bytes(data.tobytes())
    scratch = tmp_path / "other" / "scratch.bin"
    scratch.parent.mkdir()
    scratch.write_bytes(bytes(pages * PAGE))
    with weights.open("rb") as file, scratch.open("r+b") as other:
        read_only = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        private = mmap.mmap(other.fileno(), 0, access=mmap.ACCESS_COPY)  # writable: never released
        try:
            view = np.frombuffer(read_only, dtype=np.uint8)
            assert int(view.sum()) == int(data.sum())  # every page touched
            private[:PAGE] = b"\x07" * PAGE
            assert _resident_kb(weights) >= pages * PAGE // 1024

            advised = mapped_files.release([weights.parent, scratch.parent])

            assert advised == pages * PAGE
            assert _resident_kb(weights) < pages * PAGE // 1024 // 4
            np.testing.assert_array_equal(view, data)  # mapped again from the file
            assert private[:PAGE] == b"\x07" * PAGE  # the copy-on-write change is still there
            del view
        finally:
            read_only.close()
            private.close()


def test_release_of_folders_nothing_maps_advises_nothing(tmp_path) -> None:
    assert mapped_files.release([tmp_path]) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
def test_private_release_reclaims_unchanged_pages_of_a_copy_on_write_map_and_keeps_a_changed_one(tmp_path) -> None:
    """How torch maps a safetensors checkpoint (MAP_PRIVATE, writable): the pages still as the file has them leave
    the RSS and read back the same; a page this process changed keeps its change."""
    pages = 256
    data = np.random.default_rng(1).integers(0, 256, pages * PAGE, dtype=np.uint8)
    checkpoint = tmp_path / "unet" / "weights.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(data.tobytes())
    with checkpoint.open("r+b") as file:
        os.fsync(file.fileno())  # clean in the page cache, as a checkpoint on disk is: reclaim skips dirty pages
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        view = None
        try:
            view = np.frombuffer(mapping, dtype=np.uint8)
            assert int(view.sum()) == int(data.sum())  # every page touched
            mapping[:PAGE] = b"\x07" * PAGE  # a private change: in this process only, never in the file
            assert _resident_kb(checkpoint) >= pages * PAGE // 1024
            assert mapped_files.release([checkpoint.parent]) == 0  # not read-only: left alone by default

            advised = mapped_files.release([checkpoint.parent], private=True)

            assert advised == pages * PAGE
            assert _resident_kb(checkpoint) < pages * PAGE // 1024 // 4
            assert mapping[:PAGE] == b"\x07" * PAGE
            np.testing.assert_array_equal(view[PAGE:], data[PAGE:])
        finally:
            del view
            mapping.close()
    assert checkpoint.read_bytes() == data.tobytes()
