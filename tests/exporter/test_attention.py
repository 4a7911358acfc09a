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
