"""Fixtures only: tiny random pipelines built once per session and their exported bundles (helpers: tests.helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lcm_export.exporter.tiny import TinyPipelineConfig, build_tiny_pipeline
from tests.helpers import OTHER_SDXL, export


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """The caches of this run, never the user's: session-wide, so that the module and session fixtures (INT8
    bundles record calibration trajectories) are set up inside it too; a function-scoped one came after them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LCM_EXPORT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lcm-cache"))
        yield


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
