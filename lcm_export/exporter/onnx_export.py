"""Export one component to ONNX and check it against PyTorch.

The trace uses one set of shapes and the check another (other batch, other spatial size), so a dim that the
trace baked in as a constant fails the check instead of failing on a user's device.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lcm_export.errors import ExportError
from lcm_export.exporter.components import ExportableComponent, sample_inputs
from lcm_export.runtime.specs import ComponentSpec

DEFAULT_OPSET = 17
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes; protobuf cannot hold more than 2 GB in one file
FP16_RELATIVE_TOLERANCE = 2e-2  # fp16 outputs: max abs error / max abs reference


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
) -> ComponentSpec:
    """Write ``component`` to ``output_path`` (+ ``model.onnx_data`` when large); return the spec as exported.

    ``precision="fp16"`` converts float weights and activations to fp16 except for components marked
    ``keep_fp32`` (the VAE, which overflows in fp16); the returned spec carries the resulting I/O dtypes.
    """
    import onnx
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
        exported_spec = spec
        if precision == "fp16" and not spec.keep_fp32:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            # The converter needs value types (e.g. to keep Resize scales fp32); infer them from the file,
            # which also works past protobuf's 2 GB limit where in-memory inference does not.
            inferred_path = Path(scratch) / "inferred.onnx"
            onnx.shape_inference.infer_shapes_path(str(traced_path), str(inferred_path))
            model = convert_float_to_float16(
                onnx.load(str(inferred_path)), keep_io_types=False, disable_shape_infer=True
            )
            exported_spec = spec.with_dtypes("float16")
        else:
            # fp32: the traced file as it is, its weights streamed tensor by tensor into one data file; loading
            # and re-saving a 3.4 GB U-Net would hold three copies of its weights in memory at once.
            repack_onnx(traced_path, output_path)
            return exported_spec
    save_onnx(model, output_path)
    return exported_spec


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


def repack_onnx(source: Path, output_path: Path) -> None:
    """Copy the ONNX model at ``source`` to ``output_path``; weights kept outside the protobuf (one file or one
    per tensor, as torch writes models past 2 GB) are streamed into ``<name>_data`` one tensor at a time, at
    page-aligned offsets so runtimes can map them. Peak memory: the graph and the largest tensor."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(source), load_external_data=False)
    external = [tensor for tensor in _all_tensors(model.graph) if uses_external_data(tensor)]
    if not external:
        save_onnx(model, output_path)
        return
    output_path.parent.mkdir(parents=True, exist_ok=True)
    data_name = output_path.name + "_data"
    alignment = 4096
    with open(output_path.parent / data_name, "wb") as data:
        for tensor in external:
            info = ExternalDataInfo(tensor)
            with open(source.parent / info.location, "rb") as handle:
                handle.seek(info.offset or 0)
                payload = handle.read(info.length) if info.length else handle.read()
            offset = -(-data.tell() // alignment) * alignment
            data.seek(offset)
            data.write(payload)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(output_path))


def save_onnx(model: object, output_path: Path) -> None:
    """Save an ONNX model, moving weights to ``<name>_data`` beside it when the file would pass 2 GB."""
    import onnx

    output_path.parent.mkdir(parents=True, exist_ok=True)
    data_name = output_path.name + "_data"
    if (output_path.parent / data_name).exists():
        (output_path.parent / data_name).unlink()
    large = _serialized_size(model) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        model,
        str(output_path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )


def _serialized_size(model: object) -> int:
    """Bytes ``model`` takes as one protobuf; past protobuf's 2 GB limit ``ByteSize`` itself fails (an SD U-Net
    in fp32 is 3.4 GB), which can only mean "large"."""
    from google.protobuf.message import EncodeError

    try:
        return int(model.ByteSize())  # type: ignore[attr-defined]
    except (EncodeError, ValueError):
        return EXTERNAL_DATA_THRESHOLD + 1


def validate_onnx(
    component: ExportableComponent,
    onnx_path: Path,
    exported_spec: ComponentSpec,
    check_values: dict[str, int],
) -> ValidationReport:
    """Run the ONNX file (onnxruntime, CPU) and the torch module on the same inputs; report every output."""
    import onnxruntime
    import torch

    spec = component.spec
    feeds = sample_inputs(spec, check_values, seed=1)
    with torch.no_grad():
        reference = component.module(*(torch.from_numpy(feeds[name]) for name in spec.input_names))
    reference = [tensor.float().numpy() for tensor in reference]

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    onnx_feeds = {tensor.name: feeds[tensor.name].astype(tensor.dtype) for tensor in exported_spec.inputs}
    outputs = session.run(exported_spec.output_names, onnx_feeds)

    fp16 = any(t.dtype == "float16" for t in exported_spec.outputs)
    errors, scales, tolerances = {}, {}, {}
    for name, expected, actual in zip(spec.output_names, reference, outputs, strict=True):
        if expected.shape != actual.shape:
            raise ExportError(
                f"{spec.name}: output '{name}' has shape {list(actual.shape)} in ONNX but {list(expected.shape)} "
                "in PyTorch (a dynamic dim was traced as a constant)"
            )
        scale = float(np.abs(expected).max())
        errors[name] = float(np.abs(expected - actual.astype(np.float32)).max())
        scales[name] = scale
        tolerances[name] = FP16_RELATIVE_TOLERANCE * max(scale, 1.0) if fp16 else spec.atol * max(scale, 1.0)
    return ValidationReport(
        component=spec.name,
        shapes={name: list(value.shape) for name, value in feeds.items()},
        max_abs_error=errors,
        max_abs_reference=scales,
        tolerance=tolerances,
    )
