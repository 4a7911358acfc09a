"""TensorRT backend (standard TensorRT or TensorRT for RTX): runs the bundle's serialized engines on a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lcm_export.errors import UserError
from lcm_export.runtime.backends import BackendOptions
from lcm_export.runtime.manifest import Component

ARTIFACT_FORMAT = "tensorrt"


def is_available() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorrt", "tensorrt_rtx_bindings"))


def open_session(bundle_dir: Path, component: Component, options: BackendOptions, static_shapes=None):
    raise UserError("the TensorRT runtime backend is not built yet")
