"""The benchmark's models: an SD1.5-shaped random LCM pipeline and a random TAESD-shaped ``AutoencoderTiny``.

Shapes are LCM_Dreamshaper_v7's (SD1.5 U-Net of 860M parameters with ``time_cond_proj_dim=256`` and
``cross_attention_dim=768``, the SD AutoencoderKL of 84M, CLIP ViT-L/14's text encoder) and TAESD's; the weights
are random (no downloads here), which does not change the time of any operation. Everything is built with
diffusers' and transformers' own classes and written with ``save_pretrained``, so the exporter, diffusers and
optimum-intel all load the same folders the way they load real models.
"""

from __future__ import annotations

import json
from pathlib import Path

from lcm_export.exporter.tiny import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, write_clip_tokenizer_files

# LCM_Dreamshaper_v7's U-Net (SD1.5 with the LCM guidance embedding).
UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    time_cond_proj_dim=256,
)
# Stable Diffusion's AutoencoderKL.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# CLIP ViT-L/14's text tower.
TEXT_CONFIG = dict(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=CLIP_BOS_ID,
    eos_token_id=CLIP_EOS_ID,
    pad_token_id=1,
)
# TAESD (madebyollin/taesd) is diffusers' AutoencoderTiny with its default configuration.
TAESD_CONFIG: dict = dict(latent_channels=4, scaling_factor=1.0)

COMPLETE_MARK = "bench-model-complete.json"


def parameter_count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def build_sd15_lcm(output_dir: Path, seed: int = 0) -> dict[str, int]:
    """Write the random SD1.5-shaped LCM pipeline to ``output_dir``; return parameter counts per module.

    A folder already holding a complete build (its mark file) is reused: building and saving 1B random
    parameters takes minutes.
    """
    mark = output_dir / COMPLETE_MARK
    if mark.is_file():
        return json.loads(mark.read_text())["parameters"]
    import torch
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    tokenizer_dir = output_dir.parent / f".{output_dir.name}-tokenizer"
    write_clip_tokenizer_files(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    # LCM_Dreamshaper_v7's scheduler settings.
    scheduler = LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        original_inference_steps=50,
        set_alpha_to_one=True,
        clip_sample=False,
    )
    pipeline = LatentConsistencyModelPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(output_dir))
    for leftover in tokenizer_dir.iterdir():
        leftover.unlink()
    tokenizer_dir.rmdir()
    counts = {
        "unet": parameter_count(unet),
        "vae": parameter_count(vae),
        "vae_decoder": parameter_count(vae.decoder) + parameter_count(vae.post_quant_conv),
        "text_encoder": parameter_count(text_encoder),
    }
    mark.write_text(json.dumps({"parameters": counts}, indent=2) + "\n")
    return counts


def build_taesd(output_dir: Path, seed: int = 0) -> dict[str, int]:
    """Write a random TAESD-shaped ``AutoencoderTiny`` to ``output_dir`` (reused when already complete)."""
    mark = output_dir / COMPLETE_MARK
    if mark.is_file():
        return json.loads(mark.read_text())["parameters"]
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(**TAESD_CONFIG)
    vae.save_pretrained(str(output_dir))
    counts = {"decoder": parameter_count(vae.decoder), "encoder": parameter_count(vae.encoder)}
    mark.write_text(json.dumps({"parameters": counts}, indent=2) + "\n")
    return counts


if __name__ == "__main__":
    import sys

    root = Path(sys.argv[1])
    counts = {"sd15-lcm": build_sd15_lcm(root / "sd15-lcm"), "taesd": build_taesd(root / "taesd")}
    print(json.dumps(counts))
