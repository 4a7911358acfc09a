"""onnxruntime backend (CPU provider by default; CUDA where ``onnxruntime-gpu`` is installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from lcm_export.runtime.backends import BackendOptions, artifact_path
from lcm_export.runtime.manifest import Component

ARTIFACT_FORMAT = "onnx"


def is_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


class OnnxRuntimeSession:
    def __init__(self, path: Path, options: BackendOptions) -> None:
        import onnxruntime

        session_options = onnxruntime.SessionOptions()
        session_options.log_severity_level = 3
        session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        providers = ["CPUExecutionProvider"]
        if (
            options.device.upper().startswith("CUDA")
            and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(str(path), session_options, providers=providers)
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))


def open_session(
    bundle_dir: Path,
    component: Component,
    options: BackendOptions,
    static_shapes: dict[str, tuple[int, ...]] | None = None,
) -> OnnxRuntimeSession:
    return OnnxRuntimeSession(artifact_path(bundle_dir, component, ARTIFACT_FORMAT), options)
