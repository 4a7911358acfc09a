"""Resident pages of read-only file mappings a backend no longer reads, handed back to the page cache.

OpenVINO's CPU plugin memory-maps the compiled blob (or the IR it compiles) and re-lays the weights out into its
own buffers for its kernels, at load for static shapes and in the first call for dynamic ones. From then on the
kernels read their copy; the mapped pages they were copied from stay resident, and count in the process's RSS
beside that copy (on the SD1.5-shaped fast INT8 bundle: 1.26 GB of the 2.77 GB peak). :func:`release` tells the
kernel (``madvise(MADV_DONTNEED)``) that this process no longer needs the pages of the read-only mappings of files
under some folders: they leave the RSS, stay in the page cache, and a page that is read again is mapped again from
the file (a minor fault, no disk read while it is cached). A read-only mapping has no private changes to lose, so
this never changes what the process reads. :func:`released_while` does it every quarter of a second while a block
runs (the plugin copying the weights), so that the pages already copied do not pile up beside the copy, and once
at the end. Linux only: elsewhere nothing is done. Measured: docs/design-notes.md#openvino.

``private=True`` also releases the private writable mappings of those files (torch maps a safetensors checkpoint so,
and the exporter's fp32 copy of an fp16 checkpoint is made from it) with ``MADV_PAGEOUT`` (Linux 5.4): the kernel
reclaims what it can, that is the pages still as the file has them, and keeps a page this process changed (it
would have to swap it out, and keeps it where there is no swap). Nothing written is ever dropped; a page read
again comes back from the file. A kernel without ``MADV_PAGEOUT`` refuses the advice and nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

MADV_DONTNEED = 4  # <sys/mman.h> on Linux (every architecture)
MADV_PAGEOUT = 21  # Linux >= 5.4
MAPS = Path("/proc/self/maps")
# How often :func:`released_while` releases: a quarter of a second of copying is what stays mapped at most (tens of
# MB at the rate the plugin copies), for a few milliseconds of work per release.
INTERVAL_SECONDS = 0.25


def read_only_mappings(roots: Iterable[Path], maps: str) -> list[tuple[int, int]]:
    """(start, end) of each read-only file mapping in ``maps`` (``/proc/self/maps``'s text) of a file under one of
    ``roots``."""
    return _file_mappings(roots, maps, lambda permissions: "w" not in permissions)


def private_writable_mappings(roots: Iterable[Path], maps: str) -> list[tuple[int, int]]:
    """(start, end) of each private (copy-on-write) writable file mapping in ``maps`` of a file under ``roots``."""
    return _file_mappings(roots, maps, lambda permissions: "w" in permissions and permissions.endswith("p"))


def _file_mappings(roots: Iterable[Path], maps: str, chosen: Callable[[str], bool]) -> list[tuple[int, int]]:
    prefixes = tuple(str(root).rstrip("/") + "/" for root in roots)
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not chosen(fields[1]) or not fields[5].startswith(prefixes):
            continue
        start, end = (int(address, 16) for address in fields[0].split("-"))
        ranges.append((start, end))
    return ranges


def release(roots: Iterable[Path], private: bool = False) -> int:
    """Drop this process's resident pages of the read-only mappings of files under ``roots`` (``private``: and
    reclaim the unchanged pages of their private writable mappings); returns the bytes of address space advised
    (0 where this is not Linux or nothing is mapped there)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        maps = MAPS.read_text()
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return 0
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    roots = tuple(roots)
    advice = [(start, end, MADV_DONTNEED) for start, end in read_only_mappings(roots, maps)]
    if private:
        advice += [(start, end, MADV_PAGEOUT) for start, end in private_writable_mappings(roots, maps)]
    return sum(end - start for start, end, how in advice if madvise(start, end - start, how) == 0)


@contextmanager
def released_while(roots: Iterable[Path], interval: float = INTERVAL_SECONDS, private: bool = False) -> Iterator[None]:
    """Run the block with :func:`release` of ``roots`` (and ``private``) every ``interval`` seconds beside it, and
    once after it."""
    roots = tuple(roots)
    if not sys.platform.startswith("linux") or not roots:
        yield
        return
    done = threading.Event()

    def releasing() -> None:
        while not done.wait(interval):
            release(roots, private)

    thread = threading.Thread(target=releasing, name="lcm-export-release-mapped-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        release(roots, private)
