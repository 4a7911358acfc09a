"""The manifest's parts as frozen dataclasses, each with ``to_json`` and ``from_json`` reading its own fields.

``from_json`` checks what a part holds by itself (types, enums, ranges, patterns, paths inside the bundle) and
raises :class:`ManifestFieldError` naming the field; what needs other parts (a variant against the pipeline, the
I/O against what the runtime feeds) is in :mod:`.checks`. The scheduler tables are in :mod:`.tables`, the whole
manifest in :mod:`.document`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lcm_export.runtime.manifest.details import CoreMLPackageDetails, TensorRTEngineDetails
from lcm_export.runtime.manifest.vocabulary import (
    ARTIFACT_SUFFIXES,
    COMPONENT_NAME,
    CONDITIONING_SOURCES,
    DEFAULT_GUIDANCE_SCALE,
    EMPTY_NEGATIVE_MODES,
    FAMILIES,
    FLOAT_DTYPES,
    GUIDANCE_MODES,
    MANIFEST_NAME,
    MAX_CHANNELS,
    MAX_GUIDANCE_SCALE,
    MAX_IMAGE_SIDE,
    MAX_SEQUENCE,
    MAX_TOKEN_ID,
    MAX_VAE_FACTOR,
    MAX_VAE_SCALE_FACTOR,
    PRECISION_DTYPES,
    PRECISIONS,
    SHA256_HEX,
    TOKENIZER_FILE,
    VAE_KINDS,
    VARIANT_NAME,
    WINDOWS_DRIVE,
)
from lcm_export.runtime.specs import (
    TENSOR_NAME,
    TENSOR_NAME_MEANING,
    ComponentSpec,
    Fields,
    ManifestFieldError,
    as_float,
    as_str,
    describe,
)


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
    made it (tool, versions, recipe); ``details`` are the format's own keys as written (engine profiles, Core ML
    I/O, ...), read as one typed object by :attr:`tensorrt_details` and :attr:`coreml_details`.
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

    @property
    def tensorrt_details(self) -> TensorRTEngineDetails:
        """A tensorrt variant's engine details, read from ``details`` (which :func:`load_manifest` checked whole):
        what its backend checks and binds."""
        if self.format != "tensorrt":
            raise ValueError(f"a {self.format} variant has no TensorRT engine details")
        return TensorRTEngineDetails.from_json(self.details, self._details_field)

    @property
    def coreml_details(self) -> CoreMLPackageDetails:
        """An mlpackage variant's package details, read from ``details`` (which :func:`load_manifest` checked
        whole): the Core ML I/O its backend adapts the feeds to."""
        if self.format != "mlpackage":
            raise ValueError(f"a {self.format} variant has no Core ML package details")
        return CoreMLPackageDetails.from_json(self.details, self._details_field)

    @property
    def _details_field(self) -> str:
        """Where the details sit in the manifest, as far as the variant knows: its component (the first folder of
        its path, which the manifest check enforces) and its name."""
        component = self.path.split("/", 1)[0]
        return f"components.{component}.variants[{describe(self.name)}]"

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
    # The component's weight map (``<name>/weights.json``: torch module -> ONNX initializer, where run-time
    # adapters apply; lcm_export.runtime.adapters), or None: a bundle without one takes no adapter.
    weight_map: str | None = None

    @property
    def artifacts(self) -> dict[str, Artifact]:
        """format -> the preferred (first listed) variant of that format."""
        preferred: dict[str, Artifact] = {}
        for variant in self.variants:
            preferred.setdefault(variant.format, variant)
        return preferred

    def resolved(self, variant: Artifact, hashes: Mapping[str, str] | None = None) -> Component:
        """This component as one backend session sees it: only ``variant``, I/O in its float dtype, and the
        sha256 of its files from ``hashes`` (path -> sha256, the manifest's ``files``)."""
        digests = tuple(hashes[path] for path in variant.files if path in hashes) if hashes else ()
        chosen = dataclasses.replace(variant, digests=digests)
        return Component(self.spec.with_dtypes(variant.io_dtype), (chosen,), self.validation, self.weight_map)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.spec.to_json(),
            "variants": [variant.to_json() for variant in self.variants],
            "validation": self.validation,
            **({"weight_map": self.weight_map} if self.weight_map is not None else {}),
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
        weight_map = fields.get("weight_map", None)
        if weight_map is not None:
            weight_map = as_bundle_path(weight_map, fields.path("weight_map"))
        return cls(spec, tuple(variants), fields.object("validation", default={}).data, weight_map)


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
