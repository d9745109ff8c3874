"""Writing a run's artifacts: report.json, manifest.csv, plots, state dicts, and the ONNX export.

Everything is first written into a staging folder inside ``out_dir`` and moved into place with
``os.replace`` only once all of it succeeded, so a failing run never leaves a half-written or mixed
set of files behind, and never destroys an earlier run's artifacts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import plots
from .runtime.files import write_json_atomic
from .train import CompareResult

REPORT = "report.json"
MANIFEST = "manifest.csv"
LEARNING_CURVES = "learning_curves.png"
CONFUSION = "confusion_matrices.png"


def state_dict_file(arm: str) -> str:
    return f"{arm}.pt"


def write_run(result: CompareResult, out_dir: str | os.PathLike, *, export: bool = True) -> dict:
    """Write every artifact of a compare run into ``out_dir``; returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        report = result.report
        runs = report["runs"]
        result.dataset.write_manifest(staging / MANIFEST)
        plots.save(plots.learning_curves(runs, report["target_accuracy"]), staging / LEARNING_CURVES)
        plots.save(plots.confusion_matrices(runs, report["dataset"]["classes"]), staging / CONFUSION)
        for arm, run in result.runs.items():
            torch.save(run.model.state_dict(), staging / state_dict_file(arm))
        report["artifacts"] = {
            "report": REPORT, "manifest": MANIFEST, "learning_curves": LEARNING_CURVES, "confusion_matrices": CONFUSION,
            "state_dicts": {arm: state_dict_file(arm) for arm in result.runs},
        }
        if export and "pretrained" in result.runs:
            report["export"] = _export(result, staging)
        write_json_atomic(staging / REPORT, report)
        # Everything succeeded: move into place (report.json last, so it only ever names files that exist).
        names = sorted(p.name for p in staging.iterdir())
        for name in sorted(names, key=lambda n: n == REPORT):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: out / name for name in names}


def _export(result: CompareResult, staging: Path) -> dict:
    """ONNX export of the pretrained arm, verified against PyTorch: a failed parity check raises, so the run's
    files are not moved into place (the folder keeps its earlier artifacts)."""
    from export.runs import export_run
    report = result.report
    run = report["runs"]["pretrained"]
    return export_run(
        staging,
        result.runs["pretrained"].model,
        classes=report["dataset"]["classes"],
        backbone=report["backbone"],
        image_size=report["image_size"],
        training_mode="pretrained",
        metrics={k: run[k] for k in ("val_accuracy", "balanced_accuracy", "precision_macro", "recall_macro",
                                      "f1_macro")},
        val_images_uint8=result.val.crops,
        val_labels=result.val.labels,
        calib_images_uint8=result.train.crops,  # the calibrator picks its subset (export.quantize)
    )
