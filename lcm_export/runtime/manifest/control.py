"""The manifest's ``controlnet`` part: the bundle's ControlNet components and the U-Net that takes their residuals.

A bundle exported with ``--controlnet`` carries one component per ControlNet (``controlnet``, ``controlnet_1``, ..:
diffusers' ``MultiControlNetModel`` folder names) and a U-Net whose inputs include the residuals the ControlNets
give (``down_block_residual_0`` .. and ``mid_block_residual``). This part says which components those are, each
ControlNet's default conditioning scale, and the control image size rule; a bundle without it has no ControlNet and
today's U-Net. The cross-checks against the components are :func:`check_controlnet`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lcm_export.runtime.specs import (
    CONTROL_IMAGE_INPUT,
    ComponentSpec,
    Fields,
    ManifestFieldError,
    describe,
    residual_names,
)

CONTROLNET_COMPONENT = re.compile(r"controlnet(_[1-9][0-9]?)?")  # controlnet, controlnet_1 .. controlnet_99
MAX_CONTROLNETS = 8
MAX_CONDITIONING_SCALE = 100.0
# The control image must have the output image's size (diffusers would resize it; this runtime refuses another
# size rather than pick a resampling filter silently).
IMAGE_SIZE_RULES = ("output",)


def controlnet_component_name(index: int) -> str:
    """The component of the ``index``-th ControlNet: ``controlnet``, ``controlnet_1``, .. (diffusers' folders)."""
    return "controlnet" if index == 0 else f"controlnet_{index}"


@dataclass(frozen=True)
class ControlNetModelInfo:
    """One ControlNet of the bundle: its component, its default conditioning scale, and where it came from."""

    component: str
    conditioning_scale: float = 1.0
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "conditioning_scale": self.conditioning_scale, "source": self.source}

    @classmethod
    def from_json(cls, data: Any, where: str) -> ControlNetModelInfo:
        fields = Fields.of(data, where)
        meaning = "a ControlNet component name (controlnet, controlnet_1, ..)"
        component = fields.string("component", pattern=CONTROLNET_COMPONENT, meaning=meaning)
        scale = fields.number("conditioning_scale", minimum=0, maximum=MAX_CONDITIONING_SCALE, default=1.0)
        source = fields.get("source", "")
        return cls(component, scale, source if isinstance(source, str) else "")


@dataclass(frozen=True)
class ControlNetInfo:
    """The bundle's ControlNets, in the order their residuals are summed, and the U-Net that takes the sum.

    ``residual_inputs``: the U-Net's residual inputs in the U-Net's order (down blocks, then the mid block); every
    ControlNet gives exactly these outputs. ``image_size``: the control image size rule (``"output"``: the control
    image has the generated image's height and width; another size is refused).
    """

    models: tuple[ControlNetModelInfo, ...]
    residual_inputs: tuple[str, ...]
    unet: str = "unet"
    image_size: str = "output"

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(model.component for model in self.models)

    def to_json(self) -> dict[str, Any]:
        return {
            "unet": self.unet,
            "residual_inputs": list(self.residual_inputs),
            "image_size": self.image_size,
            "models": [model.to_json() for model in self.models],
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "controlnet") -> ControlNetInfo:
        fields = Fields.of(data, where)
        fields.string("unet", choices=("unet",))
        models = tuple(
            ControlNetModelInfo.from_json(item, at) for at, item in fields.array("models", 1, MAX_CONTROLNETS)
        )
        expected = tuple(controlnet_component_name(index) for index in range(len(models)))
        for index, model in enumerate(models):
            if model.component != expected[index]:
                raise ManifestFieldError(
                    f"{fields.path('models')}[{index}].component",
                    f"must be {describe(expected[index])}: ControlNets are numbered in order (got "
                    f"{describe(model.component)})",
                )
        entries = fields.array("residual_inputs", min_length=2, max_length=64)
        residuals = tuple(value for _, value in entries)
        wanted = residual_names(len(residuals))
        if residuals != wanted:
            raise ManifestFieldError(
                fields.path("residual_inputs"),
                f"must be {', '.join(wanted)} in that order (got {', '.join(map(describe, residuals))})",
            )
        return cls(models, residuals, "unet", fields.string("image_size", choices=IMAGE_SIZE_RULES))


def check_controlnet(control: ControlNetInfo, specs: dict[str, ComponentSpec], where: str) -> None:
    """Each declared ControlNet is a component giving exactly the residuals, with a control image input; the U-Net
    takes those residuals with the same shapes; no ControlNet component is left undeclared."""
    declared = set(control.components)
    for name in specs:
        if CONTROLNET_COMPONENT.fullmatch(name) and name not in declared:
            raise ManifestFieldError(f"components.{name}", f"is a ControlNet that {where}.models does not declare")
    unet = specs.get(control.unet)
    if unet is None:
        return  # a bundle without its U-Net is refused where the runtime needs it
    unet_inputs = {tensor.name: tensor for tensor in unet.inputs}
    for name in control.residual_inputs:
        if name not in unet_inputs:
            raise ManifestFieldError(f"components.{control.unet}.inputs", f"must include the residual input {name}")
    for index, model in enumerate(control.models):
        spec = specs.get(model.component)
        at = f"components.{model.component}"
        if spec is None:
            raise ManifestFieldError(f"{where}.models[{index}].component", "names no component of this bundle")
        if CONTROL_IMAGE_INPUT not in spec.input_names:
            raise ManifestFieldError(f"{at}.inputs", f"must include the control image {CONTROL_IMAGE_INPUT}")
        if sorted(spec.output_names) != sorted(control.residual_inputs):
            raise ManifestFieldError(
                f"{at}.outputs",
                f"must be exactly the U-Net's residual inputs {', '.join(control.residual_inputs)} (got "
                f"{', '.join(spec.output_names)})",
            )
        for output_index, tensor in enumerate(spec.outputs):
            if tensor.shape != unet_inputs[tensor.name].shape:
                raise ManifestFieldError(
                    f"{at}.outputs[{output_index}].shape",
                    f"must be the U-Net's {tensor.name} shape {list(unet_inputs[tensor.name].shape)} (got "
                    f"{list(tensor.shape)})",
                )
        for input_index, tensor in enumerate(spec.inputs):
            if tensor.name != CONTROL_IMAGE_INPUT and tensor.name not in unet_inputs:
                raise ManifestFieldError(
                    f"{at}.inputs[{input_index}].name",
                    f"must be {CONTROL_IMAGE_INPUT} or an input of the U-Net (got {describe(tensor.name)})",
                )
