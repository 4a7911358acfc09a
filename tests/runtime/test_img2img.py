"""Image-to-image equals diffusers' img2img pipelines given the same image and the same draws.

Distilled LCM: ``LatentConsistencyModelImg2ImgPipeline`` (strength goes into ``set_timesteps``: all steps from a
lower start). LCM-LoRA: ``StableDiffusionImg2ImgPipeline`` with ``LCMScheduler`` (the schedule is sliced: fewer
steps). The draws, in diffusers' order: the VAE's latent sample, the noise added to the encoded image, one noise
per step but the last.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lcm_export.errors import UserError
from lcm_export.runtime import Pipeline
from tests.helpers import TOLERANCE, diffusers_img2img, make_image


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_distilled_lcm_img2img_matches_diffusers(tiny_lcm_dir, tiny_lcm_bundle, strength, size) -> None:
    from diffusers import LatentConsistencyModelImg2ImgPipeline
    from diffusers.pipelines.latent_consistency_models import pipeline_latent_consistency_img2img as module

    height, width = size
    image = make_image(height, width)
    pixels = np.asarray((image * 255).round(), np.uint8).astype(np.float32) / 255  # as the PNG diffusers reads
    runtime = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime", precision="fp32")
    steps = 4
    table = runtime.denoiser.scheduler.table(steps, strength)
    shape = (1, 4, height // 2, width // 2)
    rng = np.random.default_rng(int(strength * 10) + height)
    sample_noise, image_noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    step_noise = [rng.standard_normal(shape).astype(np.float32) for _ in range(len(table.timesteps) - 1)]
    pipeline = LatentConsistencyModelImg2ImgPipeline.from_pretrained(
        str(tiny_lcm_dir), safety_checker=None, requires_safety_checker=False
    )
    expected = diffusers_img2img(
        pipeline, module, "a cat", pixels, strength, steps, 8.5, (sample_noise, image_noise, step_noise)
    )
    result = runtime.img2img(
        pixels,
        "a cat",
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=8.5,
        sample_noise=sample_noise,
        image_noise=image_noise,
        noise=step_noise,
    )
    assert result.images.shape == (1, height, width, 3)
    error = float(np.abs(result.images - expected).max())
    print(f"LCM img2img strength {strength} {width}x{height}: {len(table.timesteps)} steps, max abs {error:.2e}")
    assert error < TOLERANCE, error
    assert len(table.timesteps) == steps  # all steps run, from a lower start


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_lcm_lora_img2img_matches_diffusers(tiny_cfg_bundle, tiny_cfg_model, strength, size) -> None:
    from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    base, lora = tiny_cfg_model
    height, width = size
    pixels = np.asarray((make_image(height, width, 1) * 255).round(), np.uint8).astype(np.float32) / 255
    runtime = Pipeline.load(tiny_cfg_bundle, backend="onnxruntime", precision="fp32")
    steps, guidance = 4, 1.5
    table = runtime.denoiser.scheduler.table(steps, strength)
    shape = (1, 4, height // 2, width // 2)
    rng = np.random.default_rng(int(strength * 10) + width)
    sample_noise, image_noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    step_noise = [rng.standard_normal(shape).astype(np.float32) for _ in range(len(table.timesteps) - 1)]
    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(base), safety_checker=None, requires_safety_checker=False
    )
    pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    pipeline.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="lcm")
    pipeline.fuse_lora()
    expected = diffusers_img2img(
        pipeline,
        module,
        "a cat",
        pixels,
        strength,
        steps,
        guidance,
        (sample_noise, image_noise, step_noise),
        negative_prompt="blurry",
    )
    result = runtime.img2img(
        pixels,
        "a cat",
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        negative_prompt="blurry",
        sample_noise=sample_noise,
        image_noise=image_noise,
        noise=step_noise,
    )
    error = float(np.abs(result.images - expected).max())
    print(f"LCM-LoRA img2img strength {strength} {width}x{height}: {len(table.timesteps)} steps, max abs {error:.2e}")
    assert error < TOLERANCE, error
    assert len(table.timesteps) == int(steps * strength)  # the sliced schedule: fewer steps


def test_img2img_bad_input(tiny_lcm_bundle, tmp_path) -> None:
    runtime = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    good = make_image(32, 32)
    with pytest.raises(UserError, match=r"image is 30x32, which .* multiple of 4 \(e\.g\. 28x32\)"):
        runtime.img2img(good[:, :30], "a cat")
    for strength in (0, 1.5, float("nan"), "high"):
        with pytest.raises(UserError, match="strength="):
            runtime.img2img(good, "a cat", strength=strength)
    with pytest.raises(UserError, match=r"strength=0\.55 with num_inference_steps=4"):
        runtime.img2img(good, "a cat", strength=0.55)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="not an image Pillow can read"):
        runtime.img2img(tmp_path / "notes.txt", "a cat")
    with pytest.raises(UserError, match="does not exist"):
        runtime.img2img(tmp_path / "missing.png", "a cat")
    with pytest.raises(UserError, match=r"image_noise has shape \[1, 4, 8, 8\]: expected \[1, 4, 16, 16\]"):
        runtime.img2img(good, "a cat", image_noise=np.zeros((1, 4, 8, 8), np.float32))


def test_img2img_from_a_png_path(tiny_lcm_bundle, tmp_path) -> None:
    from PIL import Image

    image = make_image(32, 32)
    path = tmp_path / "in.png"
    Image.fromarray((image * 255).round().astype(np.uint8)).save(path)
    runtime = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    from_path = runtime.img2img(path, "a cat", seed=1).images
    from_array = runtime.img2img(np.asarray(Image.open(path)), "a cat", seed=1).images
    assert np.array_equal(from_path, from_array)
    assert runtime.variants["vae_encoder"].name == "fp32"


@pytest.fixture(scope="module")
def tiny_cfg_model(tiny_cfg_bundle) -> tuple[Path, Path]:
    """The base pipeline and LoRA the session's CFG bundle was exported from (recorded in its manifest)."""
    from lcm_export.runtime.manifest import load_manifest

    manifest = load_manifest(tiny_cfg_bundle)
    return Path(manifest.provenance["source_model"]), Path(manifest.loras[0]["source"])


def run_cli(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lcm_export.runtime.cli", *map(str, args), "--backend", "onnxruntime"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_cli_image_and_stream(tiny_lcm_bundle, tmp_path) -> None:
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    for index in range(3):
        Image.fromarray((make_image(32, 32, index) * 255).astype(np.uint8)).save(frames / f"{index:03d}.png")
    result = run_cli(
        tiny_lcm_bundle, "a cat", "--image", frames / "000.png", "--strength", "0.6", "--output", tmp_path / "out.png"
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out.png").size == (32, 32)

    result = run_cli(tiny_lcm_bundle, "a cat", "--stream", frames, "--output", tmp_path / "styled", "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "styled").iterdir()) == ["000.png", "001.png", "002.png"]
    assert "frames/s" in result.stdout and "p90" in result.stdout

    Image.fromarray(np.zeros((48, 32, 3), np.uint8)).save(frames / "003.png")  # another size mid-stream
    result = run_cli(tiny_lcm_bundle, "a cat", "--stream", frames, "--output", tmp_path / "styled2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "frame 4 is 32x48 but the stream started at 32x32" in result.stderr

    result = run_cli(tiny_lcm_bundle, "a cat", "--image", tmp_path / "none.png", "--output", tmp_path / "x.png")
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_stream_keeps_still_frames_still(tiny_lcm_bundle) -> None:
    runtime = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    stream = runtime.stream("a cat", strength=0.5)
    frame = make_image(32, 32)
    first, second = stream(frame), stream(frame)
    assert np.array_equal(first, second) and len(stream.latencies) == 2
