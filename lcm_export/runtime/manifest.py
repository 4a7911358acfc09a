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
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcm_export.errors import BundleError
from lcm_export.runtime.cache import cache_root
from lcm_export.runtime.specs import (
    MAX_DIM,
    TENSOR_NAME,
    TENSOR_NAME_MEANING,
    ComponentSpec,
    Fields,
    ManifestFieldError,
    ShapeRange,
    TensorSpec,
    as_float,
    as_int,
    as_list,
    as_str,
    describe,
    field_path,
)

FORMAT_NAME = "lcm-export-bundle"
FORMAT_VERSION = 2  # 2: per-component artifact variants, declared conditioning, schedules keyed by strength
READABLE_VERSIONS = (1, 2)  # a format-1 manifest is upgraded on read (upgrade_format_1)
MANIFEST_NAME = "manifest.json"
HASH_CHUNK = 8 * 1024 * 1024

# -- the contract's vocabulary ------------------------------------------------------------------------------------

TARGETS = ("onnx", "tensorrt", "coreml")
TARGET_FORMATS = {"onnx": "onnx", "tensorrt": "tensorrt", "coreml": "mlpackage"}  # target -> the format it runs
ARTIFACT_SUFFIXES = {"onnx": ".onnx", "tensorrt": ".plan", "mlpackage": ".mlpackage"}
FOLDER_FORMATS = ("mlpackage",)  # artifacts that are folders: every file inside must be listed in ``files``
PRECISIONS = ("fp32", "fp16", "int8")  # what a variant stores (int8: quantised weights and activations)
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")  # what an export may be asked for (manifest "precision")
# The float I/O dtype a variant of each precision takes by default (quantised graphs keep float32 I/O).
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "float32"}
VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # e.g. fp32, fp16, int8-qdq
# Where the U-Net's conditioning inputs come from (runtime/conditioning.py builds each):
CONDITIONING_SOURCES = ("text_hidden_states", "pooled_text", "guidance_embedding", "size_ids")
EMPTY_NEGATIVE_MODES = ("encode", "zeros")  # SD encodes "", SDXL zeroes it (force_zeros_for_empty_prompt)
FLOAT_DTYPES = ("float32", "float16")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
GUIDANCE_MODES = ("embedding", "cfg")
# What a call without guidance_scale uses: diffusers' LatentConsistencyModelPipeline default for the w-embedding;
# 1.0 (no unconditional pass) for LCM-LoRA with classifier-free guidance, whose documented range is 1-2.
DEFAULT_GUIDANCE_SCALE = {"embedding": 8.5, "cfg": 1.0}
MAX_GUIDANCE_SCALE = 50.0
VAE_KINDS = ("autoencoder_kl", "autoencoder_tiny")
# The (text encoder, tokenizer) pairs of each model family, in the order their hidden states are concatenated:
# SD 1.x/2.x one CLIP, SDXL (and SSD-1B) CLIP-L then OpenCLIP-bigG.
FAMILY_TEXT_ENCODERS = {
    "sd": (("text_encoder", "tokenizer"),),
    "sdxl": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
}
FAMILIES = tuple(FAMILY_TEXT_ENCODERS)
RUNTIME_COMPONENTS = ("text_encoder", "unet", "vae_decoder")  # what Pipeline runs (and the declared encoders)
COMPONENT_NAMES = (*RUNTIME_COMPONENTS, "text_encoder_2", "vae_encoder")
TOKENIZER_FILE = "tokenizer.json"  # the ``tokenizers`` library's format

# Ranges: generous bounds on what real models have, tight enough that no value overflows the runtime.
MAX_IMAGE_SIDE = 16384
MAX_VAE_SCALE_FACTOR = 64
MAX_CHANNELS = 65536
MAX_SEQUENCE = 8192
MAX_TOKEN_ID = 2**31 - 1
MAX_TRAIN_TIMESTEPS = 100_000
MAX_SCHEDULES = 1000  # step counts with a table (the exporter's --max-steps limit)
MAX_VAE_FACTOR = 100.0  # |vae_scaling_factor| and |vae_shift_factor|: SD 0.18215, SDXL 0.13025, SD3 1.5305
MAX_SCHEDULER_VALUE = 1e4  # init_noise_sigma, clip_sample_range, sample_max_value
TABLE_TOLERANCE = 1e-5  # the identities hold to float32 rounding (~3e-7)

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
COMPONENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")
STEP_COUNT = re.compile(r"[1-9][0-9]{0,3}")  # a table key: "1" .. "1000"
# A partial-strength (img2img) table key: "4@0.5" is 4 steps at strength 0.5.
STRENGTH_KEY = re.compile(r"([1-9][0-9]{0,3})@(0\.[0-9]{1,6})")
COMPUTE_CAPABILITY = re.compile(r"(?:[sS][mM]_?)?(?:\d{1,2}\.\d|\d{2,3})")  # what the TensorRT backend parses


def as_bundle_path(value: Any, where: str) -> str:
    """A path inside the bundle as the exporter writes it: relative, "/"-separated, no empty, "." or ".." part.

    Whether it stays inside after following symlinks needs the folder: :func:`check_bundle_paths`.
    """
    text = as_str(value, where, meaning="a path relative to the bundle folder")
    if not text or len(text) > 4096:
        problem = "must be a path relative to the bundle folder"
    elif text.startswith("/") or WINDOWS_DRIVE.match(text):
        problem = "must be relative to the bundle folder, not absolute"
    elif "\\" in text:
        problem = "must use / as its separator"
    elif any(ord(character) < 32 or character == "\x7f" for character in text):
        problem = "must not contain control characters"
    elif any(part in ("", ".", "..") for part in text.split("/")):
        problem = "must stay inside the bundle folder: no '..', '.' or empty parts"
    else:
        return text
    raise ManifestFieldError(where, f"{problem} (got {describe(text)})")


def _same_json(first: Any, second: Any) -> bool:
    """Equal as JSON values: 1 == 1.0, but true is not 1."""
    return first == second and isinstance(first, bool) == isinstance(second, bool)


# -- the manifest's parts -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the bundle, POSIX separators
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Any, where: str) -> FileEntry:
        fields = Fields.of(data, where)
        path = as_bundle_path(fields.get("path"), fields.path("path"))
        if path == MANIFEST_NAME:
            raise ManifestFieldError(fields.path("path"), f"must not be {MANIFEST_NAME} (it cannot hold its own hash)")
        return cls(
            path,
            fields.integer("size", minimum=0),
            fields.string("sha256", pattern=SHA256_HEX, meaning="64 lowercase hexadecimal digits"),
        )


@dataclass(frozen=True)
class Artifact:
    """One variant of a component: a runnable form in one ``format`` ("onnx", "tensorrt", "mlpackage") and one
    ``precision``, named (``fp32``, ``fp16``, ``int8-qdq``, ...; unique per format) so several sit side by side.

    ``io_dtype`` is the dtype of its float inputs and outputs (the component's spec gives them as float32);
    ``files`` are the bundle files it is made of (hashed in the manifest's ``files``); ``produced_by`` records what
    made it (tool, versions, recipe); ``details`` are the format's own (engine profiles, Core ML I/O, ...).
    """

    format: str
    path: str
    precision: str
    details: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # defaults to the precision
    io_dtype: str = ""  # defaults to PRECISION_DTYPES[precision]
    files: tuple[str, ...] = ()
    produced_by: dict[str, Any] = field(default_factory=dict)
    # The sha256 of each of ``files`` once the variant is resolved against a manifest (not written): cache keys.
    digests: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.precision)
        if not self.io_dtype:
            object.__setattr__(self, "io_dtype", PRECISION_DTYPES.get(self.precision, "float32"))
        if not self.files:
            object.__setattr__(self, "files", (self.path,))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "precision": self.precision,
            "io_dtype": self.io_dtype,
            "path": self.path,
            "files": list(self.files),
            "produced_by": self.produced_by,
            **self.details,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> Artifact:
        """Name, format, path (ending in the format's suffix), precision, I/O dtype, files and producer; the
        other keys are the details."""
        fields = Fields.of(data, where)
        artifact_format = fields.string("format", choices=tuple(ARTIFACT_SUFFIXES))
        path = as_bundle_path(fields.get("path"), fields.path("path"))
        suffix = ARTIFACT_SUFFIXES[artifact_format]
        if not path.endswith(suffix) or path.rsplit("/", 1)[-1] == suffix:
            raise ManifestFieldError(
                fields.path("path"), f"must name a {suffix} {artifact_format} artifact (got {describe(path)})"
            )
        precision = fields.string("precision", choices=PRECISIONS)
        name = fields.string("name", pattern=VARIANT_NAME, meaning="a lowercase name such as fp16 or int8-qdq")
        io_dtype = fields.string("io_dtype", choices=FLOAT_DTYPES)
        files = tuple(as_bundle_path(value, at) for at, value in fields.array("files", min_length=1))
        if len(set(files)) != len(files):
            raise ManifestFieldError(fields.path("files"), "repeats a path")
        produced_by = fields.object("produced_by", default={}).data
        known = ("name", "format", "path", "precision", "io_dtype", "files", "produced_by")
        details = {key: value for key, value in fields.data.items() if key not in known}
        return cls(artifact_format, path, precision, details, name, io_dtype, files, produced_by)


@dataclass(frozen=True)
class Component:
    """A component's spec (float tensors as float32: the model's logical I/O) and its variants, in the
    exporter's order of preference, plus the export's validation report."""

    spec: ComponentSpec
    variants: tuple[Artifact, ...]
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def artifacts(self) -> dict[str, Artifact]:
        """format -> the preferred (first listed) variant of that format."""
        preferred: dict[str, Artifact] = {}
        for variant in self.variants:
            preferred.setdefault(variant.format, variant)
        return preferred

    def select(self, artifact_format: str, precision: str = "auto") -> Artifact:
        """The variant a backend running ``artifact_format`` uses for ``precision``: the one of that precision (or
        name) where there is one, else the exporter's preferred (first listed) one, e.g. the float text encoder
        of an INT8 bundle. Whether a forced precision ran anywhere is the pipeline's check (see ``Pipeline``)."""
        of_format = [variant for variant in self.variants if variant.format == artifact_format]
        if not of_format:
            raise BundleError(
                f"component '{self.spec.name}' has no {artifact_format} variant in this bundle (it has: "
                f"{', '.join(sorted({v.format for v in self.variants}))}): pick a backend for those, or re-export"
            )
        for variant in of_format:
            if variant.precision == precision or variant.name == precision:
                return variant
        return of_format[0]

    def resolved(self, variant: Artifact, hashes: Mapping[str, str] | None = None) -> Component:
        """This component as one backend session sees it: only ``variant``, I/O in its float dtype, and the
        sha256 of its files from ``hashes`` (path -> sha256, the manifest's ``files``)."""
        digests = tuple(hashes[path] for path in variant.files if path in hashes) if hashes else ()
        chosen = dataclasses.replace(variant, digests=digests)
        return Component(self.spec.with_dtypes(variant.io_dtype), (chosen,), self.validation)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.spec.to_json(),
            "variants": [variant.to_json() for variant in self.variants],
            "validation": self.validation,
        }

    @classmethod
    def from_json(cls, name: str, data: Any, where: str) -> Component:
        """The spec, at least one variant (names unique) and the free-form validation report."""
        fields = Fields.of(data, where)
        spec = ComponentSpec.from_json(name, data, where)
        variants: list[Artifact] = []
        for at, entry in fields.array("variants", min_length=1):
            variant = Artifact.from_json(entry, at)
            if (variant.format, variant.name) in {(other.format, other.name) for other in variants}:
                raise ManifestFieldError(
                    f"{at}.name", f"repeats the {variant.format} variant name {describe(variant.name)}"
                )
            variants.append(variant)
        return cls(spec, tuple(variants), fields.object("validation", default={}).data)


@dataclass(frozen=True)
class TextEncoderInfo:
    """One text encoder of the conditioning: which component, fed by which tokenizer, and which of its outputs
    are the hidden states (concatenated across encoders on the last axis) and the pooled embedding."""

    component: str
    tokenizer: str
    hidden_state: str
    pooled: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TextEncoderInfo:
        fields = Fields.of(data, where)
        name_rule = {"pattern": COMPONENT_NAME, "meaning": "a name of letters, digits and _"}
        return cls(
            component=fields.string("component", **name_rule),
            tokenizer=fields.string("tokenizer", **name_rule),
            hidden_state=fields.string("hidden_state", pattern=TENSOR_NAME, meaning=TENSOR_NAME_MEANING),
            pooled=(
                fields.string("pooled", pattern=TENSOR_NAME, meaning=TENSOR_NAME_MEANING)
                if fields.get("pooled", None) is not None
                else None
            ),
        )


@dataclass(frozen=True)
class Conditioning:
    """How the U-Net is conditioned, declared so the loop builds its feeds without knowing the model family.

    ``unet_inputs`` maps every U-Net input but ``sample`` and ``timestep`` to a source the runtime knows
    (:data:`CONDITIONING_SOURCES`): the text encoders' hidden states, the pooled text embedding, the LCM
    w-embedding, or SDXL's size ids. ``empty_negative`` says how an empty negative prompt is encoded.
    """

    text_encoders: tuple[TextEncoderInfo, ...]
    unet_inputs: dict[str, str]
    empty_negative: str = "encode"
    # The w-embedding's frequencies exp(-k ln(10000) / (half - 1)), k < time_cond_proj_dim // 2, as diffusers
    # computes them in float32 (torch's exp is 1 ulp off numpy's for some k, which w up to ~1e4 magnifies):
    # computed at export so the runtime's embedding is diffusers'. None: computed in numpy (format-1 bundles).
    guidance_frequencies: tuple[float, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "text_encoders": [encoder.to_json() for encoder in self.text_encoders],
            "unet_inputs": dict(self.unet_inputs),
            "empty_negative": self.empty_negative,
            "guidance_frequencies": None if self.guidance_frequencies is None else list(self.guidance_frequencies),
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "conditioning") -> Conditioning:
        fields = Fields.of(data, where)
        encoders = tuple(TextEncoderInfo.from_json(item, at) for at, item in fields.array("text_encoders", 1, 8))
        inputs = fields.object("unet_inputs")
        unet_inputs = {
            name: as_str(value, inputs.path(name), choices=CONDITIONING_SOURCES) for name, value in inputs.data.items()
        }
        frequencies = None
        if fields.get("guidance_frequencies", None) is not None:
            frequencies = tuple(
                as_float(value, at, above=0, maximum=1) for at, value in fields.array("guidance_frequencies", 1)
            )
        return cls(encoders, unet_inputs, fields.string("empty_negative", choices=EMPTY_NEGATIVE_MODES), frequencies)

    @classmethod
    def of_sd(cls, pipeline: PipelineInfo) -> Conditioning:
        """SD 1.x/2.x: one CLIP encoder's last hidden state; the w-embedding where the U-Net takes one."""
        inputs = {"encoder_hidden_states": "text_hidden_states"}
        if pipeline.time_cond_proj_dim is not None:
            inputs["timestep_cond"] = "guidance_embedding"
        return cls((TextEncoderInfo("text_encoder", "tokenizer", "last_hidden_state"),), inputs, "encode")


# Ranges of the table columns (diffusers' LCMScheduler): alpha_bar_t in (0, 1); c_skip(t) > 0 and c_out(t) in
# [0, 1] for the boundary condition above.
_TABLE_RANGES: dict[str, dict[str, float]] = {
    "c_skip": {"above": 0.0, "maximum": 1.0},
    "c_out": {"minimum": 0.0, "maximum": 1.0},
    "sqrt_alpha_prod": {"above": 0.0, "maximum": 1.0},
    "sqrt_beta_prod": {"minimum": 0.0, "maximum": 1.0},
    "sqrt_alpha_prod_next": {"above": 0.0, "maximum": 1.0},
    "sqrt_beta_prod_next": {"minimum": 0.0, "maximum": 1.0},
}


@dataclass(frozen=True)
class StepTable:
    """Everything one N-step LCM run needs, per step, computed by diffusers' LCMScheduler at export."""

    timesteps: tuple[int, ...]
    c_skip: tuple[float, ...]
    c_out: tuple[float, ...]
    sqrt_alpha_prod: tuple[float, ...]  # sqrt(alpha_bar_t)
    sqrt_beta_prod: tuple[float, ...]  # sqrt(1 - alpha_bar_t)
    sqrt_alpha_prod_next: tuple[float, ...]  # sqrt(alpha_bar) of the next timestep (this one's at the last step)
    sqrt_beta_prod_next: tuple[float, ...]

    def to_json(self) -> dict[str, list]:
        return {name: list(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: Any, where: str = "table", steps: int | None = None) -> StepTable:
        """Read the columns (each ``steps`` long, or as long as ``timesteps``) and check that they are one LCM
        schedule (see the module docstring)."""
        fields = Fields.of(data, where)
        if steps is None:
            steps = len(as_list(fields.get("timesteps"), fields.path("timesteps"), min_length=1))
        columns: dict[str, tuple] = {}
        for name in cls.__dataclass_fields__:
            items = fields.array(name, min_length=steps, max_length=steps)
            if name == "timesteps":
                limit = MAX_TRAIN_TIMESTEPS - 1
                columns[name] = tuple(as_int(value, at, minimum=0, maximum=limit) for at, value in items)
            else:
                columns[name] = tuple(as_float(value, at, **_TABLE_RANGES[name]) for at, value in items)
        table = cls(**columns)
        table._check(fields)
        return table

    def _check(self, fields: Fields) -> None:
        for index in range(len(self.timesteps)):
            if index and self.timesteps[index] >= self.timesteps[index - 1]:
                raise ManifestFieldError(
                    f"{fields.path('timesteps')}[{index}]",
                    f"must be below the timestep before it, {self.timesteps[index - 1]} (timesteps strictly "
                    f"decrease; got {self.timesteps[index]})",
                )
            alpha, beta = self.sqrt_alpha_prod[index], self.sqrt_beta_prod[index]
            if abs(alpha * alpha + beta * beta - 1) > TABLE_TOLERANCE:
                raise ManifestFieldError(
                    f"{fields.path('sqrt_beta_prod')}[{index}]",
                    f"does not go with sqrt_alpha_prod[{index}]: their squares must add up to 1 (got {beta!r} and "
                    f"{alpha!r})",
                )
            c_skip, c_out = self.c_skip[index], self.c_out[index]
            if abs(c_skip + c_out * c_out - 1) > TABLE_TOLERANCE:
                raise ManifestFieldError(
                    f"{fields.path('c_out')}[{index}]",
                    f"does not go with c_skip[{index}]: c_skip + c_out² must be 1 (got {c_out!r} and {c_skip!r})",
                )
            if index + 1 < len(self.timesteps):  # the next-step columns at the last step are not used
                for column in ("sqrt_alpha_prod", "sqrt_beta_prod"):
                    if getattr(self, f"{column}_next")[index] != getattr(self, column)[index + 1]:
                        raise ManifestFieldError(
                            f"{fields.path(column + '_next')}[{index}]",
                            f"must equal {column}[{index + 1}], the next step's (got "
                            f"{getattr(self, column + '_next')[index]!r} and {getattr(self, column)[index + 1]!r})",
                        )


# Scheduler options that the exporter copies from the scheduler config: both copies must agree.
_CONFIG_COPIES = (
    "prediction_type",
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
)


@dataclass(frozen=True)
class SchedulerInfo:
    prediction_type: str  # "epsilon", "v_prediction" or "sample"
    tables: dict[int, StepTable]  # number of steps -> text-to-image table (strength 1)
    init_noise_sigma: float = 1.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    config: dict[str, Any] = field(default_factory=dict)  # the LCMScheduler config, for provenance
    # (steps, strength < 1) -> the table of an image-to-image run at that strength (key "steps@strength")
    partial_tables: dict[tuple[int, float], StepTable] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        skip = ("tables", "partial_tables")
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in skip}
        data["tables"] = {str(steps): table.to_json() for steps, table in sorted(self.tables.items())}
        for (steps, strength), table in sorted(self.partial_tables.items()):
            data["tables"][strength_key(steps, strength)] = table.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "scheduler") -> SchedulerInfo:
        fields = Fields.of(data, where)
        config = fields.object("config")
        num_train_timesteps = config.integer("num_train_timesteps", minimum=1, maximum=MAX_TRAIN_TIMESTEPS)
        tables, partial_tables = _read_tables(fields.object("tables"), num_train_timesteps)
        info = cls(
            prediction_type=fields.string("prediction_type", choices=PREDICTION_TYPES),
            tables=tables,
            partial_tables=partial_tables,
            init_noise_sigma=fields.number("init_noise_sigma", above=0, maximum=MAX_SCHEDULER_VALUE),
            clip_sample=fields.boolean("clip_sample"),
            clip_sample_range=fields.number("clip_sample_range", above=0, maximum=MAX_SCHEDULER_VALUE),
            thresholding=fields.boolean("thresholding"),
            dynamic_thresholding_ratio=fields.number("dynamic_thresholding_ratio", above=0, maximum=1),
            sample_max_value=fields.number("sample_max_value", above=0, maximum=MAX_SCHEDULER_VALUE),
            config=config.data,
        )
        for name in _CONFIG_COPIES:
            value = getattr(info, name)
            if config.has(name) and not _same_json(config.get(name), value):
                raise ManifestFieldError(
                    config.path(name),
                    f"must equal {fields.path(name)}, {describe(value)}, which the runtime uses "
                    f"(got {describe(config.get(name))})",
                )
        return info


def strength_key(steps: int, strength: float) -> str:
    """The ``tables`` key of a table: "4" at strength 1, "4@0.5" for image-to-image (strength to 6 decimals,
    written without trailing zeros: one key per table)."""
    rounded = round(strength, 6)
    if rounded >= 1:
        return str(steps)
    if rounded <= 0:
        raise ValueError(f"strength {strength} rounds to 0: an image-to-image table needs a strength in (0, 1]")
    return f"{steps}@{rounded:.6f}".rstrip("0")


def _read_tables(
    tables: Fields, num_train_timesteps: int
) -> tuple[dict[int, StepTable], dict[tuple[int, float], StepTable]]:
    """One text-to-image table per step count 1..N, any image-to-image tables ("steps@strength"), and across all
    of them every value a function of the timestep alone."""
    present: set[int] = set()
    partial_keys: dict[str, tuple[int, float]] = {}
    for key in tables.data:
        partial = STRENGTH_KEY.fullmatch(key)
        if (
            partial
            and 1 <= int(partial.group(1)) <= MAX_SCHEDULES
            and 0 < float(partial.group(2)) < 1
            and strength_key(int(partial.group(1)), float(partial.group(2))) == key  # one spelling per table
        ):
            partial_keys[key] = (int(partial.group(1)), float(partial.group(2)))
            continue
        if not STEP_COUNT.fullmatch(key) or int(key) > MAX_SCHEDULES:
            raise ManifestFieldError(
                tables.path(key), f"is not a step count from 1 to {MAX_SCHEDULES} (or STEPS@STRENGTH, e.g. 4@0.5)"
            )
        present.add(int(key))
    if not present:
        raise ManifestFieldError(tables.where, "must hold the tables for 1..N steps (it is empty)")
    count = max(present)
    missing = [steps for steps in range(1, count + 1) if steps not in present]
    if missing:
        raise ManifestFieldError(
            tables.path(str(missing[0])), f"is missing: the tables cover every step count from 1 to N (here {count})"
        )
    result: dict[int, StepTable] = {}
    partial_result: dict[tuple[int, float], StepTable] = {}
    rows: dict[int, tuple[tuple[float, ...], str]] = {}  # timestep -> (c_skip, c_out, sqrt_alpha, sqrt_beta), field
    keys = [(str(steps), steps, None) for steps in range(1, count + 1)]
    keys += [(key, steps, strength) for key, (steps, strength) in partial_keys.items()]
    for key, steps, strength in keys:
        where = tables.path(key)
        # An image-to-image table may run fewer steps than asked (diffusers' SD img2img slices the schedule).
        table = StepTable.from_json(tables.get(key), where, steps if strength is None else None)
        if len(table.timesteps) > steps:
            raise ManifestFieldError(
                f"{where}.timesteps", f"has {len(table.timesteps)} steps: a table for {steps} runs at most {steps}"
            )
        for index, timestep in enumerate(table.timesteps):
            at = f"{where}.timesteps[{index}]"
            if timestep >= num_train_timesteps:
                raise ManifestFieldError(
                    at, f"must be below scheduler.config.num_train_timesteps, {num_train_timesteps} (got {timestep})"
                )
            row = (table.c_skip[index], table.c_out[index], table.sqrt_alpha_prod[index], table.sqrt_beta_prod[index])
            if timestep in rows and rows[timestep][0] != row:
                raise ManifestFieldError(
                    at,
                    f"is {timestep} with other c_skip, c_out or sqrt_alpha/beta_prod values than at "
                    f"{rows[timestep][1]} (each is a function of the timestep)",
                )
            rows.setdefault(timestep, (row, at))
        if strength is None:
            result[steps] = table
        else:
            partial_result[(steps, strength)] = table
    # alpha_bar_t and c_skip(t) decrease as t grows (float32 rounding keeps that order, not always strictly).
    ordered = sorted(rows.items())
    for (smaller, (lower, lower_at)), (timestep, (higher, at)) in itertools.pairwise(ordered):
        if higher[0] > lower[0] or higher[2] > lower[2]:
            raise ManifestFieldError(
                at,
                f"is {timestep}, but its c_skip or sqrt_alpha_prod is above the one of the smaller timestep "
                f"{smaller} at {lower_at} (both decrease as the timestep grows)",
            )
    return result, partial_result


@dataclass(frozen=True)
class TokenizerInfo:
    name: str  # "tokenizer" (SDXL adds "tokenizer_2")
    path: str  # tokenizer.json inside the bundle
    max_length: int
    pad_id: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "max_length": self.max_length, "pad_id": self.pad_id}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TokenizerInfo:
        fields = Fields.of(data, where)
        name = fields.string("name", pattern=COMPONENT_NAME, meaning="a name of letters, digits and _")
        path = as_bundle_path(fields.get("path"), fields.path("path"))
        if path.rsplit("/", 1)[-1] != TOKENIZER_FILE:
            raise ManifestFieldError(fields.path("path"), f"must name a {TOKENIZER_FILE} file (got {describe(path)})")
        return cls(
            name,
            path,
            fields.integer("max_length", minimum=1, maximum=MAX_SEQUENCE),
            fields.integer("pad_id", minimum=0, maximum=MAX_TOKEN_ID),
        )


@dataclass(frozen=True)
class PipelineInfo:
    family: str  # "sd" or "sdxl" (FAMILY_TEXT_ENCODERS: which text encoders the conditioning declares)
    guidance: str  # "embedding" (LCM w-embedding as timestep_cond) or "cfg" (classifier-free guidance)
    time_cond_proj_dim: int | None
    latent_channels: int
    vae: str  # "autoencoder_kl" or "autoencoder_tiny"
    vae_scale_factor: int
    vae_scaling_factor: float
    vae_shift_factor: float | None
    spatial_multiple: int
    default_height: int
    default_width: int
    default_guidance_scale: float  # what a call without guidance_scale uses (see DEFAULT_GUIDANCE_SCALE)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: Any, where: str = "pipeline") -> PipelineInfo:
        fields = Fields.of(data, where)
        guidance = fields.string("guidance", choices=GUIDANCE_MODES)
        # The w-embedding's frequencies divide by (dim // 2 - 1), so it needs at least 4 dims.
        time_cond_proj_dim = fields.integer("time_cond_proj_dim", minimum=4, maximum=MAX_CHANNELS, nullable=True)
        if (guidance == "embedding") != (time_cond_proj_dim is not None):
            raise ManifestFieldError(
                fields.path("time_cond_proj_dim"),
                f'must be set exactly when {fields.path("guidance")} is "embedding" (the w-embedding is fed as '
                f"timestep_cond); got {describe(time_cond_proj_dim)} with guidance {describe(guidance)}",
            )
        vae_scale_factor = fields.integer("vae_scale_factor", minimum=1, maximum=MAX_VAE_SCALE_FACTOR)
        spatial_multiple = fields.integer("spatial_multiple", minimum=1, maximum=MAX_IMAGE_SIDE)
        if spatial_multiple % vae_scale_factor:
            raise ManifestFieldError(
                fields.path("spatial_multiple"),
                f"must be a multiple of {fields.path('vae_scale_factor')}, {vae_scale_factor} (got {spatial_multiple})",
            )
        sides: dict[str, int] = {}
        for key in ("default_height", "default_width"):
            sides[key] = fields.integer(key, minimum=1, maximum=MAX_IMAGE_SIDE)
            if sides[key] % spatial_multiple:
                raise ManifestFieldError(
                    fields.path(key), f"must be a multiple of spatial_multiple, {spatial_multiple} (got {sides[key]})"
                )
        return cls(
            family=fields.string("family", choices=FAMILIES),
            guidance=guidance,
            time_cond_proj_dim=time_cond_proj_dim,
            latent_channels=fields.integer("latent_channels", minimum=1, maximum=MAX_CHANNELS),
            vae=fields.string("vae", choices=VAE_KINDS),
            vae_scale_factor=vae_scale_factor,
            vae_scaling_factor=fields.number("vae_scaling_factor", above=0, maximum=MAX_VAE_FACTOR),
            vae_shift_factor=fields.number(
                "vae_shift_factor", minimum=-MAX_VAE_FACTOR, maximum=MAX_VAE_FACTOR, nullable=True
            ),
            spatial_multiple=spatial_multiple,
            default_height=sides["default_height"],
            default_width=sides["default_width"],
            default_guidance_scale=fields.number(
                "default_guidance_scale",
                minimum=0,
                maximum=MAX_GUIDANCE_SCALE,
                default=DEFAULT_GUIDANCE_SCALE[guidance],
            ),
        )


@dataclass(frozen=True)
class Manifest:
    target: str
    precision: str
    pipeline: PipelineInfo
    scheduler: SchedulerInfo
    tokenizers: tuple[TokenizerInfo, ...]
    components: dict[str, Component]
    files: tuple[FileEntry, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    loras: tuple[dict[str, Any], ...] = ()
    format_version: int = FORMAT_VERSION  # as read (a format-1 bundle reads as 1, upgraded in memory)
    conditioning: Conditioning | None = None  # None: SD's (Conditioning.of_sd)

    def __post_init__(self) -> None:
        if self.conditioning is None:
            object.__setattr__(self, "conditioning", Conditioning.of_sd(self.pipeline))

    def to_json(self) -> dict[str, Any]:
        """Always the current format (a bundle read as format 1 is written back as format 2)."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "target": self.target,
            "precision": self.precision,
            "pipeline": self.pipeline.to_json(),
            "conditioning": self.conditioning.to_json(),
            "scheduler": self.scheduler.to_json(),
            "tokenizers": [t.to_json() for t in self.tokenizers],
            "components": {name: c.to_json() for name, c in self.components.items()},
            "loras": list(self.loras),
            "provenance": self.provenance,
            "files": [f.to_json() for f in self.files],
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Read and validate a whole manifest (see the module docstring); raises :class:`ManifestFieldError`.

        What needs the bundle folder (symlinks, the files inside folder artifacts) is :func:`check_bundle_paths`.
        """
        top = Fields.of(data, "")
        top.string("format", choices=(FORMAT_NAME,))
        format_version = top.integer("format_version", minimum=min(READABLE_VERSIONS), maximum=FORMAT_VERSION)
        if format_version == 1:
            if top.has("conditioning"):
                raise ManifestFieldError(
                    top.path("format_version"), "is 1, but the manifest has format 2's conditioning: say 2"
                )
            top = Fields.of(upgrade_format_1(top.data), "")
        target = top.string("target", choices=TARGETS)
        precision = top.string("precision", choices=EXPORT_PRECISIONS)
        pipeline = PipelineInfo.from_json(top.get("pipeline"), top.path("pipeline"))
        conditioning = Conditioning.from_json(top.get("conditioning"), top.path("conditioning"))
        scheduler = SchedulerInfo.from_json(top.get("scheduler"), top.path("scheduler"))
        files = _read_files(top)
        listed = {entry.path for entry in files}
        tokenizers = _read_tokenizers(top, listed)
        _check_conditioning(conditioning, pipeline, tokenizers, top.path("conditioning"))
        components = _read_components(top, pipeline, conditioning, target, listed)
        loras = tuple(_read_lora(item, at).data for at, item in top.array("loras")) if top.has("loras") else ()
        return cls(
            target=target,
            precision=precision,
            pipeline=pipeline,
            scheduler=scheduler,
            tokenizers=tokenizers,
            components=components,
            files=files,
            provenance=top.object("provenance", default={}).data,
            loras=loras,
            format_version=format_version,
            conditioning=conditioning,
        )

    def write(self, bundle_dir: Path) -> None:
        (bundle_dir / MANIFEST_NAME).write_text(json.dumps(self.to_json(), indent=2) + "\n")


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


def _read_files(top: Fields) -> tuple[FileEntry, ...]:
    files: list[FileEntry] = []
    first: dict[str, str] = {}  # path -> field of its first entry
    for at, item in top.array("files", min_length=1):
        entry = FileEntry.from_json(item, at)
        if entry.path in first:
            raise ManifestFieldError(f"{at}.path", f"repeats {first[entry.path]} ({describe(entry.path)})")
        first[entry.path] = f"{at}.path"
        files.append(entry)
    return tuple(files)


def _read_tokenizers(top: Fields, listed: set[str]) -> tuple[TokenizerInfo, ...]:
    tokenizers: list[TokenizerInfo] = []
    for at, item in top.array("tokenizers", min_length=1):
        tokenizer = TokenizerInfo.from_json(item, at)
        if tokenizer.name in {other.name for other in tokenizers}:
            raise ManifestFieldError(f"{at}.name", f"repeats the tokenizer name {describe(tokenizer.name)}")
        if tokenizer.path not in listed:
            raise ManifestFieldError(f"{at}.path", _unlisted(tokenizer.path))
        tokenizers.append(tokenizer)
    return tuple(tokenizers)


def _read_lora(item: Any, where: str) -> Fields:
    """A LoRA record (provenance: what was fused, with which weight, from which file)."""
    fields = Fields.of(item, where)
    fields.string("source")
    fields.number("weight")
    if fields.has("sha256"):
        fields.string("sha256", pattern=SHA256_HEX, meaning="64 lowercase hexadecimal digits")
    return fields


def _unlisted(path: str) -> str:
    return (
        f"names {describe(path)}, which manifest.json files does not list (it would be used without its sha256 check)"
    )


def _read_components(
    top: Fields, pipeline: PipelineInfo, conditioning: Conditioning, target: str, listed: set[str]
) -> dict[str, Component]:
    entries = top.object("components")
    if not entries.data:
        raise ManifestFieldError(entries.where, "must hold at least one component")
    components: dict[str, Component] = {}
    for name, entry in entries.data.items():
        where = entries.path(name)
        if name not in COMPONENT_NAMES:
            raise ManifestFieldError(where, f"is not a component this runtime knows ({', '.join(COMPONENT_NAMES)})")
        declared = [encoder.component for encoder in conditioning.text_encoders]
        if name.startswith("text_encoder") and name not in declared:
            raise ManifestFieldError(
                where, f"is a text encoder the conditioning does not declare ({', '.join(declared)})"
            )
        component = Component.from_json(name, entry, where)
        _check_variants(component, where, pipeline, target, listed)
        _check_io(component, where, pipeline, conditioning)
        components[name] = component
    for name in RUNTIME_COMPONENTS:
        # A bundle exported without a component has no files in its folder; one whose entry was lost has.
        orphans = sorted(path for path in listed if path.startswith(f"{name}/"))
        if name not in components and orphans:
            raise ManifestFieldError(
                entries.path(name), f"is missing although files lists {describe(orphans[0])} of it"
            )
    unet = components.get("unet")
    encoders = [components.get(encoder.component) for encoder in conditioning.text_encoders]
    if unet is not None and all(encoder is not None for encoder in encoders):
        # The hidden states of every encoder, concatenated on the last axis, are what the U-Net attends to.
        hidden = sum(
            _tensor(component.spec, encoder.hidden_state).shape[2]
            for component, encoder in zip(encoders, conditioning.text_encoders, strict=True)
        )
        for input_name, source in conditioning.unet_inputs.items():
            context = _tensor(unet.spec, input_name)
            if source == "text_hidden_states" and context.shape[2] != hidden:
                index = unet.spec.inputs.index(context)
                raise ManifestFieldError(
                    f"{entries.path('unet')}.inputs[{index}].shape[2]",
                    f"must be the text encoders' hidden size, {hidden} (got {context.shape[2]})",
                )
    return components


def _check_conditioning(
    conditioning: Conditioning, pipeline: PipelineInfo, tokenizers: tuple[TokenizerInfo, ...], where: str
) -> None:
    """The declaration names known components and tokenizers, and its sources fit the pipeline."""
    tokenizer_names = {tokenizer.name for tokenizer in tokenizers}
    seen: set[str] = set()
    for index, encoder in enumerate(conditioning.text_encoders):
        at = f"{where}.text_encoders[{index}]"
        if not encoder.component.startswith("text_encoder") or encoder.component not in COMPONENT_NAMES:
            raise ManifestFieldError(
                f"{at}.component", f"is not a text encoder component (got {describe(encoder.component)})"
            )
        if encoder.component in seen:
            raise ManifestFieldError(f"{at}.component", f"repeats {describe(encoder.component)}")
        seen.add(encoder.component)
        if encoder.tokenizer not in tokenizer_names:
            raise ManifestFieldError(
                f"{at}.tokenizer", f"names no tokenizer of this bundle ({', '.join(sorted(tokenizer_names))})"
            )
    declared = tuple((encoder.component, encoder.tokenizer) for encoder in conditioning.text_encoders)
    if declared != FAMILY_TEXT_ENCODERS[pipeline.family]:
        expected = ", ".join(
            f"{component} ({tokenizer})" for component, tokenizer in FAMILY_TEXT_ENCODERS[pipeline.family]
        )
        raise ManifestFieldError(
            "pipeline.family",
            f"is {describe(pipeline.family)}, whose text encoders are {expected}; the conditioning declares "
            + ", ".join(f"{component} ({tokenizer})" for component, tokenizer in declared),
        )
    sources = set(conditioning.unet_inputs.values())
    inputs_at = f"{where}.unet_inputs"
    for name in conditioning.unet_inputs:
        if name in ("sample", "timestep"):
            raise ManifestFieldError(f"{inputs_at}.{name}", "is fed by the loop itself, not by the conditioning")
    if "text_hidden_states" not in sources:
        raise ManifestFieldError(
            inputs_at, "must feed the text encoders' hidden states (text_hidden_states) to an input"
        )
    if ("guidance_embedding" in sources) != (pipeline.time_cond_proj_dim is not None):
        raise ManifestFieldError(
            inputs_at, "must feed guidance_embedding exactly when pipeline.time_cond_proj_dim is set (distilled LCM)"
        )
    frequencies = conditioning.guidance_frequencies
    if frequencies is not None:
        half = (pipeline.time_cond_proj_dim or 0) // 2
        if len(frequencies) != half:
            raise ManifestFieldError(
                f"{where}.guidance_frequencies",
                f"must hold time_cond_proj_dim // 2 = {half} frequencies (got {len(frequencies)})",
            )
    if "pooled_text" in sources and not any(encoder.pooled for encoder in conditioning.text_encoders):
        raise ManifestFieldError(inputs_at, "feeds pooled_text, but no text encoder declares a pooled output")


def _check_variants(component: Component, where: str, pipeline: PipelineInfo, target: str, listed: set[str]) -> None:
    """A variant of the target's format is there (ONNX variants may sit beside it); each variant is inside the
    component's folder and made of files the manifest hashes; the spec's float tensors are float32 (each
    variant's own float dtype is its ``io_dtype``)."""
    name, spec = component.spec.name, component.spec
    runs = TARGET_FORMATS[target]
    if runs not in {variant.format for variant in component.variants}:
        formats = ", ".join(sorted({variant.format for variant in component.variants}))
        raise ManifestFieldError(
            f"{where}.variants", f"has no {runs} variant, which a {target} bundle runs (it has {formats})"
        )
    for index, variant in enumerate(component.variants):
        at = f"{where}.variants[{index}]"
        if variant.format not in (runs, "onnx"):
            allowed = runs if runs == "onnx" else f"{runs}, and onnx"
            raise ManifestFieldError(f"{at}.format", f"is not a format of a {target} bundle ({allowed})")
        if not variant.path.startswith(f"{name}/"):
            raise ManifestFieldError(f"{at}.path", f"must be inside the folder {name}/ (got {describe(variant.path)})")
        for file_index, path in enumerate(variant.files):
            if path not in listed:
                raise ManifestFieldError(f"{at}.files[{file_index}]", _unlisted(path))
            if not (path == variant.path or path.startswith(f"{variant.path}/") or path.startswith(f"{name}/")):
                raise ManifestFieldError(f"{at}.files[{file_index}]", f"must be inside the folder {name}/")
        if variant.format in FOLDER_FORMATS:
            inside = {path for path in listed if path.startswith(f"{variant.path}/")}
            if variant.path in listed or not inside:
                raise ManifestFieldError(f"{at}.path", "names a folder none of whose files manifest.json files lists")
            missing = sorted(inside - set(variant.files))
            if missing:
                raise ManifestFieldError(
                    f"{at}.files", f"must list every file of the folder (not {describe(missing[0])})"
                )
        elif variant.path not in listed:
            raise ManifestFieldError(f"{at}.path", _unlisted(variant.path))
        elif variant.path not in variant.files:
            raise ManifestFieldError(f"{at}.files", f"must include the variant's path {describe(variant.path)}")
        if variant.precision == "fp32" and variant.io_dtype != "float32":
            raise ManifestFieldError(f"{at}.io_dtype", f"must be float32 for an fp32 variant (got {variant.io_dtype})")
        if variant.format == "tensorrt":
            _check_tensorrt_details(variant, spec.with_dtypes(variant.io_dtype), pipeline, at)
        elif variant.format == "mlpackage":
            _check_coreml_details(variant, spec, at)
    for kind, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        for index, tensor in enumerate(tensors):
            if tensor.dtype in FLOAT_DTYPES and tensor.dtype != "float32":
                raise ManifestFieldError(
                    f"{where}.{kind}[{index}].dtype",
                    f"must be float32: the spec gives the model's float tensors as float32, each variant its own "
                    f"io_dtype (got {tensor.dtype})",
                )
    sees_cfg_batch = name == "unet" or name.startswith("text_encoder")
    wanted = 2 if pipeline.guidance == "cfg" and sees_cfg_batch else 1
    if spec.batch_multiplier != wanted:
        raise ManifestFieldError(
            f"{where}.batch_multiplier",
            f"must be {wanted} for {name} with guidance {describe(pipeline.guidance)} (got {spec.batch_multiplier})",
        )


_ANY = 0  # in an expected shape: any positive integer
# The U-Net's timestep: a scalar shared by the batch (bundles exported before per-row timesteps), or one per row.
TIMESTEP_SHAPES: tuple[tuple[int | str, ...], ...] = ((), ("batch",))


def _shape_matches(shape: tuple[int | str, ...], expected: tuple[int | str, ...]) -> bool:
    return len(shape) == len(expected) and all(
        dim == want or (want == _ANY and isinstance(dim, int)) for dim, want in zip(shape, expected, strict=True)
    )


def _expected_io(
    name: str, pipeline: PipelineInfo, conditioning: Conditioning
) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(inputs, outputs) name -> expected shape of what the runtime feeds and reads (``_ANY``: any size).

    The inputs are exactly these; the outputs at least these (the text encoder also gives ``pooler_output``).
    The text encoders' outputs and the U-Net's conditioning inputs follow the conditioning declaration.
    """
    channels = pipeline.latent_channels
    latent = ("batch", channels, "latent_height", "latent_width")
    image = ("batch", _ANY, "image_height", "image_width")
    encoders = [encoder for encoder in conditioning.text_encoders if encoder.component == name]
    if encoders:
        outputs = {encoders[0].hidden_state: ("batch", "sequence", _ANY)}
        if encoders[0].pooled:
            outputs[encoders[0].pooled] = ("batch", _ANY)
        return {"input_ids": ("batch", "sequence")}, outputs
    if name == "unet":
        by_source = {
            "text_hidden_states": ("batch", "sequence", _ANY),
            "pooled_text": ("batch", _ANY),
            "guidance_embedding": ("batch", pipeline.time_cond_proj_dim),
            "size_ids": ("batch", _ANY),
        }
        inputs = {"sample": latent, "timestep": TIMESTEP_SHAPES}
        inputs.update({input_name: by_source[source] for input_name, source in conditioning.unet_inputs.items()})
        return inputs, {"out_sample": latent}
    if name.startswith("text_encoder"):  # a text encoder the conditioning does not use
        return {"input_ids": ("batch", "sequence")}, {}
    if name == "vae_decoder":
        return {"latent_sample": latent}, {"sample": image}
    # vae_encoder: KL's mean and log-variance (2C channels), or the tiny VAE's latents.
    if pipeline.vae == "autoencoder_kl":
        return {"sample": image}, {"latent_parameters": ("batch", 2 * channels, "latent_height", "latent_width")}
    return {"sample": image}, {"latents": latent}


def _check_io(component: Component, where: str, pipeline: PipelineInfo, conditioning: Conditioning) -> None:
    spec = component.spec
    inputs, outputs = _expected_io(spec.name, pipeline, conditioning)
    if sorted(spec.input_names) != sorted(inputs):
        raise ManifestFieldError(
            f"{where}.inputs",
            f"must be exactly {', '.join(inputs)}, what the runtime feeds (got {', '.join(spec.input_names)})",
        )
    missing = [name for name in outputs if name not in spec.output_names]
    if missing:
        raise ManifestFieldError(
            f"{where}.outputs",
            f"must include {', '.join(missing)}, what the runtime reads (got {', '.join(spec.output_names)})",
        )
    for kind, tensors, expected in (("inputs", spec.inputs, inputs), ("outputs", spec.outputs, outputs)):
        for index, tensor in enumerate(tensors):
            if tensor.name not in expected:
                continue
            at = f"{where}.{kind}[{index}]"
            wanted = expected[tensor.name]
            shapes = wanted if wanted is TIMESTEP_SHAPES else (wanted,)
            if not any(_shape_matches(tensor.shape, shape) for shape in shapes):
                shown = " or ".join(json.dumps(["N" if want == _ANY else want for want in shape]) for shape in shapes)
                raise ManifestFieldError(
                    f"{at}.shape", f"must be {shown} for {tensor.name} (got {json.dumps(list(tensor.shape))})"
                )
            dtypes = ("int64",) if tensor.name == "input_ids" else FLOAT_DTYPES
            if tensor.dtype not in dtypes:
                raise ManifestFieldError(
                    f"{at}.dtype", f"must be {' or '.join(dtypes)} for {tensor.name} (got {tensor.dtype})"
                )


def _tensor(spec: ComponentSpec, name: str) -> TensorSpec:
    return next(tensor for tensor in (*spec.inputs, *spec.outputs) if tensor.name == name)


def _check_tensorrt_details(artifact: Artifact, spec: ComponentSpec, pipeline: PipelineInfo, where: str) -> None:
    """What the TensorRT backend reads: flavour and version, compute capabilities, the engine's I/O (names,
    dtypes and ranks of the spec's), the optimisation profiles and the VAE scale factor."""
    details = Fields(artifact.details, where)
    details.string("flavor")
    details.string("trt_version")
    for at, value in details.array("compute_capabilities"):
        if type(value) is int:
            as_int(value, at, minimum=10, maximum=999)
        else:
            as_str(value, at, pattern=COMPUTE_CAPABILITY, meaning='a compute capability such as 86 or "8.6"')
    engine: dict[str, tuple[str, str, int, str]] = {}  # name -> (mode, dtype, rank, field)
    for at, item in details.array("io", min_length=1):
        tensor = Fields.of(item, at)
        name = tensor.string("name", pattern=TENSOR_NAME, meaning=TENSOR_NAME_MEANING)
        mode = tensor.string("mode", choices=("input", "output"))
        dtype = tensor.string("dtype")
        shape = [as_int(value, dim_at, minimum=-1, maximum=MAX_DIM) for dim_at, value in tensor.array("shape")]
        if name in engine:
            raise ManifestFieldError(f"{at}.name", f"repeats the engine tensor {describe(name)}")
        engine[name] = (mode, dtype, len(shape), at)
    for mode, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        names = sorted(name for name, value in engine.items() if value[0] == mode)
        if names != sorted(tensor.name for tensor in tensors):
            raise ManifestFieldError(
                f"{where}.io",
                f"must list the spec's {mode}s {', '.join(t.name for t in tensors)} (got {', '.join(names)})",
            )
        for tensor in tensors:
            _, dtype, rank, at = engine[tensor.name]
            if (dtype, rank) != (tensor.dtype, len(tensor.shape)):
                raise ManifestFieldError(
                    at,
                    f"must have the spec's dtype {tensor.dtype} and rank {len(tensor.shape)} "
                    f"(got {describe(dtype)} and {rank})",
                )
    profiles = details.object("profiles", default={})
    ranks = {tensor.name: len(tensor.shape) for tensor in spec.inputs}
    for name, entry in profiles.data.items():
        at = profiles.path(name)
        if name not in ranks:
            raise ManifestFieldError(at, f"is not an input of {spec.name} ({', '.join(ranks)})")
        ranges = Fields.of(entry, at)
        low, opt, high = (
            [
                as_int(value, dim_at, minimum=1, maximum=MAX_DIM)
                for dim_at, value in ranges.array(key, ranks[name], ranks[name])
            ]
            for key in ("min", "opt", "max")
        )
        if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
            raise ManifestFieldError(at, f"must have min <= opt <= max in every dim (got {low}, {opt}, {high})")
    if details.has("vae_scale_factor"):
        factor = details.integer("vae_scale_factor", minimum=1, maximum=MAX_VAE_SCALE_FACTOR)
        if factor != pipeline.vae_scale_factor:
            raise ManifestFieldError(
                details.path("vae_scale_factor"),
                f"must equal pipeline.vae_scale_factor, {pipeline.vae_scale_factor} (got {factor})",
            )
    if details.has("shape_range"):
        ShapeRange.from_json(details.get("shape_range"), details.path("shape_range"))


def _check_coreml_details(artifact: Artifact, spec: ComponentSpec, where: str) -> None:
    """What the Core ML backend reads: the model's inputs and outputs (name, dtype, default shape, optional
    per-dim bounds, the spec's name for it), one per spec tensor."""
    details = Fields(artifact.details, where)
    for key, tensors in (("coreml_inputs", spec.inputs), ("coreml_outputs", spec.outputs)):
        names: list[str] = []
        for at, item in details.array(key, min_length=1):
            tensor = Fields.of(item, at)
            name = tensor.string("name", pattern=TENSOR_NAME, meaning=TENSOR_NAME_MEANING)
            tensor.string("dtype", choices=("float32", "float16", "int32"))
            shape = [as_int(value, dim_at, minimum=1, maximum=MAX_DIM) for dim_at, value in tensor.array("shape", 1, 8)]
            if tensor.get("bounds", None) is not None:
                for index, (bound_at, pair) in enumerate(tensor.array("bounds", len(shape), len(shape))):
                    low, high = (
                        as_int(value, field_path(bound_at, position), minimum=1, maximum=MAX_DIM)
                        for position, value in enumerate(as_list(pair, bound_at, min_length=2, max_length=2))
                    )
                    if not low <= shape[index] <= high:
                        raise ManifestFieldError(
                            bound_at, f"must be [MIN, MAX] around the default size {shape[index]} (got [{low}, {high}])"
                        )
            spec_name = (
                tensor.string("spec_name", pattern=TENSOR_NAME, meaning=TENSOR_NAME_MEANING)
                if tensor.has("spec_name")
                else ""
            )
            names.append(spec_name or name)
        if sorted(names) != sorted(tensor.name for tensor in tensors):
            raise ManifestFieldError(
                details.path(key),
                f"must map one to one onto the spec's {', '.join(t.name for t in tensors)} (got {', '.join(names)})",
            )
    if details.has("shapes"):
        ShapeRange.from_json(details.get("shapes"), details.path("shapes"))


# -- files and hashes ---------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(bundle_dir: Path, path: Path) -> FileEntry:
    return FileEntry(path.relative_to(bundle_dir).as_posix(), path.stat().st_size, sha256_file(path))


def check_bundle_paths(bundle_dir: Path, manifest: Manifest) -> None:
    """What needs the folder: every path the manifest names stays inside it after following symlinks, and every
    file inside a folder artifact (an mlpackage) is listed in ``files``. Raises :class:`ManifestFieldError`."""
    root = bundle_dir.resolve()
    named = [(f"files[{index}].path", entry.path) for index, entry in enumerate(manifest.files)]
    named += [(f"tokenizers[{index}].path", tokenizer.path) for index, tokenizer in enumerate(manifest.tokenizers)]
    for name, component in manifest.components.items():
        for index, variant in enumerate(component.variants):
            named.append((f"components.{name}.variants[{index}].path", variant.path))
    for where, path in named:
        try:
            resolved = (bundle_dir / path).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            raise ManifestFieldError(where, f"cannot be resolved (a symlink loop?) (got {describe(path)})") from None
        if root not in resolved.parents:
            raise ManifestFieldError(where, f"leads outside the bundle folder through a symlink (got {describe(path)})")
    listed = {entry.path for entry in manifest.files}
    for name, component in manifest.components.items():
        for index, artifact in enumerate(component.variants):
            if artifact.format not in FOLDER_FORMATS:
                continue
            where = f"components.{name}.variants[{index}].path"
            folder = bundle_dir / artifact.path
            if not folder.is_dir():
                raise ManifestFieldError(
                    where, f"names a folder that is not in the bundle (got {describe(artifact.path)})"
                )
            for directory, subdirectories, filenames in os.walk(folder, followlinks=False):
                links = [entry for entry in subdirectories if os.path.islink(os.path.join(directory, entry))]
                for entry in (*filenames, *links):
                    relative = Path(directory, entry).relative_to(bundle_dir).as_posix()
                    if relative not in listed:
                        raise ManifestFieldError(
                            where,
                            f"names a folder holding {describe(relative)}, which manifest.json files does not list "
                            "(it would be used without its sha256 check)",
                        )


class _VerifiedCache:
    """Remembers files already hashed, keyed by (real path, size, mtime, inode), so a second load skips hashing.

    Any write to a file changes its mtime, so a modified file is always hashed again.
    """

    def __init__(self) -> None:
        self.path = cache_root() / "verified-files.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    @staticmethod
    def _key(path: Path) -> tuple[str, list]:
        stat = path.stat()
        return str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]

    def known(self, path: Path, sha256: str) -> bool:
        key, identity = self._key(path)
        return self.entries.get(key) == [*identity, sha256]

    def remember(self, path: Path, sha256: str) -> None:
        key, identity = self._key(path)
        self.entries[key] = [*identity, sha256]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(self.entries))
            temporary.replace(self.path)
        except OSError:
            pass  # a read-only home only costs a re-hash next time


def verify_files(bundle_dir: Path, files: tuple[FileEntry, ...], mode: str = "cached") -> None:
    """Check every listed file exists with its size and sha256.

    ``mode``: "full" hashes everything, "cached" skips files hashed before and unchanged since, "size" checks
    sizes only (for read-only media where hashing multi-GB files at every start is too slow).
    """
    if mode not in ("full", "cached", "size"):
        raise ValueError(f"unknown verify mode {mode!r}")
    cache = _VerifiedCache() if mode == "cached" else None
    for entry in files:
        path = bundle_dir / entry.path
        if not path.is_file():
            raise BundleError(
                f"BUNDLE '{bundle_dir}': file '{entry.path}' listed in manifest.json is missing: "
                "copy the whole bundle folder or re-export it"
            )
        if path.stat().st_size != entry.size or (
            mode != "size" and not (cache and cache.known(path, entry.sha256)) and sha256_file(path) != entry.sha256
        ):
            raise BundleError(
                f"BUNDLE '{bundle_dir}': file '{entry.path}' does not match its sha256 in manifest.json "
                "(modified or corrupted): re-export the bundle or copy it again"
            )
        if cache is not None:
            cache.remember(path, entry.sha256)
    if cache is not None:
        cache.save()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key twice in one object is ambiguous (json keeps the last one silently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {describe(key)} appears twice in one object")
        result[key] = value
    return result


def load_manifest(bundle_dir: str | Path, verify: str = "cached") -> Manifest:
    """Read, validate and verify a bundle's manifest. Raises :class:`BundleError` with a one-line message."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"BUNDLE '{bundle_dir}' is not a folder: pass the folder lcm-export wrote")
    manifest_path = bundle_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(
            f"BUNDLE '{bundle_dir}' has no manifest.json: it is not an lcm-export bundle, or its export did not "
            "finish; export it again"
        )
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (OSError, ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BundleError(f"BUNDLE '{bundle_dir}': manifest.json is not valid JSON ({reason}): re-export it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise BundleError(f"BUNDLE '{bundle_dir}': manifest.json is not an lcm-export manifest: re-export the bundle")
    version = data.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise BundleError(
            f"BUNDLE '{bundle_dir}' has manifest format version {describe(version)}; this runtime reads versions "
            f"{readable}: re-export the bundle with this lcm-export, or install the matching lcm-export"
        )
    try:
        manifest = Manifest.from_json(data)
        check_bundle_paths(bundle_dir, manifest)
    except ManifestFieldError as error:
        raise BundleError(f"BUNDLE '{bundle_dir}': {error}: re-export the bundle") from None
    verify_files(bundle_dir, manifest.files, verify)
    return manifest
