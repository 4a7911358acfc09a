"""Core ML backend: runs the bundle's mlpackages with coremltools (prediction needs macOS)."""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

from lcm_export.errors import UserError
from lcm_export.runtime.backends import BackendOptions
from lcm_export.runtime.manifest import Component

ARTIFACT_FORMAT = "mlpackage"


def is_available() -> bool:
    return platform.system() == "Darwin" and importlib.util.find_spec("coremltools") is not None


def open_session(bundle_dir: Path, component: Component, options: BackendOptions, static_shapes=None):
    raise UserError("the Core ML runtime backend is not built yet")
