"""Warnings for the classic metric pitfalls. Each returns ``{"flagged": bool, ...evidence, "message": str}``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Thresholds:
    # Smallest/largest class below this ratio is "imbalanced" before training (a 2:1 split already skews accuracy).
    imbalance_ratio: float = 0.5
    # After training: accuracy this much above balanced accuracy means the majority class carries the score.
    accuracy_minus_balanced: float = 0.10
    # Any class recalled less often than this while overall accuracy looks fine.
    min_class_recall: float = 0.5
    # Beating the majority-class baseline by less than this is "barely better than always guessing".
    baseline_margin: float = 0.05
    # Cosine similarity of pretrained features at or above which two images count as near-duplicates.
    # Re-encodes, resizes and light crops of one photo land above 0.95 with EfficientNet-Lite0 features;
    # distinct photos of the same class rarely pass 0.9.
    near_duplicate_cosine: float = 0.95
    # Train accuracy above validation accuracy by more than this is a generalisation gap.
    overfit_gap: float = 0.15
    # Validation loss this far above its best at the end (relative and absolute, so that the noise of a small
    # validation set is not read as a trend), at least 2 epochs later, while train loss kept falling.
    val_loss_rise: float = 0.20
    val_loss_rise_abs: float = 0.05
    # ...and it only counts when validation accuracy also fell this far below its best: a head that grows more
    # confident on a validation set it already gets right raises the loss without generalising any worse.
    val_accuracy_drop: float = 0.02
    max_pairs: int = 50  # pairs listed as evidence (all are counted)


DEFAULT = Thresholds()


def class_balance(counts: dict[str, int], t: Thresholds = DEFAULT) -> dict:
    """Before training: is the training set skewed enough that plain accuracy will mislead?"""
    n = sum(counts.values())
    majority = max(counts, key=counts.get)
    ratio = min(counts.values()) / max(max(counts.values()), 1)
    flagged = ratio < t.imbalance_ratio
    message = (
        f"Classes are imbalanced (smallest/largest = {ratio:.2f}; '{majority}' is {counts[majority] / n:.0%} of the "
        f"images). Always predicting '{majority}' would already score {counts[majority] / n:.0%} accuracy: judge the "
        f"model by balanced accuracy and per-class recall, not accuracy."
        if flagged
        else f"Classes are reasonably balanced (smallest/largest = {ratio:.2f})."
    )
    return {"flagged": flagged, "counts": counts, "ratio_smallest_to_largest": ratio, "majority_class": majority,
            "message": message}


def imbalance(train_counts: dict[str, int], y_true, metrics: dict, classes: list[str], t: Thresholds = DEFAULT) -> dict:
    """After training: the accuracy paradox, judged on the validation results."""
    before = class_balance(train_counts, t)
    majority = classes.index(before["majority_class"])
    y_true = np.asarray(y_true)
    baseline = float(np.mean(y_true == majority)) if len(y_true) else 0.0
    acc, bal = metrics["val_accuracy"], metrics["balanced_accuracy"]
    recalls = {c: v["recall"] for c, v in metrics["per_class"].items() if v["support"] > 0}
    worst = min(recalls, key=recalls.get) if recalls else None
    reasons = []
    if acc - bal > t.accuracy_minus_balanced:
        reasons.append(f"accuracy {acc:.1%} is well above balanced accuracy {bal:.1%}")
    if worst is not None and recalls[worst] < t.min_class_recall:
        reasons.append(f"class '{worst}' is recognised only {recalls[worst]:.0%} of the time")
    if acc - baseline < t.baseline_margin:
        reasons.append(f"accuracy {acc:.1%} barely beats always answering '{classes[majority]}' ({baseline:.1%})")
    flagged = bool(reasons)
    message = (
        "Accuracy paradox: " + "; ".join(reasons) + ". Look at balanced accuracy and per-class recall; collect more "
        "images of the rare classes or weight them."
        if flagged
        else f"No accuracy paradox: balanced accuracy {bal:.1%} vs accuracy {acc:.1%}, "
        f"majority baseline {baseline:.1%}."
    )
    return {**before, "flagged": flagged, "majority_baseline_accuracy": baseline, "accuracy": acc,
            "balanced_accuracy": bal, "class_recall": recalls, "message": message}


def leakage(
    train_files: list[str],
    train_hashes: list[str],
    other_files: list[str],
    other_hashes: list[str],
    train_features: np.ndarray | None = None,
    other_features: np.ndarray | None = None,
    t: Thresholds = DEFAULT,
) -> dict:
    """Images that appear in training and in validation/test: exact (SHA-256) and near (feature cosine)."""
    by_hash: dict[str, list[str]] = {}
    for f, h in zip(train_files, train_hashes):
        by_hash.setdefault(h, []).append(f)
    exact = [{"train": tf, "other": of} for of, h in zip(other_files, other_hashes) for tf in by_hash.get(h, [])]
    exact_set = {(p["train"], p["other"]) for p in exact}

    near: list[dict] = []
    if train_features is not None and other_features is not None and len(train_features) and len(other_features):
        a = train_features / np.maximum(np.linalg.norm(train_features, axis=1, keepdims=True), 1e-12)
        b = other_features / np.maximum(np.linalg.norm(other_features, axis=1, keepdims=True), 1e-12)
        sim = b @ a.T  # [other, train]
        for oi, ti in zip(*np.nonzero(sim >= t.near_duplicate_cosine)):
            pair = (train_files[ti], other_files[oi])
            if pair not in exact_set:
                near.append({"train": pair[0], "other": pair[1], "cosine": round(float(sim[oi, ti]), 4)})
        near.sort(key=lambda p: -p["cosine"])

    n_other = len(set(p["other"] for p in exact + near))
    flagged = n_other > 0
    message = (
        f"Train/validation leakage: {len(exact)} exact and {len(near)} near-duplicate pairs; {n_other} evaluation "
        f"images also appear in training, which inflates validation scores. Remove the duplicates and re-run."
        if flagged
        else "No duplicates found between training and evaluation images."
    )
    return {"flagged": flagged, "exact_duplicates": exact[: t.max_pairs], "near_duplicates": near[: t.max_pairs],
            "n_exact": len(exact), "n_near": len(near), "n_affected_eval_images": n_other,
            "near_duplicate_threshold": t.near_duplicate_cosine, "message": message}


CHANCE_MARGIN = 0.02  # within 2 points of always answering the most common class counts as guessing


def overfitting(history: list[dict], t: Thresholds = DEFAULT, *, chance: float | None = None,
                reported: float | None = None) -> dict:
    """Generalisation gap at the end, and validation loss rising while training loss falls. ``chance``: the
    validation accuracy of always answering the most common class; a model whose ``reported`` accuracy (the epoch
    kept; default: its best epoch) is not clearly above it has not learned, and is flagged as such instead of being
    judged for overfitting."""
    if not history:
        return {"flagged": False, "message": "No epochs were run."}
    best_acc = max(h["val_accuracy"] for h in history)
    kept = best_acc if reported is None else reported
    if chance is not None and kept <= chance + CHANCE_MARGIN:
        return {"flagged": True, "at_chance": True, "accuracy_gap": None, "best_val_loss_epoch": None,
                "message": f"Validation accuracy {kept:.1%} is no better than guessing ({chance:.1%} by always "
                           "answering the most common class): this model has not learned yet, so overfitting "
                           "cannot be judged. Give it more epochs or more time."}
    last = history[-1]
    gap = last["train_accuracy"] - last["val_accuracy"]
    best = min(history, key=lambda h: h["val_loss"])
    rising = (
        last["epoch"] >= best["epoch"] + 2
        and last["val_loss"] > best["val_loss"] * (1 + t.val_loss_rise)
        and last["val_loss"] - best["val_loss"] > t.val_loss_rise_abs
        and last["train_loss"] < best["train_loss"]
    )
    degraded = best_acc - last["val_accuracy"] >= t.val_accuracy_drop
    reasons = []
    if gap > t.overfit_gap:
        reasons.append(f"train accuracy {last['train_accuracy']:.1%} vs validation {last['val_accuracy']:.1%} "
                       f"(gap {gap:.1%})")
    if rising and degraded:
        reasons.append(f"validation loss rose from {best['val_loss']:.3f} (epoch {best['epoch']}) to "
                       f"{last['val_loss']:.3f} while training loss kept falling, and validation accuracy fell from "
                       f"{best_acc:.1%} to {last['val_accuracy']:.1%}")
    flagged = bool(reasons)
    said = "; ".join(reasons)
    message = (
        said[:1].upper() + said[1:] + ". The epoch kept is the one that did best on training images held out for "
        "choosing it; more data, augmentation or fewer epochs help."
        if flagged
        else f"No sign of overfitting (train/validation accuracy gap {gap:.1%})."
    )
    return {"flagged": flagged, "accuracy_gap": gap, "best_val_loss_epoch": best["epoch"],
            "best_val_loss": best["val_loss"], "final_val_loss": last["val_loss"], "val_loss_rising": rising,
            "best_val_accuracy": best_acc, "final_val_accuracy": last["val_accuracy"],
            "message": message}
