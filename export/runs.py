"""A training run's exports: each arm's ONNX file and its variants, written into the run folder and recorded in
its ``report.json``; and a run rebuilt from that folder (weights, images) for ``python -m export``."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import models
from core.runtime.contract import EXPLAIN_OUTPUTS, FORMAT, OUTPUT_NAMES
from core.runtime.errors import UserError
from core.runtime.images import ImageDecodeError, open_rgb, to_array
from export import triton
from export.onnx_export import DEFAULT_OPSET, TRAINING_MODES, compose_classifier, export_classifier
from export.quantize import calibration_indices
from export.variants import build_variants, default_variants
from models.explain import OodCalibration

log = logging.getLogger(__name__)

TRITON_ZIP = "triton_repository.zip"  # the pretrained arm's Triton model repository


class RunFolderError(UserError, ValueError):
    """A run folder lacks what ``python -m core compare`` writes into it."""


def model_filename(training_mode: str) -> str:
    """``model.onnx`` for the pretrained arm (the one to deploy), ``model-scratch.onnx`` for scratch."""
    if training_mode not in TRAINING_MODES:
        raise ValueError(f"training_mode must be one of {TRAINING_MODES}, got {training_mode!r}.")
    return "model.onnx" if training_mode == "pretrained" else "model-scratch.onnx"


def report_key(training_mode: str) -> str:
    """Where a run's ``report.json`` keeps this arm's export section: ``export`` or ``export_scratch``."""
    model_filename(training_mode)
    return "export" if training_mode == "pretrained" else "export_scratch"


def export_run(run_dir: str | os.PathLike[str], classifier: models.Classifier, *, classes: list[str], backbone: str,
               image_size: int, training_mode: str, metrics: dict | None, val_images_uint8: np.ndarray | None,
               val_labels: np.ndarray | list[int] | None, calib_images_uint8: np.ndarray | None,
               tolerance: float = 0.01, variants: tuple[str, ...] | None = None,
               on_step: Callable[[float, str], None] | None = None,
               explain: OodCalibration | None = None, val_features: np.ndarray | None = None,
               defer_variants: bool = False) -> dict[str, Any]:
    """Export one arm of a run to ``run_dir`` (FP32 + accepted variants, and for the pretrained arm, the one to
    deploy, its Triton repository as a zip); return its ``report.json`` section. ``on_step(fraction, words)`` is
    told as each step starts.

    Store the result under ``report[report_key(training_mode)]``. Paths in it are relative to ``run_dir``.
    ``explain``: the arm's ``models.explain.calibrate_ood``; the model then also outputs ``cam`` and ``ood_score``.
    ``val_features``: the pooled features the training computed for ``val_images_uint8`` with the cached backbone
    graph; given for a frozen backbone, the FP32 model is composed from that graph and the head
    (``export.onnx_export.compose_classifier``, a fraction of a second) instead of traced again. ``defer_variants``:
    leave the variants to ``add_variants`` (the section says ``variants_pending``), so the verified FP32 model can be
    offered first.
    """
    if classifier.spec.name != backbone:
        raise ValueError(f"backbone {backbone!r} does not match the classifier's backbone {classifier.spec.name!r}.")
    run_dir = Path(run_dir)
    path = run_dir / model_filename(training_mode)
    step = on_step or (lambda fraction, words: None)
    composable = (training_mode == "pretrained" and val_features is not None and val_images_uint8 is not None
                  and len(val_images_uint8) > 0 and classifier.trainable_blocks == 0)
    if composable:
        step(0.0, "export: adding the trained head to the cached backbone graph and checking it")
        result = compose_classifier(classifier, path, image_size=image_size, classes=classes, metrics=metrics,
                                    features=val_features, images=val_images_uint8, explain=explain)
    else:
        step(0.0, "export: tracing the network to ONNX and checking it against PyTorch")
        result = export_classifier(classifier, path, image_size=image_size, classes=classes,
                                   training_mode=training_mode, metrics=metrics, parity_images=val_images_uint8,
                                   explain=explain)
    section = {
        "training_mode": training_mode,
        "model": path.name,
        "format": FORMAT,
        "opset": DEFAULT_OPSET,
        "backbone": backbone,
        "image_size": image_size,
        "size_bytes": path.stat().st_size,
        "parity": result["parity"],
        "outputs": [*OUTPUT_NAMES, *(EXPLAIN_OUTPUTS if explain is not None else ())],
        **({"ood": explain.summary()} if explain is not None else {}),
        "tolerance": tolerance,
        "variants": [],
    }
    if training_mode == "pretrained":
        step(0.5, "export: packing the Triton model repository")
        section["triton"] = write_triton(path, run_dir)
    if defer_variants:
        section["variants_pending"] = list(default_variants() if variants is None else variants)
        return section
    return add_variants(run_dir, section, calib_images_uint8, val_images_uint8, val_labels, variants=variants,
                        on_step=lambda fraction, words: step(0.6 + 0.4 * fraction, words))


def add_variants(run_dir: str | os.PathLike[str], section: dict[str, Any], calib_images_uint8: np.ndarray | None,
                 val_images_uint8: np.ndarray | None, val_labels: np.ndarray | list[int] | None, *,
                 variants: tuple[str, ...] | None = None,
                 on_step: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Build the variants of the model ``section`` (``export_run``'s) describes beside it, keep those within its
    tolerance, and for the pretrained arm time which one this machine serves; returns the section with
    ``variants`` (and ``served``) filled in. ``variants``: which (default: the section's ``variants_pending``, else
    ``export.variants.default_variants``)."""
    run_dir = Path(run_dir)
    step = on_step or (lambda fraction, words: None)
    path = run_dir / section["model"]
    pending = section.get("variants_pending")
    names = variants if variants is not None else tuple(pending) if pending is not None else None
    if val_images_uint8 is None:
        image_size = int(section["image_size"])
        val_images_uint8, val_labels = np.zeros((0, image_size, image_size, 3), np.uint8), []
    step(0.0, "export: building the smaller/faster variants and checking their accuracy")
    built = build_variants(path, calib_images_uint8, val_images_uint8, val_labels if val_labels is not None else [],
                           tolerance=section["tolerance"], variants=names)
    for record in built:
        if record["path"]:
            record["path"] = os.path.relpath(record["path"], run_dir)
    section = {key: value for key, value in section.items() if key != "variants_pending"}
    section["variants"] = built
    if section["training_mode"] == "pretrained":
        step(0.75, "export: timing the accepted variants on this machine")
        section["served"] = serve_choice(path, run_dir)
    return section


def serve_choice(model_path: Path, run_dir: Path) -> dict[str, Any]:
    """Which variant this machine serves the model with (``core.runtime.fastest``: timed here, kept in the cache
    for the app's Predict tab and ``python -m core predict``), with the reason in words. Never fatal."""
    from core.runtime.fastest import choose_variant

    try:
        choice = choose_variant(model_path).to_dict()
    except Exception as exc:  # noqa: BLE001 - the FP32 model is still there and served
        log.warning("timing the variants failed", exc_info=True)
        return {"variant": "fp32", "path": model_path.name, "reason": f"FP32: the variants could not be timed "
                f"({type(exc).__name__})", "speedups": {}}
    choice["path"] = os.path.relpath(choice["path"], run_dir)
    return choice


def write_triton(model_path: Path, run_dir: Path) -> dict[str, str | None]:
    """``run_dir/triton_repository.zip`` for ``model_path``: ``{"file": name, "error": None}``, or the file None and
    the reason. An optional extra: a failure is recorded (and logged with its traceback), never fatal to the run."""
    try:
        triton.write_triton_zip(model_path, run_dir / TRITON_ZIP, model_name="classifier")
    except Exception as exc:  # noqa: BLE001 - reported in report.json and the app, see above
        log.warning("building the Triton repository failed", exc_info=True)
        return {"file": None, "error": f"{str(exc).replace(str(run_dir) + os.sep, '')} ({type(exc).__name__})"}
    return {"file": TRITON_ZIP, "error": None}


def load_run_classifier(run_dir: str | os.PathLike[str], training_mode: str = "pretrained"
                        ) -> tuple[models.Classifier, dict[str, Any]]:
    """Rebuild a trained arm of a run from ``report.json`` and ``<arm>.pt``; returns (classifier, report)."""
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found; pass the folder written by `python -m core compare`.")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise RunFolderError(f"{report_path} is not valid JSON ({exc}); rerun `python -m core compare`.") from None
    weights = run_dir / f"{training_mode}.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: this run has no trained {training_mode!r} arm; "
                                f"pick one of {[m for m in TRAINING_MODES if (run_dir / f'{m}.pt').is_file()]}.")
    try:
        classes = report["dataset"]["classes"]
        backbone = report["backbone"]
    except (KeyError, TypeError) as exc:
        raise RunFolderError(f"{report_path} lacks {exc}; it was not written by `python -m core compare`.") from None
    classifier = models.build_classifier(backbone, len(classes), pretrained=False)
    classifier.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return classifier.eval(), report


def load_run_images(run_dir: Path, report: dict[str, Any], splits: tuple[str, ...], *, data_root: Path | None = None,
                    limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prepared uint8 images and label indices of the first of ``splits`` present in ``manifest.csv``; with
    ``limit``, only the images ``calibration_indices`` picks."""
    manifest = run_dir / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found; it is written by `python -m core compare`.")
    classes = report["dataset"]["classes"]
    root_text = data_root or report["dataset"].get("root")
    if not root_text:
        raise RunFolderError(f"{run_dir / 'report.json'} has no dataset.root; pass --data PATH to the image folder.")
    root = Path(root_text)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} (from report.json) does not exist; pass --data PATH to "
                                "where the images are now.")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    chosen: list[dict[str, str]] = []
    for split in splits:
        chosen = [r for r in rows if r.get("split") == split]
        if chosen:
            break
    if limit is not None:
        chosen = [chosen[i] for i in calibration_indices(len(chosen), limit)]
    image_size = int(report["image_size"])
    spec = models.get_backbone_spec(report["backbone"])
    images, labels, failed = [], [], 0
    for row in chosen:
        try:
            image = open_rgb(root / row["file"])
        except (ImageDecodeError, OSError):
            failed += 1
            continue
        images.append(to_array(image, image_size, spec.resize_for(image_size), spec.interpolation))
        labels.append(classes.index(row["class"]))
    if failed:
        print(f"warning: skipped {failed} unreadable images of split {splits[0]!r} under {root}", file=sys.stderr)
    if not images:
        return np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros(0, np.int64)
    return np.stack(images), np.asarray(labels, dtype=np.int64)
