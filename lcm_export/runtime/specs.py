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
=================  ===========================================================

This module is standard-library only so that the runtime, the exporter and the targets share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SYMBOLS = ("batch", "sequence", "latent_height", "latent_width", "image_height", "image_width")


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
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))


@dataclass(frozen=True)
class ComponentSpec:
    """A component's contract: what goes in and out, and how strictly it must match PyTorch.

    ``batch_multiplier`` is 2 for the components that see the classifier-free-guidance batch
    ([unconditional, conditional]); shape ranges for engines are derived with it.
    ``keep_fp32`` marks components whose activations overflow in fp16 (the VAE).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float = 1e-4
    batch_multiplier: int = 1
    keep_fp32: bool = False

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
            self.atol,
            self.batch_multiplier,
            self.keep_fp32,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "batch_multiplier": self.batch_multiplier,
        }

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> ComponentSpec:
        return cls(
            name=name,
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            batch_multiplier=int(data.get("batch_multiplier", 1)),
        )


@dataclass(frozen=True)
class ShapeRange:
    """Min/opt/max of the user-facing dims (images per call, pixel height and width).

    A static range (min == opt == max) gives the fastest engines; the exporter's default.
    """

    batch: tuple[int, int, int] = (1, 1, 1)
    height: tuple[int, int, int] = (512, 512, 512)
    width: tuple[int, int, int] = (512, 512, 512)
    sequence: int = 77

    @classmethod
    def static(cls, batch: int, height: int, width: int, sequence: int = 77) -> ShapeRange:
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
            "latent_height": height // vae_scale_factor,
            "latent_width": width // vae_scale_factor,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": list(self.batch),
            "height": list(self.height),
            "width": list(self.width),
            "sequence": self.sequence,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShapeRange:
        return cls(tuple(data["batch"]), tuple(data["height"]), tuple(data["width"]), int(data.get("sequence", 77)))


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
