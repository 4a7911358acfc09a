"""Static INT8 quantisation of an ONNX U-Net into QDQ form (QuantizeLinear/DequantizeLinear around Conv/MatMul/Gemm).

One QDQ file serves every engine that reads ONNX: onnxruntime fuses the pairs into integer kernels, OpenVINO reads
QDQ as its own FakeQuantize (the quantisation NNCF would produce), TensorRT builds INT8 layers from explicit QDQ.
Weights are per output channel, signed 8 bit; activations unsigned 8 bit (MLAS's fast path on AVX2). Each
activation's range is the mean over the recorded U-Net calls of that call's min and max ("mean-minmax", NNCF's
default for per-tensor activations), not the extremes over all calls ("minmax"): the rare extreme calls stretch the
ranges for all. Conv outputs are quantised too (onnxruntime's default): that is what lets onnxruntime fuse a
convolution into one integer kernel (QLinearConv); leaving every Conv/MatMul output float
(``OpTypesToExcludeOutputQuantization``, as NNCF does) is more accurate but more than twice as slow there. MatMul
outputs alone are left float (``float_outputs``): onnxruntime still runs them as integer MatMuls
(MatMulIntegerToFloat) and OpenVINO as u8 FullyConnected layers, more accurate at the same speed. OpenVINO's kernels
need no quantised output to run in 8 bit, so its backend reads this same file with the convolution outputs float as
well (``runtime.backends.openvino.float_layer_outputs``). Measured: docs/design-notes.md#calibration-onnx-qdq.

Weights use 7 of their 8 bits (``reduce_range``, onnxruntime's advice for x86): on a CPU without VNNI (AVX2 only,
e.g. the AMD EPYC machines here, or AVX-512 without VNNI) both onnxruntime's MLAS and OpenVINO's oneDNN multiply u8
activations by s8 weights with ``vpmaddubsw``, whose int16 sum of two products saturates once both are large; with
full-range weights the tiny pipelines' INT8 images fell from 41-42 dB to 27 dB against float on such a CPU. Seven-bit
weights cannot overflow it, run the same kernels at the same speed on every CPU, and cost half a step of weight
precision. TensorRT's recipe keeps the full range (a GPU's integer units do not saturate that way).

What stays float is a rule over the graph's structure (:func:`float_nodes`), not a list of names:

- the first and last convolution (``conv_in`` reads the noisy latents, ``conv_out`` writes the prediction the
  scheduler divides by sqrt(alpha) at t = 999: small relative errors there are amplified the most);
- the time and guidance embedding MLPs (``time_embedding``, ``time_emb_proj``, ``cond_proj``): one row per image,
  no speed to gain, and their outputs shift every ResNet block;
- attention's activation-by-activation products (Q·Kᵀ and softmax·V, MatMuls with no weight): their ranges vary
  with the prompt and the timestep far more than weights do.

The measured effect of each part of the rule is in the calibration tests and the issue's note.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FLOAT_RULES = ("first_last_conv", "embeddings", "attention_products")
CALIBRATIONS = ("minmax", "mean-minmax")
EMBEDDING_MARKERS = ("time_embedding", "time_emb_proj", "cond_proj", "add_embedding")


@dataclass(frozen=True)
class QdqRecipe:
    """How a U-Net is quantised; recorded in the variant's ``produced_by``."""

    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    calibration: str = "mean-minmax"  # or "minmax" (see the module docstring)
    keep_float: tuple[str, ...] = FLOAT_RULES  # which parts of the float rule apply (see the module docstring)
    float_outputs: tuple[str, ...] = ("MatMul",)  # op types whose outputs stay float (see the module docstring)
    symmetric_activations: bool = False  # zero point 0 (TensorRT parses no other)
    # Weights in 7 bits ([-64, 64]): x86 CPUs without VNNI multiply u8 x s8 pairs into saturating int16 sums
    # (vpmaddubsw), which full-range weights overflow (see the module docstring).
    reduce_range: bool = True
    quantize_bias: bool = True  # int32 biases (onnxruntime); TensorRT takes float biases beside int8 weights
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "QDQ",
            "op_types": list(self.op_types),
            "per_channel": self.per_channel,
            "activations": self.activation_type,
            "weights": self.weight_type,
            "calibration": self.calibration,
            "keep_float": list(self.keep_float),
            "float_outputs": list(self.float_outputs),
            "symmetric_activations": self.symmetric_activations,
            "reduce_range": self.reduce_range,
            "quantize_bias": self.quantize_bias,
        }


# The recipe per target: onnxruntime's and OpenVINO's CPU kernels take u8 activations with any zero point (MLAS's
# fast AVX2 path is u8 x s8); TensorRT parses only symmetric (zero point 0) s8 activations.
RECIPES = {
    "onnx": QdqRecipe(),
    # TensorRT: every output quantised, as measured with TensorRT-RTX's builder (float MatMul outputs not measured)
    "tensorrt": QdqRecipe(
        activation_type="int8", symmetric_activations=True, quantize_bias=False, float_outputs=(), reduce_range=False
    ),
}


def float_nodes(model: Any, rules: tuple[str, ...] = FLOAT_RULES) -> list[str]:
    """Names of the Conv/MatMul/Gemm nodes that ``rules`` keep in float (see the module docstring)."""
    weights = {initializer.name for initializer in model.graph.initializer}
    constants = {output for node in model.graph.node if node.op_type == "Constant" for output in node.output}
    convolutions = [node for node in model.graph.node if node.op_type == "Conv"]
    keep: list[str] = []
    if "first_last_conv" in rules and convolutions:
        keep += [convolutions[0].name, convolutions[-1].name]
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        if "embeddings" in rules and any(marker in node.name for marker in EMBEDDING_MARKERS):
            keep.append(node.name)
        elif "attention_products" in rules and not any(name in weights or name in constants for name in node.input):
            keep.append(node.name)
    return list(dict.fromkeys(keep))


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over recorded samples, one in memory at a time.

    ``load(index)`` reads sample ``index``; calibration asks for the count and
    reads the samples range by range (``set_range``).
    """

    def __init__(
        self,
        load: Callable[[int], dict[str, np.ndarray]],
        count: int,
        inputs: list[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.load = load
        self.count = count
        self.inputs = inputs
        self.progress = progress  # (samples read, count), before each sample and at the end
        self.position, self.end = 0, count

    def __len__(self) -> int:
        return self.count

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, self.count)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.progress:
            self.progress(min(self.position, self.end), self.end)
        if self.position >= self.end:
            return None
        sample = self.load(self.position)
        self.position += 1
        # np.require keeps the 0-d timestep 0-d (ascontiguousarray would make it (1,)).
        return {name: np.require(sample[name], dtype=np.float32, requirements="C") for name in self.inputs}


def quantize_qdq(
    float_path: Path,
    output_path: Path,
    load: Callable[[int], dict[str, np.ndarray]],
    count: int,
    recipe: QdqRecipe | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_ranges: Callable[[], None] | None = None,
    ranges: Any | None = None,
) -> dict[str, Any]:
    """Write the QDQ INT8 model of ``float_path`` to ``output_path`` (with ``<name>_data`` when over 2 GB).

    Two phases, so that their memory does not add up: the activation ranges first (:func:`calibrate_ranges`: an
    onnxruntime session of the model with a ReduceMin/ReduceMax after every tensor to quantise), released before
    ``quantize_static`` loads the model again to rewrite it with those ranges. In one call ``quantize_static`` held
    the model, its augmented copy and the calibration session at once (measured: docs/design-notes.md).

    ``ranges``: the activation ranges gathered already (a :class:`RangeRecorder`'s, run in the float loop that
    recorded the samples): the first phase is skipped (``load`` and ``count`` are not read).

    ``progress(done, count)`` follows the samples through the ranges phase; ``on_ranges()`` is called when the
    ranges are known and the rewrite starts. Returns what the manifest records: the recipe, the float nodes, counts
    and the time it took.
    """
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    recipe = recipe or QdqRecipe()
    started = time.perf_counter()
    model = onnx.load(str(float_path), load_external_data=False)
    keep = float_nodes(model, recipe.keep_float)
    inputs = [value.name for value in model.graph.input]
    large = has_external_data(model)
    del model
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    reader = _Reader(load, count, inputs, progress)
    options: dict[str, Any] = {
        "ActivationSymmetric": recipe.symmetric_activations,
        "QuantizeBias": recipe.quantize_bias,
        **({"OpTypesToExcludeOutputQuantization": list(recipe.float_outputs)} if recipe.float_outputs else {}),
        **recipe.extra,
    }
    two_phase = ranges_ahead_supported()
    if ranges is not None and not two_phase:
        raise ValueError("this onnxruntime cannot quantise with ranges gathered ahead (>= 1.23 can)")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization logs advice on the root logger: not the user's to read
    try:
        with tempfile.TemporaryDirectory(prefix="lcm-export-calibration-") as scratch:
            phase: dict[str, Any] = {}
            if two_phase:
                from onnxruntime.quantization.calibrate import save_tensors_data

                ranges_path = Path(scratch) / "ranges.json"
                if ranges is None:
                    ranges = calibrate_ranges(float_path, reader, recipe, large, Path(scratch))
                save_tensors_data(ranges, ranges_path)
                if on_ranges:
                    on_ranges()
                phase = {"calibration_data_reader": None, "calibration_cache_path": str(ranges_path)}
            else:  # older onnxruntime: one call
                phase = {"calibration_data_reader": reader}
                options["CalibMovingAverage"] = recipe.calibration == "mean-minmax"
            quantize_static(
                str(float_path),
                str(output_path),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(recipe.op_types),
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                activation_type=types[recipe.activation_type],
                weight_type=types[recipe.weight_type],
                nodes_to_exclude=keep,
                use_external_data_format=large,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=options,
                **phase,
            )
    finally:
        root.setLevel(level)
    quantized = onnx.load(str(output_path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in quantized.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {
        "recipe": recipe.to_json(),
        "float_nodes": keep,
        "qdq_nodes": counts,
        "seconds": round(time.perf_counter() - started, 1),
    }


def ranges_ahead_supported() -> bool:
    """Whether this onnxruntime's ``quantize_static`` takes ranges computed beforehand (>= 1.23): what lets the
    ranges be gathered apart from the rewrite, in their own phase or in the trajectories' loop."""
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def has_external_data(model: Any) -> bool:
    """Whether an ONNX model (loaded without its external data) keeps weights in files beside it."""
    import onnx

    return any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer)


def calibrate_ranges(float_path: Path, reader: _Reader, recipe: QdqRecipe, large: bool, scratch: Path) -> Any:
    """Activation ranges of every tensor the quantiser will read, over all of ``reader``'s samples
    (onnxruntime's ``TensorsData``): a :class:`RangeRecorder` run on each sample in turn."""
    with RangeRecorder(float_path, recipe, scratch, large) as recorder:
        recorder.measure(reader)
        return recorder.ranges()


class RangeRecorder:
    """The model with a ReduceMin and a ReduceMax after every tensor the quantiser will read, run as a session:
    ``run(feeds)`` returns the model's own outputs and keeps that call's min and max of each tensor (a few numbers
    per tensor), so the ranges can be gathered in the loop that records the trajectories, with no second pass
    over the samples. :meth:`ranges` merges the calls as ``recipe.calibration`` says: "minmax" the extremes over
    all calls, "mean-minmax" their means (NNCF's default for per-tensor activations: one outlying call does not
    stretch the range for all).

    The augmentation and the merge are onnxruntime's own (``MinMaxCalibrater``); its copy of the model is dropped
    as soon as the augmented one is on disk, so the recorder holds one session and nothing else, and the session is
    :func:`calibration_session`'s, which frees each activation once its statistics are taken. The session runs the
    graph unoptimised (a fusion would remove the tensors being measured): its outputs match the optimised float
    session's to float rounding, not bit for bit.
    """

    def __init__(self, float_path: Path, recipe: QdqRecipe, scratch: Path, large: bool | None = None) -> None:
        import gc

        import onnx
        from onnxruntime.quantization.calibrate import MinMaxCalibrater

        if recipe.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration {recipe.calibration!r}: one of {', '.join(CALIBRATIONS)}")
        if large is None:
            large = has_external_data(onnx.load(str(float_path), load_external_data=False))
        calibrator = MinMaxCalibrater(
            Path(float_path),
            list(recipe.op_types),
            str(Path(scratch) / "augmented.onnx"),
            use_external_data_format=large,
            moving_average=recipe.calibration == "mean-minmax",  # with every call in one batch: their mean
        )
        calibrator.augment_graph()
        calibrator.model = None  # on disk now; the recorder reads only the session
        gc.collect()
        calibrator.infer_session = calibration_session(calibrator.augmented_model_path, calibrator.execution_providers)
        self._outputs = [output.name for output in calibrator.infer_session.get_outputs()]
        self._statistics = [name not in calibrator.model_original_outputs for name in self._outputs]
        self._calibrator = calibrator
        self.output_names = [name for name in self._outputs if name in calibrator.model_original_outputs]
        self.input_names = frozenset(value.name for value in calibrator.infer_session.get_inputs())

    @property
    def calls(self) -> int:
        """Calls whose statistics are kept."""
        return len(self._calibrator.intermediate_outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._calibrator.infer_session.run(None, feeds)
        statistics = [value if added else None for value, added in zip(values, self._statistics, strict=True)]
        self._calibrator.intermediate_outputs.append(statistics)  # as MinMaxCalibrater.collect_data keeps them
        named = zip(self._outputs, values, self._statistics, strict=True)
        return {name: value for name, value, added in named if not added}

    def measure(self, reader: _Reader) -> None:
        """Run every sample of ``reader`` (its progress follows them)."""
        reader.set_range(0, len(reader))
        while (feeds := reader.get_next()) is not None:
            self.run(feeds)

    def measure_samples(
        self,
        load: Callable[[int], dict[str, np.ndarray]],
        count: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Forget the calls run so far and run recorded samples ``load(0)`` .. ``load(count - 1)`` instead."""
        self.clear()
        self.measure(_Reader(load, count, sorted(self.input_names), progress))

    def clear(self) -> None:
        """Forget the calls run so far."""
        self._calibrator.clear_collected_data()

    def ranges(self) -> Any:
        """The merged ranges of the calls run so far (onnxruntime's ``TensorsData``)."""
        if not self.calls:
            raise ValueError("no call was run: nothing to calibrate on")
        return self._calibrator.compute_data()

    def close(self) -> None:
        """Release the session (the augmented files stay in the caller's scratch folder)."""
        self._calibrator.infer_session = None
        self._calibrator = None

    def __enter__(self) -> RangeRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        self.close()
        gc.collect()


def calibration_session(augmented_path: str | Path, providers: list[str]) -> Any:
    """The onnxruntime session that runs the augmented model (a ReduceMin and a ReduceMax after every tensor to
    quantise): no graph optimisation (a fusion would remove the tensors being measured), as onnxruntime's own
    calibrator, and nodes run in priority order, which runs each Reduce as soon as its tensor exists.

    onnxruntime's default execution order ran the Reduce nodes late and so kept every calibrated tensor of a call
    alive at once: one SD1.5-shaped U-Net call peaked at 5.34 GB RSS at 256 px against 3.55 GB in priority order
    (3.60 GB for the plain model), about 20 GB at 512 px against 4.70 GB, and ran 1.5x slower
    (docs/design-notes.md#calibration-memory).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED
    return onnxruntime.InferenceSession(str(augmented_path), sess_options=options, providers=providers)
