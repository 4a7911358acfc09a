"""The random tensors of an LCM run, drawn in one order by every mode (and passable by the caller instead).

An LCM run's only random draws are, in this order (diffusers' order, ``docs/bundle-format.md`` "Draw order"):

- text-to-image: the initial latents, then one noise tensor after every step but the last;
- image-to-image and the frame loop: the KL VAE's latent sample (none for a tiny VAE, whose encoder is
  deterministic), the noise added to the encoded image, then one noise tensor after every step but the last.

Each tensor is latent-shaped, (B, C, h, w), standard normal, float32. A caller that passes them (``latents``,
``sample_noise``, ``image_noise``, ``noise``) reproduces diffusers exactly; each one passed is checked for shape and
finiteness and the draws the caller did not pass come from ``seed``: tensor k of the order above is the shared
generator's tensor k (:mod:`lcm_export.runtime.philox`, counter-based), whether or not the caller passed the others,
so every runtime draws the same tensors from the same seed.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lcm_export.errors import UserError
from lcm_export.runtime.philox import PhiloxGenerator

Shape = tuple[int, int, int, int]


def fresh_seed() -> int:
    """A seed from the OS's entropy, in the generator's range [0, 2^64), for a call that gave none."""
    return secrets.randbelow(2**64)


def generator(seed: int | None) -> PhiloxGenerator:
    """The generator every draw of a run comes from: the shared Philox4x32-10 generator of ``seed`` (None: a
    :func:`fresh_seed`; the pipeline draws one itself so that it can record it in its output)."""
    return PhiloxGenerator(fresh_seed() if seed is None else seed)


@dataclass(frozen=True)
class TextToImageDraws:
    latents: np.ndarray  # (B, C, h, w), before the scheduler's init_noise_sigma
    noise: list[np.ndarray]  # steps - 1 tensors (B, C, h, w)


@dataclass(frozen=True)
class ImageToImageDraws:
    sample_noise: np.ndarray | None  # (B, C, h, w): the KL VAE's latent sample; None for a tiny VAE
    image_noise: np.ndarray  # (B, C, h, w)
    noise: list[np.ndarray]  # steps - 1 tensors (B, C, h, w)


def text_to_image_draws(
    seed: int | None,
    shape: Shape,
    steps: int,
    *,
    latents: np.ndarray | None = None,
    noise: Sequence[np.ndarray] | None = None,
) -> TextToImageDraws:
    rng = generator(seed)
    initial = _draw("latents", latents, shape, rng)
    return TextToImageDraws(initial, _draw_steps(noise, steps - 1, shape, rng))


def image_to_image_draws(
    seed: int | None,
    shape: Shape,
    steps: int,
    *,
    tiny_vae: bool,
    sample_noise: np.ndarray | None = None,
    image_noise: np.ndarray | None = None,
    noise: Sequence[np.ndarray] | None = None,
) -> ImageToImageDraws:
    rng = generator(seed)
    if tiny_vae and sample_noise is not None:
        raise UserError("sample_noise: this bundle's tiny VAE encodes deterministically and draws no latent sample")
    sample = None if tiny_vae else _draw("sample_noise", sample_noise, shape, rng)
    image = _draw("image_noise", image_noise, shape, rng)
    return ImageToImageDraws(sample, image, _draw_steps(noise, steps - 1, shape, rng))


def _draw(name: str, given: np.ndarray | None, shape: Shape, rng: PhiloxGenerator) -> np.ndarray:
    """A standard-normal draw of ``shape``, or the caller's array checked against it."""
    if given is None:
        return rng.standard_normal(shape)
    rng.skip()
    array = np.asarray(given, dtype=np.float32)
    if array.shape != shape:
        raise UserError(f"{name} has shape {list(array.shape)}: expected {list(shape)}")
    if not np.isfinite(array).all():
        raise UserError(f"{name} contains NaN or inf: pass finite values")
    return array


def _draw_steps(given: Sequence[np.ndarray] | None, count: int, shape: Shape, rng: PhiloxGenerator) -> list[np.ndarray]:
    """The noise added after every step but the last: drawn, or the caller's list checked."""
    if given is None:
        return [rng.standard_normal(shape) for _ in range(count)]
    if len(given) != count or any(np.shape(n) != shape for n in given):
        raise UserError(
            f"noise must be {count} arrays of shape {list(shape)} (one per step but the last); got {len(given)}"
        )
    if not all(np.isfinite(n).all() for n in given):
        raise UserError("noise contains NaN or inf: pass finite noise tensors")
    return [np.asarray(n, dtype=np.float32) for n in given]
