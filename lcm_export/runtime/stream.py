"""The frame loop: frames in, styled frames out, in order (:meth:`Pipeline.stream` makes one).

A :class:`FrameStream` runs on the pipeline's :class:`~lcm_export.runtime.denoiser.Denoiser` through its public
stages, as text-to-image and image-to-image do. It draws its random tensors once, in image-to-image's order
(:func:`~lcm_export.runtime.draws.image_to_image_draws`), and uses them for every frame: a still input gives a still
output, and its first frame equals ``img2img`` of that frame with the same seed. One stream belongs to one thread
(it holds the frames in flight); several streams may share a pipeline across threads.

Run-time adapters: every push and flush step is one call of the pipeline's :class:`CallGuard` (a weight swap waits
for it to end), so no frame's steps run on two sets of weights; after a swap the next push encodes the prompt again
on the new text encoders. A step-batched stream with frames in flight spans several pushes: ``set_adapters`` refuses
to swap until it is flushed (:attr:`FrameStream.frames_in_flight`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from lcm_export.errors import UserError
from lcm_export.runtime.adapters import CallGuard
from lcm_export.runtime.control import (
    ControlRequest,
    StepControl,
    build_control,
    check_control_size,
    load_control_image,
)
from lcm_export.runtime.denoiser import Denoiser, check_finite
from lcm_export.runtime.draws import ImageToImageDraws, image_to_image_draws
from lcm_export.runtime.images import load_image
from lcm_export.runtime.request import GenerationRequest


@dataclass
class _InFlight:
    """A frame inside the frame loop: its latents before its next step, and when it came in."""

    latents: np.ndarray  # (1, C, h, w)
    step: int  # index of the next step in the table
    arrived: float  # perf_counter() when the frame was pushed
    control: ControlRequest | None = None  # the frame's control images (ControlNet bundles)


class FrameStream:
    """Frames in, styled frames out, in order.

    ``push(frame)`` takes one frame (anything ``img2img`` takes) and returns the frame that has been through every
    step, (H, W, 3) float32 in [0, 1], or None while a step-batched stream fills (its first N - 1 pushes);
    ``flush()`` returns the frames still in flight; ``run(frames)`` does both. Without step batching each push
    returns its own frame, and ``stream(frame)`` is that push.

    ``latencies``: seconds from each output frame's push to its output, in output order. ``call_seconds``: the
    seconds of each push and flush step (the work done per frame; frames per second is their count over their sum).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        request: GenerationRequest,
        *,
        batch_steps: bool,
        control: ControlRequest | None = None,
        guard: CallGuard | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.guard = guard  # the pipeline's: pushes and flush steps are calls a weight swap waits for
        self.request = request
        self.control = control  # images, or functions of the frame, with the scales and window of every frame
        self.batch_steps = batch_steps
        self.table = request.table
        self.steps = request.steps
        self.timesteps = np.asarray(self.table.timesteps, dtype=np.float32)  # (N,)
        self.text = denoiser.encode_text(request)  # 1 row, or [unconditional, conditional] with CFG
        self._text_weights = denoiser.weights_version  # the weights self.text was encoded on
        self.size: tuple[int, int] | None = None
        self.draws: ImageToImageDraws | None = None
        self.in_flight: list[_InFlight] = []  # the newest frame first
        self.frames_in = 0
        self.latencies: list[float] = []
        self.call_seconds: list[float] = []
        self._feeds: dict[int, dict[str, np.ndarray]] = {}  # U-Net rows -> conditioning feeds
        self._timings: dict[str, Any] = {}

    @property
    def frames_per_second(self) -> float:
        """Frames out per second of work (pushes and flush steps), 0 before the first frame comes out."""
        spent = sum(self.call_seconds)
        return len(self.latencies) / spent if self.latencies and spent > 0 else 0.0

    @property
    def frames_in_flight(self) -> int:
        """Frames pushed whose steps are not all done (0 between pushes without step batching)."""
        return len(self.in_flight)

    def _one_call(self) -> AbstractContextManager[None]:
        """One call of the pipeline's guard (a stream made without one: no guard)."""
        return self.guard.call() if self.guard is not None else nullcontext()

    def _follow_weights(self) -> None:
        """After a weight swap (run-time adapters): the prompt encoded again, the conditioning feeds rebuilt.
        Frames in flight would run on two sets of weights: ``set_adapters`` refuses to swap while there are."""
        if self.denoiser.weights_version == self._text_weights:
            return
        if self.in_flight:
            raise UserError(
                f"the pipeline's adapters changed while {len(self.in_flight)} frame(s) of this stream were in "
                "flight: flush() a step-batched stream before set_adapters"
            )
        self.text = self.denoiser.encode_text(self.request)
        self._text_weights = self.denoiser.weights_version
        self._feeds.clear()

    def __call__(self, frame: Any, control_image: Any = None) -> np.ndarray:
        """One frame in, the same frame styled out: the unbatched loop only (a step-batched one returns frames
        later: use :meth:`push` and :meth:`flush`)."""
        if self.batch_steps:
            raise UserError("this stream batches steps (frames come out later): call push(frame) and flush()")
        image = self.push(frame, control_image)
        assert image is not None
        return image

    def push(self, frame: Any, control_image: Any = None) -> np.ndarray | None:
        """One frame in; the oldest frame in flight out once it has run every step (None while filling).
        ``control_image``: this frame's control image(s) on a ControlNet bundle (default: the stream's)."""
        start = time.perf_counter()
        with self._one_call():
            self._follow_weights()
            latents, control = self._encode(frame, control_image)
            self.in_flight.insert(0, _InFlight(latents, 0, start, control))
            self.frames_in += 1
            image = self._advance()
            while image is None and not self.batch_steps:  # unbatched: this frame runs all its steps now
                image = self._advance()
        self.call_seconds.append(time.perf_counter() - start)
        return image

    def flush(self) -> list[np.ndarray]:
        """The frames still in flight, each after its remaining steps, oldest first (none without step batching)."""
        images = []
        while self.in_flight:
            start = time.perf_counter()
            with self._one_call():
                self._follow_weights()
                image = self._advance()
            if image is not None:
                images.append(image)
            self.call_seconds.append(time.perf_counter() - start)
        return images

    def run(self, frames: Iterable[Any]) -> Iterator[np.ndarray]:
        """Every frame of ``frames`` styled, in order, one output per input (flushed at the end)."""
        for frame in frames:
            image = self.push(frame)
            if image is not None:
                yield image
        yield from self.flush()

    def _frame_control(self, pixels: np.ndarray, control_image: Any) -> ControlRequest | None:
        """The frame's control request: its own images, the stream's, or the stream's function of the frame."""
        base = self.control
        info = self.denoiser.manifest.pipeline
        if control_image is not None:
            if base is None:
                return build_control(self.denoiser.manifest, str(self.denoiser.bundle_dir), control_image)
            own = control_image if isinstance(control_image, (list, tuple)) else [control_image]
            if len(own) != len(base.images):
                raise UserError(f"control_image: pass {len(base.images)} image(s), one per ControlNet of the bundle")
            control = base.with_images(tuple(load_control_image(image, info.spatial_multiple) for image in own))
        elif base is not None and callable(base.images[0]):
            made = [function(pixels.copy()) for function in base.images]
            control = base.with_images(tuple(load_control_image(image, info.spatial_multiple) for image in made))
        else:
            control = base
        check_control_size(control, pixels.shape[0], pixels.shape[1])
        return control

    def _encode(self, frame: Any, control_image: Any = None) -> tuple[np.ndarray, ControlRequest | None]:
        """The frame's latents at the first step (1, C, h, w) and its control; the first frame fixes the size and
        the draws."""
        denoiser = self.denoiser
        info = denoiser.manifest.pipeline
        pixels = load_image(frame, info.spatial_multiple)
        size = pixels.shape[:2]
        if self.size is None:
            # Step batching runs 1..N rows per U-Net call: the memory check counts N; a static shape cannot hold it.
            denoiser.check_call(self.request, *size, unet_rows=self.steps if self.batch_steps else None)
            self.draws = image_to_image_draws(
                self.request.seed,
                denoiser.latent_shape(1, *size),
                self.steps,
                tiny_vae=info.vae == "autoencoder_tiny",
            )
            self.size = size
        elif size != self.size:
            raise UserError(
                f"frame {self.frames_in + 1} is {size[1]}x{size[0]} but the stream started at "
                f"{self.size[1]}x{self.size[0]}: pass frames of one size (start a new stream for another)"
            )
        assert self.draws is not None
        control = self._frame_control(pixels, control_image)
        latents = denoiser.encode_image(pixels, 1, self.table, self.draws.sample_noise, self.draws.image_noise)
        return latents, control

    def _advance(self) -> np.ndarray | None:
        """One U-Net call over every frame in flight, each at its own step (one row each; the unconditional half
        too with CFG), then each frame's LCM step; returns the frame that ran its last step, decoded, if any."""
        denoiser, rows = self.denoiser, self.in_flight
        assert self.draws is not None
        latents = rows[0].latents if len(rows) == 1 else np.concatenate([row.latents for row in rows])  # (R, C, h, w)
        timesteps = self.timesteps[[row.step for row in rows]]  # (R,)
        control = None
        controlled = [row.control for row in rows if row.control is not None]
        if controlled:  # each row's control images at its own step; a row without any runs at scale 0
            parts = [
                StepControl.of(row.control or controlled[0].without_effect(), 1, row.step, self.steps) for row in rows
            ]
            control = StepControl.stack(parts)
        prediction, _, _ = denoiser.predict(self.request, self._feeds_for(len(rows)), latents, timesteps, control)
        if not np.isfinite(prediction).all():
            steps = ", ".join(str(row.step + 1) for row in rows)
            check_finite(prediction, f"the U-Net at step {steps} (timestep {', '.join(f'{t:g}' for t in timesteps)})")
        finished: tuple[int, np.ndarray] | None = None
        for index, row in enumerate(rows):
            noise = self.draws.noise[row.step] if row.step < self.steps - 1 else None
            row.latents, denoised = denoiser.step(
                self.table, row.step, prediction[index : index + 1], row.latents, noise
            )
            row.step += 1
            if row.step == self.steps:
                finished = (index, denoised)
        if finished is None:
            return None
        index, denoised = finished
        row = rows.pop(index)  # the oldest: every push adds one at step 0 and every call moves all by one
        check_finite(denoised, f"the LCM step at step {self.steps}")
        image = denoiser.decode(denoised, self._timings)[0]
        self.latencies.append(time.perf_counter() - row.arrived)
        return image

    def _feeds_for(self, rows: int) -> dict[str, np.ndarray]:
        """The conditioning feeds of a ``rows``-row U-Net call, built once per row count."""
        if rows not in self._feeds:
            height, width = self.size
            self._feeds[rows] = self.denoiser.conditioning_feeds(
                self.request, self.text.repeat(rows), rows, height, width
            )
        return self._feeds[rows]
