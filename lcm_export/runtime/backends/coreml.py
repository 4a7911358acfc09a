"""Core ML backend: runs the bundle's mlpackages with coremltools (prediction needs macOS).

A Core ML model's inputs differ from the component spec in two ways the exporter records in the artifact
(``coreml_inputs`` / ``coreml_outputs`` of its :class:`CoreMLPackageDetails`, each a :class:`CoreMLTensor`): Core
ML has no rank-0 inputs, so the scalar ``timestep`` is a ``(1,)`` array, and it has no int64, so ``input_ids`` are
int32. A session adapts the feeds
(:func:`adapt_feeds`), predicts, and returns the outputs under the spec's names as float32
(:func:`outputs_by_spec_name`). Those two functions are plain numpy so that they are tested on any system.

Compute units follow ``BackendOptions.device``: ``auto`` (the default) and ``ALL`` let Core ML choose among CPU,
GPU and Neural Engine; ``CPU`` runs on the CPU only, ``GPU`` on CPU and GPU, ``ANE`` on CPU and Neural Engine.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.errors import UserError
from lcm_export.runtime.backends import BackendOptions, artifact_path
from lcm_export.runtime.manifest import Component, CoreMLTensor

ARTIFACT_FORMAT = "mlpackage"
# BackendOptions.device -> coremltools.ComputeUnit member name.
COMPUTE_UNITS = {
    "CPU": "CPU_ONLY",
    "GPU": "CPU_AND_GPU",
    "ANE": "CPU_AND_NE",
    "NE": "CPU_AND_NE",
    "ALL": "ALL",
    "AUTO": "ALL",
}


# An mlpackage computes at the precision it was converted with (the exporter's compute_precision).
COMPUTE_PRECISIONS = ("auto",)
# MLModel.predict from several threads at once is not documented as safe: the pipeline locks each session.
THREAD_SAFE = False


def check_device(device: str) -> None:
    if device.upper() not in COMPUTE_UNITS:
        raise UserError(f"device '{device}' is not a Core ML compute unit: pick one of {', '.join(COMPUTE_UNITS)}")


def is_available() -> bool:
    return platform.system() == "Darwin" and importlib.util.find_spec("coremltools") is not None


def unavailable_reason() -> str | None:
    """Why this backend cannot run here, for the one-line error (None: only the package is missing)."""
    if platform.system() != "Darwin":
        return (
            f"backend 'coreml' runs Core ML packages on macOS only (this is {platform.system()}): run the bundle "
            "on a Mac, or export with --keep-onnx / --target onnx for this machine"
        )
    return None


def artifact_tensors(component: Component) -> tuple[tuple[CoreMLTensor, ...], tuple[CoreMLTensor, ...]]:
    """The Core ML inputs and outputs recorded in ``component``'s mlpackage artifact (its package details)."""
    details = component.artifacts[ARTIFACT_FORMAT].coreml_details
    return details.inputs, details.outputs


def adapt_feeds(feeds: dict[str, np.ndarray], inputs: tuple[CoreMLTensor, ...]) -> dict[str, np.ndarray]:
    """The spec-shaped ``feeds`` as the Core ML model takes them: its dtypes, names and ranks.

    A rank-0 array becomes ``(1,)`` (Core ML has no scalars); int64 ids become int32 (Core ML has no int64),
    refusing values int32 cannot hold rather than wrapping them.
    """
    adapted: dict[str, np.ndarray] = {}
    for tensor in inputs:
        if tensor.feed_name not in feeds:
            raise UserError(f"Core ML input '{tensor.feed_name}' was not given (got: {', '.join(feeds)})")
        value = np.asarray(feeds[tensor.feed_name])
        target = np.dtype(tensor.dtype)
        if value.dtype.kind in "iu" and target.kind in "iu" and value.size:
            limits = np.iinfo(target)
            if value.min() < limits.min or value.max() > limits.max:
                raise UserError(
                    f"Core ML input '{tensor.feed_name}': values {value.min()}..{value.max()} do not fit {target}"
                )
        if value.ndim == 0 and len(tensor.shape) == 1:
            value = value.reshape(1)
        if not tensor.accepts(value.shape):
            expected = (
                list(tensor.shape)
                if tensor.is_static
                else " x ".join(f"{low}..{high}" for low, high in tensor.bounds or ())
            )
            raise UserError(
                f"Core ML input '{tensor.feed_name}' has shape {list(value.shape)}; this mlpackage was converted for "
                f"{expected}: re-export with --height/--width/--batch (or --dynamic) covering it"
            )
        adapted[tensor.name] = np.ascontiguousarray(value, dtype=target)
    return adapted


def outputs_by_spec_name(
    predictions: dict[str, Any], outputs: tuple[CoreMLTensor, ...], ranks: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Core ML's ``predict`` result renamed to the spec's output names, as float32 numpy arrays.

    ``ranks`` (spec name -> rank) drops the leading ``(1,)`` Core ML adds to a spec's rank-0 output.
    """
    result: dict[str, np.ndarray] = {}
    for tensor in outputs:
        if tensor.name not in predictions:
            raise UserError(
                f"the Core ML model returned no output '{tensor.name}' (it returned: {', '.join(predictions)}): "
                "re-export the bundle"
            )
        value = np.asarray(predictions[tensor.name], dtype=np.float32)
        if ranks is not None and ranks.get(tensor.feed_name) == 0 and value.shape == (1,):
            value = value.reshape(())
        result[tensor.feed_name] = value
    return result


def check_static_shapes(
    component: str, static_shapes: dict[str, tuple[int, ...]] | None, inputs: tuple[CoreMLTensor, ...]
) -> None:
    """Refuse at load, in one line, a call shape the mlpackage cannot take (Core ML cannot recompile it).

    ``static_shapes`` uses the spec's shapes; -1 marks a dim left open (the CFG batch) and is not checked.
    """
    if not static_shapes:
        return
    for tensor in inputs:
        wanted = static_shapes.get(tensor.feed_name)
        if wanted is None:
            continue
        wanted = tuple(wanted) or (1,)  # a spec scalar is a (1,) array in Core ML
        if len(wanted) == len(tensor.shape):  # an open dim (-1) takes the default, which always fits
            wanted = tuple(fixed if size == -1 else size for size, fixed in zip(wanted, tensor.shape, strict=True))
        if not tensor.accepts(wanted):
            accepted = list(tensor.shape) if tensor.bounds is None else [list(pair) for pair in tensor.bounds]
            raise UserError(
                f"{component}: input '{tensor.feed_name}' of shape {list(wanted)} does not fit this mlpackage "
                f"(converted for {accepted}): re-export with shapes covering it"
            )


class CoreMLSession:
    """One mlpackage loaded by Core ML; ``run`` takes and returns arrays under the component spec's names."""

    def __init__(self, path: Path, component: Component, options: BackendOptions) -> None:
        import coremltools

        device = options.device_or("ALL").upper()
        if device not in COMPUTE_UNITS:
            raise UserError(
                f"device '{options.device}' is not a Core ML compute unit: pick one of {', '.join(COMPUTE_UNITS)}"
            )
        self.inputs, self.outputs = artifact_tensors(component)
        self.ranks = {tensor.name: len(tensor.shape) for tensor in component.spec.outputs}
        compute_units = getattr(coremltools.ComputeUnit, COMPUTE_UNITS[device])
        self.model = coremltools.models.MLModel(str(path), compute_units=compute_units)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        predictions = self.model.predict(adapt_feeds(feeds, self.inputs))
        return outputs_by_spec_name(predictions, self.outputs, self.ranks)


def open_session(
    bundle_dir: Path,
    component: Component,
    options: BackendOptions,
    static_shapes: dict[str, tuple[int, ...]] | None = None,
) -> CoreMLSession:
    """Open ``component``'s mlpackage; a one-line :class:`UserError` off macOS, where Core ML cannot predict."""
    if platform.system() != "Darwin":
        raise UserError(
            f"Core ML prediction needs macOS (this is {platform.system() or 'an unknown system'}): run the "
            "mlpackages on a Mac, or export with --keep-onnx and use the onnxruntime or openvino backend"
        )
    if importlib.util.find_spec("coremltools") is None:
        raise UserError("backend 'coreml' is not installed: pip install 'lcm-edge[coreml]'")
    path = artifact_path(bundle_dir, component, ARTIFACT_FORMAT)
    inputs, _ = artifact_tensors(component)
    check_static_shapes(component.spec.name, static_shapes, inputs)
    return CoreMLSession(path, component, options)
