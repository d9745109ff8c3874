"""Classification metrics (scikit-learn) and the verdict a practitioner would give."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
)


@dataclass(frozen=True)
class VerdictRule:
    """The rule of thumb: >= 85% accuracy with macro precision and recall >= 80% and close together."""

    good_accuracy: float = 0.85
    good_precision_recall: float = 0.80
    poor_accuracy: float = 0.70
    # Precision and recall this far apart mean the model trades one class's errors for another's.
    close_gap: float = 0.05
    far_gap: float = 0.15


def classification_metrics(y_true, y_pred, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro and per-class precision/recall/F1, and the confusion matrix."""
    labels = list(range(len(classes)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    pm, rm, fm, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {
        "val_accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "precision_macro": float(pm),
        "recall_macro": float(rm),
        "f1_macro": float(fm),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def verdict(metrics: dict, rule: VerdictRule = VerdictRule()) -> dict:
    """``{"label": "good"|"fair"|"poor", "reasons": [...]}`` with the numbers behind each reason.

    The label follows the point estimates. When ``metrics`` carries 95% intervals (``core.stats``) that could
    change whether the run is good, a last reason says so and ``"straddles"`` (empty otherwise) names the metrics:
    for a good run, any interval that reaches below its bar (accuracy 85%, macro precision and recall 80%); for
    another run, the intervals of the metrics below their bars, when every one of them reaches above it. The
    validation set is then too small to tell which side of the bar the run is on.
    """
    result = _verdict(metrics, rule)
    below, above, missed = [], [], []  # (key, note): intervals reaching below / above a bar; keys under their bar
    for key, name, bar in (("val_accuracy", "accuracy", rule.good_accuracy),
                           ("precision_macro", "macro precision", rule.good_precision_recall),
                           ("recall_macro", "macro recall", rule.good_precision_recall)):
        ci = metrics.get(f"{key}_ci")
        if metrics[key] < bar:
            missed.append(key)
        if not ci or not ci[0] < bar <= ci[1]:
            continue
        direction = "below" if metrics[key] >= bar else "above"
        note = f"the {name} interval ({ci[0]:.1%}–{ci[1]:.1%}) reaches {direction} {bar:.0%}"
        (below if direction == "below" else above).append((key, note))
    if result["label"] == "good":
        notes = below
    else:
        notes = above if missed and [key for key, _ in above] == missed else []
    if notes:
        result["reasons"].append(f"{result['label']}, but {'; '.join(n for _, n in notes)}: collect more validation "
                                 "images to be sure")
    result["straddles"] = [key for key, _ in notes]
    return result


def _verdict(metrics: dict, rule: VerdictRule) -> dict:
    acc, p, r = metrics["val_accuracy"], metrics["precision_macro"], metrics["recall_macro"]
    gap = abs(p - r)
    reasons: list[str] = []
    if acc < rule.poor_accuracy:
        reasons.append(f"validation accuracy {acc:.1%} is below {rule.poor_accuracy:.0%}")
    if gap > rule.far_gap:
        reasons.append(f"precision ({p:.1%}) and recall ({r:.1%}) are {gap:.1%} apart: errors are lopsided")
    if reasons:
        return {"label": "poor", "reasons": reasons}

    good = acc >= rule.good_accuracy and min(p, r) >= rule.good_precision_recall and gap <= rule.close_gap
    if good:
        return {
            "label": "good",
            "reasons": [
                f"validation accuracy {acc:.1%} >= {rule.good_accuracy:.0%}",
                f"macro precision {p:.1%} and recall {r:.1%} are both >= {rule.good_precision_recall:.0%} "
                f"and within {rule.close_gap:.0%} of each other",
            ],
        }
    if acc < rule.good_accuracy:
        reasons.append(f"validation accuracy {acc:.1%} is below the {rule.good_accuracy:.0%} bar for good")
    if min(p, r) < rule.good_precision_recall:
        reasons.append(f"macro precision {p:.1%} / recall {r:.1%}: at least one is below "
                       f"{rule.good_precision_recall:.0%}")
    if gap > rule.close_gap:
        reasons.append(f"precision and recall differ by {gap:.1%} (more than {rule.close_gap:.0%})")
    return {"label": "fair", "reasons": reasons}


def binary_threshold_metrics(y_true, positive_prob, threshold: float, classes: list[str], positive: int = 1) -> dict:
    """For two-class tasks: predict ``positive`` when its probability >= threshold, then the usual metrics."""
    if len(classes) != 2:
        raise ValueError(f"A decision threshold needs exactly 2 classes, got {len(classes)}.")
    y_pred = np.where(np.asarray(positive_prob) >= threshold, positive, 1 - positive)
    return classification_metrics(y_true, y_pred, classes)


def misclassified(y_true, probabilities, limit: int | None = None) -> list[int]:
    """Indices of wrong predictions, the most confidently wrong first (stable for ties)."""
    y_true, probabilities = np.asarray(y_true), np.asarray(probabilities)
    pred = probabilities.argmax(1)
    wrong = np.nonzero(pred != y_true)[0]
    order = wrong[np.argsort(-probabilities[wrong, pred[wrong]], kind="stable")]
    return [int(i) for i in order[:limit]]
