"""``--tiny-vae``: a bundle with an AutoencoderTiny (TAESD) decoder reproduces diffusers with that VAE."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lcm_export.exporter.tiny import build_tiny_autoencoder_tiny
from lcm_export.runtime import Pipeline
from lcm_export.runtime.backends import BACKENDS
from tests.helpers import (
    TOLERANCE,
    assert_one_line_error,
    diffusers_images,
    diffusers_img2img,
    export,
    make_image,
    random_inputs,
)


def _not_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is None


# Every CPU backend is a parameter: one whose library is missing is skipped with that reason; one that is installed
# but fails to load fails the test.
BACKEND_PARAMS = [
    pytest.param(
        "onnxruntime",
        marks=pytest.mark.skipif(_not_installed("onnxruntime"), reason="onnxruntime is not installed"),
    ),
    pytest.param(
        "openvino",
        marks=[
            pytest.mark.openvino,
            pytest.mark.skipif(_not_installed("openvino"), reason="openvino is not installed: lcm-edge[openvino]"),
        ],
    ),
]


@pytest.fixture(scope="module")
def tiny_vae_bundle(tiny_lcm_dir, tiny_vae_dir, tmp_path_factory) -> Path:
    return export(tiny_lcm_dir, tmp_path_factory.mktemp("bundles") / "tiny-vae", tiny_vae=str(tiny_vae_dir))


@pytest.fixture(scope="module")
def diffusers_with_tiny_vae(tiny_lcm_dir, tiny_vae_dir):
    from diffusers import AutoencoderTiny, LatentConsistencyModelPipeline

    return LatentConsistencyModelPipeline.from_pretrained(
        str(tiny_lcm_dir),
        vae=AutoencoderTiny.from_pretrained(str(tiny_vae_dir)),
        safety_checker=None,
        requires_safety_checker=False,
    )


def test_manifest_says_autoencoder_tiny(tiny_vae_bundle, tiny_vae_dir) -> None:
    manifest = json.loads((tiny_vae_bundle / "manifest.json").read_text())
    tiny_config = json.loads((tiny_vae_dir / "config.json").read_text())
    info = manifest["pipeline"]
    assert info["vae"] == "autoencoder_tiny"
    assert info["vae_scaling_factor"] == tiny_config["scaling_factor"] == 1.0
    assert info["vae_scale_factor"] == 2
    decoder = manifest["components"]["vae_decoder"]
    assert [t["name"] for t in decoder["inputs"]] == ["latent_sample"]
    assert [t["name"] for t in decoder["outputs"]] == ["sample"]
    # The tiny VAE's own encoder replaces the KL encoder: latents, not a distribution.
    assert [t["name"] for t in manifest["components"]["vae_encoder"]["outputs"]] == ["latents"]
    index = json.loads((tiny_vae_bundle / "model_index.json").read_text())
    assert index["vae_decoder"] == ["diffusers", "AutoencoderTiny"]
    assert json.loads((tiny_vae_bundle / "vae_decoder" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize(("guidance", "size"), [(8.0, (32, 32)), (3.0, (48, 64))])
def test_image_matches_diffusers_with_autoencoder_tiny(
    tiny_vae_bundle, tiny_lcm_dir, diffusers_with_tiny_vae, backend, guidance, size
) -> None:
    assert backend in BACKENDS
    height, width = size
    latents, noise = random_inputs((1, 4, height // 2, width // 2), steps=4, seed=height + int(guidance))
    expected = diffusers_images(
        tiny_lcm_dir, "a lighthouse", latents, noise, guidance=guidance, pipeline=diffusers_with_tiny_vae
    )
    runtime = Pipeline.load(tiny_vae_bundle, backend=backend, precision="fp32")
    result = runtime("a lighthouse", guidance_scale=guidance, latents=latents, noise=noise)
    assert result.images.shape == (1, height, width, 3)
    error = float(np.abs(result.images - expected).max())
    assert error < TOLERANCE, error
    assert result.images.std() > 0.01  # a real image, not a constant


def test_tiny_vae_encoder_matches_diffusers(tiny_vae_bundle, tiny_vae_dir) -> None:
    import onnxruntime
    import torch
    from diffusers import AutoencoderTiny

    image = np.random.default_rng(0).uniform(-1, 1, (1, 3, 32, 48)).astype(np.float32)
    with torch.no_grad():
        expected = AutoencoderTiny.from_pretrained(str(tiny_vae_dir)).encode(torch.from_numpy(image)).latents.numpy()
    session = onnxruntime.InferenceSession(
        str(tiny_vae_bundle / "vae_encoder" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (latents,) = session.run(["latents"], {"sample": image})
    assert latents.shape == (1, 4, 16, 24)
    assert np.abs(latents - expected).max() < 1e-4


def _export_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lcm_export.exporter.cli", *arguments, "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_missing_tiny_vae_path_is_one_line_error(tiny_lcm_dir, tmp_path) -> None:
    output = tmp_path / "out"
    result = _export_cli(str(tiny_lcm_dir), "-o", str(output), "--tiny-vae", str(tmp_path / "no-such-taesd"))
    assert_one_line_error(result, "--tiny-vae", "no-such-taesd", "does not exist")
    assert list(tmp_path.iterdir()) == []  # no bundle, no staging folder


def test_tiny_vae_that_is_not_an_autoencoder_tiny_is_one_line_error(tiny_lcm_dir, tmp_path) -> None:
    output = tmp_path / "out"
    # The pipeline's own AutoencoderKL folder: a real diffusers model, but not an AutoencoderTiny.
    result = _export_cli(str(tiny_lcm_dir), "-o", str(output), "--tiny-vae", str(tiny_lcm_dir / "vae"))
    assert_one_line_error(result, "--tiny-vae", "AutoencoderKL", "AutoencoderTiny")
    assert not output.exists()


@pytest.mark.parametrize(
    ("channels", "depth", "fragment"),
    [(6, 1, "6 latent channels"), (4, 2, "scales latents by 4")],
)
def test_mismatched_tiny_vae_is_one_line_error(tiny_lcm_dir, tmp_path, channels, depth, fragment) -> None:
    tiny = build_tiny_autoencoder_tiny(tmp_path / "taesd", latent_channels=channels, scale_factor_depth=depth)
    output = tmp_path / "bundles" / "out"
    result = _export_cli(str(tiny_lcm_dir), "-o", str(output), "--tiny-vae", str(tiny))
    assert_one_line_error(result, "--tiny-vae", fragment)
    assert not output.parent.exists() or list(output.parent.iterdir()) == []


def test_img2img_with_the_tiny_vae_encoder_matches_diffusers(tiny_lcm_dir, tiny_vae_dir, tiny_vae_bundle) -> None:
    """AutoencoderTiny encodes to latents directly: diffusers draws no latent sample, nor does the runtime."""
    import torch
    from diffusers import AutoencoderTiny, LatentConsistencyModelImg2ImgPipeline
    from diffusers.pipelines.latent_consistency_models import pipeline_latent_consistency_img2img as module

    pixels = np.asarray((make_image(32, 32, 3) * 255).round(), np.uint8).astype(np.float32) / 255
    runtime = Pipeline.load(tiny_vae_bundle, backend="onnxruntime", precision="fp32")
    table = runtime.denoiser.scheduler.table(4, 0.6)
    rng = np.random.default_rng(5)
    shape = (1, 4, 16, 16)
    image_noise = rng.standard_normal(shape).astype(np.float32)
    step_noise = [rng.standard_normal(shape).astype(np.float32) for _ in range(len(table.timesteps) - 1)]
    pipeline = LatentConsistencyModelImg2ImgPipeline.from_pretrained(
        str(tiny_lcm_dir),
        vae=AutoencoderTiny.from_pretrained(str(tiny_vae_dir), torch_dtype=torch.float32),
        safety_checker=None,
        requires_safety_checker=False,
    )
    unused = np.zeros(shape, np.float32)  # the KL sample diffusers would draw; the tiny VAE draws none
    expected = diffusers_img2img(pipeline, module, "a cat", pixels, 0.6, 4, 8.5, (unused, image_noise, step_noise))
    result = runtime.img2img(
        pixels, "a cat", strength=0.6, guidance_scale=8.5, image_noise=image_noise, noise=step_noise
    )
    error = float(np.abs(result.images - expected).max())
    print(f"tiny VAE img2img: max abs {error:.2e}")
    assert error < 2e-3, error
