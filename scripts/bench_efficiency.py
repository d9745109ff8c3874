"""What the data-efficiency curve's pretrained half costs against one compare's pretrained arm, in one process.

Runs, on the same dataset and settings: (1) ``run_compare`` with the pretrained arm only, as a compare run trains
it (decode, features, head); (2) ``efficiency_curve`` with the pretrained arm only (1, 2, 5, 10, 25, 50 and all
images per class, three draws up to 10). Both start cold (decoded images and features are not shared between
them; the backbone's ONNX file is built once beforehand and cached, as it is for every run after a machine's
first). Prints both wall times and their ratio. The target is under 2x.

    python scripts/bench_efficiency.py --data ../shared/dev-photos/cats-vs-dogs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere: the project's packages

from core.config import TrainConfig  # noqa: E402
from core.data import load_dataset  # noqa: E402
from core.efficiency import efficiency_curve, efficiency_table  # noqa: E402
from core.text import columns  # noqa: E402
from core.train import run_compare  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="sample:shapes", help="dataset folder, zip or sample spec")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=None)
    args = parser.parse_args()
    cfg = TrainConfig(epochs=args.epochs, image_size=args.image_size, train_scratch=False, device="cpu")
    dataset = load_dataset(args.data, seed=cfg.seed)
    run_compare(dataset, TrainConfig(**{**cfg.to_dict(), "epochs": 1}), arms=("pretrained",))  # builds the cache

    start = time.perf_counter()
    compare = run_compare(dataset, cfg, arms=("pretrained",))
    compare_s = time.perf_counter() - start
    start = time.perf_counter()
    curve = efficiency_curve(dataset, cfg, arms=("pretrained",))
    curve_s = time.perf_counter() - start

    print(columns(efficiency_table(curve)))
    fits = sum(len(p["draws"]) for p in curve["points"])
    print(f"\ncompare, pretrained arm only: {compare_s:.1f} s (val accuracy "
          f"{compare.report['runs']['pretrained']['val_accuracy']:.1%})")
    print(f"efficiency curve, pretrained half ({len(curve['points'])} points, {fits} head fits): {curve_s:.1f} s")
    print(f"ratio: {curve_s / compare_s:.2f}x (target < 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
