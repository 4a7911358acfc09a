"""Export one component to ONNX and check it against PyTorch.

The trace uses one set of shapes and the check another (other batch, other spatial size), so a dim that the
trace baked in as a constant fails the check instead of failing on a user's device.

fp16 graphs of components marked ``finite_mask_fills`` get one rewrite after the conversion
(:func:`use_finite_mask_fills`): the ``-inf`` that attention masks add before a Softmax becomes float16's lowest
finite value, which TensorRT-RTX builds where it cannot build the ``-inf`` (CLIP text encoders with a head size
like 10); the masked positions still softmax to exactly 0. Other graphs keep the ``-inf``: with it TensorRT-RTX
builds a different engine for CLIP-L (head size 64), one that builds today and whose speed cannot be compared
without a GPU.
"""

from __future__ import annotations

import glob
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.errors import ExportError
from lcm_export.exporter.components import ExportableComponent
from lcm_export.runtime.specs import ComponentSpec, sample_inputs

DEFAULT_OPSET = 17
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes; protobuf cannot hold more than 2 GB in one file
FP16_RELATIVE_TOLERANCE = 2e-2  # fp16 outputs: max abs error / max abs reference
FLOAT16_LOWEST = float(np.finfo(np.float16).min)  # -65504
FINITE_MASK_FILL_KEY = "lcm_export.finite_mask_fills"  # ONNX metadata: how many mask constants were rewritten
# Ops a mask goes through between its constant fill and the Softmax it masks (fill, add to the scores, reshape).
MASK_PATH_OPS = frozenset({"Where", "Add", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Cast", "Slice"})


@dataclass(frozen=True)
class ValidationReport:
    """How far one exported component is from PyTorch, per output, on shapes other than the trace's."""

    component: str
    shapes: dict[str, list[int]]
    max_abs_error: dict[str, float]
    max_abs_reference: dict[str, float]
    tolerance: dict[str, float]

    @property
    def failures(self) -> list[str]:
        return [name for name, error in self.max_abs_error.items() if not error <= self.tolerance[name]]

    def to_json(self) -> dict:
        return {
            "shapes": self.shapes,
            "max_abs_error": self.max_abs_error,
            "max_abs_reference": self.max_abs_reference,
            "tolerance": self.tolerance,
        }


def export_to_onnx(
    component: ExportableComponent,
    output_path: Path,
    trace_values: dict[str, int],
    *,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    release: Callable[[], None] | None = None,
    max_file_bytes: int | None = None,
) -> ComponentSpec:
    """Write ``component`` to ``output_path`` (+ ``model.onnx_data`` when large); return the spec as exported.

    ``precision="fp16"`` converts float weights and activations to fp16 except for components marked
    ``keep_fp32`` (the VAE, which overflows in fp16); the returned spec carries the resulting I/O dtypes.
    Components marked ``finite_mask_fills`` then get their mask fills made finite (:func:`use_finite_mask_fills`).

    ``release`` (when given) is called as soon as the trace is written, before the weights are repacked or
    converted: the caller frees the torch module there (its PyTorch reference outputs computed beforehand, see
    :func:`pytorch_reference`), so the module's weights and the ONNX file's are never in memory together.

    ``max_file_bytes`` (when given): no file written is larger (save_onnx), for browsers (the web target).
    """
    import torch

    spec = component.spec
    feeds = sample_inputs(spec, trace_values)
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    with tempfile.TemporaryDirectory(prefix="lcm-export-onnx-") as scratch:
        traced_path = Path(scratch) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about python bools in diffusers/transformers code
            torch.onnx.export(
                component.module,
                args,
                str(traced_path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        del args
        if release is not None:
            release()
        exported_spec = spec
        if precision == "fp16" and not component.keep_fp32:
            model = convert_to_fp16(traced_path, finite_mask_fills=component.finite_mask_fills)
            exported_spec = spec.with_dtypes("float16")
        else:
            # fp32: the traced file as it is, its weights streamed tensor by tensor into one data file; loading
            # and re-saving a 3.4 GB U-Net would hold three copies of its weights in memory at once.
            repack_onnx(traced_path, output_path, consume=True, max_file_bytes=max_file_bytes)
            return exported_spec
    save_onnx(model, output_path, max_file_bytes=max_file_bytes)
    return exported_spec


def convert_to_fp16(source: Path, *, finite_mask_fills: bool = False) -> object:
    """The fp32 ONNX model at ``source`` (external data beside it, if any) converted to fp16, I/O included.

    ``finite_mask_fills``: then make its mask fills finite (:func:`use_finite_mask_fills`). The model returned holds
    its weights in memory; write it with :func:`save_onnx`.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The converter needs value types (e.g. to keep Resize scales fp32); infer them from the file, which also works
    # past protobuf's 2 GB limit where in-memory inference does not. The inferred copy sits beside the source so
    # that it finds the source's external data.
    inferred_path = source.with_name(f".inferred-{os.getpid()}-{source.name}")
    try:
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred_path))
        model = convert_float_to_float16(onnx.load(str(inferred_path)), keep_io_types=False, disable_shape_infer=True)
    finally:
        inferred_path.unlink(missing_ok=True)
    if finite_mask_fills:
        use_finite_mask_fills(model)
    return model


def use_finite_mask_fills(model: object) -> int:
    """Replace ``-inf`` by -65504 in the float16 constants that only mask Softmax inputs; return how many.

    The TorchScript exporter writes ``scaled_dot_product_attention(is_causal=True)`` as
    ``Add(scores, Where(Equal(Trilu(ones), 0), -inf, 0)) -> Softmax``, and the fp16 conversion keeps the
    ``-inf``. TensorRT-RTX 1.7 fails to build that in fp16 when the head size is above 8 and not a multiple of 8
    (Myelin ``CHECK(op->input_layouts().size() > idx)``); with -65504 it builds. The Softmax result is the same:
    it subtracts the row's maximum, at least the unmasked diagonal score, so a masked entry lands some 65504
    below it and its ``exp`` is exactly 0 in fp16 and fp32, as ``exp(-inf)`` is (a causal row always keeps its
    diagonal, so no row is all masked). A constant with any other use on its way (a ReduceMax, a graph output)
    is left alone. The count is recorded in the model's metadata under ``FINITE_MASK_FILL_KEY``.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph  # type: ignore[attr-defined]
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in graph.output}

    def only_masks_softmax(value: str, depth: int = 0) -> bool:
        """Every use of ``value`` reaches a Softmax through mask ops (no more than 8 of them)."""
        uses = consumers.get(value, [])
        if not uses or value in graph_outputs or depth > 8:
            return False
        for node in uses:
            if node.op_type == "Softmax":
                continue
            if node.op_type not in MASK_PATH_OPS or not all(
                only_masks_softmax(output, depth + 1) for output in node.output
            ):
                return False
        return True

    def finite(tensor: object) -> bool:
        """Rewrite ``tensor`` in place when it is float16 with a -inf; whether it was."""
        if tensor.data_type != TensorProto.FLOAT16 or tensor.data_location == TensorProto.EXTERNAL:
            return False  # mask fills are small constants, never external data
        values = numpy_helper.to_array(tensor)
        if not np.isneginf(values).any():
            return False
        fixed = np.where(np.isneginf(values), np.float16(FLOAT16_LOWEST), values).astype(np.float16)
        tensor.CopyFrom(numpy_helper.from_array(fixed, tensor.name))  # type: ignore[attr-defined]
        return True

    rewritten = 0
    for initializer in graph.initializer:
        if only_masks_softmax(initializer.name) and finite(initializer):
            rewritten += 1
    for node in graph.node:
        if node.op_type not in ("Constant", "ConstantOfShape") or not only_masks_softmax(node.output[0]):
            continue
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.HasField("t") and finite(attribute.t):
                rewritten += 1
    if rewritten:
        entry = model.metadata_props.add()  # type: ignore[attr-defined]
        entry.key, entry.value = FINITE_MASK_FILL_KEY, str(rewritten)
    return rewritten


def _all_tensors(graph: object):
    """Every TensorProto of ``graph``: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer  # type: ignore[attr-defined]
    for node in graph.node:  # type: ignore[attr-defined]
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


class _DataFiles:
    """The external data files of one ONNX file: ``<name>_data``, then ``<name>_data_2``, ... where a
    ``max_file_bytes`` limit is given and the next tensor would pass it (a tensor is never split). Tensors start at
    page-aligned offsets so runtimes can map them."""

    ALIGNMENT = 4096

    def __init__(self, output_path: Path, max_file_bytes: int | None) -> None:
        self.folder = output_path.parent
        self.base = output_path.name + "_data"
        self.max_file_bytes = max_file_bytes
        self.count = 0
        self.handle: Any = None
        for stale in self.folder.glob(glob.escape(self.base) + "*"):
            stale.unlink()

    @property
    def location(self) -> str:
        return self.base if self.count == 1 else f"{self.base}_{self.count}"

    def write(self, payload: bytes) -> tuple[str, int]:
        """Write one tensor's bytes; return the file (relative to the model) and the offset it starts at."""
        offset = -(-self.handle.tell() // self.ALIGNMENT) * self.ALIGNMENT if self.handle else 0
        if self.handle is None or (
            self.max_file_bytes is not None and offset and offset + len(payload) > self.max_file_bytes
        ):
            if self.handle is not None:
                self.handle.close()
            self.count += 1
            self.handle = open(self.folder / self.location, "wb")
            offset = 0
        self.handle.seek(offset)
        self.handle.write(payload)
        return self.location, offset

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _point_to(tensor: Any, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` read its data from ``location`` at ``offset``."""
    import onnx

    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def repack_onnx(source: Path, output_path: Path, *, consume: bool = False, max_file_bytes: int | None = None) -> None:
    """Copy the ONNX model at ``source`` to ``output_path``; weights kept outside the protobuf (one file or one
    per tensor, as torch writes models past 2 GB) are streamed into ``<name>_data`` one tensor at a time, at
    page-aligned offsets so runtimes can map them. Peak memory: the graph and the largest tensor.

    ``consume``: ``source`` is scratch; each of its data files is deleted as soon as its last tensor is copied,
    so the disk holds the weights about once, not twice (an SDXL U-Net is 10.3 GB in fp32).
    ``max_file_bytes``: no file larger (the data split into ``<name>_data``, ``<name>_data_2``, ...; a model
    without external data that passes it is saved as :func:`save_onnx` does).
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(source), load_external_data=False)
    external = [tensor for tensor in _all_tensors(model.graph) if uses_external_data(tensor)]
    if not external:
        save_onnx(model, output_path, max_file_bytes=max_file_bytes)
        return
    output_path.parent.mkdir(parents=True, exist_ok=True)
    uses_left: dict[str, int] = {}
    for tensor in external:
        location = ExternalDataInfo(tensor).location
        uses_left[location] = uses_left.get(location, 0) + 1
    data = _DataFiles(output_path, max_file_bytes)
    try:
        for tensor in external:
            info = ExternalDataInfo(tensor)
            with open(source.parent / info.location, "rb") as handle:
                handle.seek(info.offset or 0)
                payload = handle.read(info.length) if info.length else handle.read()
            uses_left[info.location] -= 1
            if consume and not uses_left[info.location]:
                (source.parent / info.location).unlink()
            location, offset = data.write(payload)
            _point_to(tensor, location, offset, len(payload))
    finally:
        data.close()
    onnx.save_model(model, str(output_path))


def save_onnx(model: object, output_path: Path, *, max_file_bytes: int | None = None) -> None:
    """Save an ONNX model, moving weights to ``<name>_data`` beside it when the file would pass 2 GB, or
    ``max_file_bytes`` when given (then no data file passes it either: ``<name>_data_2``, ... follow)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    output_path.parent.mkdir(parents=True, exist_ok=True)
    limit = EXTERNAL_DATA_THRESHOLD if max_file_bytes is None else min(max_file_bytes, EXTERNAL_DATA_THRESHOLD)
    data = _DataFiles(output_path, max_file_bytes)  # removes the data files of an earlier save
    if _serialized_size(model) <= limit:
        onnx.save_model(model, str(output_path))
        return
    try:
        for tensor in _all_tensors(model.graph):  # type: ignore[attr-defined]
            if tensor.data_type == TensorProto.STRING or tensor.data_location == TensorProto.EXTERNAL:
                continue
            payload = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            if len(payload) < 1024:
                continue
            for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(name)
            location, offset = data.write(payload)
            _point_to(tensor, location, offset, len(payload))
    finally:
        data.close()
    onnx.save_model(model, str(output_path))


def _serialized_size(model: object) -> int:
    """Bytes ``model`` takes as one protobuf; past protobuf's 2 GB limit ``ByteSize`` itself fails (an SD U-Net
    in fp32 is 3.4 GB), which can only mean "large"."""
    from google.protobuf.message import EncodeError

    try:
        return int(model.ByteSize())  # type: ignore[attr-defined]
    except (EncodeError, ValueError):
        return EXTERNAL_DATA_THRESHOLD + 1


@dataclass(frozen=True)
class PyTorchReference:
    """What the torch module computes on the check shapes: the inputs (by name) and its outputs, in spec order."""

    feeds: dict[str, np.ndarray]
    outputs: tuple[np.ndarray, ...]


def pytorch_reference(component: ExportableComponent, check_values: dict[str, int]) -> PyTorchReference:
    """Run the torch module once on inputs of the check shapes (other than the trace's); keep its outputs.

    Kept apart from the module (small copies), so the module can be freed before the ONNX file is checked.
    """
    import torch

    spec = component.spec
    feeds = sample_inputs(spec, check_values, seed=1)
    with torch.no_grad():
        outputs = component.module(*(torch.from_numpy(feeds[name]) for name in spec.input_names))
    return PyTorchReference(feeds, tuple(tensor.float().numpy().copy() for tensor in outputs))


def validate_onnx(
    component: ExportableComponent,
    onnx_path: Path,
    exported_spec: ComponentSpec,
    check_values: dict[str, int],
    reference: PyTorchReference | None = None,
) -> ValidationReport:
    """Run the ONNX file (onnxruntime, CPU) and the torch module on the same inputs; report every output.

    ``reference``: the module's outputs computed beforehand (:func:`pytorch_reference`), when the module has
    been freed since; without it the module runs here.
    """
    import onnxruntime

    spec = component.spec
    if reference is None:
        reference = pytorch_reference(component, check_values)
    feeds = reference.feeds

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    onnx_feeds = {tensor.name: feeds[tensor.name].astype(tensor.dtype) for tensor in exported_spec.inputs}
    outputs = session.run(exported_spec.output_names, onnx_feeds)

    fp16 = any(t.dtype == "float16" for t in exported_spec.outputs)
    errors, scales, tolerances = {}, {}, {}
    for name, expected, actual in zip(spec.output_names, reference.outputs, outputs, strict=True):
        if expected.shape != actual.shape:
            raise ExportError(
                f"{spec.name}: output '{name}' has shape {list(actual.shape)} in ONNX but {list(expected.shape)} "
                "in PyTorch (a dynamic dim was traced as a constant)"
            )
        scale = float(np.abs(expected).max())
        errors[name] = float(np.abs(expected - actual.astype(np.float32)).max())
        scales[name] = scale
        tolerances[name] = FP16_RELATIVE_TOLERANCE * max(scale, 1.0) if fp16 else component.atol * max(scale, 1.0)
    return ValidationReport(
        component=spec.name,
        shapes={name: list(value.shape) for name, value in feeds.items()},
        max_abs_error=errors,
        max_abs_reference=scales,
        tolerance=tolerances,
    )
