"""The LCM scheduler step in numpy (multistep consistency sampling, Luo et al. 2023, Algorithm 3).

All constants come from the manifest, where the exporter took them from diffusers' ``LCMScheduler`` for the model's
own scheduler config; nothing here is recomputed from betas, so a bundle reproduces the scheduler it was made with.
The guidance-scale embedding (``timestep_cond`` of distilled LCMs) is the one table computed here: it depends on
the guidance scale the user picks, and costs microseconds.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from lcm_export.errors import UserError
from lcm_export.runtime.manifest import SchedulerInfo, StepTable


class LCMScheduler:
    """Step an LCM trajectory with a precomputed :class:`StepTable`."""

    def __init__(self, info: SchedulerInfo) -> None:
        self.info = info

    def table(self, num_inference_steps: int, strength: float = 1.0) -> StepTable:
        """The precomputed table of an ``num_inference_steps``-step run; ``strength`` < 1 is image-to-image."""
        if strength >= 1.0:
            if num_inference_steps not in self.info.tables:
                available = sorted(self.info.tables)
                raise UserError(
                    f"num_inference_steps={num_inference_steps}: this bundle has LCM schedules for "
                    f"{available[0]}-{available[-1]} steps; pick one of those or re-export with --max-steps "
                    f"{num_inference_steps}"
                )
            return self.info.tables[num_inference_steps]
        key = (num_inference_steps, round(strength, 6))
        if key not in self.info.partial_tables:
            available = ", ".join(f"{steps} steps at {value:g}" for steps, value in sorted(self.info.partial_tables))
            raise UserError(
                f"strength={strength:g} with num_inference_steps={num_inference_steps}: this bundle has "
                f"image-to-image schedules for {available or 'no strength'}; pick one of those or re-export"
            )
        return self.info.partial_tables[key]

    def step(
        self,
        table: StepTable,
        index: int,
        model_output: np.ndarray,  # (B, C, h, w)
        sample: np.ndarray,  # (B, C, h, w)
        noise: np.ndarray | None,  # (B, C, h, w); None at the last step
    ) -> tuple[np.ndarray, np.ndarray]:
        """One LCM step; returns (next sample, denoised). Follows diffusers' ``LCMScheduler.step``."""
        dtype = sample.dtype
        # 1. alpha_bar of this timestep and of the next one (both from the table).
        sqrt_alpha = dtype.type(table.sqrt_alpha_prod[index])
        sqrt_beta = dtype.type(table.sqrt_beta_prod[index])
        # 2. Boundary-condition scalings c_skip(t), c_out(t).
        c_skip, c_out = dtype.type(table.c_skip[index]), dtype.type(table.c_out[index])
        # 3. Predicted original sample x0 from the model's parameterisation.
        prediction = self.info.prediction_type
        if prediction == "epsilon":
            predicted_original = (sample - sqrt_beta * model_output) / sqrt_alpha
        elif prediction == "sample":
            predicted_original = model_output
        elif prediction == "v_prediction":
            predicted_original = sqrt_alpha * sample - sqrt_beta * model_output
        else:
            raise ValueError(f"prediction_type {prediction!r} is not one of epsilon, sample, v_prediction")
        # 4. Clip or threshold x0 where the scheduler config asks for it.
        if self.info.thresholding:
            predicted_original = self._threshold(predicted_original)
        elif self.info.clip_sample:
            limit = self.info.clip_sample_range
            predicted_original = np.clip(predicted_original, -limit, limit)
        # 5. Denoised sample from the consistency-model parameterisation.
        denoised = c_out * predicted_original + c_skip * sample
        # 6. Inject noise for the next timestep, except after the last step.
        if index == len(table.timesteps) - 1:
            return denoised, denoised
        if noise is None:
            raise ValueError("noise is required before the last step")
        sqrt_alpha_next = dtype.type(table.sqrt_alpha_prod_next[index])
        sqrt_beta_next = dtype.type(table.sqrt_beta_prod_next[index])
        return sqrt_alpha_next * denoised + sqrt_beta_next * noise.astype(dtype, copy=False), denoised

    def _threshold(self, sample: np.ndarray) -> np.ndarray:
        """Dynamic thresholding (Imagen), as diffusers' ``_threshold_sample``."""
        batch = sample.shape[0]
        flat = sample.reshape(batch, -1).astype(np.float32)
        limit = np.quantile(np.abs(flat), self.info.dynamic_thresholding_ratio, axis=1)
        limit = np.clip(limit, 1.0, self.info.sample_max_value)[:, None]
        flat = np.clip(flat, -limit, limit) / limit
        return flat.reshape(sample.shape).astype(sample.dtype)


@lru_cache(maxsize=32)
def _guidance_embedding_row(
    guidance_scale: float, embedding_dim: int, frequencies: tuple[float, ...] | None = None
) -> np.ndarray:
    # w = (g - 1) * 1000 (LCM's guidance parameterisation), float32 like diffusers.
    w = np.float32(guidance_scale - 1) * np.float32(1000.0)
    half = embedding_dim // 2
    if frequencies is None:  # not in the manifest (format 1): computed here, within ~1 ulp of diffusers'
        exponent = np.log(np.float32(10000.0)) / np.float32(half - 1)
        table = np.exp(np.arange(half, dtype=np.float32) * -exponent)  # (half,)
    else:  # exactly diffusers' float32 frequencies, computed at export
        table = np.asarray(frequencies, dtype=np.float32)
    # sin and cos in float64 of the float32 angles, then rounded: numpy's float32 sin/cos are SIMD approximations
    # (up to 1 ulp off, by CPU dispatch) while the JS runtime's Math.sin/cos are float64; an ulp in timestep_cond
    # is enough to flip an int8 activation of an INT8 U-Net (docs/design-notes.md, "JavaScript runtime").
    angles = (w * table).astype(np.float64)
    row = np.concatenate([np.sin(angles), np.cos(angles)])  # sin first
    if embedding_dim % 2 == 1:
        row = np.pad(row, (0, 1))
    row = row.astype(np.float32)
    row.setflags(write=False)
    return row


def guidance_scale_embedding(
    guidance_scale: float, embedding_dim: int, batch: int, frequencies: tuple[float, ...] | None = None
) -> np.ndarray:
    """The w-embedding fed as ``timestep_cond``: (batch, embedding_dim), float32, cached per scale.

    ``frequencies``: the manifest's ``conditioning.guidance_frequencies`` (diffusers' own float32 values).
    """
    row = _guidance_embedding_row(float(guidance_scale), embedding_dim, frequencies)
    return np.broadcast_to(row, (batch, embedding_dim))
