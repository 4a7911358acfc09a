"""ONNX target (the portable default): the exporter's checked ONNX files are the artifacts, nothing to build.

fp32 by default; fp16 keeps the VAE in fp32 where its config sets ``force_upcast`` (diffusers' rule: SD and SDXL
VAEs overflow in fp16; an fp16-fixed VAE or TAESD runs in fp16). onnxruntime and OpenVINO both run these files, on
any CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lcm_export.runtime.manifest import Component
from lcm_export.targets import BuildRequest, Target


def preflight(options: Mapping[str, Any]) -> None:
    """Nothing beyond the export extra is needed."""


def build(request: BuildRequest) -> dict[str, Component]:
    return dict(request.components)


TARGET = Target(
    name="onnx",
    artifact_format="onnx",
    default_precision="fp32",
    precisions=("fp32", "fp16", "int8"),
    install_hint=None,
    preflight=preflight,
    build=build,
)
