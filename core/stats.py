"""How sure the headline numbers are: intervals on each arm's metrics and a paired test between the arms.

- ``wilson_interval``: accuracy is a count of right answers out of n, so a Wilson score interval (sound near 0%
  and 100% and on small n, where the normal approximation is not).
- ``bootstrap_interval``: balanced accuracy and macro precision/recall/F1 are not simple proportions, so a seeded,
  stratified percentile bootstrap. Resampling within each true class keeps every class's count, as a validation set
  built per class does. Resampling the images of one class with replacement only changes how many of them land in
  each predicted column, a multinomial draw from that row of the confusion matrix: the bootstrap draws those counts
  directly and computes every metric from the confusion matrices at once (no per-resample scikit-learn call).
- ``mcnemar``: are two arms that were scored on the same images really different? Only the images where exactly one
  is right carry information (b: A right and B wrong; c: the reverse). Exact two-sided binomial test when
  b + c < 25, else the chi-square test with continuity correction.

numpy and the standard library only (``math.comb``, ``math.erfc``); the two closed-form intervals live in
``core.runtime.intervals`` (the export's variant check uses them too).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass

import numpy as np

from core.runtime.intervals import CONFIDENCE, _z, wilson_interval

N_BOOT = 1000
ALPHA = 0.05  # McNemar: below this p-value the sentence calls the difference real
EXACT_BELOW = 25  # McNemar: exact binomial test when fewer discordant pairs than this (the usual rule of thumb)

BOOTSTRAP_METRICS = ("val_accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro")
# The report's headline metrics (core.metrics.classification_metrics) and their interval methods.
HEADLINE = {"val_accuracy": "Wilson score", "balanced_accuracy": "stratified bootstrap",
            "precision_macro": "stratified bootstrap", "recall_macro": "stratified bootstrap",
            "f1_macro": "stratified bootstrap"}


# ---------------------------------------------------------------- bootstrap

def _encode(y_true, y_pred, labels) -> tuple[np.ndarray, np.ndarray, int]:
    """Labels as indices 0..L-1 (``labels`` default: every value in y_true or y_pred, sorted, as scikit-learn)."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length ({len(y_true)} vs {len(y_pred)}).")
    labels = np.unique(np.concatenate([y_true, y_pred])) if labels is None else np.asarray(list(labels))
    if np.any(labels[1:] <= labels[:-1]):
        raise ValueError(f"labels must be sorted and distinct, got {labels.tolist()}.")
    t, p = np.searchsorted(labels, y_true), np.searchsorted(labels, y_pred)
    for name, y, idx in (("y_true", y_true, t), ("y_pred", y_pred, p)):
        inside = idx < len(labels)
        if not inside.all() or np.any(labels[idx] != y):
            bad = y[~inside] if not inside.all() else y[labels[idx] != y]
            raise ValueError(f"{name} holds {bad[0]!r}, not one of labels {labels.tolist()}.")
    return t, p, len(labels)


def confusion_counts(y_true_idx: np.ndarray, y_pred_idx: np.ndarray, n_labels: int) -> np.ndarray:
    """Confusion matrix ``[true, predicted]`` of label indices."""
    return np.bincount(y_true_idx * n_labels + y_pred_idx, minlength=n_labels * n_labels).reshape(n_labels, n_labels)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """The headline metrics of one confusion matrix ``[L, L]`` or of a stack ``[..., L, L]``, as
    ``core.metrics.classification_metrics`` defines them: macro averages over every label with 0 for an undefined
    precision/recall/F1 (``zero_division=0``); balanced accuracy averages the recall of the classes that have
    images (scikit-learn's ``balanced_accuracy_score``)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(-1), cm.sum(-2)
    n = support.sum(-1)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros(np.broadcast_shapes(num.shape, den.shape)), where=den > 0)

    recall = ratio(tp, support)
    present = support > 0
    return {
        "val_accuracy": ratio(tp.sum(-1), n),
        "balanced_accuracy": ratio((recall * present).sum(-1), present.sum(-1).astype(np.float64)),
        "precision_macro": ratio(tp, predicted).mean(-1),
        "recall_macro": recall.mean(-1),
        "f1_macro": ratio(2 * tp, support + predicted).mean(-1),
    }


def resampled_confusions(y_true, y_pred, *, n_boot: int = N_BOOT, seed: int = 0, labels=None) -> np.ndarray:
    """``[n_boot, L, L]`` confusion matrices of stratified bootstrap resamples: each true class's images drawn with
    replacement, as many as it has. Row k of a resample is Multinomial(n_k, row k of the observed matrix / n_k),
    which is exactly the distribution of that row when the class's images are resampled one by one."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}.")
    t, p, n_labels = _encode(y_true, y_pred, labels)
    if len(t) == 0:
        raise ValueError("no images to resample: y_true is empty.")
    cm = confusion_counts(t, p, n_labels)
    rng = np.random.default_rng(seed)
    out = np.zeros((n_boot, n_labels, n_labels), dtype=np.int64)
    for k in range(n_labels):
        n_k = int(cm[k].sum())
        if n_k:
            out[:, k, :] = rng.multinomial(n_k, cm[k] / n_k, size=n_boot)
    return out


def _percentile(values: np.ndarray, confidence: float) -> tuple[float, float]:
    _z(confidence)  # validates
    lo, hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def _check_metric(metric: str) -> None:
    if metric not in BOOTSTRAP_METRICS:
        close = difflib.get_close_matches(metric, BOOTSTRAP_METRICS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown metric {metric!r}: use one of {', '.join(BOOTSTRAP_METRICS)}.{hint}")


def bootstrap_intervals(y_true, y_pred, metrics=BOOTSTRAP_METRICS, *, n_boot: int = N_BOOT, seed: int = 0,
                        confidence: float = CONFIDENCE, labels=None) -> dict[str, tuple[float, float]]:
    """Percentile intervals of several metrics from one set of stratified resamples: ``{metric: (low, high)}``."""
    for m in metrics:
        _check_metric(m)
    values = metrics_from_confusion(resampled_confusions(y_true, y_pred, n_boot=n_boot, seed=seed, labels=labels))
    return {m: _percentile(values[m], confidence) for m in metrics}


def bootstrap_interval(y_true, y_pred, metric: str, n_boot: int = N_BOOT, seed: int = 0,
                       confidence: float = CONFIDENCE, *, labels=None) -> tuple[float, float]:
    """Seeded, stratified percentile bootstrap interval of ``metric`` (one of ``BOOTSTRAP_METRICS``: balanced
    accuracy and macro precision/recall/F1, or accuracy). ``labels``: every class index of the task, so a class
    without images still counts in the macro averages (as in the report); default: the values that occur.

    With every image right the resamples are all right too and the interval is (1, 1): a bootstrap cannot see
    errors it never observed. The report's accuracy uses the Wilson interval, which can."""
    return bootstrap_intervals(y_true, y_pred, (metric,), n_boot=n_boot, seed=seed, confidence=confidence,
                               labels=labels)[metric]


def headline_intervals(y_true, y_pred, n_classes: int, *, seed: int = 0, n_boot: int = N_BOOT,
                       confidence: float = CONFIDENCE) -> dict[str, list[float] | None]:
    """``{"<metric>_ci": [low, high]}`` for every headline metric of the report (``HEADLINE``): Wilson for
    accuracy, the stratified bootstrap for the rest; ``None`` when there are no images."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return {f"{m}_ci": None for m in HEADLINE}
    out = {"val_accuracy_ci": list(wilson_interval(int((y_true == y_pred).sum()), len(y_true), confidence))}
    boot = bootstrap_intervals(y_true, y_pred, [m for m in HEADLINE if m != "val_accuracy"], n_boot=n_boot,
                               seed=seed, confidence=confidence, labels=range(n_classes))
    out.update({f"{m}_ci": list(v) for m, v in boot.items()})
    return out


def interval_method(seed: int, *, n_boot: int = N_BOOT, confidence: float = CONFIDENCE) -> dict:
    """How the report's intervals were made, for report.json."""
    return {"confidence": confidence, "val_accuracy": "Wilson score interval",
            "others": f"stratified percentile bootstrap: {n_boot} resamples within each true class, seed {seed}"}


# ---------------------------------------------------------------- McNemar

def _p_text(p: float, alpha: float) -> str:
    if p < 0.001:
        return "p < 0.001"
    text = f"{p:.2g}"
    if (float(text) < alpha) != (p < alpha):  # rounding must not move p across alpha: 0.0496 is not "0.05"
        text = f"{p:.3g}"
    return f"p = {text}"


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test of two classifiers on the same images."""

    b: int  # images where A is right and B is wrong
    c: int  # images where B is right and A is wrong
    n: int  # paired images in all
    p_value: float  # two-sided
    method: str  # "exact binomial" (b + c < 25) or "chi-square with continuity correction"
    statistic: float | None  # the chi-square statistic; None for the exact test
    names: tuple[str, str] = ("A", "B")
    alpha: float = ALPHA

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    @property
    def sentence(self) -> str:
        """"pretrained is right on 44 images where scratch is wrong, scratch on 3: p < 0.001, the difference is
        real." in plain words (no Markdown)."""
        a, b_name = self.names
        if self.b + self.c == 0:
            return (f"{a} and {b_name} are right and wrong on exactly the same images: no sign that either is "
                    "better.")
        verdict = "the difference is real" if self.significant else "this could be chance"
        return (f"{a} is right on {_images(self.b)} where {b_name} is wrong, {b_name} on {self.c}: "
                f"{_p_text(self.p_value, self.alpha)}, {verdict}.")

    def to_dict(self) -> dict:
        a, b_name = self.names
        d = asdict(self)
        d["names"] = list(self.names)
        d.update({f"{a}_right_{b_name}_wrong": self.b, f"{b_name}_right_{a}_wrong": self.c,
                  "significant": self.significant, "sentence": self.sentence})
        return d


def mcnemar(correct_a, correct_b, *, names: tuple[str, str] = ("A", "B"), alpha: float = ALPHA) -> McNemarResult:
    """McNemar's test from per-image correctness (booleans, same images in the same order) of two classifiers."""
    a, b_ = np.asarray(correct_a, dtype=bool).ravel(), np.asarray(correct_b, dtype=bool).ravel()
    if a.shape != b_.shape:
        raise ValueError(f"correct_a and correct_b must score the same images: {len(a)} vs {len(b_)} values.")
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    n_disc = b + c
    if n_disc < EXACT_BELOW:
        # Under H0 each discordant image is A's with probability 1/2; the binomial is symmetric, so the two-sided
        # p-value is twice the smaller tail (1 when b == c). Exact integer arithmetic.
        tail = sum(math.comb(n_disc, i) for i in range(min(b, c) + 1))
        p = min(1.0, 2 * tail / 2**n_disc) if n_disc else 1.0
        return McNemarResult(b, c, len(a), p, "exact binomial", None, tuple(names), alpha)
    stat = max(abs(b - c) - 1, 0) ** 2 / n_disc
    p = math.erfc(math.sqrt(stat / 2))  # survival function of chi-square with 1 degree of freedom
    return McNemarResult(b, c, len(a), p, "chi-square with continuity correction", stat, tuple(names), alpha)
