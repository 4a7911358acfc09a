"""The torch-free runtime: numpy, ``tokenizers`` and one backend. Imports nothing from the exporter."""

from __future__ import annotations

from lcm_export.runtime.manifest import FORMAT_VERSION, Manifest, load_manifest
from lcm_export.runtime.pipeline import Pipeline, PipelineOutput

__all__ = ["FORMAT_VERSION", "Manifest", "Pipeline", "PipelineOutput", "load_manifest"]
