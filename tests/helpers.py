"""What the tests share: exports, diffusers references with fixed draws, the one-line error check, shapes, gates.

Test modules import these from here (``from tests.helpers import ...``), never from one another or from conftest;
conftest.py holds only fixtures. Two PSNRs with two meanings: ``image_psnr`` here (images in [0, 1], peak 1, the
library's ``lcm_export.calibration.quality.psnr``) and ``lcm_export.targets.coreml.psnr`` (Apple's gate on model
outputs, the peak being the reference's largest magnitude), which test_coreml calls as the target's own.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lcm_export.calibration.quality import psnr as image_psnr
from lcm_export.exporter.tiny import TinyPipelineConfig
from lcm_export.runtime import Pipeline
from lcm_export.runtime.backends import tensorrt as trt_backend
from lcm_export.runtime.pipeline import StepEvent

__all__ = [
    "CPU_BACKENDS",
    "FIXTURES",
    "HAS_RTX",
    "OTHER_SDXL",
    "PROMPT",
    "TOLERANCE",
    "UNSEEN_SHAPES",
    "PlainSession",
    "as_format_1",
    "assert_one_line_error",
    "diffusers_images",
    "diffusers_img2img",
    "diffusers_sdxl_images",
    "export",
    "export_cli",
    "export_cli_blocking",
    "fixed_draws",
    "fixed_scheduler_noise",
    "image_psnr",
    "make_image",
    "needs_rtx",
    "no_leftovers",
    "random_inputs",
    "run_as_specified",
    "run_module",
    "sdxl_img2img_parity",
    "sdxl_source",
]

FIXTURES = Path(__file__).parent / "fixtures"  # files the previous exporter (format 1) wrote, kept as it wrote them
# Max abs difference of our images and diffusers' (float32 ONNX against torch, 4 steps, images in [0, 1]).
TOLERANCE = 2e-3
PROMPT = "a photo of a cat"
HAS_RTX = trt_backend.import_flavor("rtx") is not None
# The CPU backends, as a parametrize list: OpenVINO skipped (with the install hint) where it is not installed.
CPU_BACKENDS = [
    "onnxruntime",
    pytest.param(
        "openvino",
        marks=pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="pip install openvino"),
    ),
]
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not installed: pip install 'lcm-edge[tensorrt]'")


# -- exports and commands ----------------------------------------------------------------------------------------------


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


def run_module(module: str, *args: str | Path) -> subprocess.CompletedProcess:
    """``python -m module args`` in a subprocess, as a user would run the command."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=300)


def export_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """``python -m lcm_export.exporter.cli args --quiet``."""
    return run_module("lcm_export.exporter.cli", *args, "--quiet")


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error as the commands give it: exit 1, no traceback, exactly one ``error:`` line on stderr, holding
    every needle. Returns that line."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def no_leftovers(output: Path) -> None:
    """A failed export leaves neither the output folder nor its hidden staging folder behind."""
    assert not output.exists()
    assert not [path for path in output.parent.iterdir() if path.name.startswith(f".{output.name}.")]


# -- diffusers references with our draws -------------------------------------------------------------------------------


def random_inputs(shape: tuple[int, ...], steps: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(shape).astype(np.float32)
    return latents, [rng.standard_normal(shape).astype(np.float32) for _ in range(steps - 1)]


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


def diffusers_sdxl_images(
    pipeline,
    prompt: str | list[str],
    latents: np.ndarray,
    noise: list[np.ndarray],
    *,
    guidance: float,
    negative_prompt: str | None = None,
    num_images_per_prompt: int = 1,
    steps: int = 4,
) -> np.ndarray:
    """diffusers' SDXL output for these latents and noise, at the size the latents give (the size ids need it)."""
    import torch

    scale = pipeline.vae_scale_factor
    kwargs = {} if negative_prompt is None else {"negative_prompt": negative_prompt}
    pipeline.set_progress_bar_config(disable=True)
    with fixed_scheduler_noise(noise), torch.no_grad():
        return pipeline(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=latents.shape[2] * scale,
            width=latents.shape[3] * scale,
            num_images_per_prompt=num_images_per_prompt,
            latents=torch.from_numpy(latents),
            output_type="np",
            **kwargs,
        ).images


@contextlib.contextmanager
def fixed_draws(sample_noise: np.ndarray, image_noise: np.ndarray, step_noise: list[np.ndarray], pipeline_module):
    """diffusers draws these three kinds with ``randn_tensor`` in three modules: feed each its own queue."""
    import torch
    from diffusers.models.autoencoders import vae
    from diffusers.schedulers import scheduling_lcm

    queues = {
        vae: [sample_noise],
        pipeline_module: [image_noise],
        scheduling_lcm: list(step_noise),
    }
    originals = {module: module.randn_tensor for module in queues}

    def feeder(queue):
        def draw(shape, generator=None, device=None, dtype=None, layout=None):
            array = queue.pop(0)
            assert tuple(array.shape) == tuple(shape), (array.shape, shape)
            return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(dtype=dtype)

        return draw

    for module, queue in queues.items():
        module.randn_tensor = feeder(queue)
    try:
        yield
        assert not queues[scheduling_lcm], "step noise left over"
    finally:
        for module, original in originals.items():
            module.randn_tensor = original


def make_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((height // 4, width // 4, 3)).astype(np.float32)
    return np.kron(base, np.ones((4, 4, 1), np.float32))  # blocky: structure the tiny VAE can keep


def diffusers_img2img(pipeline, module, prompt, image, strength, steps, guidance, draws, **extra) -> np.ndarray:
    import torch
    from PIL import Image

    pil = Image.fromarray((image * 255).round().astype(np.uint8))
    pipeline.set_progress_bar_config(disable=True)
    with fixed_draws(*draws, module), torch.no_grad():
        return pipeline(
            prompt,
            image=pil,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="np",
            **extra,
        ).images


def sdxl_img2img_parity(runtime: Pipeline, pipeline, size, strength, guidance, negative_prompt, seed) -> float:
    """Max abs difference of our img2img and diffusers' for one image and set of draws; checks the size ids too."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

    height, width = size
    pixels = np.asarray((make_image(height, width, seed) * 255).round(), np.uint8).astype(np.float32) / 255
    steps = 4
    table = runtime.denoiser.scheduler.table(steps, strength)
    assert len(table.timesteps) == int(steps * strength)  # the sliced schedule
    factor = runtime.manifest.pipeline.vae_scale_factor
    shape = (1, 4, height // factor, width // factor)
    rng = np.random.default_rng(seed)
    sample_noise, image_noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    step_noise = [rng.standard_normal(shape).astype(np.float32) for _ in range(len(table.timesteps) - 1)]
    options = {} if negative_prompt is None else {"negative_prompt": negative_prompt}
    draws = (sample_noise, image_noise, step_noise)
    expected = diffusers_img2img(pipeline, module, PROMPT, pixels, strength, steps, guidance, draws, **options)
    events: list[StepEvent] = []
    result = runtime.img2img(
        pixels,
        PROMPT,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        # a tiny VAE encodes deterministically: it takes no latent-sample noise (passing one is an error)
        sample_noise=None if runtime.manifest.pipeline.vae == "autoencoder_tiny" else sample_noise,
        image_noise=image_noise,
        noise=step_noise,
        observer=events.append,
        **options,
    )
    assert result.images.shape == expected.shape == (1, height, width, 3)
    assert result.images.std() > 0.01
    rows = 2 if runtime.manifest.pipeline.guidance == "cfg" and guidance > 1 else 1
    size_ids = np.array([[height, width, 0, 0, height, width]] * rows, dtype=np.float32)
    assert np.array_equal(events[0].feeds["time_ids"], size_ids)  # original size, crop (0, 0), target size
    return float(np.abs(result.images - expected).max())


# -- model shapes ------------------------------------------------------------------------------------------------------


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


def sdxl_source(request, name: str):
    """(model folder, LoRAs) of the SDXL models the target tests build: "tiny-sdxl-lcm" (distilled) or the base
    OTHER_SDXL with its LoRA fused at 0.9."""
    from lcm_export.exporter.bundle import LoraSource

    if name == "tiny-sdxl-lcm":
        return request.getfixturevalue("sdxl_lcm_dir"), ()
    model, lora = request.getfixturevalue("other_sdxl_model")
    return model, (LoraSource(str(lora), 0.9),)


# Architectures and scheduler settings no export was traced at (test_parity's parity, test_calibration's INT8).
UNSEEN_SHAPES = {
    "three-blocks-vae4": TinyPipelineConfig(
        unet_block_out_channels=(32, 32, 64),
        unet_down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(4, 8, 8),
        cross_attention_dim=48,
        text_hidden_size=48,
        time_cond_proj_dim=20,
        vae_block_out_channels=(16, 16, 32),
        vae_scaling_factor=0.13025,
        scheduler={"original_inference_steps": 30},
        seed=1,
    ),
    "two-layers-v-prediction": TinyPipelineConfig(
        unet_layers_per_block=2,
        attention_head_dim=16,
        latent_channels=6,
        time_cond_proj_dim=33,
        vae_block_out_channels=(16, 32, 32, 32),
        vae_scaling_factor=0.5,
        scheduler={
            "prediction_type": "v_prediction",
            "timestep_scaling": 5.0,
            "original_inference_steps": 40,
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "beta_end": 0.02,
        },
        seed=2,
    ),
}


# -- manifests ---------------------------------------------------------------------------------------------------------


def as_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """A format-2 manifest as the previous exporter wrote it (see tests/fixtures/manifest-v1-tiny-lcm.json): one
    artifact per format (``artifacts: {format: {format, path, precision, ...details}}``, no name, io_dtype, files
    or produced_by), the spec's float tensors in the artifacts' dtype, no conditioning, tables by step count only."""
    old = copy.deepcopy(data)
    old["format_version"] = 1
    old.pop("conditioning")
    old["scheduler"]["tables"] = {key: table for key, table in old["scheduler"]["tables"].items() if "@" not in key}
    added = ("name", "io_dtype", "files", "produced_by")
    for component in old["components"].values():
        variants = component.pop("variants")
        for tensor in (*component["inputs"], *component["outputs"]):
            if tensor["dtype"] == "float32":
                tensor["dtype"] = variants[0]["io_dtype"]
        component["artifacts"] = {v["format"]: {k: x for k, x in v.items() if k not in added} for v in variants}
    return old


# -- INT8 as specified ----------------------------------------------------------------------------------------------


class PlainSession:
    """An onnxruntime CPU session at a chosen graph optimisation level, in the runtime's session interface."""

    def __init__(self, path: Path, level: Any) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = level
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [output.name for output in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, feeds), strict=True))


def run_as_specified(pipe: Pipeline, bundle: Path, components: tuple[str, ...] = ("unet", "vae_decoder")) -> Pipeline:
    """``pipe`` with ``components`` run as their ops say (ORT_DISABLE_ALL: a QDQ graph's QuantizeLinear,
    DequantizeLinear and float Conv/MatMul) instead of onnxruntime's fused x86 integer kernels, which saturate u8 x s8
    products on AVX2 CPUs without VNNI (docs/design-notes.md, "JavaScript runtime"): the float QDQ reference that
    onnxruntime-web's WASM INT8 is compared with."""
    import onnxruntime

    for component in components:
        path = bundle / pipe.variants[component].artifact.path
        pipe.denoiser._sessions[component] = PlainSession(path, onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return pipe
