"""OpenVINO backend: reads the bundle's ONNX directly and compiles it for the device (CPU by default).

OpenVINO's CPU plugin runs bf16 by default on CPUs with AVX-512 BF16/AMX; ``precision="fp32"`` pins f32 for
parity. A compiled-model cache (``cache_dir``) makes a second load fast; a known call shape (``static_shape``)
reshapes the graph to static dims before compiling.

Why OpenVINO reads the ONNX itself rather than through onnxruntime's OpenVINO execution provider: the provider is
a separate onnxruntime build (``onnxruntime-openvino``) that replaces the stock one, and keeps onnxruntime's copy
of the graph next to OpenVINO's (onnxruntime issue 20467: twice the memory); the plain ``openvino`` wheel reads
ONNX directly, caches compiled blobs and has no such copy.

When ``auto`` picks it (``auto_eligible``): only where the CPU plugin runs a float faster than f32 (bf16 on AVX-512
BF16 / AMX, fp16 on AMX-FP16 / ARM fp16). Where it has only f32, onnxruntime is the faster choice, and it loads
faster. Measured: docs/design-notes.md#openvino.

Dynamic shapes compile by path (``compile_model(path)``): a cache hit skips reading the model and keeps nothing of
it. Static shapes are a little faster per call and move the weights' re-layout from the first call to the load. The
cached blob is memory-mapped and the plugin copies the weights out of it for its kernels; the pages copied are
released while it does (:mod:`.mapped_files`), so that they do not count in RSS beside the copy. Measured:
docs/design-notes.md#openvino.

An INT8 (QDQ) variant is read from the same file onnxruntime runs, with one change (:func:`float_layer_outputs`):
the quantise-dequantise pair onnxruntime needs on each convolution's output (its integer kernel QLinearConv writes
8-bit output) is dropped where nothing quantised reads that output, so those outputs stay float as in NNCF's own
placement; the inputs of every Conv/MatMul stay quantised. Here that is as fast and more accurate; onnxruntime keeps
them quantised, because there a float output costs its integer kernel. Measured: docs/design-notes.md#openvino.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import threading
from pathlib import Path
from typing import Any

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
    mapped_files,
    warn_cache_unwritable,
)
from lcm_export.runtime.manifest import Component

ARTIFACT_FORMAT = "onnx"
# The INFERENCE_PRECISION_HINT values the option maps to (see PRECISION_HINTS); "int8" is a stored variant.
COMPUTE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Sessions may open with some initializers replaced (run-time adapters: lcm_export.runtime.adapters).
ADAPTERS = True
# Run-time adapters as LoRA factors fed to branches beside the weights: compiled per set of ranks, the branches of
# rank 0 cut out first (the CPU plugin refuses empty tensors).
FACTOR_INPUTS = True
# A session keeps a pool of infer requests, one per concurrent call (see OpenVinoSession).
THREAD_SAFE = True


def is_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def check_device(device: str) -> None:
    """``auto`` (the CPU) or a device OpenVINO lists here (CPU, GPU, GPU.1, NPU, ...; AUTO/HETERO/MULTI with
    their targets)."""
    if device.lower() == "auto":
        return
    import openvino

    available = list(openvino.Core().available_devices)
    head = device.split(":", 1)[0].upper()
    targets = device.split(":", 1)[1].split(",") if ":" in device else []
    virtual = head in ("AUTO", "HETERO", "MULTI")
    if (device.upper() in available or device in available) and not virtual:
        return
    if virtual and all(target in available or target.split(".")[0] in available for target in targets):
        return
    raise UserError(
        f"device {device!r} is not an OpenVINO device on this machine (it has {', '.join(available)}): pass one of "
        "those, or auto"
    )


# CPU feature flags (Linux /proc/cpuinfo) with which OpenVINO's CPU plugin runs a float faster than f32 by default.
FAST_FLOAT_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "amx_fp16", "avx512_fp16", "asimdhp", "fphp"})


def auto_eligible() -> bool:
    """Whether ``auto`` picks OpenVINO: installed, and the CPU runs a float faster than f32 with it (see the
    measurements: docs/design-notes.md#openvino). Read from the CPU flags where the OS lists them, so that
    choosing another backend does not cost OpenVINO's import (measured: docs/design-notes.md#openvino)."""
    if not is_available():
        return False
    flags = cpu_model_and_flags()[1]
    if flags:  # listed by the OS; otherwise ask OpenVINO
        return bool(flags & FAST_FLOAT_CPU_FLAGS)
    import openvino

    capabilities = set(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return bool(capabilities & {"BF16", "FP16"})


# precision option -> INFERENCE_PRECISION_HINT (None: the device's own choice, its fastest float) and the
# OPTIMIZATION_CAPABILITIES entry a device must list to honour it.
PRECISION_HINTS: dict[str, tuple[str | None, str | None]] = {
    "auto": (None, None),  # an INT8 variant carries its quantisation; the rest runs at the plugin's float
    "fp32": ("f32", None),
    "bf16": ("bf16", "BF16"),
    "fp16": ("f16", "FP16"),
}


def compile_config(core: Any, options: BackendOptions) -> dict[str, str]:
    """OpenVINO compile properties for ``options``.

    - Precision: "auto" leaves INFERENCE_PRECISION_HINT to the plugin (bf16 on CPUs with AVX-512 BF16 / AMX, f32
      elsewhere); "fp32" pins f32 (parity); "bf16"/"fp16" are honoured only where the device lists them (the
      CPU plugin would silently run f32 otherwise, and a timing labelled bf16 would be a lie).
    - Latency: PERFORMANCE_HINT LATENCY with one stream, so every thread works on the one request the loop
      makes; INFERENCE_NUM_THREADS from ``threads`` (default: the plugin's, all physical cores). Hyper-threading
      and SCHEDULING_CORE_TYPE stay the plugin's: LATENCY already runs one thread per physical core, and core
      types only differ on hybrid CPUs.
    - CACHE_DIR: compiled blobs in the lcm-export user cache (see ``backend_cache_dir``), so a second load
      imports instead of compiling.
    """
    if options.precision not in PRECISION_HINTS:
        raise UserError(
            f"precision '{options.precision}' is unknown for OpenVINO: pick one of {', '.join(PRECISION_HINTS)}"
        )
    hint, capability = PRECISION_HINTS[options.precision]
    if capability is not None:
        capabilities = list(core.get_property(options.device, "OPTIMIZATION_CAPABILITIES"))
        if capability not in capabilities:
            raise UserError(
                f"precision '{options.precision}': OpenVINO's {options.device} device here does not run it "
                f"(it supports {', '.join(capabilities)}): use precision 'auto' or 'fp32'"
            )
    if hint is None:
        # The device's own choice, written out: OpenVINO's compiled-blob cache does not tell a blob compiled with
        # an explicit f32 hint from one compiled without a hint, and imports the f32 blob into a bf16 run (NaN
        # images). With the hint always explicit, and each precision in its own cache folder, they never meet.
        hint = core.get_property(options.device, "INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16", ...
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": hint}
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = str(options.threads)
    cache = backend_cache_dir(options, "openvino")
    if cache is not None:
        cache = cache / hint
        cache.mkdir(parents=True, exist_ok=True)
        config["CACHE_DIR"] = str(cache)
    return config


def compile_onnx(
    core: Any,
    path: Path,
    options: BackendOptions,
    config: dict[str, str],
    static_shapes: dict[str, tuple[int, ...]] | None,
    identity: str | None = None,
    quantised: bool = False,
) -> Any:
    """Compile the ONNX file at ``path`` for ``options.device``; the ``ov.Model`` is never kept.

    Dynamic shapes: ``compile_model(path)``, so on a cache hit OpenVINO imports the blob without reading the
    ONNX at all (its cache key is the file's path, size and time, not its content). Static shapes: the model is
    read, reshaped (-1 dims stay dynamic) and saved once as OpenVINO IR in the cache, keyed by the ONNX's sha256
    and the shapes; that IR is then compiled by path too, so the cache stays as effective as for dynamic shapes.
    ``quantised`` (a QDQ variant): the model is read and :func:`float_layer_outputs` applied first, with or
    without static shapes, and the result cached as IR the same way.
    """
    shapes = {name: list(shape) for name, shape in (static_shapes or {}).items() if len(shape)}
    cache = config.get("CACHE_DIR")
    if not shapes and not quantised:
        return core.compile_model(str(path), options.device, config)
    if cache is None:
        return core.compile_model(_read(core, path, shapes, quantised), options.device, config)
    try:
        ir = _prepared_ir(core, path, shapes, Path(cache), identity, quantised)
    except OSError as error:  # the IR could not be written (a full cache disk): this load runs uncached
        warn_cache_unwritable(Path(cache), error, needed=path.stat().st_size)
        uncached = {key: value for key, value in config.items() if key != "CACHE_DIR"}
        return core.compile_model(_read(core, path, shapes, quantised), options.device, uncached)
    return core.compile_model(str(ir), options.device, config)


# Op types whose inputs a QDQ model quantises: an output that feeds one of them keeps its quantise-dequantise pair.
QUANTISED_CONSUMERS = frozenset({"Convolution", "GroupConvolution", "MatMul"})
# Ops that may follow a layer before its output's FakeQuantize (the bias), and the dequantisation chain after it.
_BIAS_OPS = frozenset({"Add"})
_DEQUANTISE_OPS = frozenset({"Convert", "Subtract", "Multiply"})
FLOAT_OUTPUTS_VERSION = 2  # part of the cached IR's key: bump when float_layer_outputs changes


def float_layer_outputs(model: Any) -> int:
    """Keep the outputs of a QDQ model's convolutions and MatMuls float where nothing quantised reads them.

    onnxruntime's quantiser puts a QuantizeLinear/DequantizeLinear pair on each convolution's output (OpenVINO
    reads it as a FakeQuantize and a Convert/Subtract/Multiply chain): it is what lets onnxruntime run the
    convolution as one integer kernel. OpenVINO's kernels take 8-bit inputs with a float output as fast, so there
    the pair only adds rounding error (measured: docs/design-notes.md#openvino). Each such pair whose
    dequantised value feeds no Conv/MatMul is bypassed: its consumers read the layer's float output. Returns how
    many were bypassed. A pair that writes a graph output (a ControlNet's residuals) is bypassed too, its names
    moved to the layer's output (the session returns the name the manifest declares).
    """
    bypassed = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "FakeQuantize":
            continue
        source = node.input_value(0)
        producer = source.get_node()
        if producer.get_type_name() in _BIAS_OPS:
            producer = producer.input_value(0).get_node()
        if producer.get_type_name() not in QUANTISED_CONSUMERS:
            continue
        tail = node
        while True:
            consumers = [target.get_node() for target in tail.output(0).get_target_inputs()]
            if len(consumers) != 1 or consumers[0].get_type_name() not in _DEQUANTISE_OPS:
                break
            tail = consumers[0]
        if tail is node or not consumers:
            continue
        if any(consumer.get_type_name() in QUANTISED_CONSUMERS for consumer in consumers):
            continue
        names = tail.output(0).get_names()  # a graph output's name (a ControlNet's residuals) goes with it
        tail.output(0).replace(source)
        source.get_tensor().add_names(names)
        bypassed += 1
    return bypassed


def replace_constants(model: Any, weights: dict[str, np.ndarray]) -> None:
    """Replace the Constants that hold the ONNX initializers named in ``weights`` by new ones with those values
    (an adapter's merged weights), before the model is compiled."""
    import openvino

    left = dict(weights)
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Constant" or not left:
            continue
        names = node.output(0).get_names()
        hit = next((name for name in names if name in left), None)
        if hit is None:
            continue
        value = left.pop(hit)
        replacement = openvino.op.Constant(np.ascontiguousarray(value), shared_memory=False)
        replacement.output(0).set_names(set(names))
        node.output(0).replace(replacement.output(0))
    if left:
        raise RuntimeError(f"OpenVINO's model has no constant for {', '.join(sorted(left)[:3])}")


def cut_factor_branches(model: Any, factor_shapes: dict[str, tuple[int, ...]]) -> None:
    """In a factor-inputs graph (lcm_export.exporter.weight_map.write_factor_inputs_graph), cut out every branch
    whose factors have rank 0 (its ``W.delta`` added to nothing: the layer's own output takes the sum's place and
    names) and its two parameters, then fix the others' shapes to ``factor_shapes``."""
    outputs: dict[str, Any] = {}
    for node in model.get_ordered_ops():
        for output in node.outputs():
            for name in output.get_names():
                outputs[name] = output
    cut = sorted({name.rsplit(".", 1)[0] for name, shape in factor_shapes.items() if 0 in shape})
    for weight in cut:
        delta = outputs.get(f"{weight}.delta")
        if delta is None:
            raise RuntimeError(f"OpenVINO's model has no factor branch for {weight}")
        (target,) = delta.get_target_inputs()
        add = target.get_node()
        kept = add.input_value(1 - target.get_index())
        names = add.output(0).get_names()
        add.output(0).replace(kept)
        kept.add_names(names)
    parameters = {parameter.get_friendly_name(): parameter for parameter in model.get_parameters()}
    for weight in cut:
        for role in ("down", "up"):
            model.remove_parameter(parameters[f"{weight}.{role}"])
    model.reshape({name: list(shape) for name, shape in factor_shapes.items() if 0 not in shape})
    model.validate_nodes_and_infer_types()


def _read(
    core: Any, path: Path, shapes: dict[str, list[int]], quantised: bool, weights: dict[str, np.ndarray] | None = None
) -> Any:
    model = core.read_model(str(path))
    if weights:
        replace_constants(model, weights)
    if quantised:
        float_layer_outputs(model)
    if shapes:
        model.reshape(shapes)
    return model


def _prepared_ir(
    core: Any, path: Path, shapes: dict[str, list[int]], cache: Path, identity: str | None, quantised: bool
) -> Path:
    """The model as read by :func:`_read`, as IR in ``cache/static-ir/<key>/model.xml``, written once
    (atomically) per key."""
    import hashlib

    import openvino

    parts: list[Any] = [identity or file_identity(path), sorted(shapes.items()), openvino.__version__]
    if quantised:
        parts.append(["float_layer_outputs", FLOAT_OUTPUTS_VERSION])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
    folder = cache / "static-ir" / key
    xml = folder / "model.xml"
    if xml.is_file() and (folder / "model.bin").is_file():
        return xml
    try:
        with cache_entry_writer(folder) as staging:
            model = _read(core, path, shapes, quantised)
            openvino.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
            del model
    except OSError:
        if not xml.is_file():  # not another process that wrote it first: a real failure
            raise
    if not xml.is_file():
        raise OSError(f"the static-shape OpenVINO IR could not be moved into the cache at {folder}")
    return xml


class OpenVinoSession:
    """One compiled model; ``run`` may be called from several threads at once.

    Each concurrent call takes an infer request from a pool (created on demand, returned after the call), so one
    call never finds another's request busy. ``max_requests`` caps the pool (1: calls wait for the one request, a
    lock); the default leaves it to the number of threads calling. With ``NUM_STREAMS`` 1 the plugin runs the
    requests one at a time on every core, so the pool costs no oversubscription.
    """

    max_requests: int | None = None

    def __init__(
        self,
        path: Path,
        options: BackendOptions,
        static_shapes: dict[str, tuple[int, ...]] | None,
        component_name: str = "model",
        identity: str | None = None,
        quantised: bool = False,
        weights: WeightOverrides | None = None,
        output_names: tuple[str, ...] = (),
        factor_shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        import openvino

        core = openvino.Core()
        config = compile_config(core, options)
        if options.profiling_dir:
            config["PERF_COUNT"] = "YES"  # per-layer counters, read after every inference
        # The files the plugin maps and copies its weights from (the cached blob or IR, the bundle's ONNX): their
        # pages are released while it copies them, in the compile and in the first call (where dynamic shapes
        # re-lay the weights out); see mapped_files.
        self._mapped_roots = tuple(Path(root) for root in (config.get("CACHE_DIR"), path.parent) if root)
        self._first_call = threading.Lock()  # held by the first call until it is over; then None
        self._input_names: frozenset[str] | None = None
        with mapped_files.released_while(self._mapped_roots):
            if factor_shapes is not None:
                # A factor-inputs graph for these ranks: the rank-0 branches cut out, compiled uncached (OpenVINO's
                # cache would hash every weight to key it; the session is kept while the ranks stay).
                uncached = {key: value for key, value in config.items() if key != "CACHE_DIR"}
                model = core.read_model(str(path))
                cut_factor_branches(model, factor_shapes)
                self.compiled = core.compile_model(model, options.device, uncached)
                self._input_names = frozenset(name for port in self.compiled.inputs for name in port.get_names())
                del model
            elif weights:
                # An adapter's merged weights: the model read, its constants replaced, compiled uncached (a merge is
                # compiled once; OpenVINO's cache would hash every weight to key it).
                shapes = {name: list(shape) for name, shape in (static_shapes or {}).items() if len(shape)}
                uncached = {key: value for key, value in config.items() if key != "CACHE_DIR"}
                model = _read(core, path, shapes, quantised, weights.values)
                self.compiled = core.compile_model(model, options.device, uncached)
                del model
            else:
                self.compiled = compile_onnx(core, path, options, config, static_shapes, identity, quantised)
        self.loaded_from_cache = bool(self.compiled.get_property("LOADED_FROM_CACHE"))
        # What the device runs: "f32", "bf16" or "f16" (for "auto", the plugin's choice).
        self.inference_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self._idle: list[Any] = [self.compiled.create_infer_request()]
        self._created = 1
        self._bound_to: dict[int, object] = {}  # id(request) -> the token of the BoundInputs whose tensors it holds
        self._pool = threading.Condition()
        self.layer_profile = (
            LayerProfile(component_name, Path(options.profiling_dir), options.device) if options.profiling_dir else None
        )
        # An output tensor may carry several names once compiled (a QDQ graph's output is also its
        # DequantizeLinear's): the one the manifest declares (``output_names``) is the one returned.
        self.output_names = [_declared_name(output, output_names) for output in self.compiled.outputs]

    def _acquire(self) -> Any:
        """An idle infer request, a new one while the pool is under ``max_requests``, else the next one freed."""
        with self._pool:
            while not self._idle and self.max_requests is not None and self._created >= self.max_requests:
                self._pool.wait()
            if self._idle:
                return self._idle.pop()
            self._created += 1
        return self.compiled.create_infer_request()

    def _release(self, request: Any) -> None:
        with self._pool:
            self._idle.append(request)
            self._pool.notify()

    def run(self, feeds: dict[str, np.ndarray], bound: BoundInputs | None = None) -> dict[str, np.ndarray]:
        first = self._first_call
        if first is not None:
            with first:  # the first call runs alone, with the mapped pages released beside it; the others wait
                if self._first_call is not None:
                    with mapped_files.released_while(self._mapped_roots):
                        outputs = self._run(feeds, bound)
                    self._first_call = None
                    return outputs
        return self._run(feeds, bound)

    def _run(self, feeds: dict[str, np.ndarray], bound: BoundInputs | None) -> dict[str, np.ndarray]:
        request = self._acquire()
        try:
            if bound is not None and self._bound_to.get(id(request)) is not bound.token:
                for name, tensor in bound.tensors.items():  # once per request and set of bound inputs
                    request.set_tensor(name, tensor)
                self._bound_to[id(request)] = bound.token
            # share_outputs stays off: the arrays returned are copies, not views of the request's buffers, which
            # the next call on that request overwrites.
            if self._input_names is not None:  # a factor-inputs graph: the cut branches' factors are not inputs
                feeds = {name: value for name, value in feeds.items() if name in self._input_names}
            results = request.infer(feeds, share_inputs=True)
            outputs = {
                name: np.asarray(results[output])
                for name, output in zip(self.output_names, self.compiled.outputs, strict=True)
            }
            if self.layer_profile is not None:
                with self._pool:
                    self.layer_profile.add(request.get_profiling_info())
        finally:
            self._release(request)
        return outputs

    def end_profiling(self) -> list[Path]:
        """Write the per-layer profile gathered so far (``profiling_dir``); [] when profiling is off."""
        return [self.layer_profile.write()] if self.layer_profile is not None else []

    def bind_inputs(self, values: dict[str, np.ndarray]) -> BoundInputs:
        """Runs of this compiled model with ``values`` (input name -> array) set once on each infer request, for
        every call (run-time adapters' factors)."""
        return BoundInputs(self, values)


class BoundInputs:
    """Runs of an :class:`OpenVinoSession` with some inputs set once per infer request: a call sets only its own
    inputs. ``infer`` wraps and sets every input it is given at every call, which for a U-Net's LoRA factors costs
    several percent of the call (SD1.5 shape at 256 px: +4.8% fed, +1.6% set once). The tensors share the arrays'
    memory and keep them referenced."""

    def __init__(self, session: OpenVinoSession, values: dict[str, np.ndarray]) -> None:
        import openvino

        self.session = session
        self.token = object()
        accepted = session._input_names
        self.tensors = {
            name: openvino.Tensor(np.ascontiguousarray(value), shared_memory=True)
            for name, value in values.items()
            if accepted is None or name in accepted
        }

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(feeds, bound=self)


class LayerProfile:
    """Time per layer of one compiled model summed over its inferences, from OpenVINO's performance counters.

    OpenVINO keeps the counters of the last inference only, so every call's are added up here; ``write`` saves
    the layers that took the most time, and the time per layer type, as JSON.
    """

    TOP_LAYERS = 50

    def __init__(self, name: str, folder: Path, device: str) -> None:
        self.name = name
        self.folder = folder
        self.device = device
        self.inferences = 0
        self.layers: dict[str, dict[str, Any]] = {}  # node name -> type, exec type, summed milliseconds

    def add(self, counters: list[Any]) -> None:
        """Add one inference's ``request.get_profiling_info()``; layers not executed are skipped."""
        self.inferences += 1
        for counter in counters:
            if counter.status != counter.Status.EXECUTED:
                continue
            entry = self.layers.setdefault(
                counter.node_name,
                {"name": counter.node_name, "type": counter.node_type, "exec_type": counter.exec_type, "real_ms": 0.0},
            )
            entry["real_ms"] += counter.real_time.total_seconds() * 1e3

    def write(self) -> Path:
        """Write ``openvino_<name>_layers.json`` into the folder and return its path."""
        total = sum(entry["real_ms"] for entry in self.layers.values())
        by_type: dict[str, float] = {}
        for entry in self.layers.values():
            by_type[entry["type"]] = by_type.get(entry["type"], 0.0) + entry["real_ms"]
        ranked = sorted(self.layers.values(), key=lambda entry: entry["real_ms"], reverse=True)
        calls = max(self.inferences, 1)
        report = {
            "backend": "openvino",
            "component": self.name,
            "device": self.device,
            "inferences": self.inferences,
            "total_ms": total,
            "by_type": [
                {"type": kind, "real_ms": ms, "share": ms / total if total else 0.0}
                for kind, ms in sorted(by_type.items(), key=lambda item: item[1], reverse=True)
            ],
            "top_layers": [
                {**entry, "mean_ms": entry["real_ms"] / calls, "share": entry["real_ms"] / total if total else 0.0}
                for entry in ranked[: self.TOP_LAYERS]
            ],
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"openvino_{self.name}_layers.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        return path


def open_session(
    bundle_dir: Path,
    component: Component,
    options: BackendOptions,
    static_shapes: dict[str, tuple[int, ...]] | None = None,
    weights: WeightOverrides | None = None,
) -> OpenVinoSession:
    path = artifact_path(bundle_dir, component, ARTIFACT_FORMAT)
    options = dataclasses.replace(options, device=options.device_or("CPU"))
    quantised = component.artifacts[ARTIFACT_FORMAT].precision == "int8"  # a QDQ variant
    identity = artifact_identity(component, ARTIFACT_FORMAT)
    return OpenVinoSession(
        path, options, static_shapes, component.spec.name, identity, quantised, weights, component.spec.output_names
    )


def open_factor_inputs_session(
    path: Path,
    options: BackendOptions,
    name: str,
    shapes: dict[str, tuple[int, ...]],
    output_names: tuple[str, ...] = (),
) -> OpenVinoSession:
    """A compiled factor-inputs graph for factors of ``shapes`` (see :func:`cut_factor_branches`); its outputs by
    the names the manifest declares (``output_names``: a cut branch's layer output takes the sum's names too)."""
    options = dataclasses.replace(options, device=options.device_or("CPU"))
    return OpenVinoSession(path, options, None, name, output_names=output_names, factor_shapes=shapes)


def factor_signature(shapes: dict[str, tuple[int, ...]]) -> tuple:
    """The ranks a compiled factor-inputs graph is specialised for: a new set compiles again."""
    return tuple(sorted((name, tuple(shape)) for name, shape in shapes.items() if 0 not in shape))


def _declared_name(output: Any, declared: tuple[str, ...]) -> str:
    """The name of a compiled model's output that ``declared`` lists, else any of its names."""
    names = output.get_names()
    return next((name for name in declared if name in names), output.get_any_name())
