"""SDXL (and SSD-1B): the second model family, exported and run through the same loop as SD.

The reference is diffusers' ``StableDiffusionXLPipeline`` with ``LCMScheduler`` given the same latents and step
noise: a distilled LCM-SDXL (U-Net with ``time_cond_proj_dim``, guidance as the w-embedding) and a base SDXL with
a U-Net LoRA fused (LCM-LoRA's shape: classifier-free guidance above 1, an absent negative prompt as zeros). The
runtime builds the same conditioning from the manifest: both encoders' penultimate hidden states concatenated,
the second encoder's ``text_embeds``, ``time_ids`` = [H, W, 0, 0, H, W]. Image-to-image is compared with
``StableDiffusionXLImg2ImgPipeline`` (see the section below), and an SDXL that needs aesthetic scores (the
refiner) is refused at export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lcm_export.exporter.tiny import TinyPipelineConfig, build_tiny_lora, build_tiny_pipeline
from lcm_export.runtime import Pipeline
from lcm_export.runtime.pipeline import StepEvent
from tests.helpers import (
    PROMPT,
    TOLERANCE,
    diffusers_sdxl_images,
    export,
    export_cli_blocking,
    random_inputs,
    sdxl_img2img_parity,
)


def _diffusers_pipeline(model_dir: Path, lora: Path | None = None):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(str(model_dir))
    if lora is not None:
        pipeline.load_lora_weights(str(lora))
        pipeline.fuse_lora()
    return pipeline


@pytest.fixture(scope="module")
def sdxl_lcm_runtime(sdxl_lcm_bundle) -> Pipeline:
    return Pipeline.load(sdxl_lcm_bundle, backend="onnxruntime", precision="fp32")


@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_distilled_lcm_sdxl_matches_diffusers(sdxl_lcm_dir, sdxl_lcm_runtime, size) -> None:
    height, width = size
    latents, noise = random_inputs((1, 4, height // 2, width // 2), steps=4, seed=height)
    expected = diffusers_sdxl_images(_diffusers_pipeline(sdxl_lcm_dir), PROMPT, latents, noise, guidance=8.5)
    result = sdxl_lcm_runtime(PROMPT, guidance_scale=8.5, latents=latents, noise=noise)
    assert result.images.shape == (1, height, width, 3)
    error = np.abs(result.images - expected).max()
    print(f"LCM-SDXL {height}x{width} guidance 8.5: max abs {error:.2e}")
    assert error < TOLERANCE, error
    assert result.images.std() > 0.01


def test_distilled_batch_and_images_per_prompt(sdxl_lcm_dir, sdxl_lcm_runtime) -> None:
    prompts = ["a cat", "an astronaut riding a horse on the moon"]
    latents, noise = random_inputs((4, 4, 16, 16), steps=4, seed=7)
    expected = diffusers_sdxl_images(
        _diffusers_pipeline(sdxl_lcm_dir), prompts, latents, noise, guidance=3.0, num_images_per_prompt=2
    )
    result = sdxl_lcm_runtime(prompts, guidance_scale=3.0, num_images_per_prompt=2, latents=latents, noise=noise)
    assert np.abs(result.images - expected).max() < TOLERANCE


@pytest.mark.parametrize(
    ("guidance", "negative_prompt"),
    [(1.0, None), (2.0, None), (2.0, ""), (2.0, "blurry, low quality")],
    ids=["no-cfg", "cfg-zeros", "cfg-empty-negative", "cfg-negative"],
)
def test_base_sdxl_with_cfg_matches_diffusers(sdxl_base, guidance, negative_prompt) -> None:
    base, lora, bundle = sdxl_base
    runtime = Pipeline.load(bundle, backend="onnxruntime", precision="fp32")
    latents, noise = random_inputs((1, 4, 16, 24), steps=4, seed=3)
    expected = diffusers_sdxl_images(
        _diffusers_pipeline(base, lora), PROMPT, latents, noise, guidance=guidance, negative_prompt=negative_prompt
    )
    options = {} if negative_prompt is None else {"negative_prompt": negative_prompt}
    result = runtime(PROMPT, guidance_scale=guidance, latents=latents, noise=noise, **options)
    error = np.abs(result.images - expected).max()
    print(f"base SDXL + LoRA guidance {guidance} negative {negative_prompt!r}: max abs {error:.2e}")
    assert error < TOLERANCE, error


def test_the_cfg_batch_layout_and_size_ids(sdxl_base) -> None:
    """[unconditional, conditional] for hidden states and text_embeds (zeros for an absent negative prompt, as
    ``force_zeros_for_empty_prompt``), and time_ids = [H, W, 0, 0, H, W] for every row."""
    runtime = Pipeline.load(sdxl_base[2], backend="onnxruntime", precision="fp32")
    events: list[StepEvent] = []
    latents, noise = random_inputs((1, 4, 16, 24), steps=4, seed=3)
    runtime(PROMPT, guidance_scale=2.0, latents=latents, noise=noise, observer=events.append)
    feeds = events[0].feeds
    assert feeds["encoder_hidden_states"].shape == (2, 77, 64)
    assert feeds["text_embeds"].shape == (2, 32)
    assert not feeds["encoder_hidden_states"][0].any() and not feeds["text_embeds"][0].any()
    assert feeds["text_embeds"][1].any()
    assert np.array_equal(feeds["time_ids"], np.array([[32, 48, 0, 0, 32, 48]] * 2, dtype=np.float32))


def test_the_bundle_describes_the_sdxl_family(sdxl_lcm_bundle) -> None:
    manifest = Pipeline.load(sdxl_lcm_bundle, backend="onnxruntime").manifest
    assert manifest.pipeline.family == "sdxl"
    assert [(t.name, t.pad_id) for t in manifest.tokenizers] == [("tokenizer", 49407), ("tokenizer_2", 0)]
    conditioning = manifest.conditioning
    assert [(e.component, e.hidden_state, e.pooled) for e in conditioning.text_encoders] == [
        ("text_encoder", "hidden_states.1", None),
        ("text_encoder_2", "hidden_states.1", "text_embeds"),
    ]
    assert conditioning.unet_inputs == {
        "encoder_hidden_states": "text_hidden_states",
        "text_embeds": "pooled_text",
        "time_ids": "size_ids",
        "timestep_cond": "guidance_embedding",
    }
    assert conditioning.empty_negative == "zeros"
    index = json.loads((sdxl_lcm_bundle / "model_index.json").read_text())
    assert index["tokenizer_2"] == index["tokenizer"] and index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    assert json.loads((sdxl_lcm_bundle / "text_encoder_2" / "config.json").read_text())["projection_dim"] == 32
    assert (sdxl_lcm_bundle / "tokenizer_2" / "tokenizer.json").is_file()


# An SSD-1B-like shape the exporter has not seen: three blocks, two transformer layers in the deeper blocks,
# per-block head dims, encoders of different widths (24 + 40) and depths, another projection and time width.
UNSEEN_SDXL = TinyPipelineConfig(
    kind="sdxl-lcm",
    unet_block_out_channels=(32, 32, 64),
    unet_down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    unet_up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(4, 8, 16),
    transformer_layers_per_block=(1, 1, 2),
    text_hidden_size=24,
    text_layers=3,
    text_heads=3,
    text_2_hidden_size=40,
    text_2_layers=2,
    text_2_heads=5,
    text_2_projection_dim=20,
    addition_time_embed_dim=4,
    time_cond_proj_dim=20,
    vae_block_out_channels=(16, 16, 32),
    vae_scaling_factor=0.13025,
    seed=3,
)


def test_an_unseen_sdxl_shape_matches_diffusers(tmp_path) -> None:
    model = build_tiny_pipeline(tmp_path / "model", UNSEEN_SDXL)
    runtime = Pipeline.load(export(model, tmp_path / "bundle"), backend="onnxruntime", precision="fp32")
    info = runtime.manifest.pipeline
    assert info.vae_scale_factor == 4 and info.spatial_multiple == 16
    hidden = [e.hidden_state for e in runtime.manifest.conditioning.text_encoders]
    assert hidden == ["hidden_states.2", "hidden_states.1"]
    pipeline = _diffusers_pipeline(model)
    for guidance, (height, width) in [(8.5, (32, 48)), (2.0, (48, 32))]:
        latents, noise = random_inputs((1, 4, height // 4, width // 4), steps=4, seed=11)
        expected = diffusers_sdxl_images(pipeline, PROMPT, latents, noise, guidance=guidance)
        result = runtime(PROMPT, guidance_scale=guidance, latents=latents, noise=noise)
        assert result.images.shape == (1, height, width, 3)
        error = np.abs(result.images - expected).max()
        print(f"unseen SDXL shape {height}x{width} guidance {guidance}: max abs {error:.2e}")
        assert error < TOLERANCE, error


@pytest.mark.parametrize("lora_format", ["diffusers", "kohya"])
def test_a_lora_on_both_text_encoders_fuses_as_diffusers_does(sdxl_base, lora_format, tmp_path) -> None:
    """An SDXL LoRA adapting the U-Net and both text encoders (kohya: lora_te1_ / lora_te2_), weight 0.7."""
    from lcm_export.exporter.bundle import LoraSource

    base = sdxl_base[0]
    lora = build_tiny_lora(
        tmp_path / f"{lora_format}.safetensors",
        base,
        rank=4,
        target_modules=("to_q", "to_v"),
        text_encoder=True,
        text_encoder_target_modules=("q_proj", "v_proj", "out_proj"),
        format=lora_format,
        seed=5,
    )
    bundle = export(base, tmp_path / "bundle", loras=(LoraSource(str(lora), 0.7),))
    runtime = Pipeline.load(bundle, backend="onnxruntime", precision="fp32")
    assert runtime.manifest.loras[0]["layers"] == {"unet": 16, "text_encoder": 6, "text_encoder_2": 6}
    reference = _diffusers_pipeline(base)
    reference.load_lora_weights(str(lora), adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.7])
    reference.fuse_lora()
    latents, noise = random_inputs((1, 4, 16, 16), steps=4, seed=9)
    expected = diffusers_sdxl_images(reference, PROMPT, latents, noise, guidance=2.0)
    result = runtime(PROMPT, guidance_scale=2.0, latents=latents, noise=noise)
    error = np.abs(result.images - expected).max()
    print(f"SDXL LoRA ({lora_format}) on U-Net and both text encoders: max abs {error:.2e}")
    assert error < TOLERANCE, error


def test_an_sdxl_that_needs_aesthetic_scores_is_refused_at_export(sdxl_lcm_dir, tmp_path) -> None:
    """The SDXL refiner's layout (no first text encoder, ``requires_aesthetics_score``, a U-Net whose added
    embedding takes 5 ids: original size, crop, aesthetic score): one line, exit 1, before any weight is loaded."""
    from lcm_export.errors import ExportError
    from lcm_export.exporter.loading import inspect_model_folder

    refiner = Path(shutil.copytree(sdxl_lcm_dir, tmp_path / "refiner"))
    unet_config = json.loads((refiner / "unet" / "config.json").read_text())
    unet_config["projection_class_embeddings_input_dim"] -= unet_config["addition_time_embed_dim"]  # 6 -> 5 ids
    (refiner / "unet" / "config.json").write_text(json.dumps(unet_config))
    index = json.loads((refiner / "model_index.json").read_text())
    for part in ("text_encoder", "tokenizer"):
        index[part] = [None, None]
        shutil.rmtree(refiner / part)
    (refiner / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": True}))
    result = export_cli_blocking(refiner, "--output", tmp_path / "out", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: MODEL '{refiner}' needs aesthetic scores (its U-Net takes 5 micro-conditioning ids: an SDXL refiner's "
        "original size, crop and aesthetic score): only base SDXL/SSD-1B U-Nets (6 ids: original size, crop, target "
        "size) are supported; export the base model"
    ]
    assert not (tmp_path / "out").exists()
    # The flag alone (a U-Net with six ids) is refused too: diffusers' img2img would pass it five.
    (refiner / "unet" / "config.json").write_text(
        json.dumps(json.loads((sdxl_lcm_dir / "unet" / "config.json").read_text()))
    )
    with pytest.raises(ExportError, match=r"needs aesthetic scores \(it sets requires_aesthetics_score: "):
        inspect_model_folder(str(refiner), refiner, has_loras=False)


# -- image-to-image ---------------------------------------------------------------------------------------------
# The reference is diffusers' StableDiffusionXLImg2ImgPipeline with LCMScheduler: for the base SDXL with its LoRA
# fused, and for the distilled LCM-SDXL too (diffusers has no LCM img2img pipeline for SDXL; AutoPipelineForImage2Image
# gives an SDXL model this one, which feeds the U-Net's timestep_cond and skips CFG for it). It slices the schedule
# (strength 0.5 of 4 steps runs the last 2) and builds time_ids from the image size without aesthetic scores
# (requires_aesthetics_score is False for base SDXL). The draws, in its order: the VAE's latent sample, the noise
# added to the encoded image, one noise per step but the last (tests.helpers.fixed_draws).


@pytest.fixture(scope="module")
def sdxl_img2img_pipelines(sdxl_lcm_dir, sdxl_base, other_sdxl_model) -> dict:
    """diffusers' SDXL img2img pipelines (LCMScheduler from each model's scheduler config, LoRAs fused)."""
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline

    def load(model_dir: Path, lora: Path | None = None, weight: float = 1.0):
        pipeline = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(model_dir))
        assert pipeline.config.requires_aesthetics_score is False
        pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
        if lora is not None:
            pipeline.load_lora_weights(str(lora), adapter_name="lora")
            pipeline.set_adapters(["lora"], adapter_weights=[weight])
            pipeline.fuse_lora()
        return pipeline

    return {
        "distilled": load(sdxl_lcm_dir),
        "lora": load(sdxl_base[0], sdxl_base[1]),
        "other-lora": load(*other_sdxl_model, weight=0.9),
    }


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
@pytest.mark.parametrize("model", ["distilled", "lora"])
def test_sdxl_img2img_matches_diffusers(
    model, size, strength, sdxl_img2img_pipelines, sdxl_lcm_runtime, sdxl_base
) -> None:
    if model == "distilled":
        runtime, guidance = sdxl_lcm_runtime, 8.5
    else:
        runtime, guidance = Pipeline.load(sdxl_base[2], backend="onnxruntime", precision="fp32"), 2.0
    error = sdxl_img2img_parity(runtime, sdxl_img2img_pipelines[model], size, strength, guidance, None, seed=size[1])
    print(f"SDXL img2img {model} {size[1]}x{size[0]} strength {strength} guidance {guidance}: max abs {error:.2e}")
    assert error < TOLERANCE, error


def test_sdxl_img2img_of_another_shape_matches_diffusers(sdxl_img2img_pipelines, other_sdxl_bundle) -> None:
    """tests.helpers.OTHER_SDXL (LoRA at 0.9 on the U-Net and both encoders), with a negative prompt, at 56x40."""
    runtime = Pipeline.load(other_sdxl_bundle, backend="onnxruntime", precision="fp32")
    error = sdxl_img2img_parity(runtime, sdxl_img2img_pipelines["other-lora"], (40, 56), 0.6, 1.5, "blurry", seed=2)
    print(f"OTHER_SDXL img2img 56x40 strength 0.6 guidance 1.5: max abs {error:.2e}")
    assert error < TOLERANCE, error
