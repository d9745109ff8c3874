"""What the data-pitfall checks cost, as a share of one compare run, all timed in one process:

- near-duplicates: the perceptual hashes (when the data loads) and the pairing with the pretrained features (report);
- shortcuts: file properties and the cross-validated tiny classifier (before training);
- "fits no class": the calibration of each arm (the scratch arm runs its backbone over its images once more);
- where it looked: the heat maps of the misclassified gallery;
- the explained export: ``model.onnx`` with ``cam`` and ``ood_score`` against the plain export.

    python scripts/bench_checks.py --data ../shared/dev-photos/cats-vs-dogs
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import duplicates, shortcuts, summary  # noqa: E402
from core.config import TrainConfig  # noqa: E402
from core.data import load_dataset  # noqa: E402
from core.train import calibrate_unfamiliar, run_compare  # noqa: E402
from export.onnx_export import export_classifier  # noqa: E402


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of class folders")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--budget-seconds", type=float, default=TrainConfig().budget_seconds)
    args = parser.parse_args()

    dataset = load_dataset(args.data)
    cfg = TrainConfig(epochs=args.epochs, budget_seconds=args.budget_seconds)
    result, compare_s = timed(run_compare, dataset, cfg)  # the checks ran inside it, on a first sight of the data
    run = result.runs["pretrained"]
    features = run.extra["features"]
    both = np.concatenate([features["train"], features["other"]])
    items = dataset.split("train") + dataset.split("val") + dataset.split("test")

    duplicates.HASHES.clear()
    _, hashes_s = timed(duplicates.check_dataset, dataset, items=items)
    _, pairing_s = timed(duplicates.check_dataset, dataset, both, items=items)  # hashes remembered: the pairing
    shortcuts._remembered.clear()
    _, shortcut_s = timed(shortcuts.check_dataset, dataset)
    fresh = {arm: dataclasses.replace(r, ood=None) for arm, r in result.runs.items()}
    timings = {arm: timed(calibrate_unfamiliar, {arm: r}, result.train, result.val, len(dataset.classes))[1]
               for arm, r in fresh.items()}
    _, gallery_s = timed(summary.misclassified_gallery, result, dataset.classes)
    size = result.report["image_size"]
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = dict(image_size=size, classes=dataset.classes, training_mode="pretrained",
                      parity_images=result.val.crops)
        _, plain_s = timed(export_classifier, run.model, Path(tmp) / "plain.onnx", **kwargs)
        _, explained_s = timed(export_classifier, run.model, Path(tmp) / "explained.onnx", explain=run.ood, **kwargs)

    rows = [("near-duplicates: hashes (at load)", hashes_s), ("near-duplicates: pairing with features", pairing_s),
            ("shortcuts", shortcut_s),
            *((f"fits no class: {arm} calibration", s) for arm, s in timings.items()),
            ("where it looked: misclassified heat maps", gallery_s),
            ("explained export minus plain export", explained_s - plain_s)]
    print(f"{args.data}: {len(dataset.items)} images, {size} px; one compare run (both arms, checks included) "
          f"{compare_s:.1f} s; plain export {plain_s:.1f} s, explained {explained_s:.1f} s")
    for name, seconds in rows:
        print(f"  {name:45s} {seconds:6.2f} s  {seconds / compare_s:6.1%} of the compare run")
    total = sum(s for _, s in rows)
    print(f"  {'all checks together':45s} {total:6.2f} s  {total / compare_s:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
