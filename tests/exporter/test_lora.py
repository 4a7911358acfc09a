"""LCM-LoRA: a base SD pipeline plus LoRAs exports to a bundle equal to diffusers' fused pipeline.

The reference is diffusers itself: ``load_lora_weights`` per adapter, ``set_adapters(names, weights)``,
``fuse_lora()``. Two random LoRAs of different ranks and target modules (one also adapting the text encoder) are
fused with weights 1.0 and 0.5; the runtime image must equal diffusers' for the same latents and noise, with and
without classifier-free guidance and with a negative prompt. Bad LoRAs must fail in one line, before any export.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lcm_export.errors import ExportError
from lcm_export.exporter.bundle import LoraSource
from lcm_export.exporter.tiny import TinyPipelineConfig, build_tiny_lora, build_tiny_pipeline
from lcm_export.runtime import Pipeline
from tests.helpers import TOLERANCE, diffusers_images, export, random_inputs

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
CONV_TARGETS = ("proj_in", "proj_out", "conv1", "ff.net.2")
# Every module kind the published LCM-LoRAs adapt, and kohya-ss' default text-encoder targets.
LCM_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "conv", "time_emb_proj",
)  # fmt: skip
KOHYA_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# diffusers' own reference loads several adapters into one model, which peft warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
WEIGHTS = (1.0, 0.5)
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny base Stable Diffusion pipeline: no time_cond_proj_dim, so it needs an LCM-LoRA to export."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"), TinyPipelineConfig(kind="sd"))


@pytest.fixture(scope="module")
def lora_files(base_dir, tmp_path_factory) -> dict[str, Path]:
    """The two fused LoRAs: rank 4 on attention (U-Net + text encoder, alpha 8 != rank, diffusers' lora.down
    names) and rank 2 on convolutions / projections / feed-forward of the U-Net only (peft's lora_A names); and an
    LCM-LoRA-shaped rank-8 LoRA in diffusers and kohya-ss format (same matrices)."""
    folder = tmp_path_factory.mktemp("loras")
    lcm_like = dict(
        rank=8,
        alpha=4,
        target_modules=LCM_LORA_TARGETS,
        text_encoder=True,
        text_encoder_target_modules=KOHYA_ENCODER_TARGETS,
        seed=5,
    )
    return {
        "attention": build_tiny_lora(
            folder / "attention.safetensors",
            base_dir,
            rank=4,
            alpha=8,
            target_modules=ATTENTION_TARGETS,
            text_encoder=True,
            text_encoder_target_modules=ENCODER_TARGETS,
            seed=1,
        ),
        "conv": build_tiny_lora(folder / "conv.safetensors", base_dir, rank=2, target_modules=CONV_TARGETS, seed=2),
        "lcm_like": build_tiny_lora(folder / "lcm_like.safetensors", base_dir, **lcm_like),
        "lcm_like_kohya": build_tiny_lora(folder / "lcm_like_kohya.safetensors", base_dir, format="kohya", **lcm_like),
    }


def _sources(lora_files: dict[str, Path]) -> tuple[LoraSource, ...]:
    return (LoraSource(str(lora_files["attention"]), WEIGHTS[0]), LoraSource(str(lora_files["conv"]), WEIGHTS[1]))


@pytest.fixture(scope="module")
def bundle(base_dir, lora_files, tmp_path_factory) -> Path:
    return export(base_dir, tmp_path_factory.mktemp("bundles") / "sd-lcm-lora", loras=_sources(lora_files))


@pytest.fixture(scope="module")
def runtime(bundle) -> Pipeline:
    return Pipeline.load(bundle, backend="onnxruntime")


def _diffusers_pipeline(base_dir: Path):
    from diffusers import DiffusionPipeline, LCMScheduler

    pipeline = DiffusionPipeline.from_pretrained(str(base_dir), safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def base_pipeline(base_dir):
    return _diffusers_pipeline(base_dir)


@pytest.fixture(scope="module")
def reference_pipeline(base_dir, lora_files):
    """diffusers' own LCM-LoRA recipe: both LoRAs loaded, weighted with set_adapters, fused (not unloaded)."""
    pipeline = _diffusers_pipeline(base_dir)
    pipeline.load_lora_weights(str(lora_files["attention"]), adapter_name="attention")
    pipeline.load_lora_weights(str(lora_files["conv"]), adapter_name="conv")
    pipeline.set_adapters(["attention", "conv"], adapter_weights=list(WEIGHTS))
    pipeline.fuse_lora()
    return pipeline


def _plain_state_dict(module) -> dict:
    """A state dict without peft's LoRA tensors, keyed like the plain module (``base_layer.`` removed)."""
    return {key.replace(".base_layer", ""): value for key, value in module.state_dict().items() if ".lora_" not in key}


def _max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max(float((first[key] - second[key]).abs().max()) for key in first)


def _fused_with_lcm_export(base_dir: Path, loras: tuple[LoraSource, ...]):
    from lcm_export.exporter.loading import load_pipeline
    from lcm_export.exporter.lora import fuse_loras

    loaded = load_pipeline(str(base_dir), has_loras=True)
    return loaded, fuse_loras(loaded, loras)


# -- (1) the runtime image equals diffusers' fused pipeline ------------------------------------------------------


@pytest.mark.parametrize(
    ("guidance", "negative_prompt"),
    [(1.0, None), (2.0, None), (2.0, "blurry, low quality")],
    ids=["no-cfg", "cfg", "cfg-negative-prompt"],
)
def test_image_matches_diffusers(runtime, reference_pipeline, base_dir, guidance, negative_prompt) -> None:
    latents, noise = random_inputs((1, 4, 16, 16), steps=4, seed=int(guidance * 10) + (negative_prompt is not None))
    expected = diffusers_images(
        base_dir,
        PROMPT,
        latents,
        noise,
        guidance=guidance,
        negative_prompt=negative_prompt,
        pipeline=reference_pipeline,
    )
    result = runtime(PROMPT, guidance_scale=guidance, negative_prompt=negative_prompt, latents=latents, noise=noise)
    error = float(np.abs(result.images - expected).max())
    print(f"LCM-LoRA guidance {guidance} negative {negative_prompt!r}: max abs vs diffusers {error:.2e}")
    assert result.images.shape == (1, 32, 32, 3)
    assert error < TOLERANCE, error
    assert result.images.std() > 0.01  # a real image, not a constant
    if negative_prompt is not None:  # the negative prompt really reaches the unconditional half
        plain = runtime(PROMPT, guidance_scale=guidance, latents=latents, noise=noise).images
        assert np.abs(plain - result.images).max() > 1e-3


def test_guidance_one_runs_one_unet_call_per_image(runtime) -> None:
    """guidance <= 1 runs the U-Net on the image batch only; > 1 on the [uncond, cond] batch."""
    feeds_seen: list[int] = []

    def count(event) -> None:
        feeds_seen.append(event.feeds["sample"].shape[0])

    runtime(PROMPT, guidance_scale=1.0, num_inference_steps=2, seed=0, observer=count)
    runtime(PROMPT, guidance_scale=1.5, num_inference_steps=2, seed=0, observer=count)
    assert feeds_seen == [1, 1, 2, 2]


# -- (2) the LoRA really changed the exported U-Net; fused weights equal diffusers' ----------------------------


def test_fused_onnx_unet_differs_from_base(bundle, base_pipeline, reference_pipeline) -> None:
    import onnxruntime
    import torch

    rng = np.random.default_rng(3)
    sample = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    hidden = rng.standard_normal((2, 77, 32)).astype(np.float32)
    timestep = np.full(2, 499.0, dtype=np.float32)  # one per row
    session = onnxruntime.InferenceSession(str(bundle / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    fused_onnx = session.run(["out_sample"], {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden})[
        0
    ]
    with torch.no_grad():
        inputs = (torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(hidden))
        base = base_pipeline.unet(*inputs).sample.numpy()
        fused_torch = reference_pipeline.unet(*inputs).sample.numpy()
    change = float(np.abs(fused_onnx - base).max())
    error = float(np.abs(fused_onnx - fused_torch).max())
    print(f"fused ONNX U-Net vs base U-Net: {change:.3g}; vs diffusers fused U-Net: {error:.2e}")
    assert change > 1e-3
    assert error < 1e-4


def test_fused_weights_equal_diffusers(base_dir, lora_files, base_pipeline, reference_pipeline) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    loaded, _ = _fused_with_lcm_export(base_dir, _sources(lora_files))
    pipeline = loaded.pipeline
    for component in ("unet", "text_encoder"):
        fused = getattr(pipeline, component)
        assert not any(isinstance(module, BaseTunerLayer) for module in fused.modules())  # plain modules
        ours = _plain_state_dict(fused)
        assert _max_difference(ours, _plain_state_dict(getattr(reference_pipeline, component))) == 0.0
        assert _max_difference(ours, _plain_state_dict(getattr(base_pipeline, component))) > 1e-3


# -- (3) the manifest records each LoRA --------------------------------------------------------------------------


def _count_targets(module, targets: tuple[str, ...]) -> int:
    return sum(any(name.endswith(f".{target}") for target in targets) for name, _ in module.named_modules())


def test_manifest_records_loras(bundle, lora_files, base_pipeline) -> None:
    import json

    records = json.loads((bundle / "manifest.json").read_text())["loras"]
    assert [record["source"] for record in records] == [str(lora_files["attention"]), str(lora_files["conv"])]
    assert [record["weight"] for record in records] == list(WEIGHTS)
    for record, name in zip(records, ("attention", "conv"), strict=True):
        assert record["sha256"] == hashlib.sha256(lora_files[name].read_bytes()).hexdigest()
        assert record["format"] == "diffusers"
    attention, conv = records
    assert attention["modules"] == ["unet", "text_encoder"]
    assert attention["layers"] == {
        "unet": _count_targets(base_pipeline.unet, ATTENTION_TARGETS),
        "text_encoder": _count_targets(base_pipeline.text_encoder, ENCODER_TARGETS),
    }
    assert conv["modules"] == ["unet"]
    assert conv["layers"] == {"unet": _count_targets(base_pipeline.unet, CONV_TARGETS)}
    assert (attention["ranks"], conv["ranks"]) == ([4], [2])


# -- (4) kohya-ss format -----------------------------------------------------------------------------------------


def test_kohya_file_fuses_like_its_diffusers_twin(base_dir, lora_files, base_pipeline) -> None:
    from safetensors.torch import load_file

    weight = 0.7
    kohya, kohya_records = _fused_with_lcm_export(base_dir, (LoraSource(str(lora_files["lcm_like_kohya"]), weight),))
    twin, twin_records = _fused_with_lcm_export(base_dir, (LoraSource(str(lora_files["lcm_like"]), weight),))
    assert (kohya_records[0]["format"], twin_records[0]["format"]) == ("kohya", "diffusers")
    assert (
        kohya_records[0]["layers"]
        == twin_records[0]["layers"]
        == {
            "unet": _count_targets(base_pipeline.unet, LCM_LORA_TARGETS),
            "text_encoder": _count_targets(base_pipeline.text_encoder, KOHYA_ENCODER_TARGETS),
        }
    )
    for component in ("unet", "text_encoder"):
        ours = _plain_state_dict(getattr(kohya.pipeline, component))
        assert _max_difference(ours, _plain_state_dict(getattr(twin.pipeline, component))) < 1e-7
        assert _max_difference(ours, _plain_state_dict(getattr(base_pipeline, component))) > 1e-3

    # One layer by hand from the kohya tensors: W + weight * (alpha / rank) * up @ down.
    tensors = load_file(str(lora_files["lcm_like_kohya"]))
    layer = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    down, up = tensors[f"{layer}.lora_down.weight"], tensors[f"{layer}.lora_up.weight"]
    alpha = float(tensors[f"{layer}.alpha"])
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    expected = base_pipeline.unet.state_dict()[module] + weight * alpha / down.shape[0] * (up @ down)
    assert float((kohya.pipeline.unet.state_dict()[module] - expected).abs().max()) < 1e-5


# -- (5) errors: one line, exit 1, nothing written ---------------------------------------------------------------


def _write_lora(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    save_file({key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}, str(path))
    return path


def _sdxl_lora(path: Path) -> Path:
    """SDXL-shaped layers (cross-attention width 2048, 640/1280 channels) in diffusers naming."""
    shapes: dict[str, tuple[int, ...]] = {}
    for block, channels, transformer in (("down_blocks.1", 640, 0), ("down_blocks.2", 1280, 1)):
        prefix = f"unet.{block}.attentions.0.transformer_blocks.{transformer}"
        for projection, width in (("attn1.to_q", channels), ("attn2.to_k", 2048), ("attn2.to_v", 2048)):
            shapes[f"{prefix}.{projection}.lora.down.weight"] = (4, width)
            shapes[f"{prefix}.{projection}.lora.up.weight"] = (channels, 4)
    return _write_lora(path, shapes)


def _foreign_lora(path: Path) -> Path:
    """Layer names of no Stable Diffusion module (a transformer-style model)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("unet.blocks.0.attn.qkv", "unet.blocks.0.mlp.fc1", "text_encoder.model.layers.0.attn.wq"):
        shapes[f"{name}.lora_A.weight"] = (4, 32)
        shapes[f"{name}.lora_B.weight"] = (32, 4)
    return _write_lora(path, shapes)


def _mixed_naming_lora(path: Path, lora_files: dict[str, Path]) -> Path:
    """The U-Net layers of the conv LoRA (peft's lora_A names) and the attention LoRA (lora.down names)."""
    from safetensors.torch import load_file, save_file

    tensors = {**load_file(str(lora_files["conv"])), **load_file(str(lora_files["attention"]))}
    save_file({key: value for key, value in tensors.items() if key.startswith("unet.")}, str(path))
    return path


def _run_cli(arguments: list[str], environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lcm_export.exporter.cli", *arguments, "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(environment or {})},
    )


# case -> (what is passed, words of the error, whether it is raised before the model is loaded)
ERROR_CASES = {
    "keys-match-no-module": ("foreign", "none of its 3 layers matches a module of this pipeline", False),
    "sdxl-lora-on-sd": ("sdxl", "this LoRA is for a different architecture (made for SDXL", False),
    "weight-not-a-number": ("weight", "weight 'strong' is not a number", True),
    "missing-file": ("missing", "file not found", True),
    "mixed-naming-styles": ("mixed", "mixes LoRA naming styles", True),
    "not-safetensors": ("text", "is not a safetensors file", True),
    "hub-id-offline": ("hub", "could not be downloaded from the hub", True),
    "base-sd-without-lora": ("none", "is not an LCM (its U-Net has no time_cond_proj_dim)", True),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_loras_fail_in_one_line(case, base_dir, lora_files, tmp_path) -> None:
    kind, expected, before_loading = ERROR_CASES[case]
    environment = {}
    if kind == "foreign":
        arguments = ["--lora", str(_foreign_lora(tmp_path / "foreign.safetensors"))]
    elif kind == "sdxl":
        arguments = ["--lora", str(_sdxl_lora(tmp_path / "sdxl.safetensors"))]
    elif kind == "weight":
        arguments = ["--lora", f"{lora_files['conv']}:strong"]
    elif kind == "mixed":
        arguments = ["--lora", str(_mixed_naming_lora(tmp_path / "mixed.safetensors", lora_files))]
    elif kind == "missing":
        arguments = ["--lora", str(tmp_path / "missing.safetensors")]
    elif kind == "text":
        (tmp_path / "notes.safetensors").write_text("not a tensor file\n")
        arguments = ["--lora", str(tmp_path / "notes.safetensors")]
    elif kind == "hub":
        arguments = ["--lora", "someone/lcm-lora-that-is-not-cached"]
        environment = {"HF_HUB_OFFLINE": "1"}
    else:
        arguments = []
    output = tmp_path / "bundle"
    result = _run_cli([str(base_dir), *arguments, "--output", str(output)], environment)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert expected in errors[0], errors[0]
    if before_loading:  # refused before any model or library is loaded: nothing but the error line
        assert len(lines) == 1, result.stderr
    assert not output.exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".bundle")]  # no staging left


def test_non_finite_weight_is_refused(lora_files) -> None:
    from lcm_export.exporter.lora import check_lora_sources

    with pytest.raises(ExportError, match="not a finite number"):
        check_lora_sources([LoraSource(str(lora_files["conv"]), float("nan"))])
