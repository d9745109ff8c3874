"""How much the frozen-backbone arm costs beyond one inference pass over the same images.

Both timings include decoding and resizing, measured in one process so the ratio is fair:
  inference pass  = decode + resize + backbone features for every image (no training);
  pretrained arm  = decode + resize + features (cached) + head training + evaluation.
The cache makes head training nearly free: the target is a ratio of at most 1.5.
"""

from __future__ import annotations

import time

import models

from .config import ConfigError, TrainConfig
from .data import Dataset
from .device import resolve_device
from .features import extract_all, make_feature_extractor
from .train import Callbacks, prepare_images, run_compare


def pretrained_overhead(dataset: Dataset, cfg: TrainConfig, *, repeats: int = 2) -> dict:
    """Best of ``repeats`` alternating runs of each, so a busy machine penalises both sides alike."""
    cfg = cfg.validated()
    if cfg.unfreeze_blocks:
        raise ConfigError("the overhead benchmark times the frozen-backbone arm (features cached once); "
                         f"run it without unfreezing blocks (got unfreeze_blocks={cfg.unfreeze_blocks}).")
    device = resolve_device(cfg.device)
    size = cfg.resolved_image_size(device)
    spec = models.get_backbone_spec(cfg.backbone)
    extractor = make_feature_extractor(cfg.backbone, size, device, engine=cfg.feature_engine)  # builds/caches once
    items = dataset.split("train") + dataset.split("val") + dataset.split("test")

    inference = arm = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        prepared = prepare_images(items, size, spec)
        extract_all(extractor, prepared.crops, batch_size=cfg.batch_size)
        inference = min(inference, time.perf_counter() - start)

        start = time.perf_counter()
        result = run_compare(dataset, cfg, Callbacks(), arms=("pretrained",))
        arm = min(arm, time.perf_counter() - start)
    run = result.report["runs"]["pretrained"]
    return {
        "images": len(items),
        "image_size": size,
        "device": device.type,
        "feature_engine": run.get("feature_engine"),
        "epochs": run["epochs_run"],
        "inference_pass_seconds": inference,
        "pretrained_arm_seconds": arm,
        "ratio": arm / inference,
        "val_accuracy": run["val_accuracy"],
    }
