"""How well the "fits no class" score (``models.explain``) tells a dataset's validation images from images of another
dataset: AUROC, and the share flagged at the exported threshold, for the score the export uses and for the usual
alternatives computed from the same network.

Trains the frozen-backbone arm on ``--data`` (as ``python -m core compare`` does), then scores its validation
images (in distribution) and every image of each ``--unfamiliar`` source (folders or sample specs):

    python scripts/bench_unfamiliar.py --data ../shared/dev-photos/cats-vs-dogs \
        --unfamiliar ../shared/dev-photos/textures sample:shapes sample:digits

Scores (higher = less like the training images):
- centroid cosine (exported): 1 - max cosine to the class centroids of the training features;
- centroid cosine, centred: the same after subtracting the training images' mean feature;
- max softmax: 1 - the largest probability (Hendrycks & Gimpel 2017);
- energy: -logsumexp(logits) (Liu et al. 2020).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from core.config import TrainConfig  # noqa: E402
from core.data import load_dataset  # noqa: E402
from core.train import prepare_images, run_compare  # noqa: E402
from models.explain import calibrate_ood, class_centroids, ood_scores, pooled_features  # noqa: E402


def scores(model: models.Classifier, train_f: torch.Tensor, train_y: np.ndarray, feats: torch.Tensor) -> dict:
    k = model.num_classes
    logits = model.head(feats)
    center = train_f.mean(0)
    centred = class_centroids(train_f - center, train_y, k)
    return {
        "centroid cosine (exported)": calibrate_ood(train_f, train_y, feats, k).val_scores,
        "centroid cosine, centred": ood_scores(feats - center, centred).numpy(),
        "max softmax": (1 - torch.softmax(logits, 1).amax(1)).numpy(),
        "energy": (-torch.logsumexp(logits, 1)).numpy(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of class folders (or a sample spec) to train on")
    parser.add_argument("--unfamiliar", nargs="+", required=True, help="folders or sample specs of other images")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=400, help="at most this many images of each unfamiliar source")
    args = parser.parse_args()

    dataset = load_dataset(args.data)
    cfg = TrainConfig(epochs=args.epochs, train_scratch=False)
    start = time.perf_counter()
    result = run_compare(dataset, cfg, arms=("pretrained",))
    run = result.runs["pretrained"]
    model = run.model.eval()
    cal = run.ood
    print(f"{args.data}: {len(result.train.labels)} training and {len(result.val.labels)} validation images, "
          f"{len(dataset.classes)} classes, {result.report['image_size']} px, val accuracy "
          f"{result.report['runs']['pretrained']['val_accuracy']:.1%} ({time.perf_counter() - start:.0f} s)")
    print(f"exported threshold {cal.threshold:.3f} (the {cal.quantile:g} quantile of the validation scores): "
          f"{cal.summary()['val_above']} of {len(cal.val_scores)} validation images above it")
    with torch.no_grad():
        train_f = torch.from_numpy(run.extra["features"]["train"])
        val_f = torch.from_numpy(run.extra["features"]["other"][: len(result.val.labels)])
        familiar = scores(model, train_f, result.train.labels, val_f)
        spec = models.get_backbone_spec(cfg.backbone)
        for source in args.unfamiliar:
            other = load_dataset(source)
            items = other.items[:: max(1, len(other.items) // args.limit)][: args.limit]
            crops = prepare_images(items, result.report["image_size"], spec).crops
            unfamiliar = scores(model, train_f, result.train.labels, pooled_features(model, crops))
            flagged = float((unfamiliar["centroid cosine (exported)"] > cal.threshold).mean())
            print(f"\nvs {source} ({len(crops)} images): {flagged:.1%} flagged at the exported threshold")
            for name, values in unfamiliar.items():
                y = np.r_[np.zeros(len(familiar[name])), np.ones(len(values))]
                auroc = roc_auc_score(y, np.r_[familiar[name], values])
                print(f"  {name:30s} AUROC {auroc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
