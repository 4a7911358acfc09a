"""Weight-only INT8 for the text encoders: every MatMul/Gemm weight stored as int8 with one float scale per output
channel (symmetric, zero point 0), dequantised in the graph (``DequantizeLinear`` -> the layer); activations stay
float, so no calibration is needed.

This is the recipe optimum-intel's hybrid quantisation gives every diffusion component but the U-Net (NNCF's 8-bit
weight compression). For SDXL's second text encoder (CLIP ViT-bigG, 695M parameters) it is what the memory is: on
the Intel Xeon of stop 35, random weights, 2 threads, one call of 2 x 77 tokens (docs/design-notes.md#calibration-int8):
onnxruntime 2.74 -> 1.72 GB RSS and 0.60 -> 0.72 s (the weights are dequantised at every call), OpenVINO f32
5.36 -> 1.69 GB and 1.42 -> 0.70 s (it keeps them compressed and decompresses in its kernels); the outputs move by
3.2% (relative L2) against the fp32 encoder's, against 0.8% for OpenVINO's own bf16.

The names follow onnxruntime's quantizer (``W_quantized``, ``W_scale``, ``W_zero_point``), so a weight map finds
the int8 weights and their scales as in a QDQ U-Net, and run-time adapters requantise them the same way (127
levels: no ``reduce_range`` here).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.calibration.onnx_qdq import has_external_data

LEVELS = 127  # symmetric int8: [-127, 127], scale = max|W| / 127 per output channel
MIN_ELEMENTS = 256  # smaller weights stay float (a CLIP-L layer has 590k elements)
# With external data, the int8 weights and float tensors from this size go beside the .onnx; every scale and zero
# point stays in it (weight maps read them from the graph itself).
INLINE_BYTES = 1024


def quantize_weights_only(float_path: Path, output_path: Path, external_data: bool | None = None) -> dict[str, Any]:
    """Write ``float_path`` with every float32 2-D MatMul/Gemm weight of at least :data:`MIN_ELEMENTS` elements as
    per-output-channel int8 (see the module docstring) to ``output_path`` (its weights in ``<name>_data`` beside it
    when the float model keeps external data, or when ``external_data``). Returns what the manifest records."""
    import onnx
    from onnx import helper, numpy_helper

    started = time.perf_counter()
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(str(float_path), load_external_data=False)  # parsed once: where its weights are, then them
    if external_data is None:
        external_data = has_external_data(model)
    load_external_data_for_model(model, str(float_path.parent))  # the weights are read and rewritten
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for value in node.input:
            readers[value] = readers.get(value, 0) + 1
    nodes: list[Any] = []
    quantised = float_bytes = int8_bytes = 0
    for node in graph.node:
        weight = node.input[1] if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
        tensor = initializers.get(weight) if weight is not None else None
        if (
            tensor is None
            or readers.get(weight) != 1  # a weight shared by two layers (tied) stays float
            or tensor.data_type != onnx.TensorProto.FLOAT
            or len(tensor.dims) != 2
            or int(np.prod(tensor.dims)) < MIN_ELEMENTS
        ):
            nodes.append(node)
            continue
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        axis = 0 if transposed else 1  # the output channels: W is (K, N) for MatMul, (N, K) for Gemm with transB
        values = numpy_helper.to_array(tensor).astype(np.float32, copy=False)
        peak = np.abs(values).max(axis=1 - axis)
        scale = np.where(peak > 0, peak / LEVELS, 1.0).astype(np.float32)
        shape = (1, -1) if axis == 1 else (-1, 1)
        levels = np.clip(np.rint(values / scale.reshape(shape)), -LEVELS, LEVELS).astype(np.int8)
        graph.initializer.remove(tensor)
        graph.initializer.extend(
            [
                numpy_helper.from_array(levels, f"{weight}_quantized"),
                numpy_helper.from_array(scale, f"{weight}_scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{weight}_zero_point"),
            ]
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{weight}_quantized", f"{weight}_scale", f"{weight}_zero_point"],
                [weight],
                name=f"{weight}_DequantizeLinear",
                axis=axis,
            )
        )
        nodes.append(node)
        quantised += 1
        float_bytes += values.nbytes
        int8_bytes += levels.nbytes
    del graph.node[:]
    graph.node.extend(nodes)  # each DequantizeLinear right before its layer: still in topological order
    if not any(opset.domain in ("", "ai.onnx") and opset.version >= 13 for opset in model.opset_import):
        raise ValueError(f"{float_path}: per-channel DequantizeLinear needs opset 13 or newer")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:  # the int8 weights (and large float tensors) beside it; every scale and zero point inline
        from onnx.external_data_helper import set_external_data

        (output_path.parent / (output_path.name + "_data")).unlink(missing_ok=True)  # onnx appends to it
        for tensor in graph.initializer:
            side = tensor.name.endswith(("_scale", "_zero_point"))
            if tensor.HasField("raw_data") and not side:
                if tensor.name.endswith("_quantized") or len(tensor.raw_data) >= INLINE_BYTES:
                    set_external_data(tensor, output_path.name + "_data")
    onnx.save(model, str(output_path))  # writes the tensors marked external into <name>_data
    return {
        "recipe": {"weights": "int8, symmetric, per output channel", "activations": "float", "levels": LEVELS},
        "quantised_weights": quantised,
        "weight_bytes": {"float32": float_bytes, "int8": int8_bytes},
        "seconds": round(time.perf_counter() - started, 1),
    }
