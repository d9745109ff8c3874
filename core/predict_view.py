"""Classifying images with an exported model for a reader: the top-k of the first image, a line on the model,
provider and latency, and a table of every image."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from core.runtime.devices import where_it_runs
from core.runtime.errors import UserError
from core.runtime.images import (
    ImageDecodeError,
    as_rgb,
    check_pixels,
    heatmap_overlay,
    open_rgb,
    resize_shorter,
)
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


def load_images(files: list[tuple[str, Any]], predictor: Predictor, *,
                max_image_pixels: int = MAX_IMAGE_PIXELS) -> list[tuple[str, Image.Image]]:
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
                pixels = check_pixels(source, max_image_pixels, reduce_to=2 * side)
                total += pixels
                if total > MAX_REQUEST_PIXELS:
                    raise PredictInputError(f"These images hold more than {MAX_REQUEST_PIXELS // 10**6} megapixels "
                                            "together; send fewer or smaller ones.", title="Too many pixels")
                large = pixels > LARGE_DECODE_PIXELS
                with _LARGE_DECODE if large else contextlib.nullcontext():
                    image = open_rgb(source, reduce_to=2 * side, max_pixels=max_image_pixels)
        except ImageDecodeError as exc:
            raise PredictInputError(f"{name} cannot be read as an image: {exc.reason}.",
                                    title="Cannot read the image") from None
        images.append((name, resize_shorter(image, side, interpolation)))
    return images


UNFAMILIAR = ("⚠️ **This image looks unlike anything the model was trained on**, so its answer is a guess: the "
              "model always picks one of its classes, even for a picture of something else.")


def _ranked(row: np.ndarray, classes: tuple[str, ...], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-row, kind="stable")[:k]
    return [{"label": classes[i], "probability": float(row[i])} for i in order]


def classify(predictor: Predictor, inputs: list[tuple[str, Image.Image]], model_name: str,
             top_k: int = 5) -> tuple[dict[str, float], str, pd.DataFrame, np.ndarray | None]:
    """``({label: probability} of the first image, info Markdown, one row per image, where the model looked in the
    first image)`` for ``(name, image)`` pairs. The last is None unless the model has the explain outputs
    (``Predictor.explains``); with them the info and the table also say which images fit no class."""
    t0 = time.perf_counter()
    k = min(top_k, len(predictor.classes))
    prepared = np.stack([predictor.prepare(image) for _, image in inputs])
    explained = first_map = None
    if predictor.explains:  # the map of the first image only: it is the one shown
        explained = predictor.explain_arrays(prepared[:1])
        first_map = explained.pop("cam")[0]
        if len(prepared) > 1:
            rest = predictor.explain_arrays(prepared[1:], maps=False)
            explained = {key: np.concatenate([explained[key], rest[key]]) for key in rest}
    probs = explained["probabilities"] if explained else predictor.predict_arrays(prepared)
    ms = (time.perf_counter() - t0) * 1000
    ranked = [_ranked(row, predictor.classes, k) for row in probs]
    label = {r["label"]: r["probability"] for r in ranked[0]}
    info = (f"Model **{md(model_name)}** · ran on **{md(where_it_runs(predictor.provider))}** "
            f"(onnxruntime's {md(predictor.provider)}) · "
            f"{len(inputs)} image(s) in **{ms:.1f} ms** ({ms / len(inputs):.1f} ms per image, "
            f"preprocessing included)")
    looked = None
    if explained:
        top = int(probs[0].argmax())
        looked = heatmap_overlay(prepared[0], first_map[top])
        info = (f"Bright areas of the picture below (the centre square the model sees) pushed it most towards "
                f"**{md(predictor.classes[top])}**.\n\n{info}")
        if explained["fits_no_class"][0]:
            info = f"{UNFAMILIAR}\n\n{info}"
        others = int(explained["fits_no_class"][1:].sum())
        if others:
            info = (f"⚠️ {others} of the other {len(inputs) - 1} image(s) look unlike anything the model was trained "
                    f"on: see **fits a class?** in the table.\n\n{info}")
    warning = getattr(predictor, "fallback_warning", None)
    if warning:
        info += f"\n\n⚠️ {md(warning)}"
    columns = ["image", "prediction", *(["fits a class?"] if explained else []), "probability", "top-k"]
    rows = []
    for i, ((name, _), top_list) in enumerate(zip(inputs, ranked)):
        row = {"image": name, "prediction": top_list[0]["label"], "probability": round(top_list[0]["probability"], 4),
               "top-k": ", ".join(f"{t['label']} {t['probability']:.0%}" for t in top_list)}
        if explained:
            row["fits a class?"] = "⚠️ no" if explained["fits_no_class"][i] else "yes"
        rows.append(row)
    return label, info, pd.DataFrame(rows, columns=columns), looked


def model_description(name: str, info: dict[str, Any]) -> str:
    """One line on an uploaded model (``check_model_file``'s info)."""
    classes = info["classes"]
    return (f"Uploaded **{md(name)}**: {len(classes)} classes ({md(', '.join(classes[:10]))}"
            f"{', …' if len(classes) > 10 else ''}), backbone {md(info.get('backbone') or '?')}, input "
            f"{info.get('image_size')} px, variant {md(info.get('variant'))}.")
