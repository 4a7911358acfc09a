"""The torch-free runtime: numpy, ``tokenizers`` and one backend; imports nothing from the exporter or the targets.

``manifest`` is the bundle contract (validated whole at load), ``specs`` the component I/O declarations shared
with the exporter and the targets, ``scheduler`` the numpy LCM step, ``conditioning`` the U-Net inputs built from
the manifest's declaration, ``pipeline`` the loop (variant selection, step observer), ``backends`` one module per
engine (onnxruntime, OpenVINO, TensorRT, Core ML), ``profile`` and ``cli`` (lcm-run).
"""

from __future__ import annotations

from lcm_export.runtime.manifest import FORMAT_VERSION, Manifest, load_manifest
from lcm_export.runtime.pipeline import Pipeline, PipelineOutput

__all__ = ["FORMAT_VERSION", "Manifest", "Pipeline", "PipelineOutput", "load_manifest"]
