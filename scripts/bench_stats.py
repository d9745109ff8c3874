"""What the statistics (``core.stats``: intervals on every headline metric, McNemar between the arms) add to a run.

Two measurements:
  1. the statistics alone on a report of realistic size (two arms, ``--images`` validation images over ``--classes``
     classes, a classifier right about 85% of the time): best of ``--repeats`` calls;
  2. one real ``run_compare`` with the statistics timed inside it (``stats.headline_intervals`` and
     ``train.compare_arms`` wrapped with a timer): the run's wall time, the part spent on statistics, and the share.
     A run without them is the same run minus that part; two separate runs would differ by more than the
     statistics cost (training time varies from run to run by more than that).

    python scripts/bench_stats.py                       # digits, ~800 validation images, 10 classes; ~1-2 min CPU
    python scripts/bench_stats.py --data DIR --epochs 15 --image-size 160

A short run (few epochs, small images) is the worst case for the share: the statistics cost does not grow with
training. The target is under 5% of a run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere: the project's packages

from core import stats  # noqa: E402
from core import train as train_module  # noqa: E402
from core.config import TrainConfig  # noqa: E402
from core.data import load_dataset  # noqa: E402
from core.metrics import verdict  # noqa: E402


def statistics_alone(images: int, classes: int, repeats: int) -> float:
    """Seconds for the statistics of one two-arm report: both arms' intervals, their verdicts, McNemar."""
    rng = np.random.default_rng(0)
    y_true = np.repeat(np.arange(classes), images // classes)
    preds = [np.where(rng.random(len(y_true)) < acc, y_true, rng.integers(0, classes, len(y_true)))
             for acc in (0.9, 0.7)]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for pred in preds:
            ci = stats.headline_intervals(y_true, pred, classes, seed=0)
            verdict({"val_accuracy": 0.9, "precision_macro": 0.9, "recall_macro": 0.9, **ci})
        stats.mcnemar(preds[0] == y_true, preds[1] == y_true)
        best = min(best, time.perf_counter() - start)
    return best


def timed_compare(args: argparse.Namespace) -> dict:
    """One run_compare with the statistics' calls timed inside it."""
    spent = {"seconds": 0.0}

    def timed(fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent["seconds"] += time.perf_counter() - start
        return wrapper

    originals = stats.headline_intervals, train_module.compare_arms
    stats.headline_intervals, train_module.compare_arms = timed(originals[0]), timed(originals[1])
    try:
        ds = load_dataset(args.data, val_fraction=args.val_fraction, seed=0)
        cfg = TrainConfig(epochs=args.epochs, image_size=args.image_size, device=args.device)
        start = time.perf_counter()
        result = train_module.run_compare(ds, cfg)
        total = time.perf_counter() - start
    finally:
        stats.headline_intervals, train_module.compare_arms = originals
    return {"val_images": len(result.val.labels), "classes": len(ds.classes), "total": total,
            "statistics": spent["seconds"], "sentence": result.report["comparison"]["sentence"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=800)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data", default="sample:digits")
    p.add_argument("--val-fraction", type=float, default=0.45, help="0.45 of the 1797 digits: ~800 images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-compare", action="store_true", help="only measurement 1")
    args = p.parse_args()

    alone = statistics_alone(args.images, args.classes, args.repeats)
    print(f"statistics alone, {args.images} images x {args.classes} classes, two arms: {alone * 1000:.1f} ms "
          f"(best of {args.repeats})")
    if args.skip_compare:
        return
    r = timed_compare(args)
    share = r["statistics"] / r["total"]
    print(f"run_compare on {args.data} ({r['val_images']} validation images, {r['classes']} classes, "
          f"{args.epochs} epochs at {args.image_size}px on {args.device}): {r['total']:.1f} s with statistics, "
          f"{r['total'] - r['statistics']:.1f} s without; statistics {r['statistics'] * 1000:.1f} ms = {share:.3%} "
          f"of the run (target < 5%): {'OK' if share < 0.05 else 'OVER'}")
    print(f"McNemar: {r['sentence']}")


if __name__ == "__main__":
    main()
