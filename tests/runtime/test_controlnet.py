"""ControlNet bundles reproduce diffusers' ControlNet pipelines given the same latents and noise (fp32).

Distilled LCM with two ControlNets and a guidance window (``StableDiffusionControlNetPipeline`` + LCMScheduler, which
computes ``timestep_cond`` itself), base SD + LCM-LoRA with CFG (the ControlNet on both halves), SDXL
(``StableDiffusionXLControlNetPipeline``), img2img (``StableDiffusionControlNetImg2ImgPipeline``), the frame loop, an
architecture no test was written for, and the bad inputs. The ControlNets are random with non-zero residual
convolutions (:func:`build_controlnet`): every comparison also checks that the control image changes the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lcm_export.exporter.bundle import LoraSource
from lcm_export.exporter.controlnet import ControlNetSource
from lcm_export.exporter.tiny import TinyPipelineConfig, build_controlnet, build_tiny_lora, build_tiny_pipeline
from lcm_export.runtime import Pipeline
from tests.helpers import (
    TOLERANCE,
    UNSEEN_SHAPES,
    diffusers_img2img,
    export,
    fixed_scheduler_noise,
    make_image,
    random_inputs,
)

EFFECT = 1e-2  # the control image moves the image by at least this much (max abs): the residuals are used


def _control_pipeline(model: Path, controlnets: list[Path], kind: str = "sd", lora: Path | None = None):
    """diffusers' ControlNet pipeline of ``kind`` ("sd", "sdxl", "img2img") on ``model`` with LCMScheduler."""
    import diffusers
    from diffusers import ControlNetModel, LCMScheduler
    from diffusers.models.controlnets import MultiControlNetModel

    classes = {
        "sd": diffusers.StableDiffusionControlNetPipeline,
        "sdxl": diffusers.StableDiffusionXLControlNetPipeline,
        "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
    }
    nets = [ControlNetModel.from_pretrained(str(path)) for path in controlnets]
    controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipeline = classes[kind].from_pretrained(str(model), controlnet=controlnet, **extra)
    pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    if lora is not None:
        pipeline.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="lcm")
        pipeline.fuse_lora()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _diffusers_text_to_image(pipeline, images, latents, noise, **kwargs) -> np.ndarray:
    import torch

    control = [image[None] for image in images]  # batched (1, H, W, 3): an (H, W, 3) array is read as H images
    scale = pipeline.vae_scale_factor
    with fixed_scheduler_noise(noise), torch.no_grad():
        return pipeline(
            "a photo of a cat",
            image=control[0] if len(control) == 1 else control,
            num_inference_steps=len(noise) + 1,
            latents=torch.from_numpy(latents),
            height=latents.shape[2] * scale,
            width=latents.shape[3] * scale,
            output_type="np",
            **kwargs,
        ).images


def _pair(root: Path, model: Path, count: int, **options) -> tuple[list[Path], Path]:
    """``count`` random ControlNets for ``model`` and the bundle exported with them (scales 1.0, 0.5, ..)."""
    nets = [build_controlnet(root / f"controlnet-{index}", model, seed=index) for index in range(count)]
    sources = tuple(ControlNetSource(str(path), 1.0 / (index + 1)) for index, path in enumerate(nets))
    return nets, export(model, root / "bundle", controlnets=sources, **options)


@pytest.fixture(scope="module")
def distilled(tiny_lcm_dir, tmp_path_factory):
    """The session's tiny distilled LCM with two ControlNets: (model, ControlNets, runtime, diffusers pipeline)."""
    nets, bundle = _pair(tmp_path_factory.mktemp("cn-lcm"), tiny_lcm_dir, 2)
    runtime = Pipeline.load(bundle, backend="onnxruntime", precision="fp32")
    return tiny_lcm_dir, nets, runtime, _control_pipeline(tiny_lcm_dir, nets)


@pytest.fixture(scope="module")
def lcm_lora(tmp_path_factory):
    """A tiny base SD + a random LCM-LoRA-shaped LoRA (CFG) with one ControlNet: (model, lora, nets, runtime)."""
    root = tmp_path_factory.mktemp("cn-cfg")
    base = build_tiny_pipeline(root / "model", TinyPipelineConfig(kind="sd", seed=3))
    lora = build_tiny_lora(root / "lcm.safetensors", base, rank=4, target_modules=("to_q", "to_v"))
    nets, bundle = _pair(root, base, 1, loras=(LoraSource(str(lora)),))
    return base, lora, nets, Pipeline.load(bundle, backend="onnxruntime", precision="fp32")


@pytest.mark.parametrize(
    ("scales", "start", "end"),
    [(None, 0.0, 1.0), ([0.7, 1.3], [0.0, 0.25], [0.5, 1.0]), (0.9, 0.5, 1.0)],
)
def test_two_controlnets_on_a_distilled_lcm_match_diffusers(distilled, scales, start, end) -> None:
    _, _, runtime, pipeline = distilled
    height, width = 32, 48
    latents, noise = random_inputs((1, 4, height // 2, width // 2), steps=4, seed=5)
    images = [make_image(height, width, 1), make_image(height, width, 2)]
    window = {"control_guidance_start": start, "control_guidance_end": end}
    # diffusers' default scale is 1.0 for each; the bundle's defaults are the export's (1.0 and 0.5)
    given = [1.0, 0.5] if scales is None else scales
    expected = _diffusers_text_to_image(
        pipeline, images, latents, noise, guidance_scale=6.0, controlnet_conditioning_scale=given, **window
    )
    result = runtime(
        "a photo of a cat",
        control_image=images,
        controlnet_conditioning_scale=scales,
        guidance_scale=6.0,
        latents=latents,
        noise=noise,
        **window,
    )
    plain = runtime("a photo of a cat", guidance_scale=6.0, latents=latents, noise=noise)
    error = float(np.abs(result.images - expected).max())
    print(f"distilled LCM, 2 ControlNets, scales {scales}, window {start}-{end}: max abs {error:.2e}")
    assert error < TOLERANCE, error
    assert np.abs(result.images - plain.images).max() > EFFECT


def test_lcm_lora_runs_the_controlnet_on_both_cfg_halves(lcm_lora) -> None:
    base, lora, nets, runtime = lcm_lora
    assert runtime.manifest.components["controlnet"].spec.batch_multiplier == 2
    latents, noise = random_inputs((1, 4, 16, 16), steps=4, seed=9)
    image = make_image(32, 32, 3)
    pipeline = _control_pipeline(base, nets, lora=lora)
    options = {"guidance_scale": 1.8, "negative_prompt": "blurry", "controlnet_conditioning_scale": 0.8}
    expected = _diffusers_text_to_image(pipeline, [image], latents, noise, **options)
    result = runtime("a photo of a cat", control_image=image, latents=latents, noise=noise, **options)
    error = float(np.abs(result.images - expected).max())
    print(f"LCM-LoRA CFG + ControlNet: max abs {error:.2e}")
    assert error < TOLERANCE, error
    plain = runtime("a photo of a cat", latents=latents, noise=noise, guidance_scale=1.8, negative_prompt="blurry")
    assert np.abs(result.images - plain.images).max() > EFFECT


def test_controlnet_img2img_matches_diffusers(lcm_lora) -> None:
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as module

    base, lora, nets, runtime = lcm_lora
    height, width, strength, steps = 32, 48, 0.8, 5
    pixels = np.asarray((make_image(height, width, 4) * 255).round(), np.uint8).astype(np.float32) / 255
    control = make_image(height, width, 5)
    table = runtime.denoiser.scheduler.table(steps, strength)
    shape = (1, 4, height // 2, width // 2)
    rng = np.random.default_rng(12)
    sample_noise, image_noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    step_noise = [rng.standard_normal(shape).astype(np.float32) for _ in range(len(table.timesteps) - 1)]
    pipeline = _control_pipeline(base, nets, "img2img", lora=lora)
    expected = diffusers_img2img(
        pipeline,
        module,
        "a cat",
        pixels,
        strength,
        steps,
        1.5,
        (sample_noise, image_noise, step_noise),
        control_image=control[None],
        control_guidance_end=0.7,
        controlnet_conditioning_scale=1.0,  # this pipeline's default is 0.8; the bundle's is the export's (1.0)
    )
    result = runtime.img2img(
        pixels,
        "a cat",
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=1.5,
        sample_noise=sample_noise,
        image_noise=image_noise,
        noise=step_noise,
        control_image=control,
        control_guidance_end=0.7,
    )
    error = float(np.abs(result.images - expected).max())
    print(f"ControlNet img2img: {len(table.timesteps)} steps, max abs {error:.2e}")
    assert error < TOLERANCE, error


def test_frame_loop_with_a_controlnet(lcm_lora) -> None:
    """The first frame equals img2img with the same seed and control image; a function of the frame and step
    batching give the unbatched loop's frames."""
    *_, runtime = lcm_lora
    frames = [make_image(32, 32, seed) for seed in (6, 7, 8)]
    control = make_image(32, 32, 9)
    stream = runtime.stream("a cat", seed=4, guidance_scale=1.5, control_image=control)
    first = stream(frames[0])
    alone = runtime.img2img(frames[0], "a cat", seed=4, guidance_scale=1.5, control_image=control).images[0]
    assert np.abs(first - alone).max() < 1e-5
    uncontrolled = runtime.stream("a cat", seed=4, guidance_scale=1.5)(frames[0])
    assert np.abs(first - uncontrolled).max() > EFFECT

    def edges(frame: np.ndarray) -> np.ndarray:
        return np.abs(np.diff(frame, axis=1, append=frame[:, -1:])).clip(0, 1)

    unbatched = runtime.stream("a cat", seed=4, guidance_scale=1.5, control_image=edges)
    batched = runtime.stream("a cat", seed=4, guidance_scale=1.5, control_image=edges, batch_steps=True)
    expected = [unbatched(frame) for frame in frames]
    got = list(batched.run(frames))
    assert len(got) == len(frames)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True)) < 1e-4
    own = runtime.stream("a cat", seed=4, guidance_scale=1.5, control_image=edges)
    assert np.abs(own(frames[0], control_image=control) - first).max() < 1e-5  # a frame's own control image


def test_sdxl_controlnet_matches_diffusers(sdxl_lcm_dir, tmp_path) -> None:
    nets, bundle = _pair(tmp_path, sdxl_lcm_dir, 1)
    runtime = Pipeline.load(bundle, backend="onnxruntime", precision="fp32")
    assert {"text_embeds", "time_ids"} <= set(runtime.manifest.components["controlnet"].spec.input_names)
    latents, noise = random_inputs((1, 4, 16, 24), steps=4, seed=13)
    image = make_image(32, 48, 10)
    pipeline = _control_pipeline(sdxl_lcm_dir, nets, "sdxl")
    expected = _diffusers_text_to_image(pipeline, [image], latents, noise, guidance_scale=5.0)
    result = runtime("a photo of a cat", control_image=image, guidance_scale=5.0, latents=latents, noise=noise)
    error = float(np.abs(result.images - expected).max())
    print(f"SDXL distilled + ControlNet: max abs {error:.2e}")
    assert error < TOLERANCE, error
    plain = runtime("a photo of a cat", guidance_scale=5.0, latents=latents, noise=noise)
    assert np.abs(result.images - plain.images).max() > EFFECT


def test_unseen_architecture_with_a_controlnet(tmp_path) -> None:
    """Three U-Net blocks with per-block head sizes, a VAE of scale 4 (a three-stage conditioning embedding)."""
    config = UNSEEN_SHAPES["three-blocks-vae4"]
    model = build_tiny_pipeline(tmp_path / "model", config)
    nets, bundle = _pair(tmp_path, model, 1)
    runtime = Pipeline.load(bundle, backend="onnxruntime", precision="fp32")
    info = runtime.manifest.pipeline
    assert info.vae_scale_factor == 4
    residuals = [t.shape for t in runtime.manifest.components["controlnet"].spec.outputs]
    assert residuals[-1][2:] == ("latent_height_4", "latent_width_4")  # the mid block: two down-samplings
    height, width = info.spatial_multiple * 2, info.spatial_multiple * 3
    latents, noise = random_inputs((1, 4, height // 4, width // 4), steps=4, seed=14)
    image = make_image(height, width, 11)
    expected = _diffusers_text_to_image(_control_pipeline(model, nets), [image], latents, noise, guidance_scale=3.0)
    result = runtime("a photo of a cat", control_image=image, guidance_scale=3.0, latents=latents, noise=noise)
    assert result.images.shape == (1, height, width, 3)
    error = float(np.abs(result.images - expected).max())
    assert error < TOLERANCE, error


def test_control_image_size_is_taken_or_refused(distilled, tiny_lcm_bundle) -> None:
    """The control image sets the size when nothing else does; another size than the output's is refused."""
    from lcm_export.errors import UserError

    *_, runtime, _ = distilled
    images = [make_image(32, 48, 1), make_image(32, 48, 2)]
    assert runtime("a cat", control_image=images, seed=1).images.shape == (1, 32, 48, 3)
    with pytest.raises(UserError, match="control_image is 48x32 but the image is 32x32"):
        runtime("a cat", control_image=images, height=32, width=32)
    with pytest.raises(UserError, match="2 ControlNet"):
        runtime("a cat", control_image=images[0])
    with pytest.raises(UserError, match=r"control_guidance_start 0\.6 must be below"):
        runtime("a cat", control_image=images, control_guidance_start=0.6, control_guidance_end=0.4)
    plain = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime")
    with pytest.raises(UserError, match="has no ControlNet: re-export it with --controlnet"):
        plain("a cat", control_image=images[0])
