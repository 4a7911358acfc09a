"""Synthetic control images for INT8 calibration of a ControlNet bundle: edge-like and smooth, derived from a seed.

A ControlNet bundle's U-Net adds the ControlNets' residuals to its own down-block and mid-block activations, so its
activation ranges depend on the control images the trajectories run with; a calibration on zero residuals (no
control image) would clip what every controlled run needs. No real control images ship with lcm-export (and none
can be downloaded here), and a ControlNet's input is one of two kinds in practice:

- sparse binary maps (Canny edges, HED/scribbles, line art, OpenPose skeletons): thin lines at 0 or 1 on black,
  the inputs whose residuals are the most peaked; :func:`edge_image` draws 1-pixel segments, rectangle and
  ellipse outlines, as a Canny map of simple shapes looks;
- smooth fields (depth, normal maps, segmentation-like blurs): every pixel mid-range and slowly varying;
  :func:`smooth_image` sums a gradient and a few wide Gaussian blobs, grey on all three channels as a depth map.

Calibration prompts alternate the two kinds (prompt 0 edges, prompt 1 smooth, ..) and each ControlNet of a bundle
gets an image of its own, so every ControlNet sees both kinds. Images depend only on (seed, index, size): the
trajectory cache stays valid between exports, and the held-out set of the quality report (other seeds) is never
calibrated on.
"""

from __future__ import annotations

import numpy as np

CALIBRATION_SEED = 0
HELD_OUT_SEED = 10_000  # the quality report's images: the seeds its runs use, never those of the calibration
KINDS = ("edges", "smooth")


def edge_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A Canny-like edge map (H, W, 3) float32 in {0, 1}: 1-pixel segments, rectangle and ellipse outlines."""
    canvas = np.zeros((height, width), dtype=np.float32)

    def draw(rows: np.ndarray, columns: np.ndarray) -> None:
        rows, columns = np.round(rows).astype(int), np.round(columns).astype(int)
        inside = (rows >= 0) & (rows < height) & (columns >= 0) & (columns < width)
        canvas[rows[inside], columns[inside]] = 1.0

    points = 2 * (height + width)  # enough samples along any outline for a connected 1-pixel line
    along = np.linspace(0.0, 1.0, points)
    for _ in range(int(rng.integers(3, 7))):  # segments
        (r0, r1), (c0, c1) = rng.uniform(0, height, 2), rng.uniform(0, width, 2)
        draw(r0 + (r1 - r0) * along, c0 + (c1 - c0) * along)
    for _ in range(int(rng.integers(1, 4))):  # rectangle outlines
        top, bottom = np.sort(rng.uniform(0, height, 2))
        left, right = np.sort(rng.uniform(0, width, 2))
        for row in (top, bottom):
            draw(np.full(points, row), left + (right - left) * along)
        for column in (left, right):
            draw(top + (bottom - top) * along, np.full(points, column))
    angles = 2 * np.pi * along
    for _ in range(int(rng.integers(1, 4))):  # ellipse outlines
        center_row, center_column = rng.uniform(0, height), rng.uniform(0, width)
        radius_rows, radius_columns = rng.uniform(0.1, 0.4) * height, rng.uniform(0.1, 0.4) * width
        draw(center_row + radius_rows * np.sin(angles), center_column + radius_columns * np.cos(angles))
    return np.repeat(canvas[:, :, None], 3, axis=2)


def smooth_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A depth-map-like field (H, W, 3) float32 in [0, 1]: a linear gradient plus wide Gaussian blobs, grey."""
    rows = np.linspace(0.0, 1.0, height, dtype=np.float64)[:, None]
    columns = np.linspace(0.0, 1.0, width, dtype=np.float64)[None, :]
    angle = rng.uniform(0, 2 * np.pi)
    field = np.cos(angle) * rows + np.sin(angle) * columns
    for _ in range(int(rng.integers(2, 5))):
        center_row, center_column, spread = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.35)
        distance = (rows - center_row) ** 2 + (columns - center_column) ** 2
        field = field + rng.uniform(-1.5, 1.5) * np.exp(-distance / (2 * spread**2))
    field = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    return np.repeat(field[:, :, None], 3, axis=2).astype(np.float32)


def control_images(index: int, controlnets: int, height: int, width: int, seed: int = CALIBRATION_SEED) -> list:
    """The control images of run ``index`` (one per ControlNet, (H, W, 3) float32 in [0, 1]): edges for an even
    ``index``, smooth fields for an odd one, each from its own generator of (seed, index, ControlNet)."""
    kind = KINDS[index % len(KINDS)]
    make = edge_image if kind == "edges" else smooth_image
    return [make(height, width, np.random.default_rng([seed, index, net])) for net in range(controlnets)]
