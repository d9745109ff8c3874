"""How many labelled images does each arm need? Validation accuracy against training images per class (1, 2, 5,
10, 25, 50, all), both arms scored on the same validation images: the classic transfer-learning figure.

Each point trains on a seeded draw of that many training images per class (the small sizes, up to ``SMALL_SIZE``,
are drawn ``draws`` times, since one draw of 2 images can be lucky). Decoded images and backbone features are
computed once for the whole curve, so every pretrained point costs a head fit. Scratch points train the whole
network; they run from the smallest size up until ``scratch_budget`` seconds are spent, and the rest are listed as
skipped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from . import stats
from .config import TrainConfig
from .data import Dataset, DatasetError
from .train import ARMS, Callbacks, _compare_once

SIZES = (1, 2, 5, 10, 25, 50)  # per class; "all" (every training image) is always added
SMALL_SIZE = 10  # sizes up to this are drawn several times
DEFAULT_DRAWS = 3
DEFAULT_SCRATCH_BUDGET = 300.0  # seconds for all scratch points together


def subsample(dataset: Dataset, per_class: int | None, seed: int) -> Dataset:
    """The dataset with at most ``per_class`` training images of each class (a seeded draw; None: all of them);
    validation and test images are unchanged, so every point is scored on the same images."""
    if per_class is None:
        return dataset
    rng = np.random.default_rng([seed, per_class, 0xEFF])
    train = [it for it in dataset.items if it.split == "train"]
    kept = []
    for label in range(len(dataset.classes)):
        mine = [it for it in train if it.label == label]
        picks = rng.choice(len(mine), size=min(per_class, len(mine)), replace=False)
        kept += [mine[i] for i in sorted(picks)]
    return dataclasses.replace(dataset, items=kept + [it for it in dataset.items if it.split != "train"])


def efficiency_curve(dataset: Dataset, cfg: TrainConfig | None = None, *, sizes: Sequence[int] = SIZES,
                     draws: int = DEFAULT_DRAWS, scratch_budget: float | None = DEFAULT_SCRATCH_BUDGET,
                     callbacks: Callbacks | None = None, arms: Sequence[str] | None = None) -> dict:
    """One point per arm and size: mean validation accuracy over its draws, a Wilson 95% interval on the draws'
    pooled answers, every draw's accuracy, and the training images used. Returns a JSON-ready dict."""
    cfg = (cfg or TrainConfig()).validated()
    callbacks = callbacks or Callbacks()
    arms = tuple(arms or (ARMS if cfg.train_scratch else ("pretrained",)))
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}.")
    if any(int(n) < 1 for n in sizes):
        raise DatasetError(f"training images per class must be at least 1, got {list(sizes)}.")
    per_class = dataset.counts()["train"]
    fewest = min(per_class.values())
    points_at: list[int | None] = sorted({int(n) for n in sizes if int(n) < fewest}) + [None]
    memo: dict = {}
    points, skipped = [], []
    scratch_spent = 0.0
    for arm in arms:
        for n in points_at:
            label = f"{'all' if n is None else n} per class"
            repeats = draws if n is not None and n <= SMALL_SIZE else 1
            if arm == "scratch" and scratch_budget is not None and scratch_spent >= scratch_budget:
                skipped.append({"arm": arm, "per_class": label,
                                "reason": f"the scratch budget of {scratch_budget:g} s was spent"})
                continue
            accuracies, correct, scored, images = [], 0, 0, 0
            for d in range(repeats):
                seed = cfg.seed + d
                subset = subsample(dataset, n, seed)
                start = time.perf_counter()
                result = _compare_once(subset, dataclasses.replace(cfg, seed=seed, repeats=1), callbacks, (arm,),
                                       memo, label=f"{arm}, {label}, draw {d + 1}/{repeats}: ", build_models=False,
                                       dataset_checks=False)
                if arm == "scratch":
                    scratch_spent += time.perf_counter() - start
                probabilities = result.runs[arm].val_probabilities
                hits = int((probabilities.argmax(1) == result.val.labels).sum())
                accuracies.append(hits / len(result.val.labels))
                correct, scored = correct + hits, scored + len(result.val.labels)
                images = len(result.train.labels)
            average = images / len(dataset.classes)  # "all": the mean count per class, for the x axis
            points.append({"arm": arm, "per_class": label, "per_class_n": n if n is not None else round(average, 1),
                           "train_images": images, "val_accuracy": float(np.mean(accuracies)),
                           "ci": list(stats.wilson_interval(correct, scored)), "draws": accuracies})
    return {"points": points, "skipped": skipped, "val_images": int(sum(dataset.counts()["val"].values())),
            "train_images_per_class": per_class, "draws": draws, "scratch_budget_seconds": scratch_budget,
            "scratch_seconds": scratch_spent, "seed": cfg.seed, "target_accuracy": cfg.target_accuracy,
            "interval": "Wilson 95% on the draws' pooled validation answers"}


def efficiency_table(curve: dict) -> list[tuple[str, ...]]:
    """``[(per class, images, pretrained, scratch)]`` rows of percentages with their intervals, header first."""
    arms = list(dict.fromkeys(p["arm"] for p in curve["points"]))
    sizes = list(dict.fromkeys(p["per_class"] for p in curve["points"]))
    cell = {(p["arm"], p["per_class"]): p for p in curve["points"]}
    rows = [("per class", "training images", *arms)]
    for size in sizes:
        first = next(cell[(a, size)] for a in arms if (a, size) in cell)
        values = []
        for arm in arms:
            p = cell.get((arm, size))
            if p is None:
                values.append("skipped")
                continue
            lo, hi = p["ci"]
            spread = f", {len(p['draws'])} draws" if len(p["draws"]) > 1 else ""
            values.append(f"{p['val_accuracy']:.1%} ({lo * 100:.1f}–{hi * 100:.1f}{spread})")
        rows.append((size.removesuffix(" per class"), str(first["train_images"]), *values))
    return rows


def efficiency_frame(curve: dict) -> pd.DataFrame:
    """``efficiency_table`` as a DataFrame (the app's table)."""
    rows = efficiency_table(curve)
    return pd.DataFrame(rows[1:], columns=list(rows[0]))


def efficiency_text(curve: dict) -> str:
    """What the curve shows, in plain words (no visitor text: numbers and this module's words only)."""
    pre = [p for p in curve["points"] if p["arm"] == "pretrained"]
    target = curve.get("target_accuracy")
    lines = [f"Each point is the accuracy on the same {curve['val_images']} validation images after training on that "
             "many labelled images per class (sizes up to 10 are drawn several times; the bars are 95% intervals)."]
    if pre and target:
        first = next((p for p in pre if p["val_accuracy"] >= target), None)
        lines.append(f"The pretrained arm first reached the {target:.0%} target with **{first['per_class']}**."
                     if first else f"The pretrained arm did not reach the {target:.0%} target at any size.")
    if curve["skipped"]:
        sizes = ", ".join(s["per_class"] for s in curve["skipped"])
        lines.append(f"Skipped to stay within the scratch budget of {curve['scratch_budget_seconds']:g} s: "
                     f"scratch at {sizes}.")
    return "\n\n".join(lines)
