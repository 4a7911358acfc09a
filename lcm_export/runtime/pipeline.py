"""``Pipeline.load(bundle)(prompt, ...)``: the LCM text-to-image loop on numpy and one backend.

Given the same initial latents and the same per-step noise, the result equals diffusers'
``LatentConsistencyModelPipeline`` (distilled LCM) or ``StableDiffusionPipeline`` with ``LCMScheduler``
(LCM-LoRA, classifier-free guidance): the only random draws of an LCM run are the initial latents and one noise
tensor after every step but the last, and both can be passed in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.errors import NonFiniteError, UserError
from lcm_export.runtime.backends import BackendOptions, backend_module, choose_backend
from lcm_export.runtime.inputs import (
    MemoryModel,
    check_guidance,
    check_integer,
    check_memory,
    check_negative_prompt,
    check_prompts,
    check_seed,
)
from lcm_export.runtime.manifest import Manifest, load_manifest
from lcm_export.runtime.scheduler import LCMScheduler, guidance_scale_embedding
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


class Pipeline:
    """A loaded bundle. Sessions are opened once; buffers and tables are reused between calls."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: str, options: BackendOptions) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.options = options
        module = backend_module(backend)
        needed = ["text_encoder", "unet", "vae_decoder"]
        missing = [name for name in needed if name not in manifest.components]
        if missing:
            raise UserError(f"BUNDLE '{bundle_dir}' has no {', '.join(missing)}: re-export it")
        self.sessions = {
            name: module.open_session(bundle_dir, manifest.components[name], options, self._static_shapes(name))
            for name in needed
        }
        self.input_dtypes = {
            name: {t.name: np.dtype(t.dtype) for t in manifest.components[name].spec.inputs} for name in needed
        }
        self.tokenizer = PromptTokenizer(bundle_dir, manifest.tokenizers[0])
        self.scheduler = LCMScheduler(manifest.scheduler)
        self.memory_model = MemoryModel.from_bundle(bundle_dir)
        self._prompt_cache: dict[tuple[str, ...], np.ndarray] = {}

    def _static_shapes(self, name: str) -> dict[str, tuple[int, ...]] | None:
        """Input shapes of ``name`` for ``options.static_shape`` (batch, height, width); None when dynamic.

        Components fed the CFG batch keep a dynamic batch (-1): guidance <= 1 runs them at 1x, > 1 at 2x.
        """
        if self.options.static_shape is None:
            return None
        batch, height, width = self.options.static_shape
        self.check_size(height, width)
        spec = self.manifest.components[name].spec
        values = ShapeRange.static(batch, height, width, self.manifest.tokenizers[0].max_length).symbol_values(
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
        device: str = "CPU",
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

    def encode_prompts(self, prompts: list[str], timings: dict[str, Any] | None = None) -> np.ndarray:
        """Text encoder hidden states for ``prompts``: (len(prompts), S, D) float32, cached per prompt list.

        ``timings`` receives ``tokenize`` and ``text_encoder`` seconds (zero when the encoding was cached).
        """
        key = tuple(prompts)
        tokenize_seconds = encode_seconds = 0.0
        if key not in self._prompt_cache:
            mark = time.perf_counter()
            ids = self.tokenizer(prompts)  # (B, S)
            tokenize_seconds = time.perf_counter() - mark
            hidden = self._run("text_encoder", {"input_ids": ids})["last_hidden_state"]
            _check_finite(hidden, "the text encoder")
            encode_seconds = time.perf_counter() - mark - tokenize_seconds
            if len(self._prompt_cache) >= 16:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            self._prompt_cache[key] = hidden.astype(np.float32, copy=False)
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
    ) -> PipelineOutput:
        """Generate images. ``latents`` (B*n, C, h, w) and ``noise`` (steps - 1 tensors of that shape) make
        the run reproduce diffusers exactly; otherwise they are drawn from ``seed`` with numpy.

        ``guidance_scale`` defaults to the bundle's (``manifest.pipeline.default_guidance_scale``: 8.5 for a
        distilled LCM as in diffusers, about 1-2 for LCM-LoRA). Every argument is checked before anything runs;
        a NaN or inf coming out of a stage raises :class:`NonFiniteError` naming the stage.
        """
        start = time.perf_counter()
        timings: dict[str, Any] = {"unet": [], "scheduler": []}
        info = self.manifest.pipeline
        prompts = check_prompts(prompt)
        num_images_per_prompt = check_integer("num_images_per_prompt", num_images_per_prompt, minimum=1)
        num_inference_steps = check_integer("num_inference_steps", num_inference_steps, minimum=1)
        guidance_scale = check_guidance(info.default_guidance_scale if guidance_scale is None else guidance_scale)
        seed = check_seed(seed)
        batch = len(prompts) * num_images_per_prompt
        table = self.scheduler.table(num_inference_steps)
        use_cfg = info.guidance == "cfg" and guidance_scale > 1.0
        negatives = check_negative_prompt(
            negative_prompt, len(prompts), guidance_kind=info.guidance, guidance_scale=guidance_scale
        )

        # 1. Shapes: from the latents when given, else from height/width (default: the model's sample size).
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            expected_lead = (batch, info.latent_channels)
            if latents.ndim != 4 or latents.shape[:2] != expected_lead:
                raise UserError(
                    f"latents have shape {list(latents.shape)}: expected ({batch}, {info.latent_channels}, h, w) "
                    f"for {len(prompts)} prompt(s) x {num_images_per_prompt} image(s)"
                )
            if not np.isfinite(latents).all():
                raise UserError("latents contain NaN or inf: pass finite initial latents")
            height, width = latents.shape[2] * info.vae_scale_factor, latents.shape[3] * info.vae_scale_factor
        height = info.default_height if height is None else height
        width = info.default_width if width is None else width
        self.check_size(height, width)
        self.check_static_shape(batch, height, width)
        latent_shape = (batch, info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
        check_memory(
            self.memory_model,
            batch=batch,
            unet_batch=batch * (2 if use_cfg else 1),
            height=height,
            width=width,
            latent_height=latent_shape[2],
            latent_width=latent_shape[3],
        )

        # 2. Random draws, in diffusers' order: initial latents, then one noise tensor per step but the last.
        rng = np.random.default_rng(seed)
        if latents is None:
            latents = rng.standard_normal(latent_shape, dtype=np.float32)
        latents = latents * np.float32(self.manifest.scheduler.init_noise_sigma)
        if noise is None:
            noise = [rng.standard_normal(latent_shape, dtype=np.float32) for _ in range(num_inference_steps - 1)]
        elif len(noise) != num_inference_steps - 1 or any(np.shape(n) != latent_shape for n in noise):
            raise UserError(
                f"noise must be {num_inference_steps - 1} arrays of shape {list(latent_shape)} "
                f"(one per step but the last); got {len(noise)}"
            )
        elif not all(np.isfinite(n).all() for n in noise):
            raise UserError("noise contains NaN or inf: pass finite noise tensors")

        # 3. Prompt encodings, repeated per image; with CFG the unconditional half comes first.
        timings["prepare"] = time.perf_counter() - start
        if use_cfg:
            encoded = self.encode_prompts(negatives + prompts, timings)
        else:
            encoded = self.encode_prompts(prompts, timings)
        hidden = np.repeat(encoded, num_images_per_prompt, axis=0)  # (B*n[*2], S, D)

        # 4. The w-embedding of distilled LCMs (no CFG batch): (B*n, time_cond_proj_dim).
        feeds: dict[str, np.ndarray] = {"encoder_hidden_states": hidden}
        if info.time_cond_proj_dim is not None:
            feeds["timestep_cond"] = guidance_scale_embedding(guidance_scale, info.time_cond_proj_dim, hidden.shape[0])

        # 5. The LCM loop: U-Net, then the consistency step.
        denoised = latents
        for index, timestep in enumerate(table.timesteps):
            mark = time.perf_counter()
            model_input = np.concatenate([latents, latents]) if use_cfg else latents  # (B*n[*2], C, h, w)
            feeds["sample"] = model_input
            feeds["timestep"] = np.array(timestep, dtype=np.float32)
            prediction = self._run("unet", feeds)["out_sample"].astype(np.float32, copy=False)
            if use_cfg:
                unconditional, conditional = np.split(prediction, 2)
                prediction = unconditional + np.float32(guidance_scale) * (conditional - unconditional)
            _check_finite(prediction, f"the U-Net at step {index + 1} (timestep {timestep})")
            after_unet = time.perf_counter()
            step_noise = noise[index] if index < len(noise) else None
            latents, denoised = self.scheduler.step(table, index, prediction, latents, step_noise)
            timings["unet"].append(after_unet - mark)
            timings["scheduler"].append(time.perf_counter() - after_unet)

        # 6. Decode the last denoised sample.
        mark = time.perf_counter()
        scaled = denoised / np.float32(info.vae_scaling_factor)
        if info.vae_shift_factor is not None:
            scaled = scaled + np.float32(info.vae_shift_factor)
        _check_finite(denoised, f"the LCM step at step {len(table.timesteps)}")
        decoded = self._run("vae_decoder", {"latent_sample": scaled})["sample"]  # (B*n, 3, H, W) in [-1, 1]
        _check_finite(decoded, "the VAE decoder")
        timings["vae_decode"] = time.perf_counter() - mark
        mark = time.perf_counter()
        images = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)  # (B*n, H, W, 3)
        images = np.ascontiguousarray(images)
        timings["postprocess"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - start
        return PipelineOutput(images=images, timings=timings)


def _check_finite(values: np.ndarray, stage: str) -> None:
    """A NaN or inf is an error naming the stage (fp16 overflow, an extreme guidance), never a black image."""
    if not np.isfinite(values).all():
        raise NonFiniteError(
            f"{stage} produced NaN or inf values: an fp16 overflow or an extreme guidance scale; "
            "try a lower guidance, or load with precision='fp32'"
        )
