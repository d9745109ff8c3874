"""The out-of-graph half of preprocessing: resize the shorter side, centre-crop, hand over uint8 RGB.

Every consumer (training, evaluation, the ONNX ``Predictor``, the standalone example in the README)
applies exactly this rule, with Pillow, so the same image gives the same pixels everywhere.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize_shorter(image: Image.Image, resize_size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize so the shorter side is ``resize_size``, keeping the aspect ratio."""
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
    w, h = image.size
    scale = resize_size / min(w, h)
    size = (max(resize_size, round(w * scale)), max(resize_size, round(h * scale)))
    return image.convert("RGB").resize(size, _RESAMPLE[interpolation])


def center_crop(array: np.ndarray, image_size: int) -> np.ndarray:
    """Centre ``image_size`` square of an ``[H, W, 3]`` array (H, W >= image_size)."""
    h, w = array.shape[:2]
    top, left = (h - image_size) // 2, (w - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def to_array(image: Image.Image, image_size: int, resize_size: int, interpolation: str = "bilinear") -> np.ndarray:
    """The full rule as a ``[image_size, image_size, 3]`` uint8 array."""
    resized = np.asarray(resize_shorter(image, resize_size, interpolation), dtype=np.uint8)
    return np.ascontiguousarray(center_crop(resized, image_size))


def resize_and_crop(image: Image.Image, image_size: int, resize_size: int,
                    interpolation: str = "bilinear") -> Image.Image:
    """The full rule as a Pillow image."""
    return Image.fromarray(to_array(image, image_size, resize_size, interpolation))
