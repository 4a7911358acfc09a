"""onnxruntime backend (CPU provider by default; CUDA where ``onnxruntime-gpu`` is installed).

On the CPU provider, the graph onnxruntime optimises at the first load (fusions and the NCHWc layout for this CPU's
vector width, weights already re-laid out, MatMul weights pre-packed) is saved into the user cache, keyed by the
ONNX file's sha256, onnxruntime's version and the CPU; later loads open that file with graph optimisations off and
map its weights from disk instead of copying them: many times faster, with the same run time and outputs and the
weights as file pages the kernel can drop. The first load, too, runs on the saved copy: the session that optimised
the graph (its weights in the heap) is replaced by one opened from the file it wrote
(docs/design-notes.md#onnxruntime-first-start). Only onnxruntime's own CPU optimisations are used: its transformers
Stable Diffusion optimizer mostly emits contrib ops with CUDA kernels only, and its attention fusion alone (CPU
kernels) gains a few percent but needs the ``onnx`` package at load (not a runtime dependency), a long first load
and a patch under numpy 2. ``static_shapes`` are not used: fixing the free dimensions gained nothing. Measured:
docs/design-notes.md#onnxruntime.

``low_memory`` turns off the sessions' memory arenas. An arena keeps the largest working set its session ever needed
for the next run, so with one per component the peak is their sum; without, each run's memory goes back to the
system and the peak is the largest single working set, for a few percent of speed (the U-Net pays for fresh pages at
every call). Measured: docs/design-notes.md#onnxruntime.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.util
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np

from lcm_export.errors import UserError
from lcm_export.runtime.adapters import WeightOverrides
from lcm_export.runtime.backends import (
    BackendOptions,
    artifact_identity,
    artifact_path,
    backend_cache_dir,
    cache_entry_writer,
    cpu_model_and_flags,
    file_identity,
    warn_cache_unwritable,
)
from lcm_export.runtime.manifest import Component

ARTIFACT_FORMAT = "onnx"
# onnxruntime computes a graph in its own types: an fp32 graph in float32, whatever the CPU offers.
COMPUTE_PRECISIONS = ("auto", "fp32")
# Sessions may open with some initializers replaced (run-time adapters: lcm_export.runtime.adapters).
ADAPTERS = True
WEIGHT_INPUTS = True  # run-time adapters may feed the weights as graph inputs (lcm_export.runtime.adapters)
FACTOR_INPUTS = True  # ... or their LoRA factors, to branches beside the weights (any rank): the branches of
# weights no active adapter touches are cut out of the graph first (lcm_export.runtime.factor_graph), one session per
# set of touched weights.
# InferenceSession.run may be called from several threads at once, but two concurrent runs share the cores their
# thread pools each want: a lock per session measured better with 2 threads (bench/RESULTS.md, "Threads").
THREAD_SAFE = False


def is_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def cuda_device_id(device: str) -> int | None:
    """``"cuda"`` / ``"cuda:N"`` -> the GPU index; None for the CPU (``"auto"``, ``"cpu"``)."""
    head, _, tail = device.lower().partition(":")
    if head in ("auto", "cpu") and not tail:
        return None
    if head == "cuda" and (tail == "" or tail.isdigit()):
        return int(tail) if tail else 0
    raise UserError(f"device {device!r} is not an onnxruntime device: pick auto, cpu, cuda or cuda:N")


def check_device(device: str) -> None:
    """A CUDA device needs onnxruntime's CUDA provider (onnxruntime-gpu); without it, it is an error, never a
    silent CPU run."""
    if cuda_device_id(device) is None:
        return
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise UserError(
            f"device {device!r}: this onnxruntime has no CUDA provider (it has {', '.join(providers)}): "
            "pip install 'lcm-edge[gpu]' on a machine with an NVIDIA GPU, or pass device='cpu'"
        )


class OnnxRuntimeSession:
    """One InferenceSession. ``weights`` (initializer name -> array) replace those initializers of the file (an
    adapter's merged weights, ``SessionOptions.add_external_initializers``); such a session is optimised from the
    ONNX file at every open and never cached: the cached graph's weights are folded and pre-packed under other
    names, and a merge is made once."""

    def __init__(
        self,
        path: Path,
        options: BackendOptions,
        name: str = "model",
        identity: str | None = None,
        weights: WeightOverrides | None = None,
        model_bytes: bytes | None = None,
    ) -> None:
        """``model_bytes``: the graph to open in place of the file's (its external data read beside ``path``),
        cached under ``identity``."""
        import onnxruntime

        self.profiling_dir = Path(options.profiling_dir) if options.profiling_dir else None

        def profile(session_options) -> None:
            if self.profiling_dir is not None:
                # onnxruntime's own profiler: a Chrome-trace JSON of every node run, written by end_profiling().
                self.profiling_dir.mkdir(parents=True, exist_ok=True)
                session_options.enable_profiling = True
                session_options.profile_file_prefix = str(self.profiling_dir / f"onnxruntime_{name}")

        def new_options(profiled: bool = True):
            session_options = onnxruntime.SessionOptions()
            session_options.log_severity_level = 3
            if options.threads:
                session_options.intra_op_num_threads = options.threads
            # Each session's arena keeps its largest working set for the next run, so the peak is the sum over the
            # components; without arenas it is the largest one (measured: docs/design-notes.md#onnxruntime).
            session_options.enable_cpu_mem_arena = not options.low_memory
            if profiled:
                profile(session_options)
            return session_options

        providers: list = ["CPUExecutionProvider"]
        gpu = cuda_device_id(options.device)
        if gpu is not None:  # check_device made sure the provider exists
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu}))
        cached = optimized_model_path(path, options, identity) if gpu is None and not weights else None
        self.loaded_from_cache = False
        if cached is not None and cached.is_file():
            try:
                self.session = _open_optimized(onnxruntime, cached, new_options(), providers)
                self.loaded_from_cache = True
            except Exception:  # an unreadable cache entry (disk full at write, a newer format): rebuild it
                shutil.rmtree(cached.parent, ignore_errors=True)
        if not self.loaded_from_cache:
            # A session that writes the cached copy is replaced by that copy (below); onnxruntime writes a profiled
            # session's trace when it is destroyed, so only the session kept is profiled.
            session_options = new_options(profiled=cached is None)
            session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            model: str | bytes = str(path)
            if weights:
                model, self._replaced = _with_weights(onnxruntime, path, session_options, weights)
            if model_bytes is not None:  # its external data is the bundle's, beside ``path``
                model = model_bytes
                session_options.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", str(path.parent)
                )

            def build():
                return onnxruntime.InferenceSession(model, session_options, providers=providers)

            def build_uncached():
                session_options.optimized_model_filepath = ""
                profile(session_options)
                return build()

            if cached is None:
                self.session = build()
            else:
                try:
                    with cache_entry_writer(cached.parent) as staging:
                        _save_optimized_into(session_options, staging / cached.name)
                        optimising = build()
                except Exception as error:
                    # The optimised copy could not be saved (a full cache disk): this load runs uncached.
                    warn_cache_unwritable(cached.parent.parent, error, needed=path.stat().st_size)
                    self.session = build_uncached()
                else:
                    if not cached.is_file():  # onnxruntime saved nothing (it skips some graphs): the session stays
                        self.session = optimising if self.profiling_dir is None else build_uncached()
                    else:
                        # The optimising session holds the weights and their packed copies in the heap; the copy
                        # it saved has them in a file that every later start maps. It is dropped (and the heap it
                        # freed given back) before that copy is opened in its place, so that the two are never
                        # held at once: the first start then holds what a later one does
                        # (docs/design-notes.md#onnxruntime-first-start).
                        del optimising
                        _return_freed_heap()
                        try:
                            self.session = _open_optimized(onnxruntime, cached, new_options(), providers)
                        except Exception:  # not expected (this onnxruntime just wrote it): load uncached
                            shutil.rmtree(cached.parent, ignore_errors=True)
                            self.session = build_uncached()
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.input_names = frozenset(value.name for value in self.session.get_inputs())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))

    def bind_inputs(self, values: dict[str, np.ndarray]) -> BoundInputs:
        """Runs of this session with ``values`` (input name -> array) bound once, for every call (run-time
        adapters' weights or factors)."""
        return BoundInputs(self, values)

    def end_profiling(self) -> list[Path]:
        """Stop the profiler and return its trace (in ``profiling_dir``); [] when profiling is off or ended."""
        if self.profiling_dir is None:
            return []
        written = self.session.end_profiling()  # "" once ended
        if not written:
            return []
        path = Path(written)
        if path.resolve().parent != self.profiling_dir.resolve():
            path = Path(shutil.move(str(path), str(self.profiling_dir / path.name)))
        check_trace(path)
        return [path]


class BoundInputs:
    """Runs of a session with some inputs bound once (onnxruntime's I/O binding): a call binds only its own
    inputs. ``session.run`` converts and checks every input it is given at every call, which for a U-Net's 570
    LoRA factors costs several percent of the call; bound, they cost nothing per call. The bound arrays are kept
    referenced here (onnxruntime reads them in place)."""

    def __init__(self, session: OnnxRuntimeSession, values: dict[str, np.ndarray]) -> None:
        import onnxruntime

        self.session = session
        # values for inputs the graph does not have (a cut factor branch's) are not bound
        self._values = {
            name: np.ascontiguousarray(value) for name, value in values.items() if name in session.input_names
        }
        self._ort_values = {
            name: onnxruntime.OrtValue.ortvalue_from_numpy(value) for name, value in self._values.items()
        }
        self._binding = session.session.io_binding()
        for name, value in self._ort_values.items():
            self._binding.bind_ortvalue_input(name, value)
        self._lock = threading.Lock()  # one binding: one call at a time

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            binding = self._binding
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            for name in self.session.output_names:
                binding.bind_output(name)  # a new array per call, on the CPU
            try:
                self.session.session.run_with_iobinding(binding)
                outputs = binding.copy_outputs_to_cpu()
            finally:
                binding.clear_binding_outputs()
        return dict(zip(self.session.output_names, outputs, strict=True))


def check_trace(path: Path) -> None:
    """onnxruntime reports no failed write of its trace: on a full disk it leaves an empty file and returns its
    name. A trace that is not whole JSON raises the OSError the write would have (ENOSPC when the disk is full)."""
    try:
        json.loads(path.read_bytes())
    except ValueError:
        if os.statvfs(path.parent).f_bavail == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise OSError(errno.EIO, "onnxruntime's profile trace is incomplete", str(path)) from None


def _with_weights(onnxruntime, path: Path, session_options, weights: WeightOverrides) -> tuple[str | bytes, list]:
    """Set ``session_options`` up to replace ``weights`` when the session opens; returns what to open and the
    values the session must keep referenced. Weights in external data are replaced with
    ``add_external_initializers`` (onnxruntime reads those arrays in place, for the session's life); onnxruntime
    refuses that for weights stored inside the .onnx file, so those are written over their bytes in a copy of the
    file, opened from memory (its external data still read from the bundle folder)."""
    external = {
        name: np.ascontiguousarray(value)
        for name, value in weights.values.items()
        if name not in weights.inline_offsets
    }
    values = [onnxruntime.OrtValue.ortvalue_from_numpy(value) for value in external.values()]
    if external:
        session_options.add_external_initializers(list(external), values)
    kept = [*external.values(), *values]
    if not weights.inline_offsets:
        return str(path), kept
    data = bytearray(path.read_bytes())
    for name, offset in weights.inline_offsets.items():
        payload = np.ascontiguousarray(weights.values[name]).tobytes()
        data[offset : offset + len(payload)] = payload
    session_options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return bytes(data), kept


def _cpu_identity() -> str:
    """What an optimised graph depends on besides the file: the CPU (model and ISA flags) and onnxruntime."""
    import platform

    model, flags = cpu_model_and_flags()
    return "|".join([platform.machine(), platform.processor(), model or "", " ".join(sorted(flags or ()))])


def optimized_model_path(path: Path, options: BackendOptions, identity: str | None = None) -> Path | None:
    """Where the optimised copy of ``path`` lives in the cache (None when caching is off)."""
    import hashlib
    import json

    import onnxruntime

    cache = backend_cache_dir(options, "onnxruntime")
    if cache is None:
        return None
    key = json.dumps(
        [identity or file_identity(path), onnxruntime.__version__, _cpu_identity(), "ORT_ENABLE_ALL+prepacked"]
    )
    return cache / hashlib.sha256(key.encode()).hexdigest()[:32] / "model.onnx"


def _return_freed_heap() -> None:
    """Give the heap pages malloc holds free back to the system (glibc's ``malloc_trim``): the optimising session's
    weights were allocated in pieces below glibc's mmap threshold, and freed they stay in the process's heap
    (measured: docs/design-notes.md#onnxruntime-first-start). Nothing is done where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError):  # another libc (musl has no malloc_trim)
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def _open_optimized(onnxruntime, cached: Path, session_options, providers: list[str]):
    """Open an already optimised graph as it is: optimising it again would only cost time."""
    session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(str(cached), session_options, providers=providers)


def _save_optimized_into(session_options, target: Path) -> None:
    """Have onnxruntime save the graph it optimises at this load to ``target``, weights in ``<name>_data``."""
    session_options.optimized_model_filepath = str(target)
    session_options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", target.name + "_data"
    )
    session_options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    # MatMul weights also in MLAS's packed layout, mapped from the file at load: no packing at load or first run,
    # no anonymous copy (measured: docs/design-notes.md#onnxruntime).
    session_options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")


def open_weight_inputs_session(path: Path, options: BackendOptions, name: str) -> OnnxRuntimeSession:
    """A session on a float variant's weight-inputs graph (its mapped weights are graph inputs, fed with every call
    by run-time adapters): the graph without those weights, optimised and cached as any other file."""
    return OnnxRuntimeSession(path, options, name)


def open_factor_inputs_session(
    path: Path,
    options: BackendOptions,
    name: str,
    shapes: dict[str, tuple[int, ...]],
    output_names: tuple[str, ...] = (),
) -> OnnxRuntimeSession:
    """A session on a float variant's factor-inputs graph (a LoRA branch beside each mapped weight, its factors
    graph inputs of any rank) with the branches whose factors in ``shapes`` have rank 0 cut out: one session for
    every set of adapters that touch the same weights (any ranks), optimised and cached under the file and the
    branches kept."""
    import hashlib

    from lcm_export.runtime.factor_graph import cut_factor_branches

    cut = {key.rsplit(".", 1)[0] for key, shape in shapes.items() if 0 in shape}
    kept = factor_signature(shapes)
    identity = hashlib.sha256(json.dumps([file_identity(path), kept]).encode()).hexdigest()
    graph = cut_factor_branches(path.read_bytes(), cut)  # the graph alone: 1.5 MB, cut in 30 ms for SD1.5's U-Net
    return OnnxRuntimeSession(path, options, name, identity, model_bytes=graph)


def factor_signature(shapes: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The weights whose branches a factor-inputs session keeps (their factors' rank is not 0): adapters that touch
    the same weights share the session, whatever their ranks."""
    return tuple(sorted({key.rsplit(".", 1)[0] for key, shape in shapes.items() if 0 not in shape}))


def open_session(
    bundle_dir: Path,
    component: Component,
    options: BackendOptions,
    static_shapes: dict[str, tuple[int, ...]] | None = None,
    weights: WeightOverrides | None = None,
) -> OnnxRuntimeSession:
    path = artifact_path(bundle_dir, component, ARTIFACT_FORMAT)
    identity = artifact_identity(component, ARTIFACT_FORMAT)
    return OnnxRuntimeSession(path, options, component.spec.name, identity, weights)
