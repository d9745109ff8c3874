"""Classifying images with an exported model for a reader: the top-k of the first image, a line on the model,
provider and latency, and a table of every image."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
from PIL import Image

from core.runtime.predictor import Predictor
from core.summary import md


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
