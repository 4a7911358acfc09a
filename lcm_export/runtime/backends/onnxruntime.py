"""onnxruntime backend (CPU provider by default; CUDA where ``onnxruntime-gpu`` is installed)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np

from lcm_export.runtime.backends import BackendOptions, artifact_path
from lcm_export.runtime.manifest import Component

ARTIFACT_FORMAT = "onnx"


def is_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


class OnnxRuntimeSession:
    def __init__(self, path: Path, options: BackendOptions, name: str = "model") -> None:
        import onnxruntime

        session_options = onnxruntime.SessionOptions()
        session_options.log_severity_level = 3
        session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        self.profiling_dir = Path(options.profiling_dir) if options.profiling_dir else None
        if self.profiling_dir is not None:
            # onnxruntime's own profiler: a Chrome-trace JSON of every node run, written by end_profiling().
            self.profiling_dir.mkdir(parents=True, exist_ok=True)
            session_options.enable_profiling = True
            session_options.profile_file_prefix = str(self.profiling_dir / f"onnxruntime_{name}")
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

    def end_profiling(self) -> list[Path]:
        """Stop the profiler and return its trace (in ``profiling_dir``); [] when profiling is off or ended."""
        if self.profiling_dir is None:
            return []
        written = self.session.end_profiling()  # "" once ended
        if not written:
            return []
        path = Path(written)
        if path.resolve().parent != self.profiling_dir.resolve():
            path = Path(shutil.move(str(path), str(self.profiling_dir / path.name)))
        return [path]


def open_session(
    bundle_dir: Path,
    component: Component,
    options: BackendOptions,
    static_shapes: dict[str, tuple[int, ...]] | None = None,
) -> OnnxRuntimeSession:
    return OnnxRuntimeSession(artifact_path(bundle_dir, component, ARTIFACT_FORMAT), options, component.spec.name)
