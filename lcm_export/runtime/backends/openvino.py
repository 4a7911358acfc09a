"""OpenVINO backend: reads the bundle's ONNX directly and compiles it for the device (CPU by default).

OpenVINO's CPU plugin runs bf16 by default on CPUs with AVX-512 BF16/AMX; ``precision="fp32"`` pins f32 for
parity. A compiled-model cache (``cache_dir``) makes a second load fast; a known call shape (``static_shape``)
reshapes the graph to static dims before compiling.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.runtime.backends import BackendOptions, artifact_path
from lcm_export.runtime.manifest import Component

ARTIFACT_FORMAT = "onnx"


def is_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


class OpenVinoSession:
    def __init__(
        self,
        path: Path,
        options: BackendOptions,
        static_shapes: dict[str, tuple[int, ...]] | None,
        component_name: str = "model",
    ) -> None:
        import openvino

        core = openvino.Core()
        config: dict[str, str] = {"PERFORMANCE_HINT": "LATENCY"}
        if options.precision == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = str(options.threads)
        if options.cache_dir:
            config["CACHE_DIR"] = str(options.cache_dir)
        if options.profiling_dir:
            config["PERF_COUNT"] = "YES"  # per-layer counters, read after every inference
        model = core.read_model(str(path))
        if static_shapes:
            model.reshape({name: list(shape) for name, shape in static_shapes.items() if shape})
        self.compiled = core.compile_model(model, options.device, config)
        self.request = self.compiled.create_infer_request()
        self.layer_profile = (
            LayerProfile(component_name, Path(options.profiling_dir), options.device) if options.profiling_dir else None
        )
        self.output_names = [output.get_any_name() for output in self.compiled.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer(feeds, share_inputs=True)
        if self.layer_profile is not None:
            self.layer_profile.add(self.request.get_profiling_info())
        return {
            name: np.asarray(results[output])
            for name, output in zip(self.output_names, self.compiled.outputs, strict=True)
        }

    def end_profiling(self) -> list[Path]:
        """Write the per-layer profile gathered so far (``profiling_dir``); [] when profiling is off."""
        return [self.layer_profile.write()] if self.layer_profile is not None else []


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
) -> OpenVinoSession:
    path = artifact_path(bundle_dir, component, ARTIFACT_FORMAT)
    return OpenVinoSession(path, options, static_shapes, component.spec.name)
