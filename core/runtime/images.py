"""Images: every supported file becomes a fully loaded RGB image or a clear error, then the out-of-graph half of
preprocessing (resize the shorter side, centre-crop, uint8 RGB).

Every consumer (training, evaluation, the ONNX ``Predictor``, the standalone example in ``export/``) applies exactly
this rule, with Pillow, so the same image gives the same pixels everywhere. The in-graph half (cast, normalise,
channels first) is ``models.preprocess``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from core.runtime.errors import UserError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_BIT_MODES = {"I", "F"}


class ImageDecodeError(UserError, ValueError):
    """An image file could not be decoded; ``reason`` is a short human explanation."""

    def __init__(self, reason: str, path: str | os.PathLike[str] | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has a supported image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _scale_to_uint8(im: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float single-channel image to 8-bit grey without clipping."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = arr.astype(np.float64) / 257.0
    else:
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            out = arr * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            out = arr
        elif lo >= 0.0 and hi <= 65535.0:
            out = arr / 257.0
        elif hi > lo:
            out = (arr - lo) * (255.0 / (hi - lo))
        else:
            out = np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def _over_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: transparency over white, high bit depths scaled to 8-bit."""
    mode = im.mode
    if mode in _ALPHA_MODES:
        return _over_white(im)
    if mode in ("P", "L", "RGB") and "transparency" in im.info:
        return _over_white(im)
    if mode == "P" and im.palette is not None and im.palette.mode == "RGBA":
        return _over_white(im)
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in _HIGH_BIT_MODES:
        return _scale_to_uint8(im).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"unsupported colour mode {mode!r} ({exc})") from exc


def _reason_for(exc: BaseException) -> str:
    text = str(exc)
    low = text.lower()
    if "truncated" in low or isinstance(exc, EOFError) or "not enough data" in low:
        return "truncated image"
    return f"corrupt image ({type(exc).__name__}: {text})" if text else f"corrupt image ({type(exc).__name__})"


def open_rgb(source: str | os.PathLike[str] | BinaryIO) -> Image.Image:
    """Decode an image file fully and return it as RGB with EXIF orientation applied.

    Animated images give their first frame. Raises ImageDecodeError for empty, truncated,
    non-image, oversized (decompression bomb) or otherwise undecodable files.
    """
    label = source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None)
    if isinstance(source, (str, os.PathLike)):
        try:
            if os.path.getsize(source) == 0:
                raise ImageDecodeError("empty file", label)
        except OSError as exc:
            raise ImageDecodeError(f"cannot read file ({exc.strerror or exc})", label) from exc
    # Partial decodes must fail loudly, never yield grey filler.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(source) as im:
            pixels = im.size[0] * im.size[1]
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and pixels > limit:
                raise ImageDecodeError(
                    f"image too large (decompression bomb limit): {im.size[0]}x{im.size[1]} "
                    f"= {pixels} pixels exceeds {limit}",
                    label,
                )
            im.load()  # the first frame of animated images
            try:
                oriented = ImageOps.exif_transpose(im)
            except (ValueError, TypeError, KeyError, IndexError, OSError, SyntaxError, struct.error):
                # malformed EXIF must not reject an otherwise good image
                oriented = im
            rgb = to_rgb(oriented if oriented is not None else im)
            if rgb is im:
                rgb = im.copy()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large (decompression bomb limit): {exc}", label) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image (unrecognised file format)", label) from exc
    except MemoryError as exc:
        raise ImageDecodeError("image too large to decode in memory", label) from exc
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageDecodeError(_reason_for(exc), label) from exc
    if rgb.mode != "RGB":  # defensive: to_rgb always returns RGB
        rgb = rgb.convert("RGB")
    return rgb


ImageInput = Image.Image | str | os.PathLike[str] | np.ndarray


def as_rgb(image: ImageInput) -> Image.Image:
    """A PIL image, an image file or a uint8 array (grey, RGB or RGBA) as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return open_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 RGB (0-255), got dtype {image.dtype}; convert with "
                             "np.clip(x * 255, 0, 255).round().astype(np.uint8) for [0, 1] floats.")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
            return to_rgb(Image.fromarray(image))
        raise ValueError(f"image arrays must be HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA), got shape {image.shape}.")
    raise TypeError(f"expected a PIL image, a file path or a uint8 numpy array, got {type(image).__name__}.")


# ---------------------------------------------------------------- the resize + centre-crop rule

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


def check_batch(images: np.ndarray, size: int | None = None, *, what: str = "images",
                allow_empty: bool = False) -> np.ndarray:
    """Prepared images as a contiguous uint8 ``[N, S, S, 3]`` array (one ``[S, S, 3]`` image becomes N = 1);
    ``size`` pins S. Raises ValueError naming what was expected and how to prepare images."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    side = size if size is not None else (images.shape[1] if images.ndim == 4 else None)
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (side, side, 3)
            or (len(images) == 0 and not allow_empty)):
        expected = f"[N, {side}, {side}, 3]" if size is not None else "[N, S, S, 3]"
        raise ValueError(f"{what} must be a {'' if allow_empty else 'non-empty '}uint8 array {expected}, got "
                         f"{images.dtype} {images.shape}. Prepare them with core.runtime.images.to_array().")
    return np.ascontiguousarray(images)
