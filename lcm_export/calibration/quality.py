"""Image quality of a quantised bundle against its float one: PSNR and SSIM on images in [0, 1] (numpy only)."""

from __future__ import annotations

import numpy as np

SSIM_WINDOW = 7  # pixels; uniform window (scikit-image's default size), constants of Wang et al. 2004
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]; inf when identical."""
    mse = float(np.mean((reference.astype(np.float64) - image.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _box_filter(values: np.ndarray, size: int) -> np.ndarray:
    """Mean over every size x size window of the last two axes ('valid' windows), by cumulative sums."""
    padded = np.cumsum(np.cumsum(np.pad(values, [(0, 0)] * (values.ndim - 2) + [(1, 0), (1, 0)]), -1), -2)
    total = (
        padded[..., size:, size:]
        - padded[..., :-size, size:]
        - padded[..., size:, :-size]
        + padded[..., :-size, :-size]
    )
    return total / (size * size)


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Mean structural similarity of two (H, W, 3) or (N, H, W, 3) images in [0, 1], per channel, averaged."""
    first = np.moveaxis(reference.astype(np.float64), -1, -3)  # (..., 3, H, W)
    second = np.moveaxis(image.astype(np.float64), -1, -3)
    size = min(SSIM_WINDOW, first.shape[-1], first.shape[-2])
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mean_a, mean_b = _box_filter(first, size), _box_filter(second, size)
    var_a = _box_filter(first * first, size) - mean_a**2
    var_b = _box_filter(second * second, size) - mean_b**2
    covariance = _box_filter(first * second, size) - mean_a * mean_b
    index = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())
