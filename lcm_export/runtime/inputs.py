"""Checks of one generation call's arguments, made before anything runs.

A call comes from a user (``lcm-run`` flags, an app's API call): every argument is checked for type and range here,
with one-line :class:`UserError` messages that name the argument and say what to pass. The size check also
estimates the working memory a size needs from the bundle's own U-Net and VAE configs, so a size the machine
cannot hold is refused in milliseconds instead of failing inside a backend after seconds (a 4000x4000 image
asks an SD U-Net for an attention matrix of hundreds of gigabytes).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcm_export.errors import UserError

FLOAT_BYTES = 4  # the runtime computes in float32; fp16 graphs halve some of this, which the estimate ignores


def check_integer(name: str, value: Any, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bool and float are refused: 2.5 images is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name}={value!r}: pass an integer >= {minimum}")
    if value < minimum:
        raise UserError(f"{name}={value}: pass an integer >= {minimum}")
    return value


def check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise UserError(f"seed={seed!r}: pass an integer in [0, 2**64) (or no seed for a random one)")
    return seed


def _is_number(value: Any) -> bool:
    """A real number as a caller would pass one (int, float, a numpy scalar); not a bool, not a string."""
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_guidance(guidance_scale: Any) -> float:
    if not _is_number(guidance_scale):
        raise UserError(
            f"guidance_scale={guidance_scale!r}: pass a number >= 0 (LCM: about 1-2 with LCM-LoRA, 8.5 distilled)"
        )
    try:
        value = float(guidance_scale)
    except (TypeError, ValueError):
        raise UserError(
            f"guidance_scale={guidance_scale!r}: pass a number >= 0 (LCM: about 1-2 with LCM-LoRA, 8.5 distilled)"
        ) from None
    if isinstance(guidance_scale, bool) or not math.isfinite(value) or value < 0:
        raise UserError(
            f"guidance_scale={guidance_scale!r}: pass a finite number >= 0 (about 1-2 for LCM-LoRA bundles, "
            "8.5 for distilled LCMs)"
        )
    return value


def check_strength(strength: Any) -> float:
    """Image-to-image strength in (0, 1]: 1 replaces the image entirely, small values keep most of it. A number
    only: a string such as "0.5" is refused in every mode alike."""
    value = float(strength) if _is_number(strength) else float("nan")
    if not math.isfinite(value) or not 0 < value <= 1:
        raise UserError(f"strength={strength!r}: pass a number in (0, 1] (e.g. 0.5)")
    return value


def check_prompts(prompt: Any, name: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"{name} must be a string or a non-empty list of strings")
    return list(prompts)


def check_negative_prompt(negative_prompt: Any, count: int, *, guidance_kind: str, guidance_scale: float) -> list[str]:
    """The unconditional prompts of a CFG call; a negative prompt that would have no effect is refused.

    A distilled LCM takes guidance as an embedding and runs no unconditional batch, and a CFG bundle at
    guidance <= 1 runs the conditional half only: in both a negative prompt would be silently ignored.
    """
    if negative_prompt is not None:
        if guidance_kind != "cfg":
            raise UserError(
                "negative_prompt has no effect on this bundle: it is a distilled LCM (guidance is an embedding, "
                "there is no unconditional batch): drop the negative prompt"
            )
        if guidance_scale <= 1.0:
            raise UserError(
                f"negative_prompt has no effect at guidance_scale={guidance_scale:g} (<= 1 runs no "
                "classifier-free guidance): raise the guidance above 1 or drop the negative prompt"
            )
        negatives = check_prompts(negative_prompt, "negative_prompt")
        if isinstance(negative_prompt, str):
            negatives = negatives * count
        if len(negatives) != count:
            raise UserError(f"negative_prompt has {len(negatives)} entries for {count} prompt(s): pass one per prompt")
        return negatives
    return [""] * count


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now (``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_config(path: Path) -> dict[str, Any]:
    """A component's config.json from the bundle (hashed at load), or {} when absent or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _positive_ints(value: Any) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return [value]
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return value
    return None


@dataclass(frozen=True)
class MemoryModel:
    """The parts of a bundle's U-Net and VAE configs that decide how working memory grows with the image size.

    Attention materialises a (heads, tokens, tokens) score matrix per image: quadratic in the pixel count, and the
    term that explodes. The VAE decoder's widest full-resolution layer is the linear term.
    """

    unet_attention_levels: tuple[tuple[int, int], ...]  # (down-sampling level, heads) of each attention block
    vae_attention: bool  # AutoencoderKL's mid-block attention at the latent resolution (one head)
    vae_full_resolution_channels: int

    @classmethod
    def from_bundle(cls, bundle_dir: Path) -> MemoryModel:
        unet = _read_config(bundle_dir / "unet" / "config.json")
        vae = _read_config(bundle_dir / "vae_decoder" / "config.json")
        levels: list[tuple[int, int]] = []
        blocks = unet.get("down_block_types")
        heads = _positive_ints(unet.get("num_attention_heads")) or _positive_ints(unet.get("attention_head_dim"))
        if isinstance(blocks, list):
            for level, block in enumerate(blocks):
                if isinstance(block, str) and "Attn" in block:
                    block_heads = heads[level] if heads and len(heads) == len(blocks) else (heads or [8])[0]
                    levels.append((level, block_heads))
        channels = _positive_ints(vae.get("block_out_channels")) or _positive_ints(
            vae.get("decoder_block_out_channels")
        )
        return cls(
            unet_attention_levels=tuple(levels),
            vae_attention=vae.get("_class_name") == "AutoencoderKL" and vae.get("mid_block_add_attention", True),
            vae_full_resolution_channels=channels[0] if channels else 64,
        )

    def working_bytes(
        self, batch: int, unet_batch: int, height: int, width: int, latent_height: int, latent_width: int
    ) -> int:
        """A lower bound of the largest working set of one call (bytes): what no backend can do without."""
        largest = 0
        for level, heads in self.unet_attention_levels:
            tokens = math.ceil(latent_height / 2**level) * math.ceil(latent_width / 2**level)
            largest = max(largest, unet_batch * heads * tokens * tokens * FLOAT_BYTES)
        if self.vae_attention:
            tokens = latent_height * latent_width
            largest = max(largest, batch * tokens * tokens * FLOAT_BYTES)
        # Two full-resolution activations of the VAE decoder's widest last layer (input and output of a conv).
        largest = max(largest, 2 * batch * self.vae_full_resolution_channels * height * width * FLOAT_BYTES)
        return largest


def check_memory(
    model: MemoryModel, *, batch: int, unet_batch: int, height: int, width: int, latent_height: int, latent_width: int
) -> None:
    needed = model.working_bytes(batch, unet_batch, height, width, latent_height, latent_width)
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise UserError(
            f"height={height} width={width} for {batch} image(s) needs at least {needed / 2**30:.1f} GiB of working "
            f"memory in this bundle's U-Net/VAE and {available / 2**30:.1f} GiB is available: pass a smaller size "
            "or fewer images"
        )
