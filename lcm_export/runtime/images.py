"""Input images for image-to-image: a PIL image, an (H, W, 3) array in [0, 1] (float) or 0-255 (uint8), or a path.

An image whose size the bundle's VAE and U-Net cannot take is refused with the sizes that would work, never
resized silently: a resize changes what the user gets, so it is theirs to choose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lcm_export.errors import UserError


def load_image(image: Any, multiple: int) -> np.ndarray:
    """``image`` as float32 (H, W, 3) in [0, 1], H and W multiples of ``multiple``."""
    if isinstance(image, (str, Path)):
        from PIL import Image, UnidentifiedImageError

        path = Path(image)
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
                image.load()
        except FileNotFoundError:
            raise UserError(f"image '{path}' does not exist: pass an image file (PNG, JPEG, ...)") from None
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"image '{path}' is not an image Pillow can read ({type(error).__name__})") from None
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    else:
        array = np.asarray(image)
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        array = array.astype(np.float32, copy=False)
    if array.ndim != 3 or array.shape[2] != 3:
        raise UserError(f"image has shape {list(array.shape)}: pass (H, W, 3) RGB")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise UserError("image values must be in [0, 1] (floats) or 0-255 (uint8)")
    height, width = array.shape[:2]
    if height % multiple or width % multiple or not height or not width:
        fit = (max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple))
        raise UserError(
            f"image is {width}x{height}, which this bundle's VAE and U-Net cannot take: resize or crop it to a "
            f"multiple of {multiple} (e.g. {fit[1]}x{fit[0]})"
        )
    return np.ascontiguousarray(array)
