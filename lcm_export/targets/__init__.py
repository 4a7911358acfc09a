"""Targets: turn the exporter's checked ONNX files (or torch modules) into the artifacts a device runs.

This package is the one interface between the exporter and the targets. Each target is one module defining
``TARGET``, a :class:`Target`: its name, the artifact format it produces, its default and allowed precisions,
what it needs installed, a ``preflight(options)`` run before any model is loaded, and ``build(request)`` that
returns the bundle's components with the target's artifact variants added. Adding a target is one module and one
line in :data:`TARGET_MODULES`.

Dependencies point one way: targets import the runtime (specs, manifest, backends' shared helpers) and never the
exporter; what a target needs from the export arrives in a :class:`BuildRequest`. Target modules are imported
lazily, so a missing TensorRT or coremltools never breaks the ONNX path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcm_export.errors import ExportError
from lcm_export.runtime.manifest import Component, PipelineInfo
from lcm_export.runtime.specs import ShapeRange

# name -> module defining TARGET. The first is the default.
TARGET_MODULES: dict[str, str] = {
    "onnx": "lcm_export.targets.onnx",
    "tensorrt": "lcm_export.targets.tensorrt",
    "coreml": "lcm_export.targets.coreml",
    "web": "lcm_export.targets.web",
}


@dataclass(frozen=True)
class BuildRequest:
    """Everything a target's ``build`` gets from an export.

    ``components`` hold the checked ONNX variants (``<name>/model.onnx``) in ``staging``, the bundle folder being
    written. ``shape_range`` is the min/opt/max of batch, height and width (and the sequence length) the artifacts
    must take. ``modules`` maps component names to torch modules (forward takes the spec's inputs in order) for
    targets that convert from torch (``Target.needs_modules``); empty otherwise. ``options`` are the target's own
    settings, as ``preflight`` checked them.
    """

    staging: Path
    components: Mapping[str, Component]
    pipeline: PipelineInfo
    shape_range: ShapeRange
    options: Mapping[str, Any] = field(default_factory=dict)
    modules: Mapping[str, Any] = field(default_factory=dict)
    quiet: bool = False
    # per component: the ONNX initializers run-time adapters change (its weight map's), for targets that make
    # them refittable (TensorRT --trt-refit)
    adaptable: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """A build target: what the exporter needs to know to offer it, check it and run it."""

    name: str
    artifact_format: str  # the variant format it adds: "onnx", "tensorrt", "mlpackage"
    default_precision: str
    precisions: tuple[str, ...]
    install_hint: str | None  # pip line when the target needs more than the export extra
    preflight: Callable[[Mapping[str, Any]], None]  # raises a one-line UserError; before any model is loaded
    build: Callable[[BuildRequest], dict[str, Component]]
    needs_modules: bool = False  # build() converts from the torch modules, not from the ONNX files
    # ONNX variants the exporter writes for this target beyond the export's precision: "fp16" also writes the fp16
    # variant of each component the fp16 rule converts (not a VAE with force_upcast), listed after the fp32 one;
    # float variants then stay beside INT8 ones.
    extra_onnx_precisions: tuple[str, ...] = ()
    max_file_bytes: int | None = None  # no ONNX or external data file larger (browsers: protobuf and ArrayBuffer)
    # The manifest's backend_variants (a JavaScript backend -> the precisions its auto tries, in order), each
    # precision kept where the bundle has a variant of it.
    backend_variants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def target_names() -> tuple[str, ...]:
    return tuple(TARGET_MODULES)


def get_target(name: str) -> Target:
    """The target called ``name`` (its module imported now); an unknown name is a one-line error."""
    if name not in TARGET_MODULES:
        raise ExportError(f"--target {name}: pick one of {', '.join(TARGET_MODULES)}")
    return importlib.import_module(TARGET_MODULES[name]).TARGET
