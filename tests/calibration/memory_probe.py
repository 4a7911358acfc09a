"""Run by test_calibration_memory in a process of its own: the RSS one calibration call adds, and its statistics.

``python -m tests.calibration.memory_probe LAYERS CHANNELS SIDE FOLDER ours|default`` builds a chain of LAYERS
Conv+Relu layers on a (1, CHANNELS, SIDE, SIDE) input, augments it as ``calibrate_ranges`` does (onnxruntime's
MinMaxCalibrater), opens the session (``ours``: :func:`calibration_session`; ``default``: onnxruntime's own) and
prints one JSON line: the MB a call adds over the loaded session (peak RSS minus RSS before it) and every range.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def chain_model(layers: int, channels: int, side: int) -> object:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, tensor = [], [], "x"
    for i in range(layers):
        weight = (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("Conv", [tensor, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        tensor = f"r{i}"
    shape = [1, channels, side, side]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(tensor, TensorProto.FLOAT, shape)],
        weights,
    )
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key)) / 1024


def main(layers: int, channels: int, side: int, folder: Path, which: str) -> None:
    import onnx
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    from lcm_export.calibration.onnx_qdq import calibration_session

    onnx.save(chain_model(layers, channels, side), folder / "chain.onnx")
    calibrator = MinMaxCalibrater(folder / "chain.onnx", ["Conv"], str(folder / "augmented.onnx"), moving_average=True)
    calibrator.augment_graph()
    calibrator.model = None
    if which == "ours":
        calibrator.infer_session = calibration_session(calibrator.augmented_model_path, calibrator.execution_providers)
    else:
        calibrator.create_inference_session()
    session = calibrator.infer_session
    feeds = {"x": np.random.default_rng(1).standard_normal((1, channels, side, side)).astype(np.float32)}
    before = status_mb("VmRSS")
    outputs = session.run(None, feeds)
    added = status_mb("VmHWM") - before
    names = [output.name for output in session.get_outputs()]
    ranges = {
        name: float(np.asarray(value).ravel()[0])
        for name, value in zip(names, outputs, strict=True)
        if name.endswith(("ReduceMin", "ReduceMax"))
    }
    print(json.dumps({"added_mb": added, "ranges": ranges}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
