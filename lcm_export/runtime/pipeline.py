"""``Pipeline.load(bundle)(prompt, ...)``: the LCM loop on numpy and one backend, as an app embeds it.

The loop knows no model family: the text encoders it runs and the U-Net inputs it builds come from the manifest's
conditioning declaration (:mod:`lcm_export.runtime.conditioning`). Each component runs the variant chosen at load
(:mod:`lcm_export.runtime.variants`: ``Pipeline.variants`` says which and why) at the compute precision the
backend was asked for. Text-to-image, image-to-image and the frame loop (:mod:`lcm_export.runtime.stream`) share one
core, :class:`~lcm_export.runtime.denoiser.Denoiser`, and one order of random draws (:mod:`lcm_export.runtime.draws`).

Given the same initial latents and the same per-step noise, the result equals diffusers'
``LatentConsistencyModelPipeline`` (distilled LCM) or ``StableDiffusionPipeline`` with ``LCMScheduler``
(LCM-LoRA, classifier-free guidance): the only random draws of an LCM run are the initial latents and one noise
tensor after every step but the last, and both can be passed in.

Threads: one ``Pipeline`` may be called from several threads at once, on every backend; each call gives the image
it would give alone (sessions that cannot run concurrently are locked one call at a time, OpenVINO keeps a pool of
infer requests). A :class:`~lcm_export.runtime.stream.FrameStream` belongs to the thread that uses it.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lcm_export.errors import UserError
from lcm_export.runtime.adapters import AdapterError, AdapterState, CallGuard, check_adapter_mode, one_weight_set
from lcm_export.runtime.backends import (
    BackendOptions,
    Session,
    backend_module,
    check_common_options,
    check_options,
    choose_backend,
)
from lcm_export.runtime.conditioning import TextConditioning
from lcm_export.runtime.control import ControlRequest, StepControl, build_control, check_control_size
from lcm_export.runtime.denoiser import Denoiser, check_finite
from lcm_export.runtime.draws import fresh_seed, image_to_image_draws, text_to_image_draws
from lcm_export.runtime.images import load_image
from lcm_export.runtime.manifest import Manifest, load_manifest
from lcm_export.runtime.request import GenerationRequest
from lcm_export.runtime.stream import FrameStream
from lcm_export.runtime.variants import VariantChoice, check_variant, choose_variant, choose_variants

Verify = Literal["full", "cached", "size"]
# The frame loop's step batching is off unless asked for: on the 2-core CPU measured it raised frames/s by a few
# percent and multiplied the latency per frame (bench/RESULTS.md, "Frame loop"; see Pipeline.stream).
DEFAULT_BATCH_STEPS = False


@dataclass
class PipelineOutput:
    """``images``: float32 (N, H, W, 3) in [0, 1], like diffusers' ``output_type="np"``.

    ``timings``: seconds per stage of this call: ``tokenize``, ``text_encoder``, ``unet`` (one per step),
    ``scheduler`` (one per step), ``vae_decode``, ``postprocess`` and ``total`` (image-to-image: ``vae_encode``).
    ``seed``: the seed the draws not passed by the caller came from (a fresh one when no seed was given).
    """

    images: np.ndarray
    timings: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None


@dataclass(frozen=True)
class StepEvent:
    """What an observer sees at each step: the U-Net's feeds and outputs as run (the CFG batch included), the
    latents before the step and the denoised sample after it. Arrays are the loop's own: copy what you keep."""

    index: int
    timestep: int
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    latents: np.ndarray
    denoised: np.ndarray


@dataclass(frozen=True)
class SessionInfo:
    """What a component's session runs on: the variant and, where the backend says, its compute precision and
    whether it was loaded from the compiled-model cache."""

    variant: VariantChoice
    inference_precision: str | None
    loaded_from_cache: bool | None


class Pipeline:
    """A loaded bundle. Sessions are opened once and reused between calls; calls may come from several threads."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        backend: str,
        options: BackendOptions,
        variant: str = "auto",
        adapter_mode: str = "auto",
        sessions: dict[str, Session] | None = None,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.options = options
        self.variant = check_variant(variant)
        module = backend_module(backend)
        check_options(backend, module, options)
        encoders = [encoder.component for encoder in manifest.conditioning.text_encoders]
        controlnets = list(manifest.controlnet.components) if manifest.controlnet is not None else []
        needed = [*encoders, "unet", *controlnets, "vae_decoder"]
        missing = [name for name in needed if name not in manifest.components]
        if missing:
            raise UserError(f"BUNDLE '{bundle_dir}' has no {', '.join(missing)}: re-export it")
        self._format = module.ARTIFACT_FORMAT
        chosen = choose_variants(manifest.components, needed, self._format, self.variant, bundle_dir)
        self.denoiser = Denoiser(bundle_dir, manifest, module, options, chosen, sessions)
        self.adapter_state = AdapterState(bundle_dir, manifest, adapter_mode)
        self.call_guard = CallGuard()
        self._streams: weakref.WeakSet[FrameStream] = weakref.WeakSet()  # a swap waits for none of them to hold frames

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        *,
        backend: str = "auto",
        variant: str = "auto",
        precision: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        cache: bool = True,
        cache_dir: str | Path | None = None,
        static_shape: tuple[int, int, int] | None = None,
        verify: Verify = "cached",
        profiling_dir: str | Path | None = None,
        low_memory: bool = False,
        adapters: dict[str | Path, float] | None = None,
        adapter_mode: str = "auto",
        sessions: dict[str, Session] | None = None,
    ) -> Pipeline:
        """Load a bundle: validate the manifest, verify file hashes, check every option against the backend, choose
        one variant per component, open one session each.

        - ``backend``: "auto" (the fastest installed for this device), "onnxruntime", "openvino", "tensorrt",
          "coreml".
        - ``variant``: which stored weights run: "auto" (the bundle's preferred, e.g. INT8 where exported), or
          "fp32" / "fp16" / "int8" (that precision where a component has it, else the closest more precise one;
          an error when the bundle cannot meet it). See :mod:`lcm_export.runtime.variants`.
        - ``precision``: how float graphs compute: "auto" (the device's fastest float: bf16 in OpenVINO on CPUs
          with AVX-512 BF16), "fp32" (parity), or "bf16"/"fp16" where the backend lists them.
        - ``device``: the backend's device ("auto": the CPU for onnxruntime and OpenVINO, the first GPU for
          TensorRT, every compute unit for Core ML); one it cannot use is an error, never a silent CPU run.
        - ``cache`` / ``cache_dir``: the compiled-model cache (default: on, in ``~/.cache/lcm-export`` or
          ``$LCM_EXPORT_CACHE_DIR``).
        - ``static_shape`` (batch, height, width): lets a backend specialise the graph for that call shape only.
        - ``verify``: "cached" (hash files not hashed before, the default), "full" (hash everything) or "size".
        - ``profiling_dir``: the backend's own profiler writes there (:meth:`end_profiling` finishes the files).
        - ``low_memory``: give each stage's working memory back after it runs (lower peak, somewhat slower).
        - ``adapters``: {adapter file: weight} applied at load (see :meth:`set_adapters`).
        - ``adapter_mode``: how adapters run: "auto" (the default), "factors" (each adapted layer's LoRA factors
          fed with every call to a branch beside it: a switch binds them, each call slower by about the factors'
          share of the weights; onnxruntime and OpenVINO, float variants), "inputs" (the merged weights fed with
          every call: a switch is the merge, each call slower by the weights the backend cannot pre-pack;
          onnxruntime, float variants) or "rebuild" (merged into a new optimised session: no cost per call, a
          switch takes as long as a load).
          See :mod:`lcm_export.runtime.adapters`.
        - ``sessions``: {component: session} run instead of opening those components (an object with
          ``run(feeds) -> outputs`` over the chosen variant's graph and I/O; the INT8 calibration runs an
          instrumented U-Net in the float bundle's own loop this way).
        """
        check_variant(variant)
        check_adapter_mode(adapter_mode)
        if not isinstance(backend, str):
            raise UserError(f"backend={backend!r}: pass a backend name such as 'auto'")
        # What needs no backend is refused before the bundle is read (verify: by load_manifest); the backend's own
        # lists at __init__.
        options = check_common_options(
            BackendOptions(
                precision=precision,
                threads=threads,
                cache_dir=cache_dir,
                cache=cache,
                device=device,
                static_shape=static_shape,
                profiling_dir=None if profiling_dir is None else str(profiling_dir),
                low_memory=low_memory,
            )
        )
        bundle_dir = Path(bundle_dir)
        manifest = load_manifest(bundle_dir, verify=verify)
        formats = {fmt for component in manifest.components.values() for fmt in component.artifacts}
        backend = choose_backend(backend, formats)
        pipeline = cls(bundle_dir, manifest, backend, options, variant, adapter_mode, sessions)
        if adapters:
            pipeline.set_adapters(adapters)
        return pipeline

    # -- run-time adapters ----------------------------------------------------------------------------------

    def set_adapters(self, adapters: dict[str | Path, float]) -> None:
        """Run the next calls with these adapters (files from ``lcm-export adapter``) at these weights, mixed:
        W + Σ λᵢ·Bᵢ·Aᵢ, always from the base weights (``{}``: the base). Every file and weight is checked first;
        the components they change get new sessions, swapped in when no call is running (a call in progress
        finishes on the weights it started with); cached prompt encodings are dropped. See
        :mod:`lcm_export.runtime.adapters`."""
        if not getattr(backend_module(self.backend), "ADAPTERS", False):
            raise UserError(
                f"the {self.backend} backend does not apply run-time adapters: load with backend='onnxruntime' or "
                "'openvino', or export with the LoRA fused (lcm-export MODEL --lora FILE)"
            )
        self._refuse_frames_in_flight()
        sessions, active = self.adapter_state.prepare(self.denoiser, adapters)
        with self.call_guard.swap():
            self._refuse_frames_in_flight()  # again, now that no push runs
            self.denoiser.replace_sessions(sessions)
            self.adapter_state.active = active

    def _refuse_frames_in_flight(self) -> None:
        """A step-batched stream's frames in flight started on the current weights and must end on them."""
        holding = sum(stream.frames_in_flight for stream in list(self._streams))
        if holding:
            raise AdapterError(
                f"set_adapters: {holding} frame(s) of a step-batched stream are in flight and would run on two sets "
                "of weights: call the stream's flush() first"
            )

    @property
    def adapters(self) -> dict[str, float]:
        """The adapters the calls run with, {file: weight} ({}: the base weights)."""
        return self.adapter_state.weights

    # -- what was loaded ------------------------------------------------------------------------------------

    @property
    def variants(self) -> dict[str, VariantChoice]:
        """The variant each open component runs, and why (the VAE encoder once image-to-image opened it)."""
        return self.denoiser.variants

    def variant_summary(self) -> str:
        """Which variant each component runs and why, e.g. "unet int8-qdq (the bundle's preferred), ..."."""
        return ", ".join(str(choice) for choice in self.variants.values())

    def session_info(self) -> dict[str, SessionInfo]:
        """Per open component: its variant, compute precision and cache state as the backend reports them."""
        variants = self.variants
        return {
            name: SessionInfo(
                variants[name],
                getattr(session, "inference_precision", None),
                getattr(session, "loaded_from_cache", None),
            )
            for name, session in self.denoiser.sessions.items()
        }

    def end_profiling(self) -> list[Path]:
        """Stop the backend profilers started by ``profiling_dir`` and return the files they wrote."""
        written: list[Path] = []
        for session in self.denoiser.sessions.values():
            end = getattr(session, "end_profiling", None)
            if end is not None:
                written.extend(end())
        return written

    def encode_prompts(self, prompts: list[str], timings: dict[str, Any] | None = None) -> TextConditioning:
        """The text conditioning of ``prompts`` (cached per prompt list; see :meth:`Denoiser.encode_prompts`)."""
        return self.denoiser.encode_prompts(prompts, timings)

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt encodings, so the next call runs the tokenizer and text encoder again (a profile
        calls this before every run: a repeated prompt would otherwise cost nothing after the first)."""
        self.denoiser.clear_prompt_cache()

    # -- generation -----------------------------------------------------------------------------------------

    @one_weight_set
    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 4,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        noise: list[np.ndarray] | None = None,
        observer: Callable[[StepEvent], None] | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] | None = None,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
    ) -> PipelineOutput:
        """Text-to-image. ``latents`` (B*n, C, h, w) and ``noise`` (steps - 1 tensors of that shape) make the run
        reproduce diffusers exactly; what is not passed is drawn from ``seed`` (None: a fresh one, given back as
        ``PipelineOutput.seed``).

        ``guidance_scale`` defaults to the bundle's (``manifest.pipeline.default_guidance_scale``: 8.5 for a
        distilled LCM as in diffusers, about 1-2 for LCM-LoRA). Every argument is checked before anything runs;
        a NaN or inf coming out of a stage raises :class:`NonFiniteError` naming the stage. ``observer`` is
        called after every step with a :class:`StepEvent` (nothing is recorded when it is None).

        ControlNet bundles (exported with ``--controlnet``): ``control_image`` (an image as ``img2img`` takes, or
        a list of one per ControlNet), ``controlnet_conditioning_scale`` (default: each ControlNet's scale in the
        manifest), ``control_guidance_start`` / ``control_guidance_end`` (the fraction of the steps each ControlNet
        runs in), as diffusers' ``StableDiffusionControlNetPipeline`` takes them; the control image sets the size
        when ``height``/``width``/``latents`` do not, and must equal it when they do.
        """
        start = time.perf_counter()
        timings: dict[str, Any] = {"unet": [], "scheduler": []}
        info = self.manifest.pipeline
        request = self._request(
            prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, seed
        )
        control = self._control(
            control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end
        )
        batch = request.batch
        if control is not None and latents is None:
            height, width = (
                (control.size[0] if height is None else height),
                (control.size[1] if width is None else width),
            )

        # 1. Shapes: from the latents when given, else from height/width (default: the model's sample size).
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.ndim != 4 or latents.shape[:2] != (batch, info.latent_channels):
                raise UserError(
                    f"latents have shape {list(latents.shape)}: expected ({batch}, {info.latent_channels}, h, w) "
                    f"for {len(request.prompts)} prompt(s) x {request.images_per_prompt} image(s)"
                )
            if not np.isfinite(latents).all():
                raise UserError("latents contain NaN or inf: pass finite initial latents")
            height, width = latents.shape[2] * info.vae_scale_factor, latents.shape[3] * info.vae_scale_factor
        height = info.default_height if height is None else height
        width = info.default_width if width is None else width
        self.denoiser.check_call(request, height, width)
        check_control_size(control, height, width)

        # 2. Random draws, in diffusers' order: initial latents, then one noise tensor per step but the last.
        draws = text_to_image_draws(
            request.seed, self.denoiser.latent_shape(batch, height, width), request.steps, latents=latents, noise=noise
        )
        initial = draws.latents * np.float32(self.manifest.scheduler.init_noise_sigma)

        # 3-6. Prompt encodings, the loop from the initial latents, the decode.
        timings["prepare"] = time.perf_counter() - start
        return self._generate(request, initial, draws.noise, height, width, observer, timings, start, control)

    @one_weight_set
    def img2img(
        self,
        image: Any,
        prompt: str | list[str],
        *,
        strength: float = 0.5,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 4,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        sample_noise: np.ndarray | None = None,
        image_noise: np.ndarray | None = None,
        noise: list[np.ndarray] | None = None,
        observer: Callable[[StepEvent], None] | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] | None = None,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
    ) -> PipelineOutput:
        """Image-to-image: ``image`` (a PIL image, a float (H, W, 3) array in [0, 1], or a path) is encoded by the
        bundle's VAE encoder, noised to the first timestep of the ``strength`` schedule and denoised from there.

        The timesteps are diffusers' for that strength and pipeline kind, computed at export (distilled:
        ``LatentConsistencyModelImg2ImgPipeline``, all steps from a lower start; LCM-LoRA:
        ``StableDiffusionImg2ImgPipeline`` + ``LCMScheduler``, the last ``int(steps * strength)`` steps). Every
        random draw can be passed: ``sample_noise`` (the VAE's latent sample; not drawn by a tiny VAE),
        ``image_noise`` (added to the encoded image), ``noise`` (one per step but the last), each latent-shaped.
        The ControlNet arguments are text-to-image's (diffusers' ``StableDiffusionControlNetImg2ImgPipeline``); the
        control image must be the image's size.
        """
        start = time.perf_counter()
        timings: dict[str, Any] = {"unet": [], "scheduler": []}
        info = self.manifest.pipeline
        request = self._request(
            prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, seed, strength
        )
        control = self._control(
            control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end
        )
        self._open_encoder()
        pixels = load_image(image, info.spatial_multiple)  # (H, W, 3) in [0, 1]
        height, width = pixels.shape[:2]
        self.denoiser.check_call(request, height, width)
        check_control_size(control, height, width)

        # 1. Random draws, in diffusers' order: the VAE's latent sample, the image noise, one noise per step.
        draws = image_to_image_draws(
            request.seed,
            self.denoiser.latent_shape(request.batch, height, width),
            request.steps,
            tiny_vae=info.vae == "autoencoder_tiny",
            sample_noise=sample_noise,
            image_noise=image_noise,
            noise=noise,
        )

        # 2-3. Encode, noise to the schedule's first timestep.
        mark = time.perf_counter()
        latents = self.denoiser.encode_image(
            pixels, request.batch, request.table, draws.sample_noise, draws.image_noise
        )
        timings["vae_encode"] = time.perf_counter() - mark
        timings["prepare"] = time.perf_counter() - start - timings["vae_encode"]
        return self._generate(request, latents, draws.noise, height, width, observer, timings, start, control)

    def stream(
        self,
        prompt: str,
        *,
        strength: float = 0.5,
        num_inference_steps: int = 4,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        seed: int | None = None,
        batch_steps: bool | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] | None = None,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
    ) -> FrameStream:
        """A frame loop for frames of one size (:class:`FrameStream`): the prompt encoded, the tables, the
        conditioning feeds and the VAE encoder prepared once, and the same draws for every frame, in
        image-to-image's order (a still input gives a still output; consecutive frames do not flicker from fresh
        noise; the first frame equals ``img2img`` of it with the same seed).

        ``batch_steps`` (StreamDiffusion's step batching): with N denoising steps, N frames are in flight and each
        U-Net call is one batch holding the newest frame at its first step, the one before at its second, and so
        on; a frame then costs one batched call instead of N calls, and comes out N - 1 frames later
        (:meth:`FrameStream.push` returns it then; :meth:`FrameStream.flush` empties the pipeline at the end).
        The output equals the unbatched loop's within float rounding. It needs a bundle whose U-Net takes one
        timestep per row (exported since step batching) and a pipeline loaded without ``static_shape`` (the
        batch grows and shrinks as the pipeline fills and flushes). On a bundle that predates per-row timesteps,
        the default runs unbatched and ``batch_steps=True`` is an error.

        Default (None): off. On a CPU a U-Net batch of N rows costs nearly N single calls, so batching adds little
        throughput and multiplies each frame's latency (measured: bench/RESULTS.md, "Frame loop"); turn it on for
        throughput (a video file) or where a batch is much cheaper per row than a single call (GPUs).

        ControlNet bundles: ``control_image`` is one image for every frame, or a function of the frame (it gets
        the frame as (H, W, 3) float32 in [0, 1] and returns the control image(s)); ``FrameStream.push(frame,
        control_image=...)`` gives a frame its own. Scales and the guidance window are text-to-image's.
        """
        if batch_steps is not None and not isinstance(batch_steps, bool):
            raise UserError(f"batch_steps={batch_steps!r}: pass True, False or None (the default, off)")
        if not isinstance(prompt, str) or (negative_prompt is not None and not isinstance(negative_prompt, str)):
            raise UserError("stream() takes one prompt (a string): start one stream per prompt")
        request = self._request(prompt, negative_prompt, num_inference_steps, guidance_scale, 1, seed, strength)
        batch = DEFAULT_BATCH_STEPS if batch_steps is None else batch_steps
        if batch and not self.denoiser.per_row_timesteps:
            if batch_steps is None:
                batch = False  # an older bundle: the unbatched loop, as before
            else:
                raise UserError(
                    f"batch_steps: BUNDLE '{self.bundle_dir}' has a U-Net that takes one timestep for the whole "
                    "batch (exported before per-row timesteps): re-export it, or pass batch_steps=False"
                )
        if batch and self.options.static_shape is not None:
            raise UserError(
                "batch_steps runs U-Net batches of 1 to N rows as the pipeline fills and flushes: load the pipeline "
                "without static_shape, or pass batch_steps=False"
            )
        control = self._control(
            control_image,
            controlnet_conditioning_scale,
            control_guidance_start,
            control_guidance_end,
            image_transform=True,
        )
        self._open_encoder()
        stream = FrameStream(self.denoiser, request, batch_steps=batch, control=control, guard=self.call_guard)
        self._streams.add(stream)
        return stream

    # -- shared steps ---------------------------------------------------------------------------------------

    def _request(
        self,
        prompt: Any,
        negative_prompt: Any,
        num_inference_steps: Any,
        guidance_scale: Any,
        num_images_per_prompt: Any,
        seed: Any,
        strength: Any = None,
    ) -> GenerationRequest:
        """Every argument checked (one-line errors naming it); no seed: a fresh one, recorded in the output so
        that the image can be made again."""
        if seed is None:
            seed = fresh_seed()
        return GenerationRequest.build(
            self.manifest.pipeline,
            self.denoiser.scheduler,
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            seed=seed,
            strength=strength,
        )

    def _control(
        self, image: Any, scale: Any, start: Any, end: Any, *, image_transform: bool = False
    ) -> ControlRequest | None:
        """A call's ControlNet arguments, checked against the bundle (:func:`build_control`)."""
        return build_control(
            self.manifest,
            str(self.bundle_dir),
            image,
            conditioning_scale=scale,
            guidance_start=start,
            guidance_end=end,
            image_transform=image_transform,
        )

    def _open_encoder(self) -> None:
        """Open the VAE encoder on its variant (image-to-image and the frame loop need it; text-to-image not)."""
        if "vae_encoder" not in self.manifest.components:
            raise UserError(f"BUNDLE '{self.bundle_dir}' has no vae_encoder: re-export it without --no-vae-encoder")
        component = self.manifest.components["vae_encoder"]
        self.denoiser.open_encoder(choose_variant(component, self._format, self.variant))

    def _generate(
        self,
        request: GenerationRequest,
        latents: np.ndarray,
        noise: list[np.ndarray],
        height: int,
        width: int,
        observer: Callable[[StepEvent], None] | None,
        timings: dict[str, Any],
        start: float,
        control: ControlRequest | None = None,
    ) -> PipelineOutput:
        """Encode the prompts, run the LCM loop from ``latents`` over the request's table, decode: shared by
        text-to-image and image-to-image (``control``: the ControlNets' images, scales and window)."""
        denoiser, table, batch = self.denoiser, request.table, request.batch
        # 3. Prompt encodings, repeated per image; with CFG the unconditional half comes first.
        text = denoiser.encode_text(request, timings).repeat(request.images_per_prompt)  # (B*n[*2], S, D)

        # 4. The other U-Net inputs, as the manifest declares them (w-embedding, pooled text, size ids).
        feeds = denoiser.conditioning_feeds(request, text, batch, height, width)

        # 5. The LCM loop: U-Net, then the consistency step.
        denoised = latents
        for index, timestep in enumerate(table.timesteps):
            mark = time.perf_counter()
            step_control = None if control is None else StepControl.of(control, batch, index, len(table.timesteps))
            prediction, run_feeds, outputs = denoiser.predict(
                request, feeds, latents, np.full(batch, timestep), step_control
            )
            check_finite(prediction, f"the U-Net at step {index + 1} (timestep {timestep})")
            after_unet = time.perf_counter()
            step_noise = noise[index] if index < len(noise) else None
            before = latents
            latents, denoised = denoiser.step(table, index, prediction, latents, step_noise)
            timings["unet"].append(after_unet - mark)
            timings["scheduler"].append(time.perf_counter() - after_unet)
            if observer is not None:
                observer(StepEvent(index, int(timestep), run_feeds, outputs, before, denoised))

        # 6. Decode the last denoised sample.
        check_finite(denoised, f"the LCM step at step {len(table.timesteps)}")
        images = denoiser.decode(denoised, timings)  # (B*n, H, W, 3)
        timings["total"] = time.perf_counter() - start
        return PipelineOutput(images=images, timings=timings, seed=request.seed)
