"""LCM scheduler tables computed at export with diffusers' own ``LCMScheduler``.

The bundle's scheduler is LCM's, built from the model's scheduler config (``LCMScheduler.from_config``), so a base
Stable Diffusion model with LCM-LoRA gets the same tables as diffusers gives it after
``pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)``. Each value is computed exactly as
``LCMScheduler.step`` computes it (float32 tensors), so the numpy step reproduces it.
"""

from __future__ import annotations

from typing import Any

from lcm_export.errors import ExportError
from lcm_export.runtime.manifest import SchedulerInfo, StepTable


def lcm_scheduler_from(config: dict[str, Any]) -> Any:
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(config)


# Image-to-image strengths a bundle carries tables for (runs at other strengths are refused, not approximated).
IMG2IMG_STRENGTHS = tuple(round(0.1 * tenth, 1) for tenth in range(1, 10))


def step_table(scheduler: Any, num_inference_steps: int) -> StepTable:
    scheduler.set_timesteps(num_inference_steps)
    return _table(scheduler, scheduler.timesteps)


def img2img_table(scheduler: Any, num_inference_steps: int, strength: float, mode: str) -> StepTable | None:
    """The table of an image-to-image run as diffusers makes it, or None where diffusers refuses the combination.

    ``mode`` "strength" (distilled SD LCMs, ``LatentConsistencyModelImg2ImgPipeline``) passes the strength to
    ``set_timesteps``: all steps run, from a lower start. "sliced" (``StableDiffusionImg2ImgPipeline`` and
    ``StableDiffusionXLImg2ImgPipeline`` with ``LCMScheduler``: LCM-LoRA, and LCM-SDXL, which has no LCM img2img
    pipeline of its own) slices the text-to-image schedule: only its last ``int(steps * strength)`` steps run, each
    stepping to the next timestep of the full schedule, as ``set_begin_index`` makes the scheduler do.
    """
    if mode == "strength":
        try:
            scheduler.set_timesteps(num_inference_steps, strength=strength)
        except ValueError:  # original_steps x strength shorter than the steps asked for
            return None
        return _table(scheduler, scheduler.timesteps)
    full = step_table(scheduler, num_inference_steps)
    start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
    if start >= num_inference_steps:
        return None  # no step would run: diffusers raises
    return StepTable(**{name: tuple(values[start:]) for name, values in full.to_json().items()})


def _table(scheduler: Any, timesteps: Any) -> StepTable:
    columns: dict[str, list] = {name: [] for name in StepTable.__dataclass_fields__}
    for index, timestep in enumerate(timesteps):
        next_timestep = timesteps[index + 1] if index + 1 < len(timesteps) else timestep
        alpha = scheduler.alphas_cumprod[timestep]
        alpha_next = scheduler.alphas_cumprod[next_timestep] if next_timestep >= 0 else scheduler.final_alpha_cumprod
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
        columns["timesteps"].append(int(timestep))
        columns["c_skip"].append(float(c_skip))
        columns["c_out"].append(float(c_out))
        columns["sqrt_alpha_prod"].append(float(alpha.sqrt()))
        columns["sqrt_beta_prod"].append(float((1 - alpha).sqrt()))
        columns["sqrt_alpha_prod_next"].append(float(alpha_next.sqrt()))
        columns["sqrt_beta_prod_next"].append(float((1 - alpha_next).sqrt()))
    return StepTable(**{name: tuple(values) for name, values in columns.items()})


def img2img_mode(family: str, guidance: str) -> str:
    """How diffusers' img2img pipeline for this model applies the strength (see :func:`img2img_table`)."""
    return "strength" if family == "sd" and guidance == "embedding" else "sliced"


def scheduler_info(config: dict[str, Any], max_steps: int, img2img: str = "strength") -> SchedulerInfo:
    """Tables for 1..``max_steps`` steps (capped by the schedule's length), image-to-image tables at
    :data:`IMG2IMG_STRENGTHS` as ``img2img`` (:func:`img2img_mode`) makes them, and the step's options."""
    scheduler = lcm_scheduler_from(config)
    original_steps = int(scheduler.config.original_inference_steps)
    if max_steps < 1:
        raise ExportError(f"--max-steps {max_steps}: pass at least 1")
    tables = {steps: step_table(scheduler, steps) for steps in range(1, min(max_steps, original_steps) + 1)}
    partial_tables = {}
    for steps in tables:
        for strength in IMG2IMG_STRENGTHS:
            table = img2img_table(scheduler, steps, strength, img2img)
            if table is not None:
                partial_tables[(steps, strength)] = table
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ExportError(f"scheduler prediction_type {prediction_type!r} is not supported by the LCM step")
    return SchedulerInfo(
        prediction_type=prediction_type,
        tables=tables,
        init_noise_sigma=float(scheduler.init_noise_sigma),
        clip_sample=bool(scheduler.config.clip_sample),
        clip_sample_range=float(scheduler.config.clip_sample_range),
        thresholding=bool(scheduler.config.thresholding),
        dynamic_thresholding_ratio=float(scheduler.config.dynamic_thresholding_ratio),
        sample_max_value=float(scheduler.config.sample_max_value),
        config={key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")},
        partial_tables=partial_tables,
    )


def guidance_frequencies(time_cond_proj_dim: int | None) -> tuple[float, ...] | None:
    """The LCM w-embedding's float32 frequencies exactly as diffusers computes them (with torch), or None.

    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` multiplies w = (g - 1) * 1000 by these; numpy's
    float32 ``exp`` is one ulp off torch's for some of them, which w magnifies to ~5e-4 in the embedding. The
    manifest carries them so the runtime's embedding is diffusers' own.
    """
    if time_cond_proj_dim is None:
        return None
    import torch

    half = time_cond_proj_dim // 2
    exponent = torch.log(torch.tensor(10000.0)) / (half - 1)  # as LatentConsistencyModelPipeline does
    return tuple(float(value) for value in torch.exp(torch.arange(half, dtype=torch.float32) * -exponent))
