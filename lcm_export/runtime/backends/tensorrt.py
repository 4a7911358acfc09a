"""TensorRT backend (standard TensorRT or TensorRT for RTX): runs the bundle's serialized engines on a GPU.

Before an engine is deserialized, its manifest entry is checked against this machine: the TensorRT flavour and
version it was built with must be installed (engines are not portable across releases), and the GPU's compute
capability must be one the engine was built for. Each mismatch is a one-line :class:`UserError` naming the
engine and what to do, instead of TensorRT's multi-line log and a ``None`` engine.

Execution: one execution context per component, device buffers allocated from a *binding plan* (every I/O
tensor's shape and byte size for the call's input shapes, computed from the component spec) and reused while
shapes repeat, host<->device copies and ``execute_async_v3`` on one CUDA stream (``cuda.bindings``, no torch), and
a CUDA graph when the session's shapes are static (TensorRT-RTX captures it itself; standard TensorRT is captured
here after one warm-up run).

The pure parts (version and capability checks, binding plans, profile checks) need neither TensorRT nor a GPU.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from lcm_export.errors import UserError
from lcm_export.runtime.adapters import AdapterError
from lcm_export.runtime.backends import BackendOptions, artifact_path, backend_cache_dir
from lcm_export.runtime.manifest import (
    Component,
    IOTensor,
    TensorRTEngineDetails,
    parse_compute_capability,  # noqa: F401 (re-exported beside check_compute_capability)
)
from lcm_export.runtime.specs import ComponentProfiles, ComponentSpec, latent_symbol_values

ARTIFACT_FORMAT = "tensorrt"
# An engine computes at the precision it was built with (fp16 or INT8, chosen at export).
COMPUTE_PRECISIONS = ("auto",)
# One execution context and one set of device buffers per session: the pipeline locks each session.
THREAD_SAFE = False
# Run-time adapters: an engine built refittable (``lcm-export --trt-refit``) opens again and is refit with the
# merged weights by ONNX initializer name (float engines; the ONNX kept beside it is where the base weights are).
ADAPTERS = True

# flavour (TENSORRT_FLAVORS) -> Python module, display name, and what installs it.
FLAVOR_MODULES = {"tensorrt": "tensorrt", "rtx": "tensorrt_rtx_bindings"}
FLAVOR_NAMES = {"tensorrt": "TensorRT", "rtx": "TensorRT-RTX"}
FLAVOR_INSTALL = {
    "rtx": "pip install 'lcm-edge[tensorrt]'",
    "tensorrt": "pip install tensorrt (standard TensorRT, on a machine with an NVIDIA GPU)",
}
DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}
# Spatial symbols that follow from each other through the VAE scale factor.
LATENT_TO_IMAGE = {"latent_height": "image_height", "latent_width": "image_width"}


def is_available() -> bool:
    """Whether a TensorRT flavour is installed (a GPU is checked when a session opens, with its own message)."""

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module blocked or half-imported in sys.modules
            return False

    return any(installed(name) for name in FLAVOR_MODULES.values())


def auto_eligible() -> bool:
    """``backend="auto"`` picks TensorRT only where it can run: installed and a GPU visible."""
    return is_available() and gpu_count() > 0


def import_flavor(flavor: str) -> ModuleType | None:
    """The TensorRT module of ``flavor`` ("tensorrt" or "rtx"), or None when it is not installed or broken."""
    try:
        return importlib.import_module(FLAVOR_MODULES[flavor])
    except (ImportError, OSError):
        return None


# -- compute capabilities -------------------------------------------------------------------------------------


def format_compute_capability(value: int) -> str:
    """86 -> "8.6" (how NVIDIA lists GPUs)."""
    return f"{value // 10}.{value % 10}"


def check_compute_capability(label: str, flavor: str, built_for: list[int], device: int) -> None:
    """Raise a :class:`UserError` when an engine built for ``built_for`` cannot run on a GPU of ``device``.

    An empty ``built_for`` means the builder's default targets: for TensorRT-RTX, Ampere and newer (Turing, 7.5,
    must be asked for explicitly); standard TensorRT always records the build GPU.
    """
    if built_for:
        if device in built_for:
            return
        listed = ", ".join(format_compute_capability(value) for value in built_for)
        raise UserError(
            f"{label} was built for GPU compute capability {listed}; this GPU is "
            f"{format_compute_capability(device)}: re-export with --compute-capability {device}"
            + (" (TensorRT-RTX)" if flavor == "rtx" else " on a machine with this GPU")
        )
    if flavor == "rtx" and device < 80:
        raise UserError(
            f"{label} was built for TensorRT-RTX's default GPUs (compute capability 8.0 and newer); this GPU is "
            f"{format_compute_capability(device)}: re-export with --compute-capability {device}"
        )


# -- versions -------------------------------------------------------------------------------------------------


def check_engine_version(label: str, flavor: str, built_with: str, installed: str | None) -> None:
    """Raise a :class:`UserError` unless ``installed`` is exactly the version the engine was built with.

    Neither TensorRT nor TensorRT-RTX engines load in another release (standard TensorRT's version-compatible
    engines are not built by lcm-export), so the comparison is exact; the message says how to get a match.
    """
    name = FLAVOR_NAMES.get(flavor)
    if name is None:
        raise UserError(f"{label} names an unknown TensorRT flavour '{flavor}': re-export the bundle")
    if installed is None:
        raise UserError(
            f"{label} was built with {name} {built_with}, which is not installed: {FLAVOR_INSTALL[flavor]} "
            f"(version {built_with})"
        )
    if installed != built_with:
        raise UserError(
            f"{label} was built with {name} {built_with} but {name} {installed} is installed: install "
            f"{name} {built_with}, or re-export the bundle with this one"
        )


# -- binding plans --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorBinding:
    """One I/O tensor of a call at concrete shapes: what to allocate and copy."""

    name: str
    mode: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def resolve_symbols(spec: ComponentSpec, input_shapes: dict[str, tuple[int, ...]], vae_scale_factor: int) -> dict:
    """Values of the spec's symbols implied by ``input_shapes``; latent and image sizes complete each other.

    Raises :class:`UserError` for a missing input, a wrong rank, a fixed dim that differs, or a symbol that takes
    two values (e.g. two inputs disagreeing on the batch).
    """
    values: dict[str, int] = {}
    for tensor in spec.inputs:
        if tensor.name not in input_shapes:
            raise UserError(
                f"component '{spec.name}': input '{tensor.name}' is missing: pass all of {spec.input_names}"
            )
        shape = tuple(input_shapes[tensor.name])
        expected = list(tensor.shape)
        if len(shape) != len(tensor.shape):
            raise UserError(
                f"component '{spec.name}': input '{tensor.name}' has shape {list(shape)}, expected {expected}"
            )
        for dim, size in zip(tensor.shape, shape, strict=True):
            if isinstance(dim, int):
                if dim != size:
                    raise UserError(
                        f"component '{spec.name}': input '{tensor.name}' has shape {list(shape)}, expected {expected}"
                    )
            elif values.setdefault(dim, size) != size:
                raise UserError(
                    f"component '{spec.name}': inputs disagree on '{dim}' ({values[dim]} and {size}): pass "
                    "consistent shapes"
                )
    for latent, image in LATENT_TO_IMAGE.items():
        if latent in values and image not in values:
            values[image] = values[latent] * vae_scale_factor
        elif image in values and latent not in values:
            values[latent] = values[image] // vae_scale_factor
    if "latent_height" in values and "latent_width" in values:  # a ControlNet's residuals: the down-sampled sizes
        derived = latent_symbol_values(values["latent_height"], values["latent_width"])
        values.update({name: size for name, size in derived.items() if name not in values})
    return values


def binding_plan(
    spec: ComponentSpec,
    io: list[IOTensor],
    input_shapes: dict[str, tuple[int, ...]],
    vae_scale_factor: int,
) -> tuple[TensorBinding, ...]:
    """Every engine I/O tensor at the given input shapes, in engine order, with its byte size.

    ``io`` is the engine's I/O table (names, modes, dtypes as built); output shapes follow from the spec's
    symbolic shapes, so the plan can be computed (and tested) without an engine or a GPU.
    """
    values = resolve_symbols(spec, input_shapes, vae_scale_factor)
    spec_tensors = {tensor.name: tensor for tensor in (*spec.inputs, *spec.outputs)}
    plan = []
    for tensor in io:
        if tensor.name not in spec_tensors:
            raise UserError(f"component '{spec.name}': the engine has a tensor '{tensor.name}' its spec does not name")
        shape = (
            tuple(int(d) for d in input_shapes[tensor.name])
            if tensor.mode == "input"
            else spec_tensors[tensor.name].concrete_shape(values)
        )
        nbytes = math.prod(shape) * DTYPE_SIZES[tensor.dtype]
        plan.append(TensorBinding(tensor.name, tensor.mode, tensor.dtype, shape, nbytes))
    return tuple(plan)


def check_profile(label: str, profiles: ComponentProfiles, input_shapes: dict[str, tuple]) -> None:
    """Raise a :class:`UserError` when an input shape lies outside the engine's optimisation profile."""
    for name in profiles.minimum:
        shape = list(input_shapes.get(name, ()))
        low, high = list(profiles.minimum[name]), list(profiles.maximum[name])
        if len(shape) != len(low) or any(not lo <= size <= hi for lo, size, hi in zip(low, shape, high, strict=True)):
            span = f"{low}" if low == high else f"{low} to {high}"
            raise UserError(
                f"{label} takes '{name}' of shape {span}, not {shape}: re-export with --batch/--height/--width "
                "ranges that cover it (or --dynamic)"
            )


# -- GPU ------------------------------------------------------------------------------------------------------


def _cuda_runtime() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        raise UserError("the tensorrt backend needs cuda-bindings: pip install 'lcm-edge[tensorrt]'") from None
    return runtime


def _cuda_check(result: Any, what: str) -> Any:
    """Unpack a ``cuda.bindings`` result tuple ``(error, *values)``; a CUDA error is a RuntimeError (a bug)."""
    runtime = _cuda_runtime()
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != runtime.cudaError_t.cudaSuccess:
        message = runtime.cudaGetErrorString(error)[-1]
        text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
        raise RuntimeError(f"CUDA {what} failed: {error.name} ({text})")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_count() -> int:
    """NVIDIA GPUs visible to the CUDA runtime; 0 without a driver, a GPU or cuda-bindings. Never raises."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        return 0
    try:
        error, count = runtime.cudaGetDeviceCount()
    except Exception:  # a missing driver library surfaces as various errors depending on the bindings version
        return 0
    return int(count) if error == runtime.cudaError_t.cudaSuccess else 0


def check_device(device: str) -> None:
    device_index(device)


def device_index(device: str) -> int:
    """``"auto"``, ``"GPU"``, ``"CUDA"`` -> 0; ``"CUDA:1"`` / ``"GPU:1"`` -> 1; anything else (a CPU) is an error:
    TensorRT runs on a GPU."""
    head, _, tail = device.partition(":")
    if device.lower() == "auto" or (head.upper() in ("CUDA", "GPU") and (tail == "" or tail.isdigit())):
        return int(tail) if tail else 0
    raise UserError(f"device '{device}': the tensorrt backend runs on an NVIDIA GPU: pass auto, GPU:N or CUDA:N")


def device_compute_capability(index: int) -> int:
    """Compute capability of GPU ``index`` as an int (8.9 -> 89); a :class:`UserError` when there is no GPU."""
    count = gpu_count()
    if count == 0:
        raise UserError(
            "the tensorrt backend needs an NVIDIA GPU and driver, and none was found: run on a GPU machine, or "
            "use --backend onnxruntime with a bundle exported with --keep-onnx (or --target onnx)"
        )
    if index >= count:
        raise UserError(f"device CUDA:{index} does not exist: this machine has {count} GPU(s) (CUDA:0..{count - 1})")
    runtime = _cuda_runtime()
    attribute = runtime.cudaDeviceAttr
    major = _cuda_check(runtime.cudaDeviceGetAttribute(attribute.cudaDevAttrComputeCapabilityMajor, index), "query")
    minor = _cuda_check(runtime.cudaDeviceGetAttribute(attribute.cudaDevAttrComputeCapabilityMinor, index), "query")
    return int(major) * 10 + int(minor)


class TensorRTSession:
    """One engine, one execution context, one CUDA stream; ``run(feeds) -> outputs`` over numpy arrays.

    Device buffers are sized from the binding plan of the call's shapes and grown only when a larger shape
    comes; with static shapes a CUDA graph replays the whole engine launch.
    """

    def __init__(
        self,
        label: str,
        trt: ModuleType,
        flavor: str,
        plan: bytes,
        component: Component,
        details: TensorRTEngineDetails,
        options: BackendOptions,
        static_shapes: dict[str, tuple[int, ...]] | None,
    ) -> None:
        self.label = label
        self.cudart = _cuda_runtime()
        self.spec = component.spec
        self.io = list(details.io)
        self.profiles = details.profiles
        self.vae_scale_factor = details.vae_scale_factor
        self.static = static_shapes is not None and all(d >= 0 for s in static_shapes.values() for d in s)
        self.flavor = flavor
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._plan: tuple[TensorBinding, ...] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._graph: Any = None
        self._graph_exec: Any = None
        self._runtime_cache: Any = None
        self._runtime_cache_path: Path | None = None
        self.stream = None

        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        if flavor == "rtx" and hasattr(self.runtime, "get_engine_validity"):
            self._check_validity(trt, plan)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError(f"{label} could not be deserialized by this TensorRT: re-export the bundle on this setup")
        self.context = self._create_context(trt, plan, options)
        if self.context is None:
            raise UserError(f"{label}: TensorRT could not create an execution context (GPU memory?)")
        self.stream = _cuda_check(self.cudart.cudaStreamCreate(), "stream creation")

    def _check_validity(self, trt: ModuleType, plan: bytes) -> None:
        """TensorRT-RTX's own header check (version, compute capability, CUDA): one line instead of a crash."""
        validity, diagnostics = self.runtime.get_engine_validity(plan)
        if validity == trt.EngineValidity.INVALID:
            causes = [
                member
                for member, value in trt.EngineInvalidityDiagnostics.__members__.items()
                if int(diagnostics) & int(value)
            ]
            raise UserError(
                f"{self.label} is not valid on this machine ({', '.join(causes) or 'unknown cause'}): update the "
                "NVIDIA driver, or re-export the bundle with the installed TensorRT-RTX for this GPU"
            )

    def _create_context(self, trt: ModuleType, plan: bytes, options: BackendOptions) -> Any:
        """Standard TensorRT: a plain context. TensorRT-RTX: a runtime config with a kernel cache on disk (its JIT
        compiles kernels at the first run) and, for static shapes, its own CUDA graph capture."""
        if self.flavor != "rtx" or not hasattr(self.engine, "create_runtime_config"):
            return self.engine.create_execution_context()
        config = self.engine.create_runtime_config()
        if self.static and hasattr(config, "cuda_graph_strategy"):
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        cache_dir = backend_cache_dir(options, "tensorrt")
        if cache_dir is None:  # caching turned off (cache=False)
            return self.engine.create_execution_context(config)
        try:
            cache = config.create_runtime_cache()
            key = hashlib.sha256(plan).hexdigest()[:24]
            self._runtime_cache_path = cache_dir / f"trt-rtx-runtime-{trt.__version__}" / f"{key}.cache"
            if self._runtime_cache_path.is_file():
                cache.deserialize(self._runtime_cache_path.read_bytes())  # False (ignored) when stale
            config.set_runtime_cache(cache)
            self._runtime_cache = cache
        except (AttributeError, OSError):
            self._runtime_cache = None
        return self.engine.create_execution_context(config)

    # -- buffers and shapes ---------------------------------------------------------------------------------

    def _prepare(self, input_shapes: dict[str, tuple[int, ...]]) -> tuple[TensorBinding, ...]:
        """Set input shapes, (re)allocate buffers and set tensor addresses when the shapes change."""
        if self._plan is not None and input_shapes == self._shapes:
            return self._plan
        plan = binding_plan(self.spec, self.io, input_shapes, self.vae_scale_factor)  # names every missing input
        check_profile(self.label, self.profiles, input_shapes)
        for binding in plan:
            if binding.mode == "input" and -1 in tuple(self.engine.get_tensor_shape(binding.name)):
                if not self.context.set_input_shape(binding.name, binding.shape):
                    raise UserError(f"{self.label} rejects '{binding.name}' of shape {list(binding.shape)}")
        for binding in plan:
            if binding.mode == "output":
                engine_shape = tuple(self.context.get_tensor_shape(binding.name))
                if engine_shape != binding.shape:
                    raise RuntimeError(
                        f"{self.label}: '{binding.name}' is {engine_shape} in the engine, plan says {binding.shape}"
                    )
            pointer, capacity = self._buffers.get(binding.name, (0, 0))
            if binding.nbytes > capacity:
                if pointer:
                    _cuda_check(self.cudart.cudaFree(pointer), "free")
                pointer = _cuda_check(self.cudart.cudaMalloc(max(binding.nbytes, 1)), "allocation")
                self._buffers[binding.name] = (pointer, max(binding.nbytes, 1))
            self.context.set_tensor_address(binding.name, int(pointer))
        self._plan, self._shapes = plan, dict(input_shapes)
        return plan

    def _launch(self) -> None:
        if self._graph_exec is not None:
            _cuda_check(self.cudart.cudaGraphLaunch(self._graph_exec, self.stream), "graph launch")
            return
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{self.label}: execute_async_v3 failed")

    def _capture_graph(self) -> None:
        """Capture the engine launch as a CUDA graph (standard TensorRT, static shapes, after one warm-up run).

        Copies stay outside the graph: the host arrays change with every call.
        """
        runtime = self.cudart
        mode = runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _cuda_check(runtime.cudaStreamBeginCapture(self.stream, mode), "graph capture")
        launched = self.context.execute_async_v3(int(self.stream))
        error, graph = runtime.cudaStreamEndCapture(self.stream)
        if not launched or error != runtime.cudaError_t.cudaSuccess:
            return  # not capturable (e.g. an engine with data-dependent shapes): stay eager
        self._graph = graph
        self._graph_exec = _cuda_check(runtime.cudaGraphInstantiate(graph, 0), "graph instantiation")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runtime, kind = self.cudart, self.cudart.cudaMemcpyKind
        shapes = {
            tensor.name: tuple(np.shape(feeds[tensor.name])) for tensor in self.spec.inputs if tensor.name in feeds
        }
        first_run_of_shape = self._plan is None or shapes != self._shapes
        plan = self._prepare(shapes)
        hosts = []  # keep the host arrays alive until the stream is synchronised
        for binding in plan:
            if binding.mode == "input":
                host = np.require(feeds[binding.name], dtype=binding.dtype, requirements="C")
                hosts.append(host)
                pointer = self._buffers[binding.name][0]
                _cuda_check(
                    runtime.cudaMemcpyAsync(
                        pointer, host.ctypes.data, binding.nbytes, kind.cudaMemcpyHostToDevice, self.stream
                    ),
                    "copy to device",
                )
        self._launch()
        outputs = {}
        for binding in plan:
            if binding.mode == "output":
                host = np.empty(binding.shape, dtype=binding.dtype)
                pointer = self._buffers[binding.name][0]
                _cuda_check(
                    runtime.cudaMemcpyAsync(
                        host.ctypes.data, pointer, binding.nbytes, kind.cudaMemcpyDeviceToHost, self.stream
                    ),
                    "copy to host",
                )
                outputs[binding.name] = host
        _cuda_check(runtime.cudaStreamSynchronize(self.stream), "synchronisation")
        if first_run_of_shape:
            if self.static and self.flavor != "rtx" and self._graph_exec is None:
                self._capture_graph()
            self._save_runtime_cache()
        return outputs

    def _save_runtime_cache(self) -> None:
        if self._runtime_cache is None or self._runtime_cache_path is None:
            return
        try:
            data = bytes(self._runtime_cache.serialize())
            self._runtime_cache_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._runtime_cache_path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_bytes(data)
            temporary.replace(self._runtime_cache_path)
        except OSError:
            pass  # a read-only cache folder only costs a JIT compile next time

    def close(self) -> None:
        """Free the graph, buffers and stream (also done when the session is garbage-collected)."""
        runtime = getattr(self, "cudart", None)
        if runtime is None:
            return
        if self._graph_exec is not None:
            runtime.cudaGraphExecDestroy(self._graph_exec)
            runtime.cudaGraphDestroy(self._graph)
            self._graph_exec = self._graph = None
        for pointer, _ in self._buffers.values():
            runtime.cudaFree(pointer)
        self._buffers.clear()
        if self.stream is not None:
            runtime.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass  # interpreter shutdown: CUDA may already be gone


def check_refittable(label: str, details: TensorRTEngineDetails, weights: Any) -> None:
    """Run-time adapters on this engine: it must be refittable, and the merged weights float (an INT8 engine's
    scales are folded into its kernels)."""
    if not details.refittable:
        raise AdapterError(
            f"{label} is not refittable: re-export with --target tensorrt --trt-refit, or load with "
            "backend='onnxruntime'"
        )
    integer = sorted(name for name, value in weights.values.items() if not np.issubdtype(value.dtype, np.floating))
    if integer:
        raise AdapterError(f"{label}: an INT8 engine is not refit ({integer[0]} is {weights.values[integer[0]].dtype})")


def refit_engine(trt: ModuleType, engine: Any, logger: Any, values: dict[str, np.ndarray], label: str) -> None:
    """Give ``engine`` the ``values`` (ONNX initializer name -> array in the ONNX layout and dtype) with TensorRT's
    Refitter: the names the ONNX parser gave the weights are the initializers'. Every name must be a refittable
    weight of the engine, and TensorRT must report none missing."""
    refitter = trt.Refitter(engine, logger)
    kept = []  # TensorRT reads the host arrays when it refits: keep them alive until then
    for name, value in values.items():
        array = np.ascontiguousarray(value)
        kept.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise AdapterError(f"{label} has no refittable weight '{name}': re-export with --trt-refit")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise AdapterError(f"{label}: TensorRT also needs the weights {', '.join(missing[:3])} to refit: re-export")
    if not refitter.refit_cuda_engine():
        raise AdapterError(f"{label}: TensorRT could not refit the engine with the adapters' weights")
    del kept


def open_session(
    bundle_dir: Path,
    component: Component,
    options: BackendOptions,
    static_shapes: dict[str, tuple[int, ...]] | None = None,
    weights: Any = None,
) -> TensorRTSession:
    """Check the engine against the installed TensorRT and the GPU, then deserialize it and open a session;
    ``weights`` (an adapter's merged weights, :class:`~lcm_export.runtime.adapters.WeightOverrides`): refit the
    new session's engine with them before its first call."""
    path = artifact_path(bundle_dir, component, ARTIFACT_FORMAT)
    artifact = component.artifacts[ARTIFACT_FORMAT]
    label = f"BUNDLE '{bundle_dir}': engine '{artifact.path}'"
    details = artifact.tensorrt_details  # its flavour is one of FLAVOR_MODULES: the manifest check says so
    if weights:
        check_refittable(label, details, weights)
    trt = import_flavor(details.flavor)
    installed = str(trt.__version__) if trt is not None else None
    check_engine_version(label, details.flavor, details.trt_version, installed)
    index = device_index(options.device)
    check_compute_capability(
        label, details.flavor, list(details.compute_capabilities), device_compute_capability(index)
    )
    _cuda_check(_cuda_runtime().cudaSetDevice(index), "device selection")
    session = TensorRTSession(label, trt, details.flavor, path.read_bytes(), component, details, options, static_shapes)
    if weights:
        refit_engine(trt, session.engine, session.logger, weights.values, label)
    return session
