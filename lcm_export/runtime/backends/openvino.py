"""OpenVINO backend: reads the bundle's ONNX directly and compiles it for the device (CPU by default).

OpenVINO's CPU plugin runs bf16 by default on CPUs with AVX-512 BF16/AMX; ``precision="fp32"`` pins f32 for
parity. A compiled-model cache (``cache_dir``) makes a second load fast; a known call shape (``static_shape``)
reshapes the graph to static dims before compiling.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from lcm_export.runtime.backends import BackendOptions, artifact_path
from lcm_export.runtime.manifest import Component

ARTIFACT_FORMAT = "onnx"


def is_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


class OpenVinoSession:
    def __init__(self, path: Path, options: BackendOptions, static_shapes: dict[str, tuple[int, ...]] | None) -> None:
        import openvino

        core = openvino.Core()
        config: dict[str, str] = {"PERFORMANCE_HINT": "LATENCY"}
        if options.precision == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = str(options.threads)
        if options.cache_dir:
            config["CACHE_DIR"] = str(options.cache_dir)
        model = core.read_model(str(path))
        if static_shapes:
            model.reshape({name: list(shape) for name, shape in static_shapes.items() if shape})
        self.compiled = core.compile_model(model, options.device, config)
        self.request = self.compiled.create_infer_request()
        self.output_names = [output.get_any_name() for output in self.compiled.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer(feeds, share_inputs=True)
        return {
            name: np.asarray(results[output])
            for name, output in zip(self.output_names, self.compiled.outputs, strict=True)
        }


def open_session(
    bundle_dir: Path,
    component: Component,
    options: BackendOptions,
    static_shapes: dict[str, tuple[int, ...]] | None = None,
) -> OpenVinoSession:
    return OpenVinoSession(artifact_path(bundle_dir, component, ARTIFACT_FORMAT), options, static_shapes)
