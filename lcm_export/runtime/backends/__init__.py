"""Runtime backends, loaded lazily: a missing backend never breaks another one.

Each backend module defines ``ARTIFACT_FORMAT`` (which artifact of a component it runs: "onnx", "tensorrt",
"mlpackage"), ``COMPUTE_PRECISIONS`` (the ``precision`` values it honours), ``check_device(device)`` (a one-line
error for a device it cannot run on), ``THREAD_SAFE`` (whether one session may run from several threads at once;
the pipeline puts a lock around the sessions of a backend that says no), ``is_available()`` and
``open_session(bundle_dir, component, options, static_shapes) -> Session`` where a session has ``run(feeds) ->
outputs`` over numpy arrays named as in the component's spec, and ``static_shapes`` (input name -> shape, -1 for a
dim left dynamic) is given when the call shape is known at load. :func:`check_options` checks every option against
the chosen backend's lists before a session opens.
A backend with a profiler honours ``options.profiling_dir``: its sessions then also have ``end_profiling() ->
list[Path]``, which stops the profiler and returns the files it wrote into that folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

from lcm_export.errors import UserError, is_disk_full
from lcm_export.runtime.cache import CACHE_ENVIRONMENT_VARIABLE, cache_root

# name -> (module, pip extra that installs it)
BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("lcm_export.runtime.backends.onnxruntime", "lcm-edge"),
    "openvino": ("lcm_export.runtime.backends.openvino", "lcm-edge[openvino]"),
    "tensorrt": ("lcm_export.runtime.backends.tensorrt", "lcm-edge[tensorrt]"),
    "coreml": ("lcm_export.runtime.backends.coreml", "lcm-edge[coreml]"),
}
# What "auto" tries, fastest first, for each artifact format.
AUTO_ORDER = ("tensorrt", "coreml", "openvino", "onnxruntime")


@dataclass(frozen=True)
class BackendOptions:
    """Load options shared by the backends (each uses what applies to it).

    ``precision`` is the compute precision of float graphs, not which stored variant runs (that is
    :mod:`lcm_export.runtime.variants`): "fp32" computes float32 (parity mode); "auto" lets the backend use the
    device's fastest float (bf16 on CPUs with AVX-512 BF16 / AMX in OpenVINO); "bf16"/"fp16" where a backend lists
    them. ``cache`` off turns every compiled-model cache off; ``cache_dir`` moves it (default: the user cache).
    ``static_shape`` (batch, height, width) lets a backend specialise the graph when the call shape is known at
    load. ``profiling_dir`` turns on the backend's
    own profiler (onnxruntime's trace, OpenVINO's per-layer counters), which writes into that folder; it slows
    the runs down a little, so it is off unless asked for. ``low_memory`` gives each stage's working memory back to
    the system once it has run instead of keeping it for the next run, for a lower peak at some speed (onnxruntime:
    see its module; the other backends have no such setting and ignore it).
    """

    precision: str = "auto"
    threads: int | None = None
    cache_dir: str | None = None  # None: the user cache (cache_root())
    cache: bool = True
    device: str = "auto"  # "auto": each backend's natural device (see device_or)
    static_shape: tuple[int, int, int] | None = None
    profiling_dir: str | None = None
    low_memory: bool = False

    def device_or(self, natural: str) -> str:
        """``device``, with "auto" meaning the backend's ``natural`` one: the CPU for onnxruntime and OpenVINO,
        every compute unit for Core ML, the first GPU for TensorRT."""
        return natural if self.device.lower() == "auto" else self.device


class Session(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def backend_module(name: str) -> ModuleType:
    """Import a backend by name; a clear error says what to install when its library is missing."""
    if name not in BACKENDS:
        raise UserError(f"backend '{name}' is unknown: pick one of auto, {', '.join(BACKENDS)}")
    module_name, extra = BACKENDS[name]
    module = importlib.import_module(module_name)
    if not module.is_available():
        # A backend may be unusable for another reason than a missing package (Core ML off macOS).
        reason = getattr(module, "unavailable_reason", lambda: None)()
        raise UserError(reason or f"backend '{name}' is not installed: pip install '{extra}'")
    return module


def check_options(name: str, module: ModuleType, options: BackendOptions) -> None:
    """Check every load option against what backend ``name`` honours, before any session opens: a value it would
    ignore or silently replace is an error naming the option and the values it takes."""
    precisions: tuple[str, ...] = module.COMPUTE_PRECISIONS
    if not isinstance(options.precision, str) or options.precision not in precisions:
        hint = " (int8 is a stored variant: pass variant='int8')" if options.precision == "int8" else ""
        raise UserError(
            f"precision={options.precision!r}: the {name} backend computes in one of {', '.join(precisions)}{hint}"
        )
    if not isinstance(options.device, str) or not options.device:
        raise UserError(f"device={options.device!r}: pass a device name such as 'auto'")
    module.check_device(options.device)
    check_common_options(options)


def check_common_options(options: BackendOptions) -> BackendOptions:
    """The options every backend reads the same way (threads, cache, static shape, low memory), checked without a
    backend, so that a load can refuse them before it hashes the bundle; returns them normalised (``cache_dir`` a
    string, ``static_shape`` a tuple)."""
    if options.threads is not None and (
        isinstance(options.threads, bool) or not isinstance(options.threads, int) or options.threads < 1
    ):
        raise UserError(f"threads={options.threads!r}: pass an integer >= 1, or None for every core")
    if not isinstance(options.cache, bool):
        raise UserError(f"cache={options.cache!r}: pass True or False")
    if options.cache_dir is not None and (
        not isinstance(options.cache_dir, (str, os.PathLike)) or not str(options.cache_dir)
    ):
        raise UserError(f"cache_dir={options.cache_dir!r}: pass a folder, or cache=False to turn caching off")
    shape = options.static_shape
    if shape is not None and (
        not isinstance(shape, (tuple, list))
        or len(shape) != 3
        or any(isinstance(value, bool) or not isinstance(value, int) or value < 1 for value in shape)
    ):
        raise UserError(f"static_shape={shape!r}: pass (batch, height, width) as three positive integers, or None")
    if not isinstance(options.low_memory, bool):
        raise UserError(f"low_memory={options.low_memory!r}: pass True or False")
    return dataclasses.replace(
        options,
        cache_dir=None if options.cache_dir is None else str(options.cache_dir),
        static_shape=None if shape is None else tuple(shape),
    )


def choose_backend(name: str, formats: set[str]) -> str:
    """Resolve ``auto`` to the first available backend that runs one of the bundle's artifact ``formats``."""
    if name != "auto":
        return name
    for candidate in AUTO_ORDER:
        module = importlib.import_module(BACKENDS[candidate][0])
        # A backend may be installed yet unusable here (TensorRT without a GPU): ``auto_eligible`` says so.
        eligible = getattr(module, "auto_eligible", module.is_available)
        if module.ARTIFACT_FORMAT in formats and eligible():
            return candidate
    raise UserError(
        f"no backend on this machine runs this bundle's artifacts ({', '.join(sorted(formats))}): TensorRT engines "
        "need 'lcm-edge[tensorrt]' and an NVIDIA GPU, Core ML packages need macOS and 'lcm-edge[coreml]'; "
        "for a CPU, export with --target onnx or --keep-onnx"
    )


def artifact_path(bundle_dir: Path, component, artifact_format: str) -> Path:
    if artifact_format not in component.artifacts:
        raise UserError(
            f"component '{component.spec.name}' has no {artifact_format} artifact in this bundle "
            f"(it has: {', '.join(component.artifacts)}): pick a backend for those, or re-export"
        )
    return bundle_dir / component.artifacts[artifact_format].path


def cpu_model_and_flags(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, frozenset[str] | None]:
    """The CPU's model name and feature flags from Linux's ``/proc/cpuinfo`` (x86 "flags", ARM "Features"):
    (None, None) where it cannot be read; an empty set where it lists no flags."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, None
    model = None
    flags: frozenset[str] = frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def backend_cache_dir(options: BackendOptions, backend: str) -> Path | None:
    """Where ``backend`` caches compiled models: None when ``options.cache`` is off, ``options.cache_dir`` when
    given, else ``cache_root()/backend``."""
    if not options.cache:
        return None
    if options.cache_dir is not None:
        return Path(options.cache_dir).expanduser()
    return cache_root() / backend


@contextmanager
def cache_entry_writer(final: Path) -> Iterator[Path]:
    """Write the cache entry folder ``final`` atomically: the block writes into the empty staging folder it is
    given (beside ``final``, named for this process), which is renamed to ``final`` when the block ends without
    error and wrote something. A concurrent writer that published first keeps its copy; nothing half-written is
    left behind. Whether ``final`` exists afterwards is the caller's to check where it matters."""
    staging = final.parent / f".{final.name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if any(staging.iterdir()):  # a library may skip writing (onnxruntime does for some graphs)
            try:
                staging.rename(final)
            except OSError:
                pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def warn_cache_unwritable(cache: Path, error: BaseException, needed: int = 0) -> None:
    """One warning for a compiled-model cache that could not be written (a full disk, a read-only folder): the
    caller loads uncached, slower to start, same results. ``needed``: about what the entry takes, so that a library
    error that does not say why (onnxruntime's "Failed to write external initializers") still reads as a full
    disk when the filesystem has less free."""
    import warnings

    try:
        full = is_disk_full(error) or shutil.disk_usage(cache).free < needed
    except OSError:
        full = False
    reason = "no space left on device" if full else (str(error).strip().splitlines() or [type(error).__name__])[0]
    warnings.warn(
        f"the compiled-model cache '{cache}' could not be written ({reason}): running uncached; free space there or "
        f"set {CACHE_ENVIRONMENT_VARIABLE} to another folder",
        stacklevel=2,
    )


def file_identity(path: Path) -> str:
    """A cache key for a model file without reading it: its resolved path, size and mtime (for files that come
    without a manifest; a bundle's variants are keyed by their sha256 instead, :func:`artifact_identity`)."""
    import hashlib

    path = Path(path)
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


def artifact_identity(component, artifact_format: str) -> str | None:
    """A cache key for the component's ``artifact_format`` variant that changes exactly when its files do: the
    sha256 of the files' sha256s as the manifest lists them (so a copied bundle hits the same cache). None when
    the variant carries no digests (then the caller keys by file)."""
    import hashlib

    variant = component.artifacts.get(artifact_format)
    if variant is None or not variant.digests:
        return None
    return hashlib.sha256("".join(variant.digests).encode()).hexdigest()
