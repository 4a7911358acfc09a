"""The shared core of every generation mode: the bundle's sessions and the stages of one LCM run.

:class:`Denoiser` has a small public interface that text-to-image, image-to-image and the frame loop all call:
``encode_text`` (prompts -> text conditioning, CFG halves included), ``conditioning_feeds`` (the other U-Net inputs
the manifest declares), ``predict`` (one U-Net call, CFG combined), ``step`` (the LCM step), ``encode_image``
(image -> noised latents at the schedule's first timestep), ``decode`` (denoised latents -> images).

It is safe to call from several threads at once: sessions of a backend that is not thread-safe run under a lock
each (:class:`LockedSession`); the prompt cache and the lazily opened VAE encoder are guarded; every other piece
of state is the call's own.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from lcm_export.errors import NonFiniteError, UserError
from lcm_export.runtime.adapters import WeightOverrides
from lcm_export.runtime.backends import BackendOptions, Session
from lcm_export.runtime.conditioning import TextConditioning, unet_conditioning_feeds
from lcm_export.runtime.control import StepControl, control_residuals
from lcm_export.runtime.inputs import MemoryModel, check_memory
from lcm_export.runtime.manifest import Manifest, StepTable
from lcm_export.runtime.request import GenerationRequest
from lcm_export.runtime.scheduler import LCMScheduler
from lcm_export.runtime.specs import ShapeRange
from lcm_export.runtime.tokenizer import PromptTokenizer
from lcm_export.runtime.variants import VariantChoice

PROMPT_CACHE_SIZE = 16  # prompt lists whose encodings are kept (a profile clears it before every run)


class LockedSession:
    """A session that one thread at a time may run (backends whose sessions are not safe, or not faster, to run
    concurrently). Every other attribute is the wrapped session's (``end_profiling``, ``loaded_from_cache``, ...)."""

    def __init__(self, session: Session) -> None:
        self.inner = session
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            return self.inner.run(feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Denoiser:
    """A loaded bundle's sessions (one per component, on its chosen variant) and the stages of an LCM run."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        module: ModuleType,
        options: BackendOptions,
        variants: dict[str, VariantChoice],
        sessions: dict[str, Session] | None = None,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.options = options
        self.scheduler = LCMScheduler(manifest.scheduler)
        self._module = module
        self._variants = variants
        by_name = {tokenizer.name: tokenizer for tokenizer in manifest.tokenizers}
        self._tokenizers = {
            encoder.tokenizer: PromptTokenizer(bundle_dir, by_name[encoder.tokenizer])
            for encoder in manifest.conditioning.text_encoders
        }
        self._sessions: dict[str, Session] = {}
        self._input_dtypes: dict[str, dict[str, np.dtype]] = {}
        self._input_shapes: dict[str, dict[str, tuple[int | str, ...]]] = {}
        self._open_lock = threading.Lock()
        self._prompt_cache: OrderedDict[tuple[str, ...], TextConditioning] = OrderedDict()
        self._prompt_lock = threading.Lock()
        self.weights_version = 0  # counts replace_sessions: what a frame loop's cached text encoding was made on
        self._memory_model = MemoryModel.from_bundle(bundle_dir)
        given = sessions or {}
        unknown = sorted(set(given) - set(variants))
        if unknown:
            raise UserError(
                f"sessions={{{', '.join(repr(name) for name in unknown)}: ...}}: not a component this pipeline opens "
                f"(it opens {', '.join(variants)})"
            )
        for name in variants:
            if name in given:  # a caller's session over this variant's graph (the INT8 calibration's)
                self._record_inputs(name)
                self._sessions[name] = self.wrap_session(given[name])
            else:
                self._open(name)

    # -- sessions -------------------------------------------------------------------------------------------

    def _open(self, name: str) -> None:
        """Open ``name``'s session on its chosen variant."""
        self._sessions[name] = self.new_session(name)

    def new_session(self, name: str, weights: WeightOverrides | None = None) -> Session:
        """A session of ``name`` on its chosen variant, not yet used by calls; ``weights`` (initializer name ->
        array) replace those initializers (run-time adapters: the backend must list ``ADAPTERS``)."""
        hashes = {entry.path: entry.sha256 for entry in self.manifest.files}
        resolved = self.manifest.components[name].resolved(self._variants[name].artifact, hashes)
        extra = {"weights": weights} if weights else {}
        session = self._module.open_session(self.bundle_dir, resolved, self.options, self._static_shapes(name), **extra)
        self._record_inputs(name)
        return self.wrap_session(session)

    def _record_inputs(self, name: str) -> None:
        """Keep the input dtypes and shapes of ``name``'s chosen variant: what its calls are cast to."""
        spec = self.manifest.components[name].spec.with_dtypes(self._variants[name].artifact.io_dtype)
        self._input_dtypes[name] = {t.name: np.dtype(t.dtype) for t in spec.inputs}
        self._input_shapes[name] = {t.name: t.shape for t in spec.inputs}

    @property
    def backend_module(self) -> ModuleType:
        return self._module

    def wrap_session(self, session: Session) -> Session:
        """``session`` as calls run it: under a lock where the backend's sessions are not thread-safe."""
        return session if self._module.THREAD_SAFE else LockedSession(session)

    def open_weight_inputs(self, name: str, path: Path) -> Session:
        """A backend session on ``name``'s weight-inputs graph at ``path`` (run-time adapters fed as inputs: the
        backend lists ``WEIGHT_INPUTS``); its calls must feed every weight (:class:`WeightInputsSession`)."""
        return self._module.open_weight_inputs_session(path, self.options, name)

    def open_factor_inputs(self, name: str, path: Path, shapes: dict[str, tuple[int, ...]]) -> Session:
        """A backend session on ``name``'s factor-inputs graph at ``path`` for factor inputs of ``shapes`` (the
        backend lists ``FACTOR_INPUTS``); its calls feed the factors (:class:`WeightInputsSession`)."""
        outputs = self.manifest.components[name].spec.output_names
        return self._module.open_factor_inputs_session(path, self.options, name, shapes, outputs)

    def factor_signature(self, shapes: dict[str, tuple[int, ...]]) -> Any:
        """What of the factor shapes a factor-inputs session is specialised for: a new signature opens a new one
        (onnxruntime: the weights whose branches it keeps; OpenVINO: their ranks too)."""
        return self._module.factor_signature(shapes)

    def replace_sessions(self, sessions: dict[str, Session]) -> None:
        """Make ``sessions`` (from :meth:`new_session`) the ones calls run, at once, and forget cached prompt
        encodings (a text encoder may have changed). The caller makes sure no call is running."""
        with self._open_lock:
            self._sessions.update(sessions)
            self.weights_version += 1
        self.clear_prompt_cache()

    def open_encoder(self, variant: VariantChoice) -> None:
        """Open the VAE encoder (image-to-image, the frame loop) once, whichever thread asks first."""
        with self._open_lock:
            if "vae_encoder" not in self._sessions:
                self._variants["vae_encoder"] = variant
                self._open("vae_encoder")

    @property
    def sessions(self) -> dict[str, Session]:
        """The open sessions by component (the VAE encoder once image-to-image opened it)."""
        return dict(self._sessions)

    @property
    def variants(self) -> dict[str, VariantChoice]:
        """The variant each open session runs, and why."""
        return {name: self._variants[name] for name in list(self._sessions)}

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

    def _run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtypes = self._input_dtypes[component]
        # np.asarray keeps 0-d arrays 0-d (the scalar timestep); np.require makes them C-contiguous.
        cast = {
            name: np.require(np.asarray(value, dtype=dtypes[name]), requirements="C") for name, value in feeds.items()
        }
        return self._sessions[component].run(cast)

    # -- facts ----------------------------------------------------------------------------------------------

    @property
    def sequence_length(self) -> int:
        """Tokens per prompt (the first text encoder's tokenizer): the ``sequence`` symbol of the specs."""
        first = self.manifest.conditioning.text_encoders[0].tokenizer
        return self._tokenizers[first].info.max_length

    @property
    def per_row_timesteps(self) -> bool:
        """Whether the U-Net takes one timestep per row, (batch,), so that one call can hold rows at different
        steps (the frame loop's step batching). Bundles exported before that take one scalar for the batch."""
        return len(self._input_shapes["unet"]["timestep"]) == 1

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        info = self.manifest.pipeline
        return (batch, info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)

    def check_size(self, height: Any, width: Any) -> None:
        """Height and width the VAE and U-Net can take: positive integer multiples of the bundle's spatial
        multiple."""
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

    def check_call(self, request: GenerationRequest, height: int, width: int, *, unet_rows: int | None = None) -> None:
        """Refuse a call shape before anything runs: a size the VAE cannot take, a shape other than the one a
        ``static_shape`` pipeline was compiled for, or a size the machine's memory cannot hold. ``unet_rows``: U-Net
        rows per call when they are not the request's batch (the frame loop's step batching: one row per step in
        flight, which a static shape cannot hold)."""
        self.check_size(height, width)
        static = self.options.static_shape
        batch = request.batch
        if static is not None and (unet_rows is not None or tuple(static) != (batch, height, width)):
            loaded_batch, loaded_height, loaded_width = static
            raise UserError(
                f"this pipeline was loaded with static_shape for {loaded_batch} image(s) of {loaded_width}x"
                f"{loaded_height} but was called for {batch} image(s) of {width}x{height}: call it with that shape, "
                f"or load it again with static_shape=({batch}, {height}, {width}) or without static_shape"
            )
        info = self.manifest.pipeline
        rows = batch if unet_rows is None else unet_rows
        check_memory(
            self._memory_model,
            batch=batch,
            unet_batch=rows * (2 if request.use_cfg else 1),
            height=height,
            width=width,
            latent_height=height // info.vae_scale_factor,
            latent_width=width // info.vae_scale_factor,
        )

    # -- text -----------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], timings: dict[str, Any] | None = None) -> TextConditioning:
        """The declared text encoders' hidden states (concatenated) and pooled embedding for ``prompts``,
        float32, cached per prompt list. ``timings`` receives ``tokenize`` and ``text_encoder`` seconds (zero
        when the encoding was cached)."""
        key = tuple(prompts)
        with self._prompt_lock:
            cached = self._prompt_cache.get(key)
        tokenize_seconds = encode_seconds = 0.0
        if cached is None:
            hidden_parts: list[np.ndarray] = []
            pooled = None
            for encoder in self.manifest.conditioning.text_encoders:
                mark = time.perf_counter()
                ids = self._tokenizers[encoder.tokenizer](prompts)  # (B, S)
                tokenize_seconds += time.perf_counter() - mark
                mark = time.perf_counter()
                outputs = self._run(encoder.component, {"input_ids": ids})
                encode_seconds += time.perf_counter() - mark
                hidden_parts.append(outputs[encoder.hidden_state].astype(np.float32, copy=False))  # (B, S, D_i)
                if encoder.pooled is not None:
                    pooled = outputs[encoder.pooled].astype(np.float32, copy=False)  # (B, P)
            hidden = hidden_parts[0] if len(hidden_parts) == 1 else np.concatenate(hidden_parts, axis=-1)
            check_finite(hidden, "the text encoder")
            cached = TextConditioning(hidden, pooled)
            with self._prompt_lock:
                self._prompt_cache[key] = cached
                while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                    self._prompt_cache.popitem(last=False)
        if timings is not None:
            timings["tokenize"] = tokenize_seconds
            timings["text_encoder"] = encode_seconds
        return cached

    def clear_prompt_cache(self) -> None:
        with self._prompt_lock:
            self._prompt_cache.clear()

    def encode_text(self, request: GenerationRequest, timings: dict[str, Any] | None = None) -> TextConditioning:
        """The request's prompt encodings, one row per prompt; with CFG the unconditional rows come first. A family
        that zeroes an absent negative prompt (SDXL's force_zeros_for_empty_prompt) does not encode it."""
        prompts, negatives = request.prompts, request.negatives
        if not request.use_cfg:
            return self.encode_prompts(prompts, timings)
        if not request.negative_given and self.manifest.conditioning.empty_negative == "zeros":
            conditional = self.encode_prompts(prompts, timings)
            return TextConditioning.concatenate([conditional.zeros_like(), conditional])
        return self.encode_prompts(negatives + prompts, timings)

    def conditioning_feeds(
        self, request: GenerationRequest, text: TextConditioning, rows: int, height: int, width: int
    ) -> dict[str, np.ndarray]:
        """Every U-Net input but ``sample`` and ``timestep`` for ``rows`` latents (``text`` already repeated to
        them, twice with CFG)."""
        return unet_conditioning_feeds(
            self.manifest.conditioning,
            self.manifest.pipeline,
            text,
            guidance_scale=request.guidance_scale,
            images=rows,
            height=height,
            width=width,
        )

    # -- the loop -------------------------------------------------------------------------------------------

    def _timestep_feed(self, timesteps: np.ndarray) -> np.ndarray:
        """The U-Net's ``timestep`` input for rows at ``timesteps`` (B,): as is, or a scalar bundle's one value."""
        if self.per_row_timesteps:
            return timesteps.astype(np.float32)  # (B,)
        if np.any(timesteps != timesteps[0]):
            raise ValueError("this U-Net takes one timestep for the whole batch")  # callers check it first
        return np.array(timesteps[0], dtype=np.float32)  # ()

    def predict(
        self,
        request: GenerationRequest,
        feeds: dict[str, np.ndarray],
        latents: np.ndarray,  # (B, C, h, w)
        timesteps: np.ndarray,  # (B,): each row's timestep
        control: StepControl | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One U-Net call over ``latents``, each row at its own timestep; with CFG the batch is doubled
        ([unconditional, conditional]) and combined. ``feeds`` (from :meth:`conditioning_feeds`) is not changed.
        On a ControlNet bundle the ControlNets run first on the same feeds (``control``: their images and each
        row's scales; None: no control, zero residuals). Returns the guided prediction (B, C, h, w), the feeds as
        run and the raw outputs."""
        run_feeds = dict(feeds)
        run_feeds["sample"] = np.concatenate([latents, latents]) if request.use_cfg else latents  # (B[*2], C, h, w)
        both = np.concatenate([timesteps, timesteps]) if request.use_cfg else timesteps
        run_feeds["timestep"] = self._timestep_feed(both)
        info = self.manifest.controlnet
        if info is not None:  # the residual U-Net: the ControlNets' residuals, summed (zeros without control)
            residual_specs = tuple(
                t for t in self.manifest.components["unet"].spec.inputs if t.name in info.residual_inputs
            )
            names = {model.component: list(self._input_dtypes[model.component]) for model in info.models}
            run_feeds.update(
                control_residuals(self._run, info, names, residual_specs, run_feeds, control, request.use_cfg)
            )
        outputs = self._run("unet", run_feeds)
        prediction = outputs["out_sample"].astype(np.float32, copy=False)
        if request.use_cfg:
            unconditional, conditional = np.split(prediction, 2)
            prediction = unconditional + np.float32(request.guidance_scale) * (conditional - unconditional)
        return prediction, run_feeds, outputs

    def step(
        self,
        table: StepTable,
        index: int,
        prediction: np.ndarray,  # (B, C, h, w)
        latents: np.ndarray,  # (B, C, h, w)
        noise: np.ndarray | None,  # (B, C, h, w); None at the last step
    ) -> tuple[np.ndarray, np.ndarray]:
        """The LCM step (:meth:`LCMScheduler.step`): (next latents, denoised)."""
        return self.scheduler.step(table, index, prediction, latents, noise)

    # -- VAE ------------------------------------------------------------------------------------------------

    def encode_image(
        self,
        pixels: np.ndarray,  # (H, W, 3) in [0, 1]
        batch: int,
        table: StepTable,
        sample_noise: np.ndarray | None,  # (B, C, h, w); None for a tiny VAE (it draws no latent sample)
        image_noise: np.ndarray,  # (B, C, h, w)
    ) -> np.ndarray:
        """The latents image-to-image starts from, (B, C, h, w): the image encoded, scaled and noised to the
        table's first timestep, as diffusers' img2img pipelines prepare them."""
        info = self.manifest.pipeline
        # 1. Encode: (B, 3, H, W) in [-1, 1] -> latents, sampled from the KL VAE's distribution, scaled.
        encoder_input = np.repeat((pixels * 2 - 1).transpose(2, 0, 1)[None], batch, axis=0)
        outputs = self._run("vae_encoder", {"sample": encoder_input})
        if info.vae == "autoencoder_tiny":
            encoded = outputs["latents"].astype(np.float32)
        else:
            mean, log_variance = np.split(outputs["latent_parameters"].astype(np.float32), 2, axis=1)
            std = np.exp(0.5 * np.clip(log_variance, -30.0, 20.0))
            encoded = mean + std * sample_noise
        check_finite(encoded, "the VAE encoder")
        if info.vae_shift_factor is not None:
            encoded = encoded - np.float32(info.vae_shift_factor)
        encoded = encoded * np.float32(info.vae_scaling_factor)
        # 2. Noise it to the schedule's first timestep (the scheduler's add_noise).
        sqrt_alpha, sqrt_beta = np.float32(table.sqrt_alpha_prod[0]), np.float32(table.sqrt_beta_prod[0])
        return sqrt_alpha * encoded + sqrt_beta * image_noise

    def decoder_feeds(self, denoised: np.ndarray) -> dict[str, np.ndarray]:
        """The VAE decoder's feeds for denoised latents (B, C, h, w): unscaled (and unshifted) as the VAE expects."""
        info = self.manifest.pipeline
        scaled = denoised / np.float32(info.vae_scaling_factor)
        if info.vae_shift_factor is not None:
            scaled = scaled + np.float32(info.vae_shift_factor)
        return {"latent_sample": scaled}

    def decode(self, denoised: np.ndarray, timings: dict[str, Any]) -> np.ndarray:
        """Denoised latents (B, C, h, w) -> images (B, H, W, 3) float32 in [0, 1]; ``timings`` gets ``vae_decode``
        and ``postprocess`` seconds."""
        mark = time.perf_counter()
        decoded = self._run("vae_decoder", self.decoder_feeds(denoised))["sample"]  # (B, 3, H, W) in [-1, 1]
        check_finite(decoded, "the VAE decoder")
        timings["vae_decode"] = time.perf_counter() - mark
        mark = time.perf_counter()
        images = decoded_images(decoded)
        timings["postprocess"] = time.perf_counter() - mark
        return images


def decoded_images(decoded: np.ndarray) -> np.ndarray:
    """The VAE decoder's output (B, 3, H, W) in [-1, 1] -> images (B, H, W, 3) float32 in [0, 1]."""
    images = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images)


def check_finite(values: np.ndarray, stage: str) -> None:
    """A NaN or inf is an error naming the stage (fp16 overflow, an extreme guidance), never a black image."""
    if not np.isfinite(values).all():
        raise NonFiniteError(
            f"{stage} produced NaN or inf values: an fp16 overflow or an extreme guidance scale; "
            "try a lower guidance, or load with precision='fp32'"
        )
