"""Web target: an ONNX bundle holding the variants onnxruntime-web's backends want, every file under 2 GB.

Per component: fp32 (the reference, and what the Python runtime's ``auto`` runs), fp16 where the ONNX target's
fp16 rule converts it (text encoders and U-Net; not a VAE whose config sets ``force_upcast``) for WebGPU, and with
``--precision int8`` the INT8 U-Net for WASM (the float variants stay beside it). The manifest's
``backend_variants`` tells the JavaScript runtime which precision ``auto`` runs on each backend. Weights go to
external data files (``model.onnx_data``, ``model.onnx_data_2``, ...) of at most ``MAX_FILE_BYTES`` each: Chrome
holds at most about 2 GB in one ArrayBuffer and protobuf at most 2 GB in one file (onnxruntime docs, "Working with
Large Models"); onnxruntime-web reads them through the session option ``externalData``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lcm_export.runtime.manifest import Component
from lcm_export.targets import BuildRequest, Target

MAX_FILE_BYTES = 1_900_000_000  # below 2 GB (2**31 bytes) with room for the protobuf's own header
# What auto tries on each browser backend, in order (the JS runtime leaves fp16 out on an adapter without shader-f16;
# WebGPU's INT8 QDQ images were measured 0.26 off the CPU's: WebGPU never runs the INT8 U-Net by preference).
BACKEND_VARIANTS = {"webgpu": ("fp16", "fp32"), "wasm": ("int8", "fp32")}


def preflight(options: Mapping[str, Any]) -> None:
    """Nothing beyond the export extra is needed."""


def build(request: BuildRequest) -> dict[str, Component]:
    return dict(request.components)  # the exporter wrote every variant: nothing to build


TARGET = Target(
    name="web",
    artifact_format="onnx",
    default_precision="fp32",
    precisions=("fp32", "int8"),
    install_hint=None,
    preflight=preflight,
    build=build,
    extra_onnx_precisions=("fp16",),
    max_file_bytes=MAX_FILE_BYTES,
    backend_variants=BACKEND_VARIANTS,
)
