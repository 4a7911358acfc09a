"""The numpy LCM step and w-embedding against diffusers' own ``LCMScheduler.step`` and pipeline, on random tensors.

Each step gets identical inputs on both sides (diffusers' previous sample feeds the next step of both) and the same
noise, injected into diffusers through ``fixed_scheduler_noise``; ``prev_sample`` and ``denoised`` must agree to
float32 rounding. Branches that only change the result when they act (clipping, thresholding) are also checked to
act: their output differs from the same step without them.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

import numpy as np
import pytest

from lcm_export.errors import UserError
from lcm_export.exporter.schedule import guidance_frequencies, scheduler_info
from lcm_export.runtime.manifest import SchedulerInfo
from lcm_export.runtime.scheduler import LCMScheduler, guidance_scale_embedding
from tests.helpers import fixed_scheduler_noise

MAX_STEPS = 8
STEP_COUNTS = (1, 2, 4, 8)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SHAPE = (2, 4, 6, 5)  # (B, C, h, w): tiny, with a batch so thresholding's per-image quantile is exercised
RELATIVE_TOLERANCE = 1e-6  # max |numpy - diffusers| / max |diffusers|, float32

# Scheduler configs (keyword arguments of diffusers' LCMScheduler) beside its defaults.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "original_steps_30": {"original_inference_steps": 30},
    "timestep_scaling_5": {"timestep_scaling": 5.0},
    "linear_betas": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "train_timesteps_500": {"num_train_timesteps": 500},
    "all_changed": {
        "num_train_timesteps": 500,
        "original_inference_steps": 30,
        "timestep_scaling": 5.0,
        "beta_schedule": "linear",
    },
}
# Options of step 4 (clip or threshold x0), each set so that it changes x0 of random inputs.
CLIPPING: dict[str, dict[str, Any]] = {
    "clip_sample": {"clip_sample": True, "clip_sample_range": 0.5},
    # ratio 0.9 of |x0|: s lies above 1 for every image; one image is scaled so s stays below sample_max_value
    # (the quantile itself is used), the other so that it is capped at sample_max_value.
    "thresholding": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 4.0},
    # Both on: diffusers thresholds and ignores clip_sample.
    "thresholding_and_clip": {
        "thresholding": True,
        "dynamic_thresholding_ratio": 0.9,
        "sample_max_value": 4.0,
        "clip_sample": True,
        "clip_sample_range": 0.5,
    },
}


def diffusers_scheduler(options: dict[str, Any]):
    from diffusers import LCMScheduler as DiffusersLCMScheduler

    return DiffusersLCMScheduler(**options)


@cache
def _info(options_key: tuple[tuple[str, Any], ...]) -> SchedulerInfo:
    return scheduler_info(dict(diffusers_scheduler(dict(options_key)).config), MAX_STEPS)


def runtime_info(options: dict[str, Any]) -> SchedulerInfo:
    """The runtime's scheduler info as the exporter builds it from a diffusers config (cached per config)."""
    return _info(tuple(sorted(options.items())))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == np.float32, actual.dtype
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def model_outputs(steps: int, seed: int) -> list[np.ndarray]:
    """Random model outputs for each step; in each the two images differ in scale (2 and 12), so that dynamic
    thresholding takes the quantile for one and sample_max_value for the other (for "sample" prediction, and for
    the x0 an epsilon or v prediction gives at high noise)."""
    rng = np.random.default_rng(seed)
    scale = np.array([2.0, 12.0], dtype=np.float32).reshape(2, 1, 1, 1)
    return [(rng.standard_normal(SHAPE) * scale).astype(np.float32) for _ in range(steps)]


def compare_trajectory(options: dict[str, Any], steps: int, seed: int = 0) -> list[tuple[float, float]]:
    """Run ``steps`` LCM steps in diffusers and in numpy on the same inputs; assert the timesteps are diffusers'
    and return the relative errors (prev_sample, denoised) of each step."""
    import torch

    reference = diffusers_scheduler(options)
    reference.set_timesteps(steps)
    runtime = LCMScheduler(runtime_info(options))
    table = runtime.table(steps)
    assert list(table.timesteps) == reference.timesteps.tolist()

    rng = np.random.default_rng(seed + 1000)
    sample = rng.standard_normal(SHAPE).astype(np.float32)
    errors = []
    for index, (timestep, output) in enumerate(zip(reference.timesteps, model_outputs(steps, seed), strict=True)):
        last = index == steps - 1
        noise = None if last else rng.standard_normal(SHAPE).astype(np.float32)
        with fixed_scheduler_noise([] if last else [noise]):  # the last step draws nothing
            expected = reference.step(torch.from_numpy(output), timestep, torch.from_numpy(sample))
        expected_prev, expected_denoised = expected.prev_sample.numpy(), expected.denoised.numpy()

        prev_sample, denoised = runtime.step(table, index, output, sample, noise)
        errors.append((relative_error(prev_sample, expected_prev), relative_error(denoised, expected_denoised)))
        if last:
            np.testing.assert_array_equal(prev_sample, denoised)
        sample = expected_prev
    return errors


def assert_within_tolerance(errors: list[tuple[float, float]]) -> None:
    worst = max(max(pair) for pair in errors)
    assert worst <= RELATIVE_TOLERANCE, errors


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_step_matches_diffusers(config: str, steps: int, prediction_type: str) -> None:
    assert_within_tolerance(compare_trajectory({**CONFIGS[config], "prediction_type": prediction_type}, steps))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("steps", (1, 4))
@pytest.mark.parametrize("clipping", CLIPPING)
def test_clipped_step_matches_diffusers(clipping: str, steps: int, prediction_type: str) -> None:
    options = {**CLIPPING[clipping], "prediction_type": prediction_type}
    assert_within_tolerance(compare_trajectory(options, steps))


def diffusers_denoised(options: dict[str, Any], steps: int, index: int) -> np.ndarray:
    """diffusers' ``denoised`` of step ``index`` of ``steps`` for the inputs of :func:`compare_trajectory`'s first
    step (fed at that step's timestep)."""
    import torch

    scheduler = diffusers_scheduler(options)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(index)
    output = model_outputs(1, seed=0)[0]
    sample = np.random.default_rng(1000).standard_normal(SHAPE).astype(np.float32)
    noise = [] if index == steps - 1 else [np.zeros(SHAPE, np.float32)]
    with fixed_scheduler_noise(noise):
        step = scheduler.step(torch.from_numpy(output), scheduler.timesteps[index], torch.from_numpy(sample))
    return step.denoised.numpy()


# What each clipping option must differ from on these inputs, so that a runtime ignoring it (or taking the other
# branch) fails the comparison with diffusers.
ALTERNATIVES = {
    "clip_sample": ({},),
    "thresholding": ({}, CLIPPING["clip_sample"]),
    "thresholding_and_clip": ({}, CLIPPING["clip_sample"]),
}


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize(("steps", "index"), [(1, 0), (4, 0), (4, 3)])
@pytest.mark.parametrize("clipping", CLIPPING)
def test_clipping_options_act_on_these_inputs(clipping: str, steps: int, index: int, prediction_type: str) -> None:
    """Guards the comparison above: on these inputs each option changes the step."""
    acting = diffusers_denoised({**CLIPPING[clipping], "prediction_type": prediction_type}, steps, index)
    for alternative in ALTERNATIVES[clipping]:
        other = diffusers_denoised({**alternative, "prediction_type": prediction_type}, steps, index)
        assert np.abs(acting - other).max() > 1e-2, alternative


def test_thresholding_uses_the_quantile_and_the_cap() -> None:
    """With ``sample`` prediction x0 is the model output: image 0's 0.9-quantile of |x0| lies between 1 and
    sample_max_value (the quantile itself is the limit), image 1's is above it (the cap is the limit)."""
    options = CLIPPING["thresholding"]
    output = model_outputs(1, seed=0)[0]
    quantiles = np.quantile(np.abs(output.reshape(2, -1)), options["dynamic_thresholding_ratio"], axis=1)
    assert 1.0 < quantiles[0] < options["sample_max_value"] < quantiles[1]


def test_last_step_needs_no_noise_and_earlier_steps_do() -> None:
    runtime = LCMScheduler(runtime_info({}))
    table = runtime.table(2)
    output, sample = model_outputs(2, seed=3)
    with pytest.raises(ValueError, match="noise is required"):
        runtime.step(table, 0, output, sample, None)
    prev_sample, denoised = runtime.step(table, 1, output, sample, None)
    assert prev_sample is denoised


def test_unknown_prediction_type_is_rejected_like_diffusers() -> None:
    import torch

    reference = diffusers_scheduler({"prediction_type": "flow"})
    reference.set_timesteps(1)
    output, sample = model_outputs(1, seed=4)[0], model_outputs(1, seed=5)[0]
    with pytest.raises(ValueError, match="prediction_type"):
        reference.step(torch.from_numpy(output), reference.timesteps[0], torch.from_numpy(sample))
    runtime = LCMScheduler(dataclasses.replace(runtime_info({}), prediction_type="flow"))
    with pytest.raises(ValueError, match="prediction_type"):
        runtime.step(runtime.table(1), 0, output, sample, None)


@pytest.mark.parametrize("config", CONFIGS)
def test_timesteps_equal_diffusers_set_timesteps(config: str) -> None:
    """Every table the exporter writes (1..MAX_STEPS, capped by original_inference_steps) has diffusers' timesteps."""
    info = runtime_info(CONFIGS[config])
    reference = diffusers_scheduler(CONFIGS[config])
    assert sorted(info.tables) == list(range(1, min(MAX_STEPS, reference.config.original_inference_steps) + 1))
    for steps, table in info.tables.items():
        reference.set_timesteps(steps)
        assert list(table.timesteps) == reference.timesteps.tolist(), steps


def test_usual_four_step_schedule_is_diffusers() -> None:
    """The usual config's 4 steps (NOTES: [999, 759, 499, 259] with current diffusers; older releases differ)."""
    reference = diffusers_scheduler({})
    reference.set_timesteps(4)
    expected = reference.timesteps.tolist()
    assert LCMScheduler(runtime_info({})).table(4).timesteps == tuple(expected)
    assert len(set(expected)) == 4 and expected[0] == reference.config.num_train_timesteps - 1


def test_missing_step_count_is_a_user_error() -> None:
    runtime = LCMScheduler(runtime_info({}))
    with pytest.raises(UserError, match=f"1-{MAX_STEPS} steps"):
        runtime.table(MAX_STEPS + 1)


@pytest.mark.parametrize("guidance", (1.0, 4.5, 8.5))
@pytest.mark.parametrize("dim", (32, 256, 33))
def test_guidance_embedding_matches_diffusers(dim: int, guidance: float) -> None:
    import torch
    from diffusers import LatentConsistencyModelPipeline

    batch = 3
    # As the pipeline calls it: w = guidance - 1 per image. The method does not use the pipeline's state.
    w = torch.tensor(guidance - 1).repeat(batch)
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim).numpy()
    # With the frequencies the exporter computes with torch (what a format-2 manifest carries): diffusers' own.
    frequencies = guidance_frequencies(dim)
    actual = guidance_scale_embedding(guidance, dim, batch, frequencies)
    assert actual.shape == (batch, dim) and actual.dtype == np.float32
    error = float(np.abs(actual - expected).max())
    assert error <= 1e-6, f"max abs {error:.3g} against diffusers (dim {dim}, guidance {guidance})"
    # Without them (format-1 bundles) the frequencies come from numpy's exp, one float32 ulp off torch's for some
    # k: the angles w * f_k with w = (g - 1) * 1000 move by ~w * 6e-8, measured up to 4.9e-4 at g = 8.5, dim 256.
    fallback = float(np.abs(guidance_scale_embedding(guidance, dim, batch) - expected).max())
    assert fallback <= 1e-3, fallback


def test_the_guidance_embedding_is_float64_sin_cos_of_the_float32_angles_rounded() -> None:
    """bundle-format.md step 5: sin and cos of the float32 angles w·f are taken in float64 and rounded to float32,
    as the JavaScript runtime's Math.sin/cos do; numpy's float32 sin/cos are SIMD approximations up to 1 ulp off,
    which flipped an int8 activation of an INT8 U-Net between the two runtimes."""
    half = 128
    exponent = np.float32(np.log(10000.0) / (half - 1))
    frequencies = np.exp(np.arange(half, dtype=np.float32) * -exponent)
    for guidance in (1.5, 2.0, 4.0, 7.5, 8.5, 12.0):
        w = np.float32((guidance - 1) * 1000)
        angles = (w * frequencies).astype(np.float64)
        expected = np.concatenate([np.sin(angles), np.cos(angles)]).astype(np.float32)
        row = guidance_scale_embedding(guidance, 2 * half, 1, tuple(float(f) for f in frequencies))[0]
        assert np.array_equal(row, expected), (guidance, np.abs(row - expected).max())
