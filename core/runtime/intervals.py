"""Closed-form 95% intervals for counts of right answers, numpy and the standard library only.

- ``wilson_interval``: accuracy is a count of right answers out of n, so a Wilson score interval (sound near 0%
  and 100% and on small n, where the normal approximation is not).
- ``paired_difference_interval``: how far apart two classifiers' accuracies on the same images can be (an INT8
  model against its FP32 original): Newcombe's hybrid score interval (his 1998 method 10), built from the two
  Wilson intervals and the correlation of the paired answers, sound when the difference is 0 or 1 image.

``core.stats`` builds the report's intervals and tests on these; ``export.variants`` uses them for its check.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}; 0.95 is the usual.")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes out of ``n``; ``(0.0, 1.0)`` when ``n`` is 0."""
    if n < 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}.")
    z = _z(confidence)
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes one bound is exactly 0 or 1; rounding must not leave it a hair inside.
    return (0.0 if correct == 0 else max(0.0, centre - half)), (1.0 if correct == n else min(1.0, centre + half))


def paired_difference_interval(correct_a, correct_b, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval of accuracy(A) - accuracy(B) from per-image correctness on the same images (Newcombe 1998, method
    10): the Wilson intervals of both accuracies, combined with the phi correlation of the paired answers."""
    a_ok, b_ok = np.asarray(correct_a, dtype=bool).ravel(), np.asarray(correct_b, dtype=bool).ravel()
    if a_ok.shape != b_ok.shape:
        raise ValueError(f"correct_a and correct_b must score the same images: {len(a_ok)} vs {len(b_ok)} values.")
    n = len(a_ok)
    if n == 0:
        return -1.0, 1.0
    both, only_a = int((a_ok & b_ok).sum()), int((a_ok & ~b_ok).sum())
    only_b, neither = int((~a_ok & b_ok).sum()), int((~a_ok & ~b_ok).sum())
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, confidence)
    l2, u2 = wilson_interval(both + only_b, n, confidence)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    low = (p1 - p2) - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = (p1 - p2) + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, low), min(1.0, high)
