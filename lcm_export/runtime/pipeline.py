"""``Pipeline.load(bundle)(prompt, ...)``: the LCM text-to-image loop on numpy and one backend.

The loop knows no model family: the text encoders it runs and the U-Net inputs it builds come from the manifest's
conditioning declaration (:mod:`lcm_export.runtime.conditioning`), and each component runs the variant the
backend and the requested precision select (:meth:`Component.select`; ``Pipeline.variants`` says which). An
optional ``observer`` sees every U-Net call's inputs and outputs (calibration, previews, tests).

Given the same initial latents and the same per-step noise, the result equals diffusers'
``LatentConsistencyModelPipeline`` (distilled LCM) or ``StableDiffusionPipeline`` with ``LCMScheduler``
(LCM-LoRA, classifier-free guidance): the only random draws of an LCM run are the initial latents and one noise
tensor after every step but the last, and both can be passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.errors import NonFiniteError, UserError
from lcm_export.runtime.backends import BackendOptions, backend_module, choose_backend
from lcm_export.runtime.conditioning import TextConditioning, unet_conditioning_feeds
from lcm_export.runtime.images import load_image
from lcm_export.runtime.inputs import (
    MemoryModel,
    check_guidance,
    check_integer,
    check_memory,
    check_negative_prompt,
    check_prompts,
    check_seed,
    check_strength,
)
from lcm_export.runtime.manifest import Artifact, Manifest, load_manifest
from lcm_export.runtime.scheduler import LCMScheduler
from lcm_export.runtime.specs import ShapeRange
from lcm_export.runtime.tokenizer import PromptTokenizer


@dataclass
class PipelineOutput:
    """``images``: float32 (N, H, W, 3) in [0, 1], like diffusers' ``output_type="np"``.

    ``timings``: seconds per stage of this call: ``tokenize``, ``text_encoder``, ``unet`` (one per step),
    ``scheduler`` (one per step), ``vae_decode``, ``postprocess`` and ``total``.
    """

    images: np.ndarray
    timings: dict[str, Any] = field(default_factory=dict)


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
class _Request:
    """One generation call's checked arguments (text-to-image and image-to-image share them)."""

    prompts: list[str]
    negatives: list[str]  # the unconditional prompts of a CFG call ("" each when none was given)
    negative_given: bool
    images_per_prompt: int
    guidance_scale: float
    table: Any  # StepTable
    seed: int | None

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt


# Precisions only a variant can give (no backend computes them from a float graph): asking for one that no
# component has is an error, not a silent float run.
VARIANT_ONLY_PRECISIONS = ("int8",)
# The frame loop's step batching is off unless asked for: on the 2-core CPU measured (bench/RESULTS.md, "Frame
# loop") it raised frames/s by 3-5% and multiplied the latency per frame by 2-3.5 (see Pipeline.stream).
DEFAULT_BATCH_STEPS = False


class Pipeline:
    """A loaded bundle. Sessions are opened once; buffers and tables are reused between calls."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: str, options: BackendOptions) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.options = options
        module = backend_module(backend)
        conditioning = manifest.conditioning
        encoders = [encoder.component for encoder in conditioning.text_encoders]
        needed = [*encoders, "unet", "vae_decoder"]
        missing = [name for name in needed if name not in manifest.components]
        if missing:
            raise UserError(f"BUNDLE '{bundle_dir}' has no {', '.join(missing)}: re-export it")
        # One variant per component: the backend's format at the requested precision.
        self.variants: dict[str, Artifact] = {
            name: manifest.components[name].select(module.ARTIFACT_FORMAT, options.precision) for name in needed
        }
        by_name = {tokenizer.name: tokenizer for tokenizer in manifest.tokenizers}
        self.tokenizers = {
            encoder.tokenizer: PromptTokenizer(bundle_dir, by_name[encoder.tokenizer])
            for encoder in conditioning.text_encoders
        }
        if options.precision in VARIANT_ONLY_PRECISIONS and not any(
            variant.precision == options.precision for variant in self.variants.values()
        ):
            have = sorted({v.precision for c in manifest.components.values() for v in c.variants})
            raise UserError(
                f"precision '{options.precision}': BUNDLE '{bundle_dir}' has no {options.precision} variant (it has "
                f"{', '.join(have)}): pick one of those, or re-export with --precision {options.precision}"
            )
        self._module = module
        self.sessions: dict[str, Any] = {}
        self.input_dtypes: dict[str, dict[str, np.dtype]] = {}
        self.input_shapes: dict[str, dict[str, tuple[int | str, ...]]] = {}
        for name in needed:
            self._open(name)
        self.scheduler = LCMScheduler(manifest.scheduler)
        self.memory_model = MemoryModel.from_bundle(bundle_dir)
        self._prompt_cache: dict[tuple[str, ...], TextConditioning] = {}

    def _open(self, name: str) -> None:
        """Open ``name``'s session on its selected variant (the VAE encoder only when image-to-image needs it)."""
        manifest = self.manifest
        if name not in self.variants:
            self.variants[name] = manifest.components[name].select(self._module.ARTIFACT_FORMAT, self.options.precision)
        hashes = {entry.path: entry.sha256 for entry in manifest.files}
        resolved = manifest.components[name].resolved(self.variants[name], hashes)
        self.sessions[name] = self._module.open_session(
            self.bundle_dir, resolved, self.options, self._static_shapes(name)
        )
        self.input_dtypes[name] = {t.name: np.dtype(t.dtype) for t in resolved.spec.inputs}
        self.input_shapes[name] = {t.name: t.shape for t in resolved.spec.inputs}

    @property
    def per_row_timesteps(self) -> bool:
        """Whether the U-Net takes one timestep per row, (batch,), so that one call can hold rows at different
        steps (the frame loop's step batching). Bundles exported before that take one scalar for the batch."""
        return len(self.input_shapes["unet"]["timestep"]) == 1

    def _timestep_feed(self, timesteps: np.ndarray) -> np.ndarray:
        """The U-Net's ``timestep`` input for rows at ``timesteps`` (B,): as is, or a scalar bundle's one value."""
        if self.per_row_timesteps:
            return timesteps.astype(np.float32)  # (B,)
        if np.any(timesteps != timesteps[0]):
            raise ValueError("this U-Net takes one timestep for the whole batch")  # callers check it first
        return np.array(timesteps[0], dtype=np.float32)  # ()

    @property
    def sequence_length(self) -> int:
        """Tokens per prompt (the first text encoder's tokenizer): the ``sequence`` symbol of the specs."""
        first = self.manifest.conditioning.text_encoders[0].tokenizer
        return self.tokenizers[first].info.max_length

    def variant_summary(self) -> str:
        """Which variant each component runs, e.g. "text_encoder fp32, unet int8-qdq, vae_decoder fp32"."""
        return ", ".join(f"{name} {variant.name}" for name, variant in self.variants.items())

    def _static_shapes(self, name: str) -> dict[str, tuple[int, ...]] | None:
        """Input shapes of ``name`` for ``options.static_shape`` (batch, height, width); None when dynamic.

        Components fed the CFG batch keep a dynamic batch (-1): guidance <= 1 runs them at 1x, > 1 at 2x.
        """
        if self.options.static_shape is None:
            return None
        batch, height, width = self.options.static_shape
        self.check_size(height, width)
        spec = self.manifest.components[name].spec
        values = ShapeRange.static(batch, height, width, self.sequence_length).symbol_values(
            "opt", self.manifest.pipeline.vae_scale_factor
        )
        if spec.batch_multiplier != 1:
            values["batch"] = -1
        return spec.input_shapes(values)

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        *,
        backend: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        cache_dir: str | None = None,
        device: str = "auto",
        static_shape: tuple[int, int, int] | None = None,
        verify: str = "cached",
        profiling_dir: str | None = None,
        low_memory: bool = False,
    ) -> Pipeline:
        """Load a bundle: validate the manifest, verify file hashes, open one session per component.

        ``profiling_dir`` turns on the backend's own profiler, which writes into that folder (see
        ``BackendOptions``); the sessions' ``end_profiling()`` finishes the files. ``low_memory`` trades some speed
        for a lower peak memory (``BackendOptions``).
        """
        bundle_dir = Path(bundle_dir)
        manifest = load_manifest(bundle_dir, verify=verify)
        formats = {fmt for component in manifest.components.values() for fmt in component.artifacts}
        options = BackendOptions(
            precision=precision,
            threads=threads,
            cache_dir=cache_dir,
            device=device,
            static_shape=static_shape,
            profiling_dir=profiling_dir,
            low_memory=low_memory,
        )
        return cls(bundle_dir, manifest, choose_backend(backend, formats), options)

    # -- stages ---------------------------------------------------------------------------------------------

    def _run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtypes = self.input_dtypes[component]
        # np.asarray keeps 0-d arrays 0-d (the scalar timestep); np.require makes them C-contiguous.
        cast = {
            name: np.require(np.asarray(value, dtype=dtypes[name]), requirements="C") for name, value in feeds.items()
        }
        return self.sessions[component].run(cast)

    def encode_prompts(self, prompts: list[str], timings: dict[str, Any] | None = None) -> TextConditioning:
        """The declared text encoders' hidden states (concatenated) and pooled embedding for ``prompts``,
        float32, cached per prompt list.

        ``timings`` receives ``tokenize`` and ``text_encoder`` seconds (zero when the encoding was cached).
        """
        key = tuple(prompts)
        tokenize_seconds = encode_seconds = 0.0
        if key not in self._prompt_cache:
            hidden_parts: list[np.ndarray] = []
            pooled = None
            for encoder in self.manifest.conditioning.text_encoders:
                mark = time.perf_counter()
                ids = self.tokenizers[encoder.tokenizer](prompts)  # (B, S)
                tokenize_seconds += time.perf_counter() - mark
                mark = time.perf_counter()
                outputs = self._run(encoder.component, {"input_ids": ids})
                encode_seconds += time.perf_counter() - mark
                hidden_parts.append(outputs[encoder.hidden_state].astype(np.float32, copy=False))  # (B, S, D_i)
                if encoder.pooled is not None:
                    pooled = outputs[encoder.pooled].astype(np.float32, copy=False)  # (B, P)
            hidden = hidden_parts[0] if len(hidden_parts) == 1 else np.concatenate(hidden_parts, axis=-1)
            _check_finite(hidden, "the text encoder")
            if len(self._prompt_cache) >= 16:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            self._prompt_cache[key] = TextConditioning(hidden, pooled)
        if timings is not None:
            timings["tokenize"] = tokenize_seconds
            timings["text_encoder"] = encode_seconds
        return self._prompt_cache[key]

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt encodings, so the next call runs the tokenizer and text encoder again.

        A profile calls this before every run: a repeated prompt would otherwise cost nothing after the first.
        """
        self._prompt_cache.clear()

    def check_size(self, height: int, width: int) -> None:
        multiple = self.manifest.pipeline.spatial_multiple
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise UserError(f"{name}={value!r}: pass an integer multiple of {multiple}")
            if value <= 0 or value % multiple:
                lower = max(multiple, value // multiple * multiple)
                raise UserError(
                    f"{name}={value} cannot be taken by this bundle's VAE and U-Net: pass a multiple of "
                    f"{multiple} (e.g. {lower} or {lower + multiple})"
                )

    def check_static_shape(self, batch: int, height: int, width: int) -> None:
        """A pipeline loaded with ``static_shape`` runs that shape only: backends compiled their graphs for it, and
        recompiling on the fly would cost a load's time and memory in the middle of a call."""
        if self.options.static_shape is None or tuple(self.options.static_shape) == (batch, height, width):
            return
        loaded_batch, loaded_height, loaded_width = self.options.static_shape
        raise UserError(
            f"this pipeline was loaded with static_shape for {loaded_batch} image(s) of {loaded_width}x{loaded_height} "
            f"but was called for {batch} image(s) of {width}x{height}: call it with that shape, or load it again "
            f"with static_shape=({batch}, {height}, {width}) or without static_shape"
        )

    # -- the loop -------------------------------------------------------------------------------------------

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
    ) -> PipelineOutput:
        """Generate images. ``latents`` (B*n, C, h, w) and ``noise`` (steps - 1 tensors of that shape) make
        the run reproduce diffusers exactly; otherwise they are drawn from ``seed`` with numpy.

        ``guidance_scale`` defaults to the bundle's (``manifest.pipeline.default_guidance_scale``: 8.5 for a
        distilled LCM as in diffusers, about 1-2 for LCM-LoRA). Every argument is checked before anything runs;
        a NaN or inf coming out of a stage raises :class:`NonFiniteError` naming the stage. ``observer`` is
        called after every step with a :class:`StepEvent` (nothing is recorded when it is None).
        """
        start = time.perf_counter()
        timings: dict[str, Any] = {"unet": [], "scheduler": []}
        info = self.manifest.pipeline
        request = self._request(
            prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, seed
        )
        batch = request.batch

        # 1. Shapes: from the latents when given, else from height/width (default: the model's sample size).
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            expected_lead = (batch, info.latent_channels)
            if latents.ndim != 4 or latents.shape[:2] != expected_lead:
                raise UserError(
                    f"latents have shape {list(latents.shape)}: expected ({batch}, {info.latent_channels}, h, w) "
                    f"for {len(request.prompts)} prompt(s) x {request.images_per_prompt} image(s)"
                )
            if not np.isfinite(latents).all():
                raise UserError("latents contain NaN or inf: pass finite initial latents")
            height, width = latents.shape[2] * info.vae_scale_factor, latents.shape[3] * info.vae_scale_factor
        height = info.default_height if height is None else height
        width = info.default_width if width is None else width
        self.check_size(height, width)
        self.check_static_shape(batch, height, width)
        latent_shape = (batch, info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
        self._check_memory(request, height, width)

        # 2. Random draws, in diffusers' order: initial latents, then one noise tensor per step but the last.
        rng = np.random.default_rng(request.seed)
        if latents is None:
            latents = rng.standard_normal(latent_shape, dtype=np.float32)
        latents = latents * np.float32(self.manifest.scheduler.init_noise_sigma)
        noise = _draw_steps(noise, len(request.table.timesteps) - 1, latent_shape, rng)

        # 3-6. Prompt encodings, the loop from the initial latents, the decode.
        timings["prepare"] = time.perf_counter() - start
        return self._generate(request, latents, noise, height, width, observer, timings, start)

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
    ) -> PipelineOutput:
        """Image-to-image: ``image`` (a PIL image, a float (H, W, 3) array in [0, 1], or a path) is encoded by the
        bundle's VAE encoder, noised to the first timestep of the ``strength`` schedule and denoised from there.

        The timesteps are diffusers' for that strength and pipeline kind, computed at export (distilled:
        ``LatentConsistencyModelImg2ImgPipeline``, all steps from a lower start; LCM-LoRA:
        ``StableDiffusionImg2ImgPipeline`` + ``LCMScheduler``, the last ``int(steps * strength)`` steps). Every
        random draw can be passed: ``sample_noise`` (the VAE's latent sample; not drawn by a tiny VAE),
        ``image_noise`` (added to the encoded image), ``noise`` (one per step but the last), each latent-shaped.
        """
        start = time.perf_counter()
        timings: dict[str, Any] = {"unet": [], "scheduler": []}
        info = self.manifest.pipeline
        request = self._request(
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            seed,
            check_strength(strength),
        )
        batch, table = request.batch, request.table
        if "vae_encoder" not in self.manifest.components:
            raise UserError(f"BUNDLE '{self.bundle_dir}' has no vae_encoder: re-export it without --no-vae-encoder")
        pixels = load_image(image, info.spatial_multiple)  # (H, W, 3) in [0, 1]
        height, width = pixels.shape[:2]
        self.check_static_shape(batch, height, width)
        latent_shape = (batch, info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
        self._check_memory(request, height, width)

        # 1. Random draws, in diffusers' order: the VAE's latent sample, the image noise, one noise per step.
        rng = np.random.default_rng(request.seed)
        tiny = info.vae == "autoencoder_tiny"
        sample_noise = None if tiny else _draw("sample_noise", sample_noise, latent_shape, rng)
        image_noise = _draw("image_noise", image_noise, latent_shape, rng)
        noise = _draw_steps(noise, len(table.timesteps) - 1, latent_shape, rng)

        # 2-3. Encode, noise to the schedule's first timestep.
        mark = time.perf_counter()
        if self.sessions.get("vae_encoder") is None:
            self._open("vae_encoder")
        latents = self._encode_image(pixels, batch, table, sample_noise, image_noise)
        timings["vae_encode"] = time.perf_counter() - mark
        timings["prepare"] = time.perf_counter() - start - timings["vae_encode"]
        return self._generate(request, latents, noise, height, width, observer, timings, start)

    def _encode_image(
        self,
        pixels: np.ndarray,  # (H, W, 3) in [0, 1]
        batch: int,
        table: Any,  # StepTable
        sample_noise: np.ndarray | None,  # (B, C, h, w); None for a tiny VAE (it draws no latent sample)
        image_noise: np.ndarray,  # (B, C, h, w)
    ) -> np.ndarray:
        """The latents image-to-image starts from, (B, C, h, w): the image encoded, scaled and noised to the
        table's first timestep, as diffusers' img2img pipelines prepare them."""
        info = self.manifest.pipeline
        # 2. Encode: (B, 3, H, W) in [-1, 1] -> latents, sampled from the KL VAE's distribution, scaled.
        encoder_input = np.repeat((pixels * 2 - 1).transpose(2, 0, 1)[None], batch, axis=0)
        outputs = self._run("vae_encoder", {"sample": encoder_input})
        if info.vae == "autoencoder_tiny":
            encoded = outputs["latents"].astype(np.float32)
        else:
            mean, log_variance = np.split(outputs["latent_parameters"].astype(np.float32), 2, axis=1)
            std = np.exp(0.5 * np.clip(log_variance, -30.0, 20.0))
            encoded = mean + std * sample_noise
        _check_finite(encoded, "the VAE encoder")
        if info.vae_shift_factor is not None:
            encoded = encoded - np.float32(info.vae_shift_factor)
        encoded = encoded * np.float32(info.vae_scaling_factor)
        # 3. Noise it to the schedule's first timestep (the scheduler's add_noise).
        sqrt_alpha, sqrt_beta = np.float32(table.sqrt_alpha_prod[0]), np.float32(table.sqrt_beta_prod[0])
        return sqrt_alpha * encoded + sqrt_beta * image_noise

    def _request(
        self,
        prompt: Any,
        negative_prompt: Any,
        num_inference_steps: Any,
        guidance_scale: Any,
        num_images_per_prompt: Any,
        seed: Any,
        strength: float = 1.0,
    ) -> _Request:
        """Check every argument of a call before anything runs (one-line errors naming the argument)."""
        info = self.manifest.pipeline
        prompts = check_prompts(prompt)
        images = check_integer("num_images_per_prompt", num_images_per_prompt, minimum=1)
        steps = check_integer("num_inference_steps", num_inference_steps, minimum=1)
        guidance = check_guidance(info.default_guidance_scale if guidance_scale is None else guidance_scale)
        seed = check_seed(seed)
        table = self.scheduler.table(steps, strength)
        negatives = check_negative_prompt(
            negative_prompt, len(prompts), guidance_kind=info.guidance, guidance_scale=guidance
        )
        return _Request(prompts, negatives, negative_prompt is not None, images, guidance, table, seed)

    def _check_memory(self, request: _Request, height: int, width: int, unet_rows: int | None = None) -> None:
        """Refuse a size the machine's memory cannot hold; ``unet_rows``: U-Net rows per call when they are not
        the request's batch (the frame loop's step batching runs one row per step in flight)."""
        info = self.manifest.pipeline
        rows = request.batch if unet_rows is None else unet_rows
        check_memory(
            self.memory_model,
            batch=request.batch,
            unet_batch=rows * (2 if self._uses_cfg(request) else 1),
            height=height,
            width=width,
            latent_height=height // info.vae_scale_factor,
            latent_width=width // info.vae_scale_factor,
        )

    def _uses_cfg(self, request: _Request) -> bool:
        return self.manifest.pipeline.guidance == "cfg" and request.guidance_scale > 1.0

    def stream(
        self,
        prompt: str,
        *,
        strength: float = 0.5,
        num_inference_steps: int = 4,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        seed: int = 0,
        batch_steps: bool | None = None,
    ) -> FrameStream:
        """A frame loop for frames of one size (:class:`FrameStream`): the prompt encoded, the tables, the
        conditioning feeds and the VAE encoder prepared once, and the same noise for every frame (a still input
        gives a still output; consecutive frames do not flicker from fresh noise).

        ``batch_steps`` (StreamDiffusion's step batching): with N denoising steps, N frames are in flight and each
        U-Net call is one batch holding the newest frame at its first step, the one before at its second, and so
        on; a frame then costs one batched call instead of N calls, and comes out N - 1 frames later
        (:meth:`FrameStream.push` returns it then; :meth:`FrameStream.flush` empties the pipeline at the end).
        The output equals the unbatched loop's within float rounding. It needs a bundle whose U-Net takes one
        timestep per row (exported since step batching) and a pipeline loaded without ``static_shape`` (the
        batch grows and shrinks as the pipeline fills and flushes). On a bundle that predates per-row timesteps,
        the default runs unbatched and ``batch_steps=True`` is an error.

        Default (None): off, by measurement (bench/RESULTS.md, "Frame loop": SD1.5-shaped, 256 px, tiny VAE,
        OpenVINO bf16, 2 threads, the rows alternating): on this CPU a U-Net batch of N rows costs nearly N single
        calls, so batching raised frames per second by only 3-5% (2 steps 0.39 against 0.38, 4 steps 0.22 against
        0.21, about the spread between rounds), while each frame's latency grew from 2.6 to 5.1 s (2 steps) and
        from 4.9 to 16.9 s (4 steps, medians). For a live loop latency decides; turn it on for throughput (a video
        file) or where a batch is much cheaper per row than a single call (GPUs: StreamDiffusion's case).
        """
        check_strength(strength)
        if batch_steps is not None and not isinstance(batch_steps, bool):
            raise UserError(f"batch_steps={batch_steps!r}: pass True, False or None (the default, off)")
        if isinstance(prompt, list) or (negative_prompt is not None and not isinstance(negative_prompt, str)):
            raise UserError("stream() takes one prompt (a string): start one stream per prompt")
        request = self._request(prompt, negative_prompt, num_inference_steps, guidance_scale, 1, seed, strength)
        batch = DEFAULT_BATCH_STEPS if batch_steps is None else batch_steps
        if batch and not self.per_row_timesteps:
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
        if "vae_encoder" not in self.manifest.components:
            raise UserError(f"BUNDLE '{self.bundle_dir}' has no vae_encoder: re-export it without --no-vae-encoder")
        if self.sessions.get("vae_encoder") is None:
            self._open("vae_encoder")
        return FrameStream(self, request, batch_steps=batch)

    def _generate(
        self,
        request: _Request,
        latents: np.ndarray,
        noise: list[np.ndarray],
        height: int,
        width: int,
        observer: Callable[[StepEvent], None] | None,
        timings: dict[str, Any],
        start: float,
    ) -> PipelineOutput:
        """Encode the prompts, run the LCM loop from ``latents`` over the request's table, decode: shared by both
        modes."""
        table, batch = request.table, request.batch
        # 3. Prompt encodings, repeated per image; with CFG the unconditional half comes first.
        text = self._text_conditioning(request, timings).repeat(request.images_per_prompt)  # (B*n[*2], S, D)

        # 4. The other U-Net inputs, as the manifest declares them (w-embedding, pooled text, size ids).
        feeds = self._conditioning_feeds(request, text, batch, height, width)

        # 5. The LCM loop: U-Net, then the consistency step.
        denoised = latents
        for index, timestep in enumerate(table.timesteps):
            mark = time.perf_counter()
            prediction, outputs = self._predict_noise(request, feeds, latents, np.full(batch, timestep))
            _check_finite(prediction, f"the U-Net at step {index + 1} (timestep {timestep})")
            after_unet = time.perf_counter()
            step_noise = noise[index] if index < len(noise) else None
            before = latents
            latents, denoised = self.scheduler.step(table, index, prediction, latents, step_noise)
            timings["unet"].append(after_unet - mark)
            timings["scheduler"].append(time.perf_counter() - after_unet)
            if observer is not None:
                observer(StepEvent(index, int(timestep), dict(feeds), outputs, before, denoised))

        # 6. Decode the last denoised sample.
        _check_finite(denoised, f"the LCM step at step {len(table.timesteps)}")
        images = self._decode(denoised, timings)  # (B*n, H, W, 3)
        timings["total"] = time.perf_counter() - start
        return PipelineOutput(images=images, timings=timings)

    def _text_conditioning(self, request: _Request, timings: dict[str, Any] | None = None) -> TextConditioning:
        """The request's prompt encodings, one row per prompt; with CFG the unconditional rows come first. A family
        that zeroes an absent negative prompt (SDXL's force_zeros_for_empty_prompt) does not encode it."""
        prompts, negatives = request.prompts, request.negatives
        if self._uses_cfg(request) and not request.negative_given:
            if self.manifest.conditioning.empty_negative == "zeros":
                conditional = self.encode_prompts(prompts, timings)
                return TextConditioning.concatenate([conditional.zeros_like(), conditional])
        if self._uses_cfg(request):
            return self.encode_prompts(negatives + prompts, timings)
        return self.encode_prompts(prompts, timings)

    def _conditioning_feeds(
        self, request: _Request, text: TextConditioning, rows: int, height: int, width: int
    ) -> dict[str, np.ndarray]:
        """Every U-Net input but ``sample`` and ``timestep`` for ``rows`` latents (``text`` already repeated to
        them, twice with CFG)."""
        info = self.manifest.pipeline
        return unet_conditioning_feeds(
            self.manifest.conditioning,
            info,
            text,
            guidance_scale=request.guidance_scale,
            images=rows,
            height=height,
            width=width,
        )

    def _predict_noise(
        self,
        request: _Request,
        feeds: dict[str, np.ndarray],
        latents: np.ndarray,  # (B, C, h, w)
        timesteps: np.ndarray,  # (B,): each row's timestep
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One U-Net call over ``latents``, each row at its own timestep; with CFG the batch is doubled
        ([unconditional, conditional]) and combined. Returns the guided prediction (B, C, h, w) and the raw
        outputs."""
        use_cfg = self._uses_cfg(request)
        feeds["sample"] = np.concatenate([latents, latents]) if use_cfg else latents  # (B[*2], C, h, w)
        feeds["timestep"] = self._timestep_feed(np.concatenate([timesteps, timesteps]) if use_cfg else timesteps)
        outputs = self._run("unet", feeds)
        prediction = outputs["out_sample"].astype(np.float32, copy=False)
        if use_cfg:
            unconditional, conditional = np.split(prediction, 2)
            prediction = unconditional + np.float32(request.guidance_scale) * (conditional - unconditional)
        return prediction, outputs

    def decoder_feeds(self, denoised: np.ndarray) -> dict[str, np.ndarray]:
        """The VAE decoder's feeds for denoised latents (B, C, h, w): unscaled (and unshifted) as the VAE expects."""
        info = self.manifest.pipeline
        scaled = denoised / np.float32(info.vae_scaling_factor)
        if info.vae_shift_factor is not None:
            scaled = scaled + np.float32(info.vae_shift_factor)
        return {"latent_sample": scaled}

    def _decode(self, denoised: np.ndarray, timings: dict[str, Any]) -> np.ndarray:
        """Denoised latents (B, C, h, w) -> images (B, H, W, 3) float32 in [0, 1]; ``timings`` gets ``vae_decode``
        and ``postprocess`` seconds."""
        mark = time.perf_counter()
        decoded = self._run("vae_decoder", self.decoder_feeds(denoised))["sample"]  # (B, 3, H, W) in [-1, 1]
        _check_finite(decoded, "the VAE decoder")
        timings["vae_decode"] = time.perf_counter() - mark
        mark = time.perf_counter()
        images = decoded_images(decoded)
        timings["postprocess"] = time.perf_counter() - mark
        return images


def decoded_images(decoded: np.ndarray) -> np.ndarray:
    """The VAE decoder's output (B, 3, H, W) in [-1, 1] -> images (B, H, W, 3) float32 in [0, 1]."""
    images = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images)


@dataclass
class _InFlight:
    """A frame inside the frame loop: its latents before its next step, and when it came in."""

    latents: np.ndarray  # (1, C, h, w)
    step: int  # index of the next step in the table
    arrived: float  # perf_counter() when the frame was pushed


class FrameStream:
    """Frames in, styled frames out, in order (see :meth:`Pipeline.stream`).

    ``push(frame)`` takes one frame (anything ``img2img`` takes) and returns the frame that has been through every
    step, (H, W, 3) float32 in [0, 1], or None while a step-batched pipeline fills (its first N - 1 pushes);
    ``flush()`` returns the frames still in flight; ``run(frames)`` does both. Without step batching each push
    returns its own frame, and ``stream(frame)`` is that push.

    ``latencies``: seconds from each output frame's push to its output, in output order. ``call_seconds``: the
    seconds of each push and flush step (the work done per frame; frames per second is their count over their sum).
    """

    def __init__(self, pipe: Pipeline, request: _Request, *, batch_steps: bool) -> None:
        self.pipe = pipe
        self.request = request
        self.batch_steps = batch_steps
        self.table = request.table
        self.steps = len(self.table.timesteps)
        self.timesteps = np.asarray(self.table.timesteps, dtype=np.float32)  # (N,)
        self.text = pipe._text_conditioning(request)  # 1 row, or [unconditional, conditional] with CFG
        self.size: tuple[int, int] | None = None
        self.draws: dict[str, Any] = {}
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

    def __call__(self, frame: Any) -> np.ndarray:
        """One frame in, the same frame styled out: the unbatched loop only (a step-batched one returns frames
        later: use :meth:`push` and :meth:`flush`)."""
        if self.batch_steps:
            raise UserError("this stream batches steps (frames come out later): call push(frame) and flush()")
        image = self.push(frame)
        assert image is not None
        return image

    def push(self, frame: Any) -> np.ndarray | None:
        """One frame in; the oldest frame in flight out once it has run every step (None while filling)."""
        start = time.perf_counter()
        latents = self._encode(frame)
        self.in_flight.insert(0, _InFlight(latents, 0, start))
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

    def _encode(self, frame: Any) -> np.ndarray:
        """The frame's latents at the first step (1, C, h, w); the first frame fixes the size and the draws."""
        pipe = self.pipe
        info = pipe.manifest.pipeline
        pixels = load_image(frame, info.spatial_multiple)
        size = pixels.shape[:2]
        if self.size is None:
            if not self.batch_steps:
                pipe.check_static_shape(1, *size)
            pipe._check_memory(self.request, *size, unet_rows=self.steps if self.batch_steps else 1)
            shape = (1, info.latent_channels, size[0] // info.vae_scale_factor, size[1] // info.vae_scale_factor)
            rng = np.random.default_rng(self.request.seed)
            sample_noise = rng.standard_normal(shape, dtype=np.float32)  # drawn even for a tiny VAE, which ignores it
            self.draws = {
                "sample_noise": None if info.vae == "autoencoder_tiny" else sample_noise,
                "image_noise": rng.standard_normal(shape, dtype=np.float32),
                "noise": [rng.standard_normal(shape, dtype=np.float32) for _ in range(self.steps - 1)],
            }
            self.size = size
        elif size != self.size:
            raise UserError(
                f"frame {self.frames_in + 1} is {size[1]}x{size[0]} but the stream started at "
                f"{self.size[1]}x{self.size[0]}: pass frames of one size (start a new stream for another)"
            )
        return pipe._encode_image(pixels, 1, self.table, self.draws["sample_noise"], self.draws["image_noise"])

    def _advance(self) -> np.ndarray | None:
        """One U-Net call over every frame in flight, each at its own step (one row each; the unconditional half
        too with CFG), then each frame's LCM step; returns the frame that ran its last step, decoded, if any."""
        pipe, rows = self.pipe, self.in_flight
        latents = rows[0].latents if len(rows) == 1 else np.concatenate([row.latents for row in rows])  # (R, C, h, w)
        timesteps = self.timesteps[[row.step for row in rows]]  # (R,)
        prediction, _ = pipe._predict_noise(self.request, self._feeds_for(len(rows)), latents, timesteps)
        if not np.isfinite(prediction).all():
            steps = ", ".join(str(row.step + 1) for row in rows)
            _check_finite(prediction, f"the U-Net at step {steps} (timestep {', '.join(f'{t:g}' for t in timesteps)})")
        finished: tuple[int, np.ndarray] | None = None
        for index, row in enumerate(rows):
            noise = self.draws["noise"][row.step] if row.step < self.steps - 1 else None
            row.latents, denoised = pipe.scheduler.step(
                self.table, row.step, prediction[index : index + 1], row.latents, noise
            )
            row.step += 1
            if row.step == self.steps:
                finished = (index, denoised)
        if finished is None:
            return None
        index, denoised = finished
        row = rows.pop(index)  # the oldest: every push adds one at step 0 and every call moves all by one
        _check_finite(denoised, f"the LCM step at step {self.steps}")
        image = pipe._decode(denoised, self._timings)[0]
        self.latencies.append(time.perf_counter() - row.arrived)
        return image

    def _feeds_for(self, rows: int) -> dict[str, np.ndarray]:
        """The conditioning feeds of a ``rows``-row U-Net call, built once per row count."""
        if rows not in self._feeds:
            height, width = self.size
            self._feeds[rows] = self.pipe._conditioning_feeds(self.request, self.text.repeat(rows), rows, height, width)
        return dict(self._feeds[rows])


def _draw(name: str, given: np.ndarray | None, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A standard-normal draw of ``shape``, or the caller's array checked against it."""
    if given is None:
        return rng.standard_normal(shape, dtype=np.float32)
    array = np.asarray(given, dtype=np.float32)
    if array.shape != shape:
        raise UserError(f"{name} has shape {list(array.shape)}: expected {list(shape)}")
    if not np.isfinite(array).all():
        raise UserError(f"{name} contains NaN or inf: pass finite values")
    return array


def _draw_steps(
    given: list[np.ndarray] | None, count: int, shape: tuple[int, ...], rng: np.random.Generator
) -> list[np.ndarray]:
    """The noise added after every step but the last: drawn, or the caller's list checked."""
    if given is None:
        return [rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]
    if len(given) != count or any(np.shape(n) != shape for n in given):
        raise UserError(
            f"noise must be {count} arrays of shape {list(shape)} (one per step but the last); got {len(given)}"
        )
    if not all(np.isfinite(n).all() for n in given):
        raise UserError("noise contains NaN or inf: pass finite noise tensors")
    return [np.asarray(n, dtype=np.float32) for n in given]


def _check_finite(values: np.ndarray, stage: str) -> None:
    """A NaN or inf is an error naming the stage (fp16 overflow, an extreme guidance), never a black image."""
    if not np.isfinite(values).all():
        raise NonFiniteError(
            f"{stage} produced NaN or inf values: an fp16 overflow or an extreme guidance scale; "
            "try a lower guidance, or load with precision='fp32'"
        )
