"""Tiny random-weight diffusers pipelines, built with diffusers' own classes and saved with ``save_pretrained``.

They are the built-in demo model (``lcm-export builtin:tiny-lcm``) and the test fixtures: every load then goes
through the real loading code. The tokenizer is the real CLIP BPE table, taken from the ``open-clip-torch`` wheel
(installed with ``--no-deps``) without importing ``open_clip``.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcm_export.errors import ExportError

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407


KINDS = ("lcm", "sd", "sdxl-lcm", "sdxl")


@dataclass(frozen=True)
class TinyPipelineConfig:
    """Shapes of a tiny pipeline; every field can be varied to test shapes the exporter has not seen."""

    # "lcm": U-Net with time_cond_proj_dim; "sd": base Stable Diffusion (for LCM-LoRA); "sdxl-lcm" / "sdxl": the
    # same two for the SDXL shape (two text encoders, the U-Net's text_time embedding of pooled text and size ids)
    kind: str = "lcm"
    unet_block_out_channels: tuple[int, ...] = (32, 64)
    unet_down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    unet_up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    unet_layers_per_block: int = 1
    attention_head_dim: int | tuple[int, ...] = 8
    norm_num_groups: int = 8
    cross_attention_dim: int = 32  # SDXL kinds: ignored, the two encoders' hidden sizes summed
    time_cond_proj_dim: int = 32
    sample_size: int = 16
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (16, 32)
    vae_norm_num_groups: int = 8
    vae_scaling_factor: float = 0.18215
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 4
    # SDXL kinds: the second encoder (CLIPTextModelWithProjection, pads with "!") and the U-Net's added embedding
    text_2_hidden_size: int = 32
    text_2_layers: int = 2
    text_2_heads: int = 4
    text_2_projection_dim: int = 32
    addition_time_embed_dim: int = 8
    transformer_layers_per_block: int | tuple[int, ...] = 1
    scheduler: dict = field(default_factory=dict)  # overrides of the LCMScheduler config
    seed: int = 0


def clip_bpe_file() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside the installed open-clip-torch wheel (not imported)."""
    try:
        files = importlib.metadata.files("open_clip_torch") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == "bpe_simple_vocab_16e6.txt.gz":
            return Path(str(entry.locate()))
    raise ExportError(
        "the CLIP BPE table was not found: install it with `pip install --no-deps open-clip-torch` "
        "(the tiny pipelines use the real CLIP tokenizer)"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def write_clip_tokenizer_files(directory: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` equal to OpenAI CLIP's, built from the BPE table."""
    lines = gzip.open(clip_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [token + "</w>" for token in base] + ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in merges) + "\n")


def _clip_text_config(hidden: int, layers: int, heads: int, projection: int) -> Any:
    """A CLIP text encoder config with the real CLIP vocabulary and special tokens."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=projection,
        max_position_embeddings=77,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=1,
    )


def build_tiny_pipeline(output_dir: str | Path, config: TinyPipelineConfig | None = None) -> Path:
    """Build a random tiny pipeline with diffusers' classes and ``save_pretrained`` it to ``output_dir``.

    SDXL kinds are ``StableDiffusionXLPipeline`` (diffusers has no LCM-SDXL class: a distilled LCM-SDXL is that
    pipeline with a U-Net that has ``time_cond_proj_dim``, and ``LCMScheduler``).
    """
    import torch
    from diffusers import (
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lcm_export.runtime.conditioning import SDXL_SIZE_IDS

    config = config or TinyPipelineConfig()
    if config.kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {config.kind!r}: pick one of {', '.join(KINDS)}")
    sdxl = config.kind.startswith("sdxl")
    distilled = config.kind in ("lcm", "sdxl-lcm")
    output_dir = Path(output_dir)
    torch.manual_seed(config.seed)
    sdxl_unet_options: dict = {}
    if sdxl:
        sdxl_unet_options = dict(
            cross_attention_dim=config.text_hidden_size + config.text_2_hidden_size,
            addition_embed_type="text_time",
            addition_time_embed_dim=config.addition_time_embed_dim,
            projection_class_embeddings_input_dim=(
                config.addition_time_embed_dim * SDXL_SIZE_IDS + config.text_2_projection_dim
            ),
            transformer_layers_per_block=config.transformer_layers_per_block,
            use_linear_projection=True,
        )
    unet = UNet2DConditionModel(
        block_out_channels=config.unet_block_out_channels,
        layers_per_block=config.unet_layers_per_block,
        sample_size=config.sample_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=config.unet_down_block_types,
        up_block_types=config.unet_up_block_types,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        time_cond_proj_dim=config.time_cond_proj_dim if distilled else None,
        **(sdxl_unet_options or {"cross_attention_dim": config.cross_attention_dim}),
    )
    vae = _tiny_autoencoder_kl(
        config.vae_block_out_channels,
        latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_num_groups,
        scaling_factor=config.vae_scaling_factor,
        latent_size=config.sample_size,
    )
    text_encoder = CLIPTextModel(
        _clip_text_config(config.text_hidden_size, config.text_layers, config.text_heads, config.text_hidden_size)
    )
    tokenizer_dir = output_dir / "_tokenizer_source"
    write_clip_tokenizer_files(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    scheduler = LCMScheduler(**{"beta_schedule": "scaled_linear", **config.scheduler})
    components = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    if sdxl:
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(
                config.text_2_hidden_size,
                config.text_2_layers,
                config.text_2_heads,
                config.text_2_projection_dim,
            )
        )
        # SDXL's second tokenizer (OpenCLIP's) pads with "!" (id 0), not <|endoftext|>
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77, pad_token="!")
        pipeline = StableDiffusionXLPipeline(
            **components, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=True
        )
    elif distilled:
        pipeline = LatentConsistencyModelPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    else:
        pipeline = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipeline.save_pretrained(output_dir)
    for leftover in tokenizer_dir.iterdir():
        leftover.unlink()
    tokenizer_dir.rmdir()
    return output_dir


def _tiny_autoencoder_kl(
    block_out_channels: tuple[int, ...],
    *,
    latent_channels: int,
    norm_num_groups: int,
    scaling_factor: float,
    latent_size: int,
    **options: Any,
) -> Any:
    """A random-weight diffusers ``AutoencoderKL`` with one block per entry of ``block_out_channels`` (scale factor
    ``2 ** (len - 1)``), drawn from torch's current random state; ``options`` go to its config."""
    from diffusers import AutoencoderKL

    depth = len(block_out_channels)
    return AutoencoderKL(
        block_out_channels=block_out_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        scaling_factor=scaling_factor,
        sample_size=latent_size * 2 ** (depth - 1),
        **options,
    )


def build_tiny_autoencoder_kl(
    path: str | Path,
    *,
    block_out_channels: tuple[int, ...] = TinyPipelineConfig.vae_block_out_channels,
    latent_channels: int = TinyPipelineConfig.latent_channels,
    scaling_factor: float = TinyPipelineConfig.vae_scaling_factor,
    force_upcast: bool = True,
    seed: int = 0,
) -> Path:
    """A random-weight ``AutoencoderKL`` shaped like the tiny pipelines' VAE (by default), ``save_pretrained``.

    What ``--vae`` takes: e.g. the tiny pipelines' VAE shape with other weights and another ``scaling_factor``,
    or ``force_upcast=False`` for an fp16-fixed VAE (madebyollin/sdxl-vae-fp16-fix's config says so).
    """
    import torch

    torch.manual_seed(seed)
    vae = _tiny_autoencoder_kl(
        block_out_channels,
        latent_channels=latent_channels,
        norm_num_groups=TinyPipelineConfig.vae_norm_num_groups,
        scaling_factor=scaling_factor,
        latent_size=TinyPipelineConfig.sample_size,
        force_upcast=force_upcast,
    )
    path = Path(path)
    vae.save_pretrained(str(path))
    return path


LORA_FORMATS = ("diffusers", "kohya")


def _kohya_lora_state_dict(peft_state_dict: dict, prefix: str, alpha: float, name_prefix: str = "") -> dict:
    """peft ``<module>.lora_A.weight`` / ``lora_B.weight`` keys -> kohya ``<prefix><module_with_underscores>``.

    kohya-ss names a layer by its module path with dots turned into underscores and stores the down (A) and up (B)
    matrices and the scalar ``alpha`` next to it; ``name_prefix`` restores a path prefix the loaded model no longer
    has (``text_model.`` of CLIP in recent transformers) so the file looks like one trained elsewhere.
    """
    import torch

    converted: dict = {}
    for key, tensor in peft_state_dict.items():
        module, _, parameter = key.rpartition(".lora_")
        layer = prefix + (name_prefix + module).replace(".", "_")
        if parameter == "A.weight":
            converted[f"{layer}.lora_down.weight"] = tensor.contiguous()
            converted[f"{layer}.alpha"] = torch.tensor(float(alpha))
        elif parameter == "B.weight":
            converted[f"{layer}.lora_up.weight"] = tensor.contiguous()
        else:
            raise ValueError(f"unexpected LoRA parameter {key!r}")
    return converted


def build_tiny_lora(
    path: str | Path,
    pipeline_dir: str | Path,
    *,
    rank: int,
    target_modules: tuple[str, ...] | list[str],
    text_encoder: bool = False,
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    alpha: float | None = None,
    seed: int = 0,
    format: str = "diffusers",
) -> Path:
    """Write a random LoRA for the pipeline in ``pipeline_dir`` to the safetensors file ``path``.

    The adapter is made by peft (``LoraConfig(init_lora_weights=False)``: random A *and* B, so the LoRA really
    changes the model) on the pipeline's own U-Net (and text encoder when ``text_encoder``), then saved the way
    diffusers' training scripts save one (``StableDiffusionPipeline.save_lora_weights``, with the adapter config
    in the header so ``alpha`` survives) or, for ``format="kohya"``, as kohya-ss names it
    (``lora_unet_*`` / ``lora_te_*`` with ``lora_down``, ``lora_up`` and ``alpha``). The same seed and arguments
    give the same A and B matrices in both formats: the two files describe the same LoRA. For an SDXL pipeline,
    ``text_encoder`` adapts both text encoders (kohya: ``lora_te1_*`` / ``lora_te2_*``), saved as
    ``StableDiffusionXLPipeline.save_lora_weights`` does.
    """
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if format not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}: pick one of {', '.join(LORA_FORMATS)}")
    path = Path(path)
    pipeline_dir = Path(pipeline_dir)
    alpha = float(rank if alpha is None else alpha)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet")
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=False)
    unet.add_adapter(unet_config)
    unet_layers = get_peft_model_state_dict(unet, save_embedding_layers=False)
    sdxl = (pipeline_dir / "text_encoder_2").is_dir()
    encoder_names = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    encoder_layers: dict[str, dict] = {}
    encoder_config = None
    encoder_name_prefixes: dict[str, str] = {}
    if text_encoder:
        encoder_config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(text_encoder_target_modules), init_lora_weights=False
        )
        for name in encoder_names:
            model_class = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            encoder = model_class.from_pretrained(str(pipeline_dir), subfolder=name)
            encoder.add_adapter(encoder_config)
            encoder_layers[name] = get_peft_model_state_dict(encoder, save_embedding_layers=False)
            encoder_name_prefixes[name] = "" if hasattr(encoder, "text_model") else "text_model."

    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "kohya":
        state_dict = _kohya_lora_state_dict(unet_layers, "lora_unet_", alpha)
        kohya_prefixes = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
        for name, layers in encoder_layers.items():
            state_dict.update(_kohya_lora_state_dict(layers, kohya_prefixes[name], alpha, encoder_name_prefixes[name]))
        save_file(state_dict, str(path), metadata={"format": "pt"})
        return path
    # diffusers' training scripts rename peft's lora_A/lora_B to lora.down/lora.up, which covers attention
    # projections only; a LoRA on other modules keeps peft's names (diffusers reads both, not a mix of the two).
    diffusers_named = convert_state_dict_to_diffusers(unet_layers)
    if any(".lora_A." in key for key in diffusers_named):
        diffusers_named = unet_layers
    encoder_metadata = encoder_config.to_dict() if encoder_config is not None else None
    encoder_options = {}
    for name, layers in encoder_layers.items():
        encoder_options[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(layers)
        encoder_options[f"{name}_lora_adapter_metadata"] = encoder_metadata
    saver = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    saver.save_lora_weights(
        str(path.parent),
        unet_lora_layers=diffusers_named,
        weight_name=path.name,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        **encoder_options,
    )
    return path


def build_tiny_autoencoder_tiny(
    path: str | Path, *, latent_channels: int = 4, scale_factor_depth: int = 1, seed: int = 0
) -> Path:
    """A random-weight, small-channel diffusers ``AutoencoderTiny`` (TAESD's architecture), ``save_pretrained``.

    ``scale_factor_depth`` is the number of x2 up-sampling stages of the decoder (and down-sampling stages of
    the encoder): the VAE scale factor is ``2 ** scale_factor_depth``, e.g. 1 for the tiny test pipelines whose
    AutoencoderKL has two blocks, 3 for Stable Diffusion's 8.
    """
    import torch
    from diffusers import AutoencoderTiny

    blocks = scale_factor_depth + 1
    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(16,) * blocks,
        decoder_block_out_channels=(16,) * blocks,
        num_encoder_blocks=(1,) * blocks,
        num_decoder_blocks=(1,) * blocks,
        latent_channels=latent_channels,
    )
    path = Path(path)
    vae.save_pretrained(str(path))
    return path


# The U-Net config keys a ControlNet copies (diffusers' ControlNetModel.from_unet, which fails on a distilled LCM
# U-Net: the ControlNet has no time_cond_proj_dim, cond_proj.weight is an unexpected key).
CONTROLNET_UNET_KEYS = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "mid_block_type",
)


def build_controlnet(
    path: str | Path,
    model_dir: str | Path,
    *,
    embedding_channels: tuple[int, ...] | None = None,
    seed: int = 0,
    residual_std: float = 0.05,
) -> Path:
    """A random-weight diffusers ``ControlNetModel`` for the pipeline at ``model_dir``, ``save_pretrained``.

    Built from the pipeline's U-Net config (its down blocks, cross-attention size, heads, norm groups, SDXL's
    added embedding) without ``time_cond_proj_dim``; its conditioning embedding down-samples by the VAE's scale
    factor (``embedding_channels``: one entry per stage, default 16, 32, .. as many as the VAE needs). diffusers
    zero-initialises the residual convolutions (a fresh ControlNet changes nothing); here they get random weights
    of ``residual_std`` so that the control image visibly changes the image.
    """
    import torch
    from diffusers import ControlNetModel

    model_dir = Path(model_dir)
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    stages = len(vae["block_out_channels"])  # scale factor 2 ** (stages - 1): as many embedding entries
    channels = embedding_channels or tuple(16 * 2**index for index in range(stages))
    torch.manual_seed(seed)
    controlnet = ControlNetModel(
        **{key: unet[key] for key in CONTROLNET_UNET_KEYS if key in unet},
        conditioning_embedding_out_channels=channels,
    )
    zeroed = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zeroed.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for module in zeroed:
            torch.nn.init.normal_(module.weight, std=residual_std)
            torch.nn.init.normal_(module.bias, std=residual_std)
    path = Path(path)
    controlnet.save_pretrained(str(path))
    return path
