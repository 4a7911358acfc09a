"""Declarative component I/O specs: the one place shapes are defined.

A :class:`ComponentSpec` names a component's inputs and outputs with dtypes and *symbolic* shapes. Everything that
needs shapes derives them from here: the ONNX dynamic axes, the validation inputs, TensorRT optimisation profiles,
CoreML input shapes, the manifest's I/O table and the runtime's input checks. The symbols are:

=================  ===========================================================
``batch``          images in one call (times the CFG factor where it applies)
``sequence``       token sequence length (fixed by the tokenizer, usually 77)
``latent_height``  image height / vae_scale_factor
``latent_width``   image width / vae_scale_factor
``image_height``   pixels
``image_width``    pixels
``latent_height_K`` latent_height / K for K in 2, 4, 8, 16, 32 (a ControlNet's residuals at the U-Net's lower
``latent_width_K``  resolutions; the bundle's spatial multiple makes the division exact)
=================  ===========================================================

It also holds the typed readers with which ``manifest.json`` (untrusted input) is parsed: :class:`Fields` and the
``as_*`` checks. Each reader raises :class:`ManifestFieldError`, whose one-line message names the field's path
(``components.unet.inputs[0].shape[1]``), so a bad bundle is reported the same way wherever the problem lies.

This module is standard-library only so that the runtime, the exporter and the targets share it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lcm_export.errors import BundleError

# CLIP's padded length: only a default for shape ranges built without a bundle (tests, tools). A bundle's own
# length is its tokenizer's max_length (``TokenizerInfo``), which the exporter and the runtime pass explicitly.
DEFAULT_SEQUENCE = 77
# The U-Net's down-sampled latent sizes a ControlNet's residuals have: latent size / K (one symbol per K).
DOWNSAMPLED_FACTORS = (2, 4, 8, 16, 32)
SYMBOLS = (
    "batch",
    "sequence",
    "latent_height",
    "latent_width",
    "image_height",
    "image_width",
    *(f"latent_{side}_{factor}" for factor in DOWNSAMPLED_FACTORS for side in ("height", "width")),
)
# numpy dtype names a component's tensors may have: what the exporter writes (float32, float16 for fp16 components,
# int64 token ids) and int32 (Core ML's token ids).
TENSOR_DTYPES = ("float32", "float16", "int64", "int32")
MAX_DIM = 2**31 - 1  # a fixed tensor dim: int32, as TensorRT and Core ML hold them
TENSOR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,255}")
TENSOR_NAME_MEANING = "a tensor name (a letter or _, then letters, digits and _.:/-)"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype and shape whose entries are ints or symbols from :data:`SYMBOLS`."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def dynamic_axes(self) -> dict[int, str]:
        """ONNX ``dynamic_axes`` entry: axis index -> symbol for every symbolic dim."""
        return {axis: dim for axis, dim in enumerate(self.shape) if isinstance(dim, str)}

    def concrete_shape(self, values: dict[str, int]) -> tuple[int, ...]:
        """The shape with every symbol replaced by its value in ``values``."""
        return tuple(values[dim] if isinstance(dim, str) else dim for dim in self.shape)

    def with_dtype(self, dtype: str) -> TensorSpec:
        return TensorSpec(self.name, dtype, self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Any, where: str = "tensor") -> TensorSpec:
        """Read ``{"name", "dtype", "shape"}``: a tensor name, a dtype of :data:`TENSOR_DTYPES`, and a shape whose
        entries are positive ints or symbols of :data:`SYMBOLS` (``[]`` for a scalar)."""
        fields = Fields.of(data, where)
        name = fields.string("name", pattern=TENSOR_NAME, meaning=TENSOR_NAME_MEANING)
        dtype = fields.string("dtype", choices=TENSOR_DTYPES)
        shape = tuple(as_dim(entry, entry_where) for entry_where, entry in fields.array("shape", max_length=8))
        return cls(name, dtype, shape)


@dataclass(frozen=True)
class ComponentSpec:
    """A component's contract: what goes in and out, and how strictly it must match PyTorch.

    ``batch_multiplier`` is 2 for the components that see the classifier-free-guidance batch
    ([unconditional, conditional]); shape ranges for engines are derived with it.
    How strictly an export must match PyTorch and which components stay fp32 are the exporter's business
    (``ExportableComponent``): a spec holds only what the manifest records.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_multiplier: int = 1

    @property
    def input_names(self) -> list[str]:
        return [tensor.name for tensor in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export`` dynamic axes for every input and output with a symbolic dim."""
        axes = {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs)}
        return {name: value for name, value in axes.items() if value}

    def input_shapes(self, values: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {tensor.name: tensor.concrete_shape(values) for tensor in self.inputs}

    def with_dtypes(self, dtype: str) -> ComponentSpec:
        """This spec with every float tensor in ``dtype`` (e.g. after an fp16 conversion)."""

        def convert(tensor: TensorSpec) -> TensorSpec:
            return tensor.with_dtype(dtype) if tensor.dtype.startswith("float") else tensor

        return ComponentSpec(
            self.name,
            tuple(map(convert, self.inputs)),
            tuple(map(convert, self.outputs)),
            self.batch_multiplier,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "batch_multiplier": self.batch_multiplier,
        }

    @classmethod
    def from_json(cls, name: str, data: Any, where: str | None = None) -> ComponentSpec:
        """Read a component's ``inputs``, ``outputs`` (at least one each, names unique) and ``batch_multiplier``
        (1, or 2 for a component fed the classifier-free-guidance batch)."""
        where = where or field_path("components", name)
        fields = Fields.of(data, where)
        inputs = tuple(TensorSpec.from_json(item, item_where) for item_where, item in fields.array("inputs", 1))
        outputs = tuple(TensorSpec.from_json(item, item_where) for item_where, item in fields.array("outputs", 1))
        seen: set[str] = set()
        for kind, tensors in (("inputs", inputs), ("outputs", outputs)):
            for index, tensor in enumerate(tensors):
                if tensor.name in seen:
                    raise ManifestFieldError(
                        f"{fields.path(kind)}[{index}].name", f"repeats the tensor name {describe(tensor.name)}"
                    )
                seen.add(tensor.name)
        return cls(
            name=name,
            inputs=inputs,
            outputs=outputs,
            batch_multiplier=fields.integer("batch_multiplier", minimum=1, maximum=2),
        )


@dataclass(frozen=True)
class ShapeRange:
    """Min/opt/max of the user-facing dims (images per call, pixel height and width).

    A static range (min == opt == max) gives the fastest engines; the exporter's default.
    """

    batch: tuple[int, int, int] = (1, 1, 1)
    height: tuple[int, int, int] = (512, 512, 512)
    width: tuple[int, int, int] = (512, 512, 512)
    sequence: int = DEFAULT_SEQUENCE

    @classmethod
    def static(cls, batch: int, height: int, width: int, sequence: int = DEFAULT_SEQUENCE) -> ShapeRange:
        return cls((batch,) * 3, (height,) * 3, (width,) * 3, sequence)

    @property
    def is_static(self) -> bool:
        return len({*self.batch}) == len({*self.height}) == len({*self.width}) == 1

    def symbol_values(self, which: str, vae_scale_factor: int, batch_multiplier: int = 1) -> dict[str, int]:
        """Values of every symbol at ``which`` in ("min", "opt", "max") for one component.

        The minimum batch of a CFG component stays 1x (guidance <= 1 runs without the unconditional half).
        """
        index = ("min", "opt", "max").index(which)
        batch = self.batch[index] * (1 if which == "min" else batch_multiplier)
        height, width = self.height[index], self.width[index]
        return {
            "batch": batch,
            "sequence": self.sequence,
            "image_height": height,
            "image_width": width,
            **latent_symbol_values(height // vae_scale_factor, width // vae_scale_factor),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": list(self.batch),
            "height": list(self.height),
            "width": list(self.width),
            "sequence": self.sequence,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "shape range") -> ShapeRange:
        """Read ``{"batch", "height", "width": [MIN, OPT, MAX], "sequence"}`` with 0 < MIN <= OPT <= MAX."""
        fields = Fields.of(data, where)

        def span(key: str) -> tuple[int, int, int]:
            low, opt, high = (
                as_int(value, value_where, minimum=1, maximum=MAX_DIM)
                for value_where, value in fields.array(key, min_length=3, max_length=3)
            )
            if not low <= opt <= high:
                raise ManifestFieldError(
                    fields.path(key), f"must be [MIN, OPT, MAX] with MIN <= OPT <= MAX (got {[low, opt, high]})"
                )
            return low, opt, high

        sequence = fields.integer("sequence", minimum=1, maximum=MAX_DIM, default=DEFAULT_SEQUENCE)
        return cls(span("batch"), span("height"), span("width"), sequence)


def latent_symbol_values(latent_height: int, latent_width: int) -> dict[str, int]:
    """``latent_height`` / ``latent_width`` and their down-sampled sizes ``latent_height_K`` (ceil, as a stride-2
    convolution with padding 1 rounds; exact at the bundle's spatial multiple)."""
    values = {"latent_height": latent_height, "latent_width": latent_width}
    for factor in DOWNSAMPLED_FACTORS:
        values[f"latent_height_{factor}"] = -(-latent_height // factor)
        values[f"latent_width_{factor}"] = -(-latent_width // factor)
    return values


def latent_symbol(side: str, factor: int) -> str:
    """The symbol of the latent ``side`` ("height" or "width") down-sampled by ``factor`` (1: the latent size)."""
    if factor == 1:
        return f"latent_{side}"
    if factor not in DOWNSAMPLED_FACTORS:
        raise ValueError(f"no symbol for a latent size down-sampled by {factor}")
    return f"latent_{side}_{factor}"


# -- ControlNet: its component and the residual inputs of the U-Net that takes them ------------------------------

CONTROL_IMAGE_INPUT = "controlnet_cond"  # a ControlNet's conditioning image, (batch, 3, H, W) in [0, 1]
MID_BLOCK_RESIDUAL = "mid_block_residual"


def down_block_residual(index: int) -> str:
    """The name of the ``index``-th down-block residual (a ControlNet's output, the residual U-Net's input)."""
    return f"down_block_residual_{index}"


def residual_names(count: int) -> tuple[str, ...]:
    """The names of ``count`` residuals: ``down_block_residual_0`` .. for all but the last, ``mid_block_residual``."""
    return (*(down_block_residual(index) for index in range(count - 1)), MID_BLOCK_RESIDUAL)


def control_residual_specs(residuals: tuple[tuple[int, int], ...]) -> tuple[TensorSpec, ...]:
    """The residual tensors a ControlNet gives and its U-Net takes: one per (channels, down-sampling factor) of the
    U-Net's down blocks in order (``down_block_residual_0`` ..), the last being the mid block's
    (``mid_block_residual``)."""

    def spatial(factor: int) -> tuple[str, str]:
        return latent_symbol("height", factor), latent_symbol("width", factor)

    return tuple(
        TensorSpec(name, "float32", ("batch", channels, *spatial(factor)))
        for name, (channels, factor) in zip(residual_names(len(residuals)), residuals, strict=True)
    )


def controlnet_spec(
    name: str,
    unet_inputs: tuple[TensorSpec, ...],
    conditioning_channels: int,
    residuals: tuple[tuple[int, int], ...],
    batch_multiplier: int,
) -> ComponentSpec:
    """A ControlNet component: the U-Net's ``sample``, ``timestep`` and text conditioning (SDXL: ``text_embeds``
    and ``time_ids``; never the LCM w-embedding, which ControlNets do not take) and the control image in, the
    residuals out (unscaled: the runtime multiplies them by the conditioning scale, as diffusers does in the model).
    It sees the same batch as the U-Net (both CFG halves)."""
    shared = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    inputs = tuple(tensor for tensor in unet_inputs if tensor.name in shared)
    image = TensorSpec(CONTROL_IMAGE_INPUT, "float32", ("batch", conditioning_channels, "image_height", "image_width"))
    return ComponentSpec(name, (*inputs, image), control_residual_specs(residuals), batch_multiplier)


@dataclass(frozen=True)
class ComponentProfiles:
    """Concrete min/opt/max input shapes of one component, derived from its spec and a :class:`ShapeRange`."""

    minimum: dict[str, tuple[int, ...]] = field(default_factory=dict)
    optimum: dict[str, tuple[int, ...]] = field(default_factory=dict)
    maximum: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def derive(cls, spec: ComponentSpec, shape_range: ShapeRange, vae_scale_factor: int) -> ComponentProfiles:
        shapes = [
            spec.input_shapes(shape_range.symbol_values(which, vae_scale_factor, spec.batch_multiplier))
            for which in ("min", "opt", "max")
        ]
        return cls(*shapes)

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {
            name: {"min": list(self.minimum[name]), "opt": list(self.optimum[name]), "max": list(self.maximum[name])}
            for name in self.minimum
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "profiles") -> ComponentProfiles:
        """Read ``{input: {"min", "opt", "max": [dims]}}``: three lists of one length, positive dims, min <= opt <=
        max in every dim. Whether the names and ranks are a spec's is for the caller that has the spec."""
        profiles = Fields.of(data, where)
        minimum: dict[str, tuple[int, ...]] = {}
        optimum: dict[str, tuple[int, ...]] = {}
        maximum: dict[str, tuple[int, ...]] = {}
        for name, entry in profiles.data.items():
            at = profiles.path(name)
            ranges = Fields.of(entry, at)
            rank = len(as_list(ranges.get("min"), ranges.path("min")))  # opt and max must have as many dims
            low, opt, high = (
                tuple(as_int(size, dim, minimum=1, maximum=MAX_DIM) for dim, size in ranges.array(key, rank, rank))
                for key in ("min", "opt", "max")
            )
            if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                raise ManifestFieldError(
                    at, f"must have min <= opt <= max in every dim (got {list(low)}, {list(opt)}, {list(high)})"
                )
            minimum[name], optimum[name], maximum[name] = low, opt, high
        return cls(minimum, optimum, maximum)


# -- reading untrusted JSON --------------------------------------------------------------------------------------


class ManifestFieldError(BundleError):
    """A field of ``manifest.json`` is missing or invalid. ``field`` is its path, e.g. ``pipeline.guidance``.

    The message is one line (values are shown JSON-quoted and shortened); :func:`load_manifest` prefixes the
    bundle's path and suffixes what to do.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"manifest.json field {field} {problem}" if field else f"manifest.json {problem}")
        self.field = field
        self.problem = problem


_MISSING: Any = object()
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def describe(value: Any) -> str:
    """A JSON value shown in one short line: strings quoted and escaped, containers by their kind."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)} entries" if value else "an empty list"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = json.dumps(value)  # one line: newlines and control characters are escaped
    return text if len(text) <= 60 else text[:57] + "..."


def field_path(parent: str, key: str | int) -> str:
    """``parent.key`` for a plain key, ``parent[3]`` for a list index, ``parent["odd key"]`` otherwise."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{describe(key)}]"


def _expected_range(kind: str, minimum: float | None, maximum: float | None, above: float | None = None) -> str:
    """``a positive integer``, ``an integer from 1 to 64``, ``a finite number above 0 and at most 100``..."""
    if kind == "integer" and maximum is None and minimum in (0, 1):
        return "a positive integer" if minimum == 1 else "a non-negative integer"
    if kind == "integer" and minimum is not None and maximum is not None:
        return f"an integer from {minimum} to {maximum}"
    bounds = [f"above {above:g}"] if above is not None else []
    bounds += [f"at least {minimum:g}"] if minimum is not None else []
    bounds += [f"at most {maximum:g}"] if maximum is not None else []
    article = "an integer" if kind == "integer" else "a finite number"
    return " ".join([article, " and ".join(bounds)]).strip()


def as_int(value: Any, where: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """A JSON integer (not a bool, not 2.0) within [minimum, maximum]."""
    if type(value) is not int or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ManifestFieldError(
            where, f"must be {_expected_range('integer', minimum, maximum)} (got {describe(value)})"
        )
    return value


def as_float(
    value: Any,
    where: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> float:
    """A finite JSON number (an int is accepted: JSON writers may drop the ``.0``) within the bounds; ``above`` is
    an exclusive minimum."""
    try:
        number = float(value) if type(value) in (int, float) else math.nan
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if (
        not math.isfinite(number)
        or (minimum is not None and number < minimum)
        or (maximum is not None and number > maximum)
        or (above is not None and number <= above)
    ):
        expected = _expected_range("number", minimum, maximum, above)
        raise ManifestFieldError(where, f"must be {expected} (got {describe(value)})")
    return number


def as_bool(value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise ManifestFieldError(where, f"must be true or false (got {describe(value)})")
    return value


def as_str(
    value: Any,
    where: str,
    *,
    choices: tuple[str, ...] | None = None,
    pattern: re.Pattern[str] | None = None,
    meaning: str = "a string",
) -> str:
    """A JSON string: one of ``choices``, or matching ``pattern`` (described to the user as ``meaning``)."""
    if choices is not None and value not in choices:
        raise ManifestFieldError(where, f"must be one of {', '.join(choices)} (got {describe(value)})")
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise ManifestFieldError(where, f"must be {meaning} (got {describe(value)})")
    return value


def as_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestFieldError(where, f"must be an object (got {describe(value)})")
    return value


def as_list(value: Any, where: str, *, min_length: int = 0, max_length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise ManifestFieldError(where, f"must be a list (got {describe(value)})")
    if len(value) < min_length or (max_length is not None and len(value) > max_length):
        if min_length == max_length:
            count = f"exactly {min_length}"
        elif max_length is None:
            count = f"at least {min_length}"
        else:
            count = f"{min_length} to {max_length}"
        raise ManifestFieldError(where, f"must be a list of {count} entries (got {len(value)})")
    return value


def as_dim(value: Any, where: str) -> int | str:
    """One entry of a symbolic shape: a positive int or a symbol of :data:`SYMBOLS`."""
    if isinstance(value, str) and value in SYMBOLS:
        return value
    if type(value) is int and 1 <= value <= MAX_DIM:
        return value
    raise ManifestFieldError(
        where, f"must be a positive integer or one of {', '.join(SYMBOLS)} (got {describe(value)})"
    )


@dataclass(frozen=True)
class Fields:
    """A JSON object at a field path, read one key at a time with the ``as_*`` checks.

    A reader raises :class:`ManifestFieldError` naming ``where.key`` when the key is missing (unless a ``default``
    is given, returned as is) or its value is not what the reader expects. Keys nobody reads are ignored: a newer
    exporter may add information an older runtime does not need (a change of meaning bumps the format version).
    """

    data: dict[str, Any]
    where: str

    @classmethod
    def of(cls, value: Any, where: str) -> Fields:
        return cls(as_object(value, where), where)

    def path(self, key: str | int) -> str:
        return field_path(self.where, key)

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise ManifestFieldError(self.path(key), "is missing")
        return default

    def _optional(self, key: str, nullable: bool, default: Any, read: Any) -> Any:
        """``read(value, field)`` of ``key``; its default when absent, None when null is allowed."""
        if key not in self.data and default is not _MISSING:
            return default
        value = self.get(key)
        if value is None and nullable:
            return None
        try:
            return read(value, self.path(key))
        except ManifestFieldError as error:
            if not nullable:
                raise
            raise ManifestFieldError(error.field, error.problem.replace("must be ", "must be null or ", 1)) from None

    def integer(
        self,
        key: str,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
        nullable: bool = False,
        default: Any = _MISSING,
    ) -> Any:
        return self._optional(
            key, nullable, default, lambda value, at: as_int(value, at, minimum=minimum, maximum=maximum)
        )

    def number(
        self,
        key: str,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        above: float | None = None,
        nullable: bool = False,
        default: Any = _MISSING,
    ) -> Any:
        return self._optional(
            key,
            nullable,
            default,
            lambda value, at: as_float(value, at, minimum=minimum, maximum=maximum, above=above),
        )

    def boolean(self, key: str) -> bool:
        return as_bool(self.get(key), self.path(key))

    def string(
        self,
        key: str,
        *,
        choices: tuple[str, ...] | None = None,
        pattern: re.Pattern[str] | None = None,
        meaning: str = "a string",
    ) -> str:
        return as_str(self.get(key), self.path(key), choices=choices, pattern=pattern, meaning=meaning)

    def object(self, key: str, default: Any = _MISSING) -> Fields:
        value = self.get(key, default)
        return Fields.of(value, self.path(key))

    def array(self, key: str, min_length: int = 0, max_length: int | None = None) -> list[tuple[str, Any]]:
        """The list at ``key`` as (field path, item) pairs."""
        where = self.path(key)
        items = as_list(self.get(key), where, min_length=min_length, max_length=max_length)
        return [(field_path(where, index), item) for index, item in enumerate(items)]


def sample_inputs(spec: ComponentSpec, values: dict[str, int], seed: int = 0) -> dict[str, Any]:
    """Deterministic sample inputs for tracing and validation, shaped by ``values`` of the spec's symbols."""
    import numpy as np  # this module is otherwise standard-library only

    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for tensor in spec.inputs:
        shape = tensor.concrete_shape(values)
        if tensor.name == "input_ids":
            feeds[tensor.name] = rng.integers(0, 1000, size=shape).astype(tensor.dtype)  # any vocab has 1000 ids
        elif tensor.name == "timestep":  # a scalar, or one per row: different rows, different timesteps
            feeds[tensor.name] = np.linspace(499.0, 139.0, num=math.prod(shape)).reshape(shape).astype(tensor.dtype)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
    return feeds
