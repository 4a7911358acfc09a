"""What a target records on its variant for its backend: one typed object per format, defined once.

A TensorRT engine's details (:class:`TensorRTEngineDetails`) and a Core ML package's (:class:`CoreMLPackageDetails`)
are written flat into the variant's JSON object, beside its name, format and path; :class:`Artifact` keeps them as
``details``. The target builds the object and writes its ``to_json()``; the manifest check reads it with
``from_json`` (every field, one :class:`ManifestFieldError` line naming it) and then checks it against the spec and
the pipeline (:mod:`.checks`); the backend reads the same object (``Artifact.tensorrt_details``,
``Artifact.coreml_details``). A field that older bundles may lack gets its default here, in ``from_json``, and
nowhere else, so what the check validates is what the backend runs with.

The compute-capability syntax (86, "8.6", "SM86", "sm_86") is :data:`COMPUTE_CAPABILITY`, parsed by
:func:`parse_compute_capability` for the exporter's ``--compute-capability``, the manifest and the backend alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lcm_export.runtime.manifest.vocabulary import MAX_VAE_SCALE_FACTOR
from lcm_export.runtime.specs import (
    MAX_DIM,
    TENSOR_NAME,
    TENSOR_NAME_MEANING,
    ComponentProfiles,
    Fields,
    ManifestFieldError,
    ShapeRange,
    as_int,
    as_list,
    as_str,
    describe,
    field_path,
)

# -- TensorRT -----------------------------------------------------------------------------------------------------

TENSORRT_FLAVORS = ("tensorrt", "rtx")  # standard TensorRT, TensorRT for RTX
# TensorRT ``DataType`` member names -> numpy dtype names (bfloat16 has no numpy dtype; kept by name).
TENSORRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}
ENGINE_DTYPES = tuple(TENSORRT_DTYPES.values())
IO_MODES = ("input", "output")
OPTIMIZATION_LEVELS = range(0, 6)  # the builder's optimisation levels (TensorRT's default: 3)
# An engine recorded without its VAE scale factor (none written by lcm-export lacks it) is taken as SD's.
DEFAULT_ENGINE_VAE_SCALE_FACTOR = 8
# A GPU compute capability: NVIDIA's "8.6", TensorRT-RTX's "SM86" (or "sm_86"), or the integer 86; 1.0 to 99.9.
COMPUTE_CAPABILITY = re.compile(r"(?:sm_?)?(?:([1-9][0-9]?)\.([0-9])|([1-9][0-9]{1,2}))", re.IGNORECASE)
COMPUTE_CAPABILITY_MEANING = 'a compute capability such as 86 or "8.6"'
COMPUTE_CAPABILITY_RANGE = (10, 999)  # the integers a capability string stands for


def parse_compute_capability(value: str | int) -> int:
    """``86``, ``"86"``, ``"SM86"``, ``"sm_86"`` or ``"8.6"`` -> 86. Raises ``ValueError`` on anything else.

    An integer must be in :data:`COMPUTE_CAPABILITY_RANGE` (what a string of :data:`COMPUTE_CAPABILITY` gives), so
    the same values are accepted however they are written.
    """
    if type(value) is int:
        low, high = COMPUTE_CAPABILITY_RANGE
        if low <= value <= high:
            return value
    elif isinstance(value, str) and (match := COMPUTE_CAPABILITY.fullmatch(value)):
        return int(match[1]) * 10 + int(match[2]) if match[1] else int(match[3])
    raise ValueError(f"not a compute capability: {value!r}")


def read_compute_capability(value: Any, where: str) -> int:
    """A manifest's compute capability (an integer or a string of :data:`COMPUTE_CAPABILITY`) as an integer."""
    if type(value) is int:
        low, high = COMPUTE_CAPABILITY_RANGE
        return as_int(value, where, minimum=low, maximum=high)
    text = as_str(value, where, pattern=COMPUTE_CAPABILITY, meaning=COMPUTE_CAPABILITY_MEANING)
    return parse_compute_capability(text)


@dataclass(frozen=True)
class IOTensor:
    """An engine input or output as TensorRT reports it: ``shape`` holds -1 for dims set at run time."""

    name: str
    mode: str  # "input" or "output"
    dtype: str  # numpy dtype name (see TENSORRT_DTYPES)
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Any, where: str = "io") -> IOTensor:
        fields = Fields.of(data, where)
        return cls(
            fields.string("name", pattern=TENSOR_NAME, meaning=TENSOR_NAME_MEANING),
            fields.string("mode", choices=IO_MODES),
            fields.string("dtype", choices=ENGINE_DTYPES),
            tuple(as_int(value, at, minimum=-1, maximum=MAX_DIM) for at, value in fields.array("shape")),
        )


@dataclass(frozen=True)
class TensorRTEngineDetails:
    """A TensorRT engine as built: what the backend checks before deserializing it and what it binds.

    ``flavor`` and ``trt_version`` must be installed exactly (engines are not portable across releases);
    ``compute_capabilities`` are the GPUs it was built for (``()``: TensorRT-RTX's default targets); ``io`` is the
    engine's tensors in engine order and ``profiles`` its optimisation profile (none for a fully static engine);
    ``vae_scale_factor`` relates latent and image sizes in the binding plan. ``shape_range`` (the export's shape
    range), ``strongly_typed``, ``builder_optimization_level`` and ``build_seconds`` record how it was built
    (None where a bundle does not say); ``refittable``: built with its weight-mapped weights refittable
    (``BuilderFlag.REFIT_INDIVIDUAL``; run-time adapters refit them by ONNX initializer name, from the ONNX variant
    kept beside it).
    """

    flavor: str
    trt_version: str
    compute_capabilities: tuple[int, ...]
    io: tuple[IOTensor, ...]
    profiles: ComponentProfiles = field(default_factory=ComponentProfiles)
    vae_scale_factor: int = DEFAULT_ENGINE_VAE_SCALE_FACTOR
    shape_range: ShapeRange | None = None
    strongly_typed: bool | None = None
    builder_optimization_level: int | None = None
    build_seconds: float | None = None
    refittable: bool = False  # its weight-mapped weights refittable: run-time adapters refit them by name

    def to_json(self) -> dict[str, Any]:
        """The keys written beside the variant's own, in the order lcm-export has always written them."""
        data: dict[str, Any] = {
            "flavor": self.flavor,
            "trt_version": self.trt_version,
            "compute_capabilities": list(self.compute_capabilities),
        }
        if self.strongly_typed is not None:
            data["strongly_typed"] = self.strongly_typed
        if self.builder_optimization_level is not None:
            data["builder_optimization_level"] = self.builder_optimization_level
        if self.shape_range is not None:
            data["shape_range"] = self.shape_range.to_json()
        data["vae_scale_factor"] = self.vae_scale_factor
        data["profiles"] = self.profiles.to_json()
        data["io"] = [tensor.to_json() for tensor in self.io]
        if self.build_seconds is not None:
            data["build_seconds"] = self.build_seconds
        if self.refittable:
            data["refittable"] = True
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> TensorRTEngineDetails:
        """Every field checked; ``profiles`` and ``vae_scale_factor`` default when absent, the build record to None.

        Whether the I/O and profiles are the spec's and the scale factor the pipeline's is :mod:`.checks`'.
        """
        fields = Fields.of(data, where)
        flavor = fields.string("flavor", choices=TENSORRT_FLAVORS)
        trt_version = fields.string("trt_version")
        capabilities = tuple(read_compute_capability(value, at) for at, value in fields.array("compute_capabilities"))
        io: list[IOTensor] = []
        for at, item in fields.array("io", min_length=1):
            tensor = IOTensor.from_json(item, at)
            if tensor.name in {other.name for other in io}:
                raise ManifestFieldError(f"{at}.name", f"repeats the engine tensor {describe(tensor.name)}")
            io.append(tensor)
        profiles = (
            ComponentProfiles.from_json(fields.get("profiles"), fields.path("profiles"))
            if fields.has("profiles")
            else ComponentProfiles()
        )
        shape_range = (
            ShapeRange.from_json(fields.get("shape_range"), fields.path("shape_range"))
            if fields.has("shape_range")
            else None
        )
        return cls(
            flavor=flavor,
            trt_version=trt_version,
            compute_capabilities=capabilities,
            io=tuple(io),
            profiles=profiles,
            vae_scale_factor=fields.integer(
                "vae_scale_factor", minimum=1, maximum=MAX_VAE_SCALE_FACTOR, default=DEFAULT_ENGINE_VAE_SCALE_FACTOR
            ),
            shape_range=shape_range,
            strongly_typed=fields.boolean("strongly_typed") if fields.has("strongly_typed") else None,
            builder_optimization_level=fields.integer(
                "builder_optimization_level",
                minimum=OPTIMIZATION_LEVELS.start,
                maximum=OPTIMIZATION_LEVELS.stop - 1,
                default=None,
            ),
            build_seconds=fields.number("build_seconds", minimum=0, default=None),
            refittable=fields.boolean("refittable") if fields.has("refittable") else False,
        )


# -- Core ML ------------------------------------------------------------------------------------------------------

COREML_TENSOR_DTYPES = ("float32", "float16", "int32")  # Core ML has no int64
COMPUTE_PRECISIONS = ("float32", "float16")
MAX_COREML_RANK = 8
# The conversion's check report (free-form, not read by the runtime): "spec-only" off macOS, PSNR against PyTorch
# on macOS.
VALIDATION_KEYS = ("validated", "psnr_db", "psnr_gate_db", "validation_shapes")


@dataclass(frozen=True)
class CoreMLTensor:
    """One input or output of a converted Core ML model, as recorded in the artifact's details.

    ``name`` is the feature name inside the mlpackage and ``spec_name`` the component spec's name for it (equal
    unless a converter renamed it). ``shape`` is the default shape; ``bounds`` holds (min, max) per dim when the
    model accepts a range of shapes and is None when it is static.
    """

    name: str
    dtype: str  # numpy dtype name: "float32", "float16" or "int32"
    shape: tuple[int, ...]
    bounds: tuple[tuple[int, int], ...] | None = None
    spec_name: str = ""

    @property
    def is_static(self) -> bool:
        return self.bounds is None

    @property
    def feed_name(self) -> str:
        """The spec's name for this tensor (what the pipeline passes and expects)."""
        return self.spec_name or self.name

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether ``shape`` (after adaptation) fits this tensor's static shape or bounds."""
        if len(shape) != len(self.shape):
            return False
        if self.bounds is None:
            return tuple(shape) == self.shape
        return all(low <= size <= high for size, (low, high) in zip(shape, self.bounds, strict=True))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.bounds is not None:
            data["bounds"] = [list(pair) for pair in self.bounds]
        if self.spec_name and self.spec_name != self.name:
            data["spec_name"] = self.spec_name
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "tensor") -> CoreMLTensor:
        """Name, dtype, default shape, per-dim bounds around it (absent or null: static) and the spec's name."""
        fields = Fields.of(data, where)
        name = fields.string("name", pattern=TENSOR_NAME, meaning=TENSOR_NAME_MEANING)
        dtype = fields.string("dtype", choices=COREML_TENSOR_DTYPES)
        shape = tuple(
            as_int(value, at, minimum=1, maximum=MAX_DIM) for at, value in fields.array("shape", 1, MAX_COREML_RANK)
        )
        bounds = None
        if fields.get("bounds", None) is not None:
            pairs = []
            for index, (bound_at, pair) in enumerate(fields.array("bounds", len(shape), len(shape))):
                low, high = (
                    as_int(value, field_path(bound_at, position), minimum=1, maximum=MAX_DIM)
                    for position, value in enumerate(as_list(pair, bound_at, min_length=2, max_length=2))
                )
                if not low <= shape[index] <= high:
                    raise ManifestFieldError(
                        bound_at, f"must be [MIN, MAX] around the default size {shape[index]} (got [{low}, {high}])"
                    )
                pairs.append((low, high))
            bounds = tuple(pairs)
        spec_name = (
            fields.string("spec_name", pattern=TENSOR_NAME, meaning=TENSOR_NAME_MEANING)
            if fields.has("spec_name")
            else ""
        )
        return cls(name, dtype, shape, bounds, spec_name)


@dataclass(frozen=True)
class CoreMLPackageDetails:
    """A converted Core ML package: its model's inputs and outputs (what the backend adapts the feeds to) and how
    it was converted.

    ``inputs`` / ``outputs`` are written as ``coreml_inputs`` / ``coreml_outputs``; ``shape_range`` and
    ``flexible`` as ``shapes`` (the export's shape range, and whether any dim is a range). The conversion record
    (deployment target, compute precision, coremltools version, seconds) is None where a bundle does not say;
    ``validation`` is the conversion's check report (:data:`VALIDATION_KEYS`, free-form).
    """

    inputs: tuple[CoreMLTensor, ...]
    outputs: tuple[CoreMLTensor, ...]
    minimum_deployment_target: str | None = None  # e.g. "iOS16/macOS13"
    compute_precision: str | None = None  # "float16" or "float32"
    shape_range: ShapeRange | None = None
    flexible: bool | None = None
    coremltools_version: str | None = None
    conversion_seconds: float | None = None
    validation: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The keys written beside the variant's own, in the order lcm-export has always written them."""
        data: dict[str, Any] = {
            "coreml_inputs": [tensor.to_json() for tensor in self.inputs],
            "coreml_outputs": [tensor.to_json() for tensor in self.outputs],
        }
        if self.minimum_deployment_target is not None:
            data["minimum_deployment_target"] = self.minimum_deployment_target
        if self.compute_precision is not None:
            data["compute_precision"] = self.compute_precision
        if self.shape_range is not None:
            data["shapes"] = self.shape_range.to_json()
            if self.flexible is not None:
                data["shapes"]["flexible"] = self.flexible
        if self.coremltools_version is not None:
            data["coremltools"] = self.coremltools_version
        if self.conversion_seconds is not None:
            data["conversion_seconds"] = self.conversion_seconds
        return {**data, **{key: self.validation[key] for key in VALIDATION_KEYS if key in self.validation}}

    @classmethod
    def from_json(cls, data: Any, where: str) -> CoreMLPackageDetails:
        """Every field checked; the conversion record is None where absent. Whether the tensors map onto the
        spec's is :mod:`.checks`'."""
        fields = Fields.of(data, where)
        inputs, outputs = (
            tuple(CoreMLTensor.from_json(item, at) for at, item in fields.array(key, min_length=1))
            for key in ("coreml_inputs", "coreml_outputs")
        )
        shape_range = flexible = None
        if fields.has("shapes"):
            shapes = fields.object("shapes")
            shape_range = ShapeRange.from_json(shapes.data, shapes.where)
            if shapes.has("flexible"):
                flexible = shapes.boolean("flexible")
        optional_strings = {
            key: fields.string(key) if fields.has(key) else None for key in ("minimum_deployment_target", "coremltools")
        }
        return cls(
            inputs=inputs,
            outputs=outputs,
            minimum_deployment_target=optional_strings["minimum_deployment_target"],
            compute_precision=(
                fields.string("compute_precision", choices=COMPUTE_PRECISIONS)
                if fields.has("compute_precision")
                else None
            ),
            shape_range=shape_range,
            flexible=flexible,
            coremltools_version=optional_strings["coremltools"],
            conversion_seconds=fields.number("conversion_seconds", minimum=0, default=None),
            validation={key: fields.data[key] for key in VALIDATION_KEYS if key in fields.data},
        )
