"""The format-1 upgrade: a format-1 manifest read as format 2, in memory, before it is validated.

It only reshapes (artifacts into variants, float I/O into float32 plus each variant's ``io_dtype``, SD's implied
conditioning made explicit); whatever is malformed is left for the format-2 validation to name.
"""

from __future__ import annotations

from typing import Any

from lcm_export.runtime.manifest.vocabulary import FLOAT_DTYPES, FOLDER_FORMATS


def upgrade_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest as format 2 (in memory; the bundle's files and hashes are untouched).

    Format 1 had one artifact per format (``artifacts: {format: artifact}``), float tensors in the artifacts'
    dtype, no declared conditioning (SD's was implied) and tables keyed by step count only. Each artifact becomes
    the variant named by its precision, made of its file (and external data) or, for a folder, the files under it;
    the spec's float tensors become float32 with the artifact's dtype as the variant's ``io_dtype``. Whatever is
    malformed is left for the format-2 validation to name.
    """
    upgraded = dict(data)
    files = data.get("files")
    listed = [entry.get("path") for entry in files if isinstance(entry, dict)] if isinstance(files, list) else []
    components = data.get("components")
    if isinstance(components, dict):
        upgraded["components"] = {}
        for name, entry in components.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("artifacts"), dict):
                upgraded["components"][name] = entry
                continue
            entry = dict(entry)
            tensors = [t for key in ("inputs", "outputs") if isinstance(entry.get(key), list) for t in entry[key]]
            float_dtypes = [t.get("dtype") for t in tensors if isinstance(t, dict)]
            io_dtype = "float16" if "float16" in float_dtypes else "float32"
            for key in ("inputs", "outputs"):
                if isinstance(entry.get(key), list):
                    entry[key] = [
                        {**t, "dtype": "float32"} if isinstance(t, dict) and t.get("dtype") in FLOAT_DTYPES else t
                        for t in entry[key]
                    ]
            variants = []
            for artifact_format, artifact in entry.pop("artifacts").items():
                if not isinstance(artifact, dict):
                    variants.append(artifact)
                    continue
                path = artifact.get("path")
                if artifact_format in FOLDER_FORMATS and isinstance(path, str):
                    files = [p for p in listed if isinstance(p, str) and p.startswith(f"{path}/")] or [path]
                else:
                    files = [p for p in (path, f"{path}_data") if p in listed] or [path]
                variants.append(
                    {
                        **artifact,
                        "name": artifact.get("precision"),
                        "io_dtype": io_dtype,
                        "files": files,
                        "produced_by": {"tool": "lcm-export (bundle format 1)"},
                    }
                )
            entry["variants"] = variants
            upgraded["components"][name] = entry
    pipeline = data.get("pipeline")
    if isinstance(pipeline, dict):
        inputs = {"encoder_hidden_states": "text_hidden_states"}
        if pipeline.get("time_cond_proj_dim") is not None:
            inputs["timestep_cond"] = "guidance_embedding"
        upgraded["conditioning"] = {
            "text_encoders": [
                {"component": "text_encoder", "tokenizer": "tokenizer", "hidden_state": "last_hidden_state"}
            ],
            "unet_inputs": inputs,
            "empty_negative": "encode",
        }
    return upgraded
