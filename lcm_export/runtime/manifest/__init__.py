"""The bundle contract: ``manifest.json`` is the only thing the exporter and the runtime share.

A bundle folder holds the artifacts (ONNX files, engines, mlpackages), the tokenizer, the scheduler config, an
optimum-style ``model_index.json`` and ``manifest.json``. The manifest carries a format version, every component's
I/O (names, dtypes, symbolic shapes), its artifacts per format, precision and target, the LCM scheduler tables
computed at export, the tokenizer settings, the VAE factors read from the model, provenance, and every file's size
and sha256. :func:`load_manifest` validates all of it and verifies the hashes before anything is run.

``manifest.json`` is untrusted input, so it is validated whole, here at the border, and the runtime trusts it
inside. Every field is typed (a bool is not an integer, nor is 2.0; an integer is accepted where a number is, as
JSON writers may drop the ``.0``), enums and ranges are checked, and the parts are checked against each other:

- the components the runtime runs take exactly the tensors it feeds and give the ones it reads, with the shapes
  the pipeline implies (latent channels, ``timestep_cond`` exactly when ``time_cond_proj_dim`` is set), and every
  float tensor has the dtype of its artifacts' precision;
- the scheduler tables are LCM tables: one per step count 1..N, timesteps strictly decreasing in
  [0, num_train_timesteps), values in their ranges, sqrt_alpha² + sqrt_beta² = 1 and c_skip + c_out² = 1
  (diffusers' boundary condition: c_skip = σ²/(τ² + σ²), c_out = τ/√(τ² + σ²)), each next-step column equal to
  the next row, and every value a function of the timestep alone (equal across tables, monotonic in t);
- every path is relative, POSIX and stays inside the bundle, also after following symlinks; every artifact and
  tokenizer file is listed in ``files`` (for a folder artifact such as an mlpackage, every file inside), so no
  file is used without its sha256 check.

Any problem raises one :class:`BundleError` line naming the field, e.g. ``BUNDLE 'x': manifest.json field
pipeline.vae_scale_factor must be an integer from 1 to 64 (got "8"): re-export the bundle``.

Unknown keys are ignored (forward compatibility: a newer exporter may add information this runtime does not need;
a change of meaning bumps ``format_version``). Unknown component names, enum values and shape symbols are rejected:
this runtime would not know what to do with them. ``pipeline.default_guidance_scale`` is the one field a bundle
may lack (bundles written before it existed): it then defaults to :data:`DEFAULT_GUIDANCE_SCALE` of the guidance.

The package is split by job: :mod:`.vocabulary` (the format's fixed values), :mod:`.model` (the parts, each
reading its own fields), :mod:`.tables` (the LCM scheduler tables), :mod:`.checks` (the parts against each
other), :mod:`.upgrade` (format 1 read as format 2), :mod:`.document` (the whole :class:`Manifest`),
:mod:`.details` (the typed details a target records for its backend: TensorRT engines, Core ML packages),
:mod:`.files` (sizes, hashes, paths through symlinks) and :mod:`.load` (:func:`load_manifest`). Every name is
importable from here.
"""

from __future__ import annotations

from lcm_export.runtime.manifest.checks import TIMESTEP_SHAPES
from lcm_export.runtime.manifest.control import (
    CONTROLNET_COMPONENT,
    ControlNetInfo,
    ControlNetModelInfo,
    controlnet_component_name,
)
from lcm_export.runtime.manifest.details import (
    COMPUTE_CAPABILITY,
    DEFAULT_ENGINE_VAE_SCALE_FACTOR,
    OPTIMIZATION_LEVELS,
    TENSORRT_DTYPES,
    TENSORRT_FLAVORS,
    CoreMLPackageDetails,
    CoreMLTensor,
    IOTensor,
    TensorRTEngineDetails,
    parse_compute_capability,
)
from lcm_export.runtime.manifest.document import Manifest
from lcm_export.runtime.manifest.files import check_bundle_paths, file_entry, sha256_file, verify_files
from lcm_export.runtime.manifest.load import load_manifest
from lcm_export.runtime.manifest.model import (
    Artifact,
    Component,
    Conditioning,
    FileEntry,
    PipelineInfo,
    TextEncoderInfo,
    TokenizerInfo,
    as_bundle_path,
)
from lcm_export.runtime.manifest.tables import SchedulerInfo, StepTable, strength_key
from lcm_export.runtime.manifest.upgrade import upgrade_format_1
from lcm_export.runtime.manifest.vocabulary import (
    ARTIFACT_SUFFIXES,
    COMPONENT_NAME,
    COMPONENT_NAMES,
    CONDITIONING_SOURCES,
    DEFAULT_GUIDANCE_SCALE,
    EMPTY_NEGATIVE_MODES,
    EXPORT_PRECISIONS,
    FAMILIES,
    FAMILY_TEXT_ENCODERS,
    FLOAT_DTYPES,
    FOLDER_FORMATS,
    FORMAT_NAME,
    FORMAT_VERSION,
    GUIDANCE_MODES,
    HASH_CHUNK,
    MANIFEST_NAME,
    MAX_CHANNELS,
    MAX_GUIDANCE_SCALE,
    MAX_IMAGE_SIDE,
    MAX_SCHEDULER_VALUE,
    MAX_SCHEDULES,
    MAX_SEQUENCE,
    MAX_TOKEN_ID,
    MAX_TRAIN_TIMESTEPS,
    MAX_VAE_FACTOR,
    MAX_VAE_SCALE_FACTOR,
    PRECISION_DTYPES,
    PRECISIONS,
    PREDICTION_TYPES,
    READABLE_VERSIONS,
    RUNTIME_COMPONENTS,
    SHA256_HEX,
    STEP_COUNT,
    STRENGTH_KEY,
    TABLE_TOLERANCE,
    TARGET_FORMATS,
    TARGETS,
    TOKENIZER_FILE,
    VAE_KINDS,
    VARIANT_NAME,
    WINDOWS_DRIVE,
)
from lcm_export.runtime.specs import ManifestFieldError

__all__ = [
    "ARTIFACT_SUFFIXES",
    "COMPONENT_NAME",
    "COMPONENT_NAMES",
    "COMPUTE_CAPABILITY",
    "CONDITIONING_SOURCES",
    "CONTROLNET_COMPONENT",
    "DEFAULT_ENGINE_VAE_SCALE_FACTOR",
    "DEFAULT_GUIDANCE_SCALE",
    "EMPTY_NEGATIVE_MODES",
    "EXPORT_PRECISIONS",
    "FAMILIES",
    "FAMILY_TEXT_ENCODERS",
    "FLOAT_DTYPES",
    "FOLDER_FORMATS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GUIDANCE_MODES",
    "HASH_CHUNK",
    "MANIFEST_NAME",
    "MAX_CHANNELS",
    "MAX_GUIDANCE_SCALE",
    "MAX_IMAGE_SIDE",
    "MAX_SCHEDULER_VALUE",
    "MAX_SCHEDULES",
    "MAX_SEQUENCE",
    "MAX_TOKEN_ID",
    "MAX_TRAIN_TIMESTEPS",
    "MAX_VAE_FACTOR",
    "MAX_VAE_SCALE_FACTOR",
    "OPTIMIZATION_LEVELS",
    "PRECISIONS",
    "PRECISION_DTYPES",
    "PREDICTION_TYPES",
    "READABLE_VERSIONS",
    "RUNTIME_COMPONENTS",
    "SHA256_HEX",
    "STEP_COUNT",
    "STRENGTH_KEY",
    "TABLE_TOLERANCE",
    "TARGETS",
    "TARGET_FORMATS",
    "TENSORRT_DTYPES",
    "TENSORRT_FLAVORS",
    "TIMESTEP_SHAPES",
    "TOKENIZER_FILE",
    "VAE_KINDS",
    "VARIANT_NAME",
    "WINDOWS_DRIVE",
    "Artifact",
    "Component",
    "Conditioning",
    "ControlNetInfo",
    "ControlNetModelInfo",
    "CoreMLPackageDetails",
    "CoreMLTensor",
    "FileEntry",
    "IOTensor",
    "Manifest",
    "ManifestFieldError",
    "PipelineInfo",
    "SchedulerInfo",
    "StepTable",
    "TensorRTEngineDetails",
    "TextEncoderInfo",
    "TokenizerInfo",
    "as_bundle_path",
    "check_bundle_paths",
    "controlnet_component_name",
    "file_entry",
    "load_manifest",
    "parse_compute_capability",
    "sha256_file",
    "strength_key",
    "upgrade_format_1",
    "verify_files",
]
