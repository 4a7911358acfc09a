"""ControlNet at run time: the control images, scales and guidance window of a call, and the residuals they give.

A bundle exported with ``--controlnet`` declares its ControlNets (``manifest.controlnet``) and its U-Net takes their
residuals. :func:`build_control` checks a call's ``control_image`` / ``controlnet_conditioning_scale`` /
``control_guidance_start`` / ``control_guidance_end`` as diffusers' ``StableDiffusionControlNetPipeline`` takes them
(one value, or one per ControlNet); :meth:`ControlRequest.scales_at` gives each ControlNet's scale at a step with
diffusers' keep rule (a ControlNet runs at step i of N unless i / N < start or (i + 1) / N > end);
:func:`control_residuals` runs the ControlNets on the U-Net's feeds (both CFG halves, as diffusers does) and sums
their scaled residuals into the U-Net's residual inputs. A ControlNet whose scale is 0 at a step is not run: its
residuals are zeros, which is what diffusers adds. A call without a control image feeds zeros (the plain U-Net's
result).

The control image is the output image's size: another size is refused (diffusers would resize it, with a filter
that depends on the input's type); preprocessing (edges, poses, depth) is the caller's, except the optional Canny
edge map of :func:`canny_edges` (OpenCV, the ``canny`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lcm_export.errors import UserError
from lcm_export.runtime.images import load_image
from lcm_export.runtime.manifest import ControlNetInfo, Manifest
from lcm_export.runtime.specs import CONTROL_IMAGE_INPUT, TensorSpec, latent_symbol_values

Run = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class ControlRequest:
    """A call's checked ControlNet arguments: per ControlNet of the bundle, in order, its control image (H, W, 3)
    float32 in [0, 1], its conditioning scale and its guidance window [start, end] (fractions of the steps)."""

    images: tuple[np.ndarray, ...]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the control images (all equal)."""
        return self.images[0].shape[0], self.images[0].shape[1]

    def scales_at(self, index: int, steps: int) -> np.ndarray:
        """Each ControlNet's scale at step ``index`` of ``steps``: its scale where diffusers keeps it, else 0."""
        keep = [
            1.0 - float(index / steps < start or (index + 1) / steps > end)
            for start, end in zip(self.starts, self.ends, strict=True)
        ]
        return np.array([scale * kept for scale, kept in zip(self.scales, keep, strict=True)], dtype=np.float64)

    def with_images(self, images: tuple[np.ndarray, ...]) -> ControlRequest:
        return ControlRequest(images, self.scales, self.starts, self.ends)

    def without_effect(self) -> ControlRequest:
        """The same shapes at scale 0 (a row of a batched call that has no control image)."""
        return ControlRequest(tuple(map(np.zeros_like, self.images)), (0.0,) * len(self.scales), self.starts, self.ends)


@dataclass(frozen=True)
class StepControl:
    """What one U-Net call needs of the ControlNets: per ControlNet, its control images for the call's rows
    (R, 3, H, W) and each row's scale (R,) (the frame loop's rows may sit at different steps)."""

    images: tuple[np.ndarray, ...]
    scales: np.ndarray  # (ControlNets, R)

    @classmethod
    def of(cls, control: ControlRequest, rows: int, index: int, steps: int) -> StepControl:
        """``rows`` rows of one control request at step ``index``."""
        images = tuple(np.repeat(as_model_input(image), rows, axis=0) for image in control.images)
        scales = np.repeat(control.scales_at(index, steps)[:, None], rows, axis=1)
        return cls(images, scales)

    @classmethod
    def stack(cls, parts: list[StepControl]) -> StepControl:
        """Rows of several calls in one (the frame loop's step batching)."""
        images = tuple(np.concatenate(group) for group in zip(*(part.images for part in parts), strict=True))
        return cls(images, np.concatenate([part.scales for part in parts], axis=1))


def as_model_input(image: np.ndarray) -> np.ndarray:
    """A control image (H, W, 3) in [0, 1] as the ControlNet takes it: (1, 3, H, W), not normalised (diffusers'
    control image processor has ``do_normalize=False``)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)


def _per_controlnet(name: str, value: Any, count: int, check: Callable[[str, Any], float]) -> tuple[float, ...]:
    """One value for every ControlNet, or a list of one per ControlNet."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise UserError(f"{name}: pass one value or a list of {count} (one per ControlNet of the bundle)")
    return tuple(check(name, item) for item in values)


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise UserError(f"{name}={value!r}: pass a number from {low:g} to {high:g}")
    number = float(value)
    if not np.isfinite(number) or not low <= number <= high:
        raise UserError(f"{name}={value!r}: pass a number from {low:g} to {high:g}")
    return number


def build_control(
    manifest: Manifest,
    bundle: str,
    control_image: Any,
    *,
    conditioning_scale: Any = None,
    guidance_start: Any = 0.0,
    guidance_end: Any = 1.0,
    image_transform: bool = False,
) -> ControlRequest | None:
    """Check a call's ControlNet arguments against the bundle (``bundle``: its path, for messages); None when no
    control image is given (then only the defaults may be passed). ``image_transform``: ``control_image`` may be
    a function of the frame (the frame loop), checked when it is called."""
    info: ControlNetInfo | None = manifest.controlnet
    if control_image is None:
        if conditioning_scale is not None or guidance_start != 0.0 or guidance_end != 1.0:
            raise UserError(
                "controlnet_conditioning_scale / control_guidance_start / control_guidance_end apply to a control "
                "image: pass control_image too"
            )
        return None
    if info is None:
        raise UserError(
            f"control_image: BUNDLE '{bundle}' has no ControlNet: re-export it with --controlnet CN, or drop the "
            "control image"
        )
    count = len(info.models)
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != count:
        raise UserError(
            f"control_image: the bundle has {count} ControlNet(s) and {len(images)} image(s) were given: pass one "
            "control image per ControlNet (a list, in the bundle's order)"
        )
    scales = (
        tuple(model.conditioning_scale for model in info.models)
        if conditioning_scale is None
        else _per_controlnet(
            "controlnet_conditioning_scale", conditioning_scale, count, lambda n, v: _number(n, v, 0.0, 100.0)
        )
    )
    starts = _per_controlnet("control_guidance_start", guidance_start, count, lambda n, v: _number(n, v, 0.0, 1.0))
    ends = _per_controlnet("control_guidance_end", guidance_end, count, lambda n, v: _number(n, v, 0.0, 1.0))
    for start, end in zip(starts, ends, strict=True):
        if start >= end:
            raise UserError(
                f"control_guidance_start {start:g} must be below control_guidance_end {end:g} (fractions of the steps)"
            )
    if image_transform and all(callable(image) for image in images):
        return ControlRequest(tuple(images), scales, starts, ends)  # type: ignore[arg-type]  # called per frame
    multiple = manifest.pipeline.spatial_multiple
    return ControlRequest(tuple(load_control_image(image, multiple) for image in images), scales, starts, ends)


def load_control_image(image: Any, multiple: int) -> np.ndarray:
    """A control image as (H, W, 3) float32 in [0, 1] (what ``img2img`` takes as an image), named in errors."""
    try:
        return load_image(image, multiple)
    except UserError as error:
        raise UserError(f"control_image: {error}") from None


def check_control_size(control: ControlRequest | None, height: int, width: int) -> None:
    """The control images must be the output's size (they are refused, never resized)."""
    if control is None:
        return
    control_height, control_width = control.size
    if (control_height, control_width) != (height, width):
        raise UserError(
            f"control_image is {control_width}x{control_height} but the image is {width}x{height}: pass a control "
            f"image of {width}x{height} (it is not resized), or leave height/width unset to take the control image's"
        )


def control_residuals(
    run: Run,
    info: ControlNetInfo,
    input_names: dict[str, list[str]],
    residual_specs: tuple[TensorSpec, ...],
    unet_feeds: dict[str, np.ndarray],
    control: StepControl | None,
    use_cfg: bool,
) -> dict[str, np.ndarray]:
    """The U-Net's residual inputs for one call: each ControlNet run on the U-Net's feeds (``unet_feeds``, the CFG
    batch included) with its control images, its residuals times each row's scale, summed over the ControlNets in
    order (diffusers' MultiControlNetModel); zeros where no ControlNet runs."""
    total: dict[str, np.ndarray] | None = None
    for index, model in enumerate(info.models):
        if control is None or not np.any(control.scales[index]):
            continue
        feeds = {name: unet_feeds[name] for name in input_names[model.component] if name != CONTROL_IMAGE_INPUT}
        images, scales = control.images[index], control.scales[index]
        if use_cfg:  # both halves, as diffusers runs the ControlNet on the CFG batch
            images, scales = np.concatenate([images, images]), np.concatenate([scales, scales])
        feeds[CONTROL_IMAGE_INPUT] = images
        outputs = run(model.component, feeds)
        row_scales = scales.astype(np.float32)[:, None, None, None]  # diffusers: residual * scale, in float32
        scaled = {name: outputs[name].astype(np.float32, copy=False) * row_scales for name in info.residual_inputs}
        total = scaled if total is None else {name: total[name] + scaled[name] for name in info.residual_inputs}
    if total is not None:
        return total
    sample = unet_feeds["sample"]
    values = {"batch": sample.shape[0], **latent_symbol_values(sample.shape[2], sample.shape[3])}
    return {spec.name: np.zeros(spec.concrete_shape(values), dtype=np.float32) for spec in residual_specs}


def canny_edges(image: Any, low: int = 100, high: int = 200) -> np.ndarray:
    """The Canny edge map of an image as a control image, (H, W, 3) float32 in {0, 1} (the edges on all three
    channels, as diffusers' ControlNet examples prepare it with OpenCV). Needs ``pip install 'lcm-edge[canny]'``."""
    try:
        import cv2
    except ImportError:
        raise UserError(
            "--control-preprocess canny needs OpenCV: pip install 'lcm-edge[canny]' (opencv-python-headless)"
        ) from None
    pixels = load_image(image, 1)
    gray = np.ascontiguousarray((pixels * 255).round().astype(np.uint8))
    edges = cv2.Canny(gray, low, high)  # (H, W) uint8: 0 or 255; OpenCV converts RGB to gray
    return np.repeat(edges[:, :, None], 3, axis=2).astype(np.float32) / 255.0
