"""Shared fixtures: tiny random pipelines built once per session, exported bundles, and diffusers references."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lcm_export.exporter.tiny import TinyPipelineConfig, build_tiny_pipeline


def export(model: Path | str, output: Path, **options) -> Path:
    """Export with the library API (what the CLI calls), quietly."""
    from lcm_export.exporter.bundle import ExportConfig, export_bundle

    export_bundle(ExportConfig(model=str(model), output=Path(output), quiet=True, **options))
    return Path(output)


def export_cli_blocking(*args: str | Path, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``lcm-export`` as a user would; ``blocked`` modules fail to import (a machine without them)."""
    code = (
        "import sys\n"
        f"for name in {list(blocked)!r}: sys.modules[name] = None\n"
        "from lcm_export.exporter.cli import entry_point\n"
        f"sys.argv = ['lcm-export', *{[str(a) for a in args]!r}]\n"
        "entry_point()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@contextlib.contextmanager
def fixed_scheduler_noise(noise: list[np.ndarray]):
    """Make diffusers' LCMScheduler.step draw ``noise`` in order instead of random tensors."""
    import torch
    from diffusers.schedulers import scheduling_lcm

    queue = [torch.from_numpy(np.asarray(n, dtype=np.float32)) for n in noise]
    original = scheduling_lcm.randn_tensor

    def next_noise(shape, generator=None, device=None, dtype=None, layout=None):
        tensor = queue.pop(0)
        assert tuple(tensor.shape) == tuple(shape), (tensor.shape, shape)
        return tensor.to(dtype=dtype)

    scheduling_lcm.randn_tensor = next_noise
    try:
        yield
        assert not queue, f"{len(queue)} noise tensors were not used"
    finally:
        scheduling_lcm.randn_tensor = original


def diffusers_images(
    model_dir: Path,
    prompt: str | list[str],
    latents: np.ndarray,
    noise: list[np.ndarray],
    *,
    steps: int = 4,
    guidance: float | None = None,  # None: diffusers' own default (the bundle's default must equal it)
    num_images_per_prompt: int = 1,
    negative_prompt: str | list[str] | None = None,
    pipeline=None,
) -> np.ndarray:
    """diffusers' own output (output_type="np") for the same latents and noise."""
    import torch
    from diffusers import DiffusionPipeline, LCMScheduler

    if pipeline is None:
        pipeline = DiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
        pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    kwargs = dict(
        num_inference_steps=steps,
        num_images_per_prompt=num_images_per_prompt,
        latents=torch.from_numpy(latents),
        output_type="np",
    )
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    with fixed_scheduler_noise(noise), torch.no_grad():
        return pipeline(prompt, **kwargs).images


def random_inputs(shape: tuple[int, ...], steps: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(shape).astype(np.float32)
    return latents, [rng.standard_normal(shape).astype(np.float32) for _ in range(steps - 1)]


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    mse = float(np.mean((reference.astype(np.float64) - image.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def sdxl_source(request, name: str):
    """(model folder, LoRAs) of the SDXL models the target tests build: "tiny-sdxl-lcm" (distilled) or the base
    OTHER_SDXL with its LoRA fused at 0.9."""
    from lcm_export.exporter.bundle import LoraSource

    if name == "tiny-sdxl-lcm":
        return request.getfixturevalue("sdxl_lcm_dir"), ()
    model, lora = request.getfixturevalue("other_sdxl_model")
    return model, (LoraSource(str(lora), 0.9),)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LCM_EXPORT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lcm-cache"))


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-lcm"), TinyPipelineConfig(kind="lcm"))


@pytest.fixture(scope="session")
def tiny_lcm_bundle(tiny_lcm_dir, tmp_path_factory) -> Path:
    return export(tiny_lcm_dir, tmp_path_factory.mktemp("bundles") / "tiny-lcm")


@pytest.fixture(scope="session")
def tiny_lcm_pipeline(tiny_lcm_dir):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(tiny_lcm_dir), safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A tiny AutoencoderTiny (TAESD's architecture, 4 latent channels) for every tiny pipeline here: their
    AutoencoderKLs (SD and SDXL kinds) have two blocks, scale factor 2 = one up-sampling stage. On SDXL it has
    TAESDXL's shape (TAESD and TAESDXL differ in weights only)."""
    from lcm_export.exporter.tiny import build_tiny_autoencoder_tiny

    return build_tiny_autoencoder_tiny(tmp_path_factory.mktemp("taesd"), latent_channels=4, scale_factor_depth=1)


@pytest.fixture(scope="session")
def tiny_cfg_bundle(tmp_path_factory) -> Path:
    """A classifier-free-guidance bundle: a tiny base SD with one random LoRA fused (LCM-LoRA's shape)."""
    from lcm_export.exporter.bundle import LoraSource
    from lcm_export.exporter.tiny import build_tiny_lora

    base = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-base"), TinyPipelineConfig(kind="sd"))
    lora = build_tiny_lora(
        tmp_path_factory.mktemp("cfg-lora") / "lcm.safetensors", base, rank=4, target_modules=("to_q", "to_v")
    )
    return export(base, tmp_path_factory.mktemp("bundles") / "tiny-cfg", loras=(LoraSource(str(lora)),))


# -- SDXL -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sdxl_lcm_dir(tmp_path_factory) -> Path:
    """A tiny distilled LCM-SDXL (U-Net with time_cond_proj_dim, two text encoders)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl-lcm"), TinyPipelineConfig(kind="sdxl-lcm"))


@pytest.fixture(scope="session")
def sdxl_lcm_bundle(sdxl_lcm_dir, tmp_path_factory) -> Path:
    return export(sdxl_lcm_dir, tmp_path_factory.mktemp("bundles") / "tiny-sdxl-lcm")


@pytest.fixture(scope="session")
def sdxl_base(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny base SDXL, a random U-Net LoRA for it, and the bundle of the two fused."""
    from lcm_export.exporter.bundle import LoraSource
    from lcm_export.exporter.tiny import build_tiny_lora

    base = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), TinyPipelineConfig(kind="sdxl"))
    lora = build_tiny_lora(
        tmp_path_factory.mktemp("sdxl-lora") / "lcm.safetensors", base, rank=4, target_modules=("to_q", "to_v")
    )
    bundle = export(base, tmp_path_factory.mktemp("bundles") / "tiny-sdxl-cfg", loras=(LoraSource(str(lora)),))
    return base, lora, bundle


# A base SDXL shape only the target, optimum and image-to-image checks use (test_sdxl's UNSEEN_SDXL is another):
# cross-attention in the two highest-resolution blocks and none in the lowest (the mid block keeps it), two
# transformer layers in the first block, heads of size 16, 16 and 8, a one-layer first text encoder (its
# penultimate state is the embeddings' output) with heads of size 24 (TensorRT's finite mask fill), a narrower
# three-layer second encoder, projection 24, a time embedding of 6 per id, and an 8/16-channel VAE.
OTHER_SDXL = TinyPipelineConfig(
    kind="sdxl",
    unet_block_out_channels=(16, 32, 32),
    unet_down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    unet_up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(1, 2, 4),
    transformer_layers_per_block=(2, 1, 1),
    text_hidden_size=48,
    text_layers=1,
    text_heads=2,
    text_2_hidden_size=16,
    text_2_layers=3,
    text_2_heads=2,
    text_2_projection_dim=24,
    addition_time_embed_dim=6,
    vae_block_out_channels=(8, 16),
    seed=11,
)


@pytest.fixture(scope="session")
def other_sdxl_model(tmp_path_factory) -> tuple[Path, Path]:
    """The OTHER_SDXL base pipeline and a LoRA for it (U-Net attention and both text encoders)."""
    from lcm_export.exporter.tiny import build_tiny_lora

    base = build_tiny_pipeline(tmp_path_factory.mktemp("other-sdxl"), OTHER_SDXL)
    lora = build_tiny_lora(
        tmp_path_factory.mktemp("other-sdxl-lora") / "lora.safetensors",
        base,
        rank=2,
        target_modules=("to_q", "to_k", "to_v", "to_out.0"),
        text_encoder=True,
        seed=4,
    )
    return base, lora


@pytest.fixture(scope="session")
def other_sdxl_bundle(other_sdxl_model, tmp_path_factory) -> Path:
    """OTHER_SDXL with its LoRA fused at 0.9: an LCM-LoRA-shaped (classifier-free guidance) fp32 ONNX bundle."""
    from lcm_export.exporter.bundle import LoraSource

    base, lora = other_sdxl_model
    return export(base, tmp_path_factory.mktemp("bundles") / "other-sdxl", loras=(LoraSource(str(lora), 0.9),))
