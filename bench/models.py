"""The benchmark's models: an SD1.5-shaped random LCM pipeline, a random TAESD-shaped ``AutoencoderTiny`` and a
full-size SDXL-shaped random LCM pipeline.

Shapes are LCM_Dreamshaper_v7's (SD1.5 U-Net of 860M parameters with ``time_cond_proj_dim=256`` and
``cross_attention_dim=768``, the SD AutoencoderKL of 84M, CLIP ViT-L/14's text encoder) and TAESD's; the weights
are random (no downloads here), which does not change the time of any operation. The SDXL-shaped pipeline has
LCM-SDXL's shapes (SDXL base's U-Net of 2.6B parameters with ``time_cond_proj_dim=256``, CLIP ViT-L/14 and OpenCLIP
ViT-bigG/14 text towers, SDXL's VAE): its weights are stored in fp16 (6.5 GB instead of 13 GB on disk), as the hub's
``fp16`` variants are; the exporter loads them upcast to fp32. Everything is built with
diffusers' and transformers' own classes and written with ``save_pretrained``, so the exporter, diffusers and
optimum-intel all load the same folders the way they load real models.

``--sdxl-tiny`` / ``--ssd1b-tiny``: the same families' structure with narrow layers, for smoke tests of the SDXL
benches (seconds to build and export; its timings mean nothing).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from lcm_export.exporter.tiny import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_VOCAB_SIZE,
    build_controlnet,
    write_clip_tokenizer_files,
)

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
# LCM-SDXL's U-Net (latent-consistency/lcm-sdxl): SDXL base's U-Net with the LCM guidance embedding.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 size ids x 256 + the 1280-wide pooled text
    norm_num_groups=32,
    time_cond_proj_dim=256,
)
# SSD-1B's U-Net (segmind/SSD-1B, distilled from SDXL's): SDXL's with fewer transformer layers, 2 then 4 in the
# down blocks (ComfyUI's detection of it: input transformer depths [0, 0, 2, 2, 4, 4]), per layer of the up blocks
# [4, 4, 10], [2, 1, 1], [1, 1, 1], and no mid block: 1.300 B parameters, the published 1.3 B (SDXL's: 2.567 B).
SSD1B_UNET_CONFIG = dict(
    SDXL_UNET_CONFIG,
    transformer_layers_per_block=(1, 2, 4),
    reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), (1, 1, 1)),
    mid_block_type=None,
)
# SDXL's AutoencoderKL: SD's shape, its own scaling factor and size.
SDXL_VAE_CONFIG = {**VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# OpenCLIP ViT-bigG/14's text tower (SDXL's text_encoder_2, CLIPTextModelWithProjection).
SDXL_TEXT_2_CONFIG = dict(
    TEXT_CONFIG,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
# Smoke tests of the SDXL benches (not for timing): a family's U-Net structure (its blocks, attention layout, mid
# block or none, guidance embedding) with narrow channels and one or two transformer layers, at 128 px by default;
# small text towers (the real tokenizers) and a small VAE with SDXL's 8x latent scale, so that TAESD's decoder fits.
TINY_TEXT_CONFIG = dict(
    TEXT_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
)
TINY_TEXT_2_CONFIG = dict(
    SDXL_TEXT_2_CONFIG,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=64,
)
TINY_VAE_CONFIG = {**SDXL_VAE_CONFIG, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1}
TINY_ADDITION_TIME_EMBED_DIM = 16


def tiny_unet_config(config: dict) -> dict:
    """``config`` (an SDXL-family U-Net's) narrowed for a smoke test: the same block types and mid block, channels
    (32, 64, 64), two heads, at most two transformer layers per block; sized for the tiny text towers."""
    tiny = dict(
        config,
        sample_size=16,
        block_out_channels=(32, 64, 64),
        attention_head_dim=(2, 2, 2),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=TINY_TEXT_CONFIG["hidden_size"] + TINY_TEXT_2_CONFIG["hidden_size"],
        addition_time_embed_dim=TINY_ADDITION_TIME_EMBED_DIM,
        # 6 size ids x the time embedding + the pooled text of the second tower
        projection_class_embeddings_input_dim=6 * TINY_ADDITION_TIME_EMBED_DIM + TINY_TEXT_2_CONFIG["projection_dim"],
    )
    if config.get("reverse_transformer_layers_per_block"):  # SSD-1B's: its own depths per up block
        tiny["reverse_transformer_layers_per_block"] = ((2, 2, 1), (1, 1, 1), (1, 1, 1))
    return tiny


# An SD1.5 ControlNet's (lllyasviel/control_v11p_sd15_canny) conditioning embedding: 8x down-sampling of the image.
CONTROLNET_EMBEDDING_CHANNELS = (16, 32, 96, 256)
# Its residual convolutions are zero-initialised by diffusers (a fresh ControlNet changes nothing); random ones of
# this spread make the control image change the image, as a trained ControlNet's do.
CONTROLNET_RESIDUAL_STD = 0.02
# TAESD (madebyollin/taesd) is diffusers' AutoencoderTiny with its default configuration.
TAESD_CONFIG: dict = dict(latent_channels=4, scaling_factor=1.0)

COMPLETE_MARK = "bench-model-complete.json"
# RESULTS.md's section on exporting the SDXL-shaped pipeline (measured by hand: commands in it); run.py keeps it.
SDXL_EXPORT_SECTION_START = "<!-- sdxl-export-memory: start (measured by hand with the commands it shows) -->"
SDXL_EXPORT_SECTION_END = "<!-- sdxl-export-memory: end -->"


# LCM_Dreamshaper_v7's and latent-consistency/lcm-sdxl's LCMScheduler settings (SDXL adds its own spacing).
LCM_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    original_inference_steps=50,
    set_alpha_to_one=True,
    clip_sample=False,
)


def parameter_count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _save_with_clip_tokenizers(output_dir: Path, make_pipeline, **tokenizers: dict) -> None:
    """``make_pipeline(**{name: CLIPTokenizer})`` saved to ``output_dir``; each tokenizer is the real CLIP BPE table
    with ``tokenizers[name]``'s options, read from files written beside ``output_dir`` and removed afterwards."""
    import shutil

    from transformers import CLIPTokenizer

    tokenizer_dir = output_dir.parent / f".{output_dir.name}-tokenizer"
    write_clip_tokenizer_files(tokenizer_dir)
    try:
        loaded = {
            name: CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77, **options)
            for name, options in tokenizers.items()
        }
        make_pipeline(**loaded).save_pretrained(str(output_dir))
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)


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
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    pipeline = functools.partial(
        LatentConsistencyModelPipeline,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        scheduler=LCMScheduler(**LCM_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_with_clip_tokenizers(output_dir, pipeline, tokenizer={})
    counts = {
        "unet": parameter_count(unet),
        "vae": parameter_count(vae),
        "vae_decoder": parameter_count(vae.decoder) + parameter_count(vae.post_quant_conv),
        "text_encoder": parameter_count(text_encoder),
    }
    mark.write_text(json.dumps({"parameters": counts}, indent=2) + "\n")
    return counts


def build_ssd1b_lcm(output_dir: Path, seed: int = 0) -> dict[str, int]:
    """The SSD-1B-shaped LCM pipeline (:data:`SSD1B_UNET_CONFIG`, SDXL's text encoders and VAE), as
    :func:`build_sdxl_lcm` writes the SDXL-shaped one."""
    return build_sdxl_lcm(output_dir, seed, SSD1B_UNET_CONFIG)


def build_tiny_sdxl_lcm(output_dir: Path, family: str = "sdxl", seed: int = 0) -> dict[str, int]:
    """A narrow pipeline of the SDXL ``family`` ("sdxl" or "ssd1b") for smoke tests: :func:`tiny_unet_config` of
    its U-Net, the tiny text towers and VAE, written as :func:`build_sdxl_lcm` writes the full-size one."""
    unet = {"sdxl": SDXL_UNET_CONFIG, "ssd1b": SSD1B_UNET_CONFIG}[family]
    return build_sdxl_lcm(
        output_dir,
        seed,
        tiny_unet_config(unet),
        text_configs=(TINY_TEXT_CONFIG, TINY_TEXT_2_CONFIG),
        vae_config=TINY_VAE_CONFIG,
    )


def build_sdxl_lcm(
    output_dir: Path,
    seed: int = 0,
    unet_config: dict | None = None,
    text_configs: tuple[dict, dict] = (TEXT_CONFIG, SDXL_TEXT_2_CONFIG),
    vae_config: dict = SDXL_VAE_CONFIG,
) -> dict[str, int]:
    """Write the random full-size SDXL-shaped LCM pipeline to ``output_dir`` in fp16 (``unet_config``: another
    SDXL-family U-Net's; ``text_configs`` and ``vae_config``: other text towers and VAE, for the tiny pipelines);
    return parameter counts.

    Each module is built in fp32 (random initialisation as diffusers/transformers do it) and halved before the next
    one is built, so the build peaks near the fp32 U-Net alone (10.3 GB), not the fp32 pipeline (14 GB). Saved by
    ``StableDiffusionXLPipeline.save_pretrained`` as safetensors, with LCM-SDXL's scheduler settings. A folder
    already holding a complete build (its mark file) is reused.
    """
    mark = output_dir / COMPLETE_MARK
    if mark.is_file():
        return json.loads(mark.read_text())["parameters"]
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    counts: dict[str, int] = {}

    def built(name: str, module):
        counts[name] = parameter_count(module)
        return module.half().eval()

    unet = built("unet", UNet2DConditionModel(**(unet_config or SDXL_UNET_CONFIG)))
    text_encoder_2 = built("text_encoder_2", CLIPTextModelWithProjection(CLIPTextConfig(**text_configs[1])))
    text_encoder = built("text_encoder", CLIPTextModel(CLIPTextConfig(**text_configs[0])))
    vae = built("vae", AutoencoderKL(**vae_config))
    # latent-consistency/lcm-sdxl's scheduler settings.
    scheduler = LCMScheduler(**LCM_SCHEDULER, timestep_spacing="leading", steps_offset=1)
    pipeline = functools.partial(
        StableDiffusionXLPipeline,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    _save_with_clip_tokenizers(output_dir, pipeline, tokenizer={}, tokenizer_2={"pad_token": "!"})  # 2: OpenCLIP
    counts["vae_decoder"] = parameter_count(vae.decoder) + parameter_count(vae.post_quant_conv)
    mark.write_text(json.dumps({"parameters": counts, "stored_dtype": "float16"}, indent=2) + "\n")
    return counts


def build_sd15_controlnet(output_dir: Path, model_dir: Path, seed: int = 0) -> dict[str, int]:
    """Write a random full-size SD1.5-shaped ``ControlNetModel`` for the pipeline at ``model_dir`` (its U-Net's down
    blocks, mid block and cross-attention size, without the LCM guidance embedding: an SD1.5 ControlNet serves an
    LCM); return its parameter count (reused when already complete)."""
    mark = output_dir / COMPLETE_MARK
    if mark.is_file():
        return json.loads(mark.read_text())["parameters"]
    from diffusers import ControlNetModel

    build_controlnet(
        output_dir,
        model_dir,
        embedding_channels=CONTROLNET_EMBEDDING_CHANNELS,
        seed=seed,
        residual_std=CONTROLNET_RESIDUAL_STD,
    )
    counts = {"controlnet": parameter_count(ControlNetModel.from_pretrained(str(output_dir)))}
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


# ``models.py ROOT --NAME...``: each named model into ROOT/NAME (the SDXL family's are 10+ GB to build: on their own,
# not part of the default benchmark); no name: the SD1.5-shaped pipeline and TAESD.
BUILDERS = {
    "sdxl": build_sdxl_lcm,
    "ssd1b": build_ssd1b_lcm,
    "sdxl-tiny": functools.partial(build_tiny_sdxl_lcm, family="sdxl"),
    "ssd1b-tiny": functools.partial(build_tiny_sdxl_lcm, family="ssd1b"),
    "taesd": build_taesd,
}


if __name__ == "__main__":
    import sys

    root, names = Path(sys.argv[1]), [option.removeprefix("--") for option in sys.argv[2:]]
    unknown = [name for name in names if name not in BUILDERS]
    if unknown:
        raise SystemExit(f"usage: models.py ROOT [{' '.join('--' + name for name in BUILDERS)}]: not {unknown}")
    if names:
        counts = {name: BUILDERS[name](root / name) for name in names}
    else:
        counts = {"sd15-lcm": build_sd15_lcm(root / "sd15-lcm"), "taesd": build_taesd(root / "taesd")}
    print(json.dumps(counts))
