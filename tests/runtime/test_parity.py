"""The runtime reproduces diffusers' LatentConsistencyModelPipeline given the same latents and noise."""

from __future__ import annotations

import numpy as np
import pytest

from lcm_export.exporter.tiny import build_tiny_pipeline
from lcm_export.runtime import Pipeline
from tests.helpers import TOLERANCE, UNSEEN_SHAPES, diffusers_images, export, image_psnr, random_inputs


@pytest.fixture(scope="module")
def runtime(tiny_lcm_bundle):
    return Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")


@pytest.mark.parametrize("guidance", [1.0, 4.0, 8.5])
@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_image_matches_diffusers(runtime, tiny_lcm_dir, tiny_lcm_pipeline, guidance, size) -> None:
    height, width = size
    latents, noise = random_inputs((1, 4, height // 2, width // 2), steps=4, seed=int(guidance * 10) + height)
    expected = diffusers_images(
        tiny_lcm_dir, "a photo of a cat", latents, noise, guidance=guidance, pipeline=tiny_lcm_pipeline
    )
    result = runtime("a photo of a cat", guidance_scale=guidance, latents=latents, noise=noise)
    assert result.images.shape == (1, height, width, 3)
    assert result.images.dtype == np.float32
    error = np.abs(result.images - expected).max()
    assert error < TOLERANCE, error
    assert result.images.std() > 0.01  # a real image, not a constant


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_other_step_counts_match(runtime, tiny_lcm_dir, tiny_lcm_pipeline, steps) -> None:
    latents, noise = random_inputs((1, 4, 16, 16), steps=steps, seed=steps)
    expected = diffusers_images(
        tiny_lcm_dir, "a red car", latents, noise, steps=steps, guidance=6.0, pipeline=tiny_lcm_pipeline
    )
    result = runtime("a red car", num_inference_steps=steps, guidance_scale=6.0, latents=latents, noise=noise)
    assert np.abs(result.images - expected).max() < TOLERANCE


def test_batch_of_prompts_and_images_per_prompt(runtime, tiny_lcm_dir, tiny_lcm_pipeline) -> None:
    prompts = ["a cat", "an astronaut riding a horse on the moon"]
    latents, noise = random_inputs((4, 4, 16, 16), steps=4, seed=7)
    expected = diffusers_images(
        tiny_lcm_dir, prompts, latents, noise, num_images_per_prompt=2, pipeline=tiny_lcm_pipeline
    )
    result = runtime(prompts, num_images_per_prompt=2, latents=latents, noise=noise)
    assert result.images.shape == (4, 32, 32, 3)
    assert np.abs(result.images - expected).max() < TOLERANCE
    assert np.abs(result.images[0] - result.images[2]).max() > 1e-3  # different prompts, different images


def test_seeded_runs_repeat_and_differ(runtime) -> None:
    first = runtime("a cat", seed=3).images
    assert np.array_equal(first, runtime("a cat", seed=3).images)
    assert np.abs(first - runtime("a cat", seed=4).images).max() > 1e-3


@pytest.mark.parametrize("name", sorted(UNSEEN_SHAPES))
def test_other_architectures_and_schedulers_match(name, tmp_path) -> None:
    config = UNSEEN_SHAPES[name]
    model = build_tiny_pipeline(tmp_path / "model", config)
    bundle = export(model, tmp_path / "bundle")
    runtime = Pipeline.load(bundle, backend="onnxruntime")
    info = runtime.manifest.pipeline
    assert info.vae_scale_factor == 2 ** (len(config.vae_block_out_channels) - 1)
    assert info.vae_scaling_factor == pytest.approx(config.vae_scaling_factor)
    for guidance, (height, width) in [(2.0, (info.spatial_multiple * 2, info.spatial_multiple * 3)), (7.0, (32, 32))]:
        if height % info.spatial_multiple or width % info.spatial_multiple:
            height = width = info.spatial_multiple * 2
        shape = (1, config.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
        latents, noise = random_inputs(shape, steps=4, seed=11)
        expected = diffusers_images(model, "a lighthouse at dusk", latents, noise, guidance=guidance)
        result = runtime("a lighthouse at dusk", guidance_scale=guidance, latents=latents, noise=noise)
        assert result.images.shape == (1, height, width, 3)
        assert np.abs(result.images - expected).max() < TOLERANCE


def test_fp16_bundle_psnr(tiny_lcm_dir, tiny_lcm_bundle, tmp_path) -> None:
    bundle16 = export(tiny_lcm_dir, tmp_path / "fp16", precision="fp16")
    runtime16 = Pipeline.load(bundle16, backend="onnxruntime")
    runtime32 = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    assert runtime16.manifest.components["unet"].artifacts["onnx"].io_dtype == "float16"
    assert runtime16.manifest.components["vae_decoder"].artifacts["onnx"].io_dtype == "float32"  # VAE kept fp32
    latents, noise = random_inputs((1, 4, 16, 16), steps=4, seed=5)
    image16 = runtime16("a cat", latents=latents, noise=noise).images
    image32 = runtime32("a cat", latents=latents, noise=noise).images
    value = image_psnr(image32, image16)
    print(f"fp16 vs fp32 PSNR: {value:.1f} dB")
    assert 35.0 < value < float("inf")
