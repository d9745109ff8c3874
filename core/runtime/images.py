"""Images: every supported file becomes a fully loaded RGB image or a clear error, then the out-of-graph half of
preprocessing (resize the shorter side, centre-crop, uint8 RGB).

Every consumer (training, evaluation, the ONNX ``Predictor``, the standalone example in ``export/``) applies exactly
this rule, with Pillow, so the same image gives the same pixels everywhere. The in-graph half (cast, normalise,
channels first) is ``models.preprocess``.

Uploads are hostile: ``check_pixels`` and ``open_rgb(max_pixels=...)`` refuse an image from its header, before any
pixel is decoded, and ``open_rgb(reduce_to=...)`` shrinks while decoding (JPEG at 1/2 to 1/8 scale inside libjpeg,
other formats right after the load), so full-size pixels live only for the moment of the load (one copy, two for
images with transparency).
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from core.runtime.errors import UserError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_BIT_MODES = {"I", "F"}
# The Pillow formats of IMAGE_EXTENSIONS ("JPEG" also opens phones' multi-picture MPO files). Naming them keeps an
# upload from reaching Pillow's other decoders whatever its file name says (EPS, for one, runs Ghostscript).
_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
# Modes whose pixels can be box-averaged before the conversion to RGB (alpha is premultiplied by Image.reduce).
_REDUCE_FIRST = {"RGB", "RGBA", "L", "LA"}
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ERRORS = (ValueError, TypeError, KeyError, IndexError, OSError, SyntaxError, struct.error)


class ImageDecodeError(UserError, ValueError):
    """An image file could not be decoded; ``reason`` is a short human explanation."""

    def __init__(self, reason: str, path: str | os.PathLike[str] | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has a supported image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _scale_to_uint8(im: Image.Image, *, sixteen_bit: bool | None = None,
                    extrema: tuple[float, float] | None = None) -> Image.Image:
    """Map a 16/32-bit integer or float single-channel image to 8-bit grey without clipping.

    ``sixteen_bit`` and ``extrema`` (the full image's range) let a reduced copy follow the full image's rule."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16") if sixteen_bit is None else sixteen_bit:
        out = arr.astype(np.float64) / 257.0
    else:
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if extrema is not None:
            lo, hi = extrema
        else:
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


def _megapixels(pixels: int) -> str:
    if pixels < 100_000:
        return f"{pixels} pixels"
    return f"{pixels / 1e6:.1f}".removesuffix(".0") + " MP"


def _label(source: str | os.PathLike[str] | BinaryIO) -> str | os.PathLike[str] | None:
    return source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None)


def _limit_reason(pixels: str, max_pixels: int) -> str:
    return f"image too large: {pixels}; the limit here is {_megapixels(max_pixels)}; resize it and upload again"


@contextmanager
def _decoding(source: str | os.PathLike[str] | BinaryIO, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """``Image.open(source)`` restricted to the supported formats, every failure as ImageDecodeError."""
    label = _label(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            if os.path.getsize(source) == 0:
                raise ImageDecodeError("empty file", label)
        except OSError as exc:
            raise ImageDecodeError(f"cannot read file ({exc.strerror or exc})", label) from exc
    elif source.seekable():  # a file object: the same answer for an empty one as for an empty file
        position = source.tell()
        empty = not source.read(1)
        source.seek(position)
        if empty:
            raise ImageDecodeError("empty file", label)
    # Partial decodes must fail loudly, never yield grey filler.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(source, formats=_FORMATS) as im:
            yield im
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:  # Image.open refuses over twice Image.MAX_IMAGE_PIXELS
        size = re.search(r"\((\d+) pixels\)", str(exc))
        if max_pixels is not None and size:
            limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
            raise ImageDecodeError(_limit_reason(_megapixels(int(size[1])), limit), label) from exc
        raise ImageDecodeError(f"image too large (decompression bomb limit): {exc}", label) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image (unrecognised file format)", label) from exc
    except MemoryError as exc:
        raise ImageDecodeError("image too large to decode in memory", label) from exc
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageDecodeError(_reason_for(exc), label) from exc


def _check_arguments(reduce_to: int | None, max_pixels: int | None) -> None:
    for name, value in (("reduce_to", reduce_to), ("max_pixels", max_pixels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}; e.g. {name}=256")


def _plan(im: Image.Image, label: str | os.PathLike[str] | None, reduce_to: int | None,
          max_pixels: int | None) -> tuple[float, float]:
    """Check an opened (not yet decoded) image's size and set up a JPEG's reduced decode.

    Returns the whole picture's extent in the pixels that will be decoded: ``im.size``, or for a JPEG decoded at
    1/s scale ``(w / s, h / s)``, a little less than ``im.size`` when s does not divide the sides."""
    w, h = im.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        if max_pixels is not None:
            raise ImageDecodeError(_limit_reason(f"{w}x{h} = {_megapixels(w * h)}", min(max_pixels, limit)), label)
        raise ImageDecodeError(
            f"image too large (decompression bomb limit): {w}x{h} = {w * h} pixels exceeds {limit}", label)
    extent: tuple[float, float] = (w, h)
    if reduce_to is not None and min(w, h) >= 2 * reduce_to:
        # JPEG: libjpeg decodes at 1/2, 1/4 or 1/8 scale, keeping the shorter side >= reduce_to; others: None
        drafted = im.draft("RGB", (reduce_to, reduce_to))
        if drafted is not None:
            extent = drafted[1][2:]
    dw, dh = im.size
    if max_pixels is not None and dw * dh > max_pixels:
        scaled = f", {dw}x{dh} = {_megapixels(dw * dh)} when decoded at reduced scale" if (dw, dh) != (w, h) else ""
        raise ImageDecodeError(_limit_reason(f"{w}x{h} = {_megapixels(w * h)}{scaled}", max_pixels), label)
    return extent


def check_pixels(source: str | os.PathLike[str] | BinaryIO, max_pixels: int | None = None, *,
                 reduce_to: int | None = None) -> int:
    """The number of pixels ``open_rgb(source, reduce_to=reduce_to)`` will decode, read from the header only.

    Raises ImageDecodeError when that is over ``max_pixels`` (or the file is not a supported image). A JPEG with
    ``reduce_to`` counts at the scale libjpeg decodes it (a 200 MP photo read at 1/8 scale is about 3 MP); other
    formats always decode at full size. A file object is left at the position it had.
    """
    _check_arguments(reduce_to, max_pixels)
    position = None if isinstance(source, (str, os.PathLike)) else source.tell()
    try:
        with _decoding(source, max_pixels) as im:
            _plan(im, _label(source), reduce_to, max_pixels)
            return im.size[0] * im.size[1]
    finally:
        if position is not None:
            source.seek(position)


def _orientation(im: Image.Image) -> Image.Transpose | None:
    """The transpose the EXIF (or XMP) orientation asks for; None when there is none or the EXIF is malformed."""
    try:
        return _TRANSPOSE.get(im.getexif().get(ExifTags.Base.Orientation, 1))
    except _EXIF_ERRORS:
        return None


def _shrink(im: Image.Image, reduce_to: int, extent: tuple[float, float]) -> Image.Image:
    """A loaded ``im`` as RGB, reduced by the largest integer factor k that keeps its shorter side >= ``reduce_to``,
    EXIF orientation applied; ``im`` is closed (its pixels freed) as soon as the smaller copy exists.

    ``extent`` is the picture's true size in ``im``'s pixels (see ``_plan``). Reductions round sizes up, so a last
    partial row or column would stretch the picture; one resample to ``extent / k`` keeps the geometry exact."""
    method = _orientation(im)
    factor = max(1, int(min(extent) // reduce_to))
    if factor < 2:
        out = to_rgb(im)
        out = out.copy() if out is im else out
    elif im.mode.startswith("I;16"):
        wide = im.convert("I")
        im.close()
        out = _scale_to_uint8(wide.reduce(factor), sixteen_bit=True).convert("RGB")
    elif im.mode in _REDUCE_FIRST and "transparency" not in im.info:
        small = im.reduce(factor)
        im.close()
        out = to_rgb(small)
    elif im.mode in _HIGH_BIT_MODES and all(math.isfinite(v) for v in im.getextrema()):
        extrema = tuple(float(v) for v in im.getextrema())
        small = im.reduce(factor)
        im.close()
        out = _scale_to_uint8(small, extrema=extrema).convert("RGB")
    elif im.mode in ("P", "PA") or "transparency" in im.info:  # to_rgb would composite at full size: reduce RGBA
        rgba = im.convert("RGBA")
        im.close()
        out = to_rgb(rgba.reduce(factor))
        rgba.close()
    else:  # bilevel, CMYK, NaN floats ...: convert at full size, then reduce
        rgb = to_rgb(im)
        if rgb is not im:
            im.close()
        out = rgb.reduce(factor)
        rgb.close()
    im.close()
    ew, eh = extent[0] / factor, extent[1] / factor
    if out.size != (ew, eh):
        out = out.resize((round(ew), round(eh)), Image.Resampling.BILINEAR, box=(0, 0, ew, eh))
    if method is not None:
        out = out.transpose(method)
    out.info = {}  # the orientation is applied: no metadata may ask for it again
    return out


def open_rgb(source: str | os.PathLike[str] | BinaryIO, *, reduce_to: int | None = None,
             max_pixels: int | None = None) -> Image.Image:
    """Decode an image file and return it as RGB with EXIF orientation applied.

    Animated images give their first frame. Raises ImageDecodeError for empty, truncated, non-image, oversized
    (decompression bomb, or more than ``max_pixels`` to decode, see ``check_pixels``: refused from the header,
    before decoding) or otherwise undecodable files.

    ``reduce_to``: shrink by the largest integer factor that keeps the shorter side at least ``reduce_to``, while
    decoding (JPEG at 1/2, 1/4 or 1/8 scale) and then with ``Image.reduce``; the full-size pixels are freed before
    this returns, and the reduced image carries no metadata. The shorter side ends in ``[reduce_to, 2 * reduce_to]``
    (an image already below ``2 * reduce_to`` keeps its size) and the picture's geometry is exact, so a later resize
    to ``reduce_to`` or less sees the same picture up to resampling noise: with ``reduce_to`` twice the final size
    (e.g. ``2 * resize_size``), ``to_array`` differs from a full decode by under one grey level on average (when
    the reduced sides round the aspect ratio so that ``resize_shorter``'s longer side differs by one pixel, the crop
    moves by half a pixel too).
    Without ``reduce_to`` the image is decoded at full size, as before.
    """
    _check_arguments(reduce_to, max_pixels)
    label = _label(source)
    with _decoding(source, max_pixels) as im:
        extent = _plan(im, label, reduce_to, max_pixels)
        im.load()  # the first frame of animated images
        if reduce_to is not None:
            return _shrink(im, reduce_to, extent)
        try:
            oriented = ImageOps.exif_transpose(im)
        except _EXIF_ERRORS:
            # malformed EXIF must not reject an otherwise good image
            oriented = im
        rgb = to_rgb(oriented if oriented is not None else im)
        if rgb is im:
            rgb = im.copy()
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


__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageInput",
    "as_rgb",
    "center_crop",
    "check_batch",
    "check_pixels",
    "is_image_file",
    "open_rgb",
    "resize_and_crop",
    "resize_shorter",
    "to_array",
    "to_rgb",
]


# A perceptually ordered colour scale (matplotlib's "inferno" at 8 stops): dark = adds little, bright = adds most.
_HEAT_STOPS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                        [250, 193, 39], [252, 255, 164]], dtype=np.float32)


def heatmap_overlay(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.55) -> np.ndarray:
    """A class activation map (``cam`` ``[h, w]``, one class of the model's ``cam`` output) laid over the image the
    model saw (uint8 ``[S, S, 3]``): the map is stretched to [0, 1] (lowest to highest value), resized to ``S`` with
    bilinear interpolation, coloured from dark (adds least to the class) to bright yellow (adds most) and blended
    with ``alpha``. Returns uint8 ``[S, S, 3]``."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}.")
    cam = np.asarray(cam, dtype=np.float64)  # float64: the range of float32 extremes (3e38 - -3e38) stays finite
    if cam.ndim != 2:
        raise ValueError(f"cam must be one class's map [h, w], got shape {list(cam.shape)}.")
    finite = np.isfinite(cam)
    if not finite.any():
        cam = np.zeros_like(cam)
    else:  # an uploaded model's map may hold inf or NaN: they count as its highest / lowest finite value
        low, high = float(cam[finite].min()), float(cam[finite].max())
        cam = np.nan_to_num(cam, nan=low, posinf=high, neginf=low)
    low, span = float(cam.min()), float(cam.max() - cam.min())
    unit = ((cam - low) / span if span > 0 else np.zeros_like(cam)).astype(np.float32)
    size = (image.shape[1], image.shape[0])
    heat = np.asarray(Image.fromarray(unit).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    position = np.clip(heat, 0.0, 1.0) * (len(_HEAT_STOPS) - 1)
    lower = np.minimum(position.astype(np.int64), len(_HEAT_STOPS) - 2)
    frac = (position - lower)[..., None]
    colour = _HEAT_STOPS[lower] * (1 - frac) + _HEAT_STOPS[lower + 1] * frac
    blended = image.astype(np.float32) * (1 - alpha) + colour * alpha
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not Linux/glibc: pages are left to the OS
    _madvise = None


def slices(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """``images`` ``size`` rows at a time; each slice's pages are handed back (``release``) once the caller asks for
    the next, so going through a memory-mapped file of any size keeps one slice resident."""
    for start in range(0, len(images), size):
        part = images[start:start + size]
        yield part
        release(part)


def release(array: np.ndarray) -> None:
    """Hand the pages of a slice of a memory-mapped file back to the OS (they are read again if used again), so
    going through a large file keeps one slice resident, not the whole file. Nothing for other arrays."""
    if _madvise is None or not isinstance(array, np.memmap) or array.size == 0:
        return
    low, high = np.lib.array_utils.byte_bounds(array)
    start = low - low % _PAGE  # whole pages only: the ones partly outside the slice are dropped too (read back)
    _madvise(start, high - start, _MADV_DONTNEED)
