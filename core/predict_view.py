"""Classifying images with an exported model for a reader: the top-k of the first image, a line on the model,
provider and latency, and a table of every image."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pandas as pd
from PIL import Image

from core.runtime.errors import UserError
from core.runtime.images import ImageDecodeError, as_rgb, check_pixels, open_rgb, resize_shorter
from core.runtime.predictor import Predictor
from core.text import md

MAX_IMAGES = 64
MAX_IMAGE_PIXELS = 40_000_000  # per file, counted as decoded (a JPEG at its draft scale); a 40 MP PNG peaks ~165 MB
MAX_REQUEST_PIXELS = 1_000_000_000  # all files of one request: 64 4K screenshots (530 MP) fit; JPEGs count small
# Decoding a large PNG holds its full size for a moment (~3 bytes a pixel, twice with transparency); one such decode
# at a time in the whole process keeps the peak at one image however many requests arrive together.
LARGE_DECODE_PIXELS = 4_000_000
_LARGE_DECODE = threading.BoundedSemaphore(1)


class PredictInputError(UserError):
    """An image to classify cannot be used (unreadable, too large, too many); the message says what to do."""


def load_images(files: list[tuple[str, Any]], predictor: Predictor) -> list[tuple[str, Image.Image]]:
    """``(name, image)`` for ``(name, path or image)`` pairs, memory bounded by design: every file's size is read
    from its header first (``MAX_IMAGE_PIXELS`` each, ``MAX_REQUEST_PIXELS`` together), it is reduced while it is
    decoded (JPEG draft mode, ``Image.reduce``) and at once resized to the model's resize size, so the process holds
    one large decode at a time and ~350 KB per image after it. Raises ``PredictInputError``."""
    if len(files) > MAX_IMAGES:
        raise PredictInputError(f"At most {MAX_IMAGES} images per request, got {len(files)}.",
                                title="Too many images")
    side, interpolation = predictor.info.resize_size, predictor.info.interpolation
    total, images = 0, []
    for name, source in files:
        try:
            if isinstance(source, Image.Image):  # an API caller's decoded image: already in memory
                image = as_rgb(source)
            else:
                pixels = check_pixels(source, MAX_IMAGE_PIXELS, reduce_to=2 * side)
                total += pixels
                if total > MAX_REQUEST_PIXELS:
                    raise PredictInputError(f"These images hold more than {MAX_REQUEST_PIXELS // 10**6} megapixels "
                                            "together; send fewer or smaller ones.", title="Too many pixels")
                large = pixels > LARGE_DECODE_PIXELS
                with _LARGE_DECODE if large else contextlib.nullcontext():
                    image = open_rgb(source, reduce_to=2 * side, max_pixels=MAX_IMAGE_PIXELS)
        except ImageDecodeError as exc:
            raise PredictInputError(f"{name} is not a readable image ({exc.reason}).",
                                    title="Cannot read the image") from None
        images.append((name, resize_shorter(image, side, interpolation)))
    return images


def classify(predictor: Predictor, inputs: list[tuple[str, Image.Image]], model_name: str,
             top_k: int = 5) -> tuple[dict[str, float], str, pd.DataFrame]:
    """``({label: probability} of the first image, info Markdown, one row per image)`` for ``(name, image)`` pairs."""
    t0 = time.perf_counter()
    results = predictor.predict([image for _, image in inputs], top_k=min(top_k, len(predictor.classes)))
    ms = (time.perf_counter() - t0) * 1000
    first = results[0]
    label = {r["label"]: float(r["probability"]) for r in first["top_k"]}
    info = (f"Model **{md(model_name)}** · provider **{first.get('provider', predictor.provider)}** · "
            f"{len(inputs)} image(s) in **{ms:.1f} ms** ({ms / len(inputs):.1f} ms per image, "
            f"preprocessing included)")
    warning = getattr(predictor, "fallback_warning", None)
    if warning:
        info += f"\n\n⚠️ {md(warning)}"
    table = pd.DataFrame([{"image": name, "prediction": r["label"], "probability": round(r["probability"], 4),
                           "top-k": ", ".join(f"{t['label']} {t['probability']:.0%}" for t in r["top_k"])}
                          for (name, _), r in zip(inputs, results)],
                         columns=["image", "prediction", "probability", "top-k"])
    return label, info, table


def model_description(name: str, info: dict[str, Any]) -> str:
    """One line on an uploaded model (``check_model_file``'s info)."""
    classes = info["classes"]
    return (f"Uploaded **{md(name)}**: {len(classes)} classes ({md(', '.join(classes[:10]))}"
            f"{', …' if len(classes) > 10 else ''}), backbone {md(info.get('backbone') or '?')}, input "
            f"{info.get('image_size')} px, variant {md(info.get('variant'))}.")
