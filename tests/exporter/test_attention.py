"""``--attention-slicing``: the U-Net's attention one head at a time, same images, one head's scores at a time."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from lcm_export.exporter.tiny import TinyPipelineConfig, build_tiny_pipeline
from lcm_export.runtime.pipeline import Pipeline
from tests.helpers import export


def _softmax_count(bundle) -> int:
    model = onnx.load(str(bundle / "unet" / "model.onnx"), load_external_data=False)
    return sum(node.op_type == "Softmax" for node in model.graph.node)


def _heads(model_dir) -> list[int]:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"))
    return [module.heads for module in unet.modules() if isinstance(module, Attention)]


def _image(bundle, prompt: str, guidance: float | None = None) -> np.ndarray:
    pipe = Pipeline.load(bundle, backend="onnxruntime", precision="fp32")
    return pipe(prompt, num_inference_steps=4, seed=3, guidance_scale=guidance).images


@pytest.mark.parametrize(
    "shape",
    [
        {},  # the shared tiny LCM
        # unseen: three levels, other head counts per level, two transformer layers
        {
            "unet_block_out_channels": (32, 64, 64),
            "attention_head_dim": (2, 4, 8),
            "transformer_layers_per_block": 2,
            "unet_down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "unet_up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "sample_size": 8,
        },
    ],
    ids=["tiny-lcm", "unseen-heads"],
)
def test_sliced_attention_same_images_one_head_at_a_time(shape, tiny_lcm_dir, tmp_path) -> None:
    model = tiny_lcm_dir if not shape else build_tiny_pipeline(tmp_path / "model", TinyPipelineConfig(**shape))
    plain = export(model, tmp_path / "plain")
    sliced = export(model, tmp_path / "sliced", attention_slicing=True)

    heads = _heads(model)
    assert max(heads) > 1
    assert _softmax_count(plain) == len(heads)  # one softmax over every head at once per attention layer
    assert _softmax_count(sliced) == sum(heads)  # one per head

    manifest = json.loads((sliced / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    assert unet["variants"][0]["produced_by"]["attention"] == "head-sliced"
    assert unet["validation"]["max_abs_error"]["out_sample"] < 1e-4  # against PyTorch's unsliced U-Net
    plain_manifest = json.loads((plain / "manifest.json").read_text())
    assert "attention" not in plain_manifest["components"]["unet"]["variants"][0]["produced_by"]

    reference = _image(plain, "a red fox in the snow")
    image = _image(sliced, "a red fox in the snow")
    assert image.shape == reference.shape
    assert float(np.abs(image - reference).max()) < 1e-5


def test_sliced_attention_with_cfg_lora(tmp_path) -> None:
    """LCM-LoRA bundles (CFG batch of 2): the sliced graph gives the same image at guidance 1.5."""
    from lcm_export.exporter.bundle import LoraSource
    from lcm_export.exporter.tiny import build_tiny_lora

    base = build_tiny_pipeline(tmp_path / "sd", TinyPipelineConfig(kind="sd"))
    lora = build_tiny_lora(tmp_path / "lcm.safetensors", base, rank=4, target_modules=("to_q", "to_v"))
    plain = export(base, tmp_path / "plain", loras=(LoraSource(str(lora)),))
    sliced = export(base, tmp_path / "sliced", loras=(LoraSource(str(lora)),), attention_slicing=True)
    reference = _image(plain, "a lighthouse", guidance=1.5)
    image = _image(sliced, "a lighthouse", guidance=1.5)
    assert float(np.abs(image - reference).max()) < 1e-5


# SD1.5's and SDXL's U-Nets (their published configs, on PyTorch's meta device: no weights) at their default sizes.
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


@pytest.mark.parametrize(
    "config, expected",
    [
        # 512 px: the 4096-token self-attention of the first down block (2) and the last up block (3)
        (SD15_UNET, {"down_blocks.0": 2, "up_blocks.3": 3}),
        # 1024 px: the 4096-token level, down_blocks.1 (2 attentions x 2 layers) and up_blocks.1 (3 x 2)
        (SDXL_UNET, {"down_blocks.1": 4, "up_blocks.1": 6}),
        # SDXL at 512 px (sample_size 64): 1024 tokens at most, 42 MB of scores: nothing to slice
        ({**SDXL_UNET, "sample_size": 64}, {}),
    ],
    ids=["sd15-512", "sdxl-1024", "sdxl-512"],
)
def test_int8_slices_only_the_layers_with_large_scores_by_default(config, expected, tmp_path) -> None:
    """The INT8 default on the ONNX target: the self-attention layers whose scores per image at the default size
    reach 256 MiB, none of the others; --attention-slicing every layer; other targets and fp32 none."""
    from types import SimpleNamespace

    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    from lcm_export.exporter.attention import LARGE_SCORES_BYTES, scores_bytes
    from lcm_export.exporter.bundle import ExportConfig, _slice_attention

    def sliced_layers(**options) -> dict[str, int]:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        loaded = SimpleNamespace(unet=unet, module=lambda name: unet)
        count = _slice_attention(ExportConfig(model="m", output=tmp_path, **options), loaded)
        blocks: dict[str, int] = {}
        for name, module in unet.named_modules():
            if isinstance(module, Attention) and type(module.processor).__name__ == "HeadSlicedAttnProcessor":
                block = ".".join(name.split(".")[:2])
                blocks[block] = blocks.get(block, 0) + 1
                side = config["sample_size"]
                if not options.get("attention_slicing"):
                    assert not module.is_cross_attention
                    assert scores_bytes(unet, name, module, (side, side)) >= LARGE_SCORES_BYTES
        assert count == sum(blocks.values())
        return blocks

    assert sliced_layers(precision="int8") == expected
    assert sliced_layers(precision="int8", target="web") == {}
    assert sliced_layers() == {}
    assert sliced_layers(precision="int8", attention_slicing=False) == {}
    every = sliced_layers(precision="int8", attention_slicing=True)
    with torch.device("meta"):
        total = sum(isinstance(m, Attention) for m in UNet2DConditionModel(**config).modules())
    assert sum(every.values()) == total > sum(expected.values())
