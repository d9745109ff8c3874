"""Writing a run's artifacts: report.json, config.json, manifest.csv, plots, state dicts, and the ONNX export.

Everything is first written into a staging folder inside ``out_dir`` and moved into place with
``os.replace`` only once all of it succeeded, so a failing run never leaves a half-written set of files
behind, and never destroys an earlier run's artifacts. A run that succeeds replaces the earlier run's: the files
this project writes into a run folder (``run_file_names``) that this run did not produce are removed, so
``report.json``'s ``artifacts.files`` lists exactly the project's files in the folder. Other files are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from . import plots
from .runtime.files import release_locals, write_json_atomic
from .train import ARMS, CompareResult

REPORT = "report.json"
CONFIG = "config.json"  # the run's TrainConfig; `python -m core compare --config RUN/config.json` repeats it
MANIFEST = "manifest.csv"
LEARNING_CURVES = "learning_curves.png"
CONFUSION = "confusion_matrices.png"


def state_dict_file(arm: str) -> str:
    return f"{arm}.pt"


def run_file_names() -> frozenset[str]:
    """Every name this project writes into a run folder: what a new run there replaces (or removes as stale)."""
    from export.runs import TRITON_ZIP, model_filename
    from export.variants import VARIANTS, variant_path

    models_ = {variant_path(model_filename(arm), v).name for arm in ARMS for v in VARIANTS}
    return frozenset({REPORT, CONFIG, MANIFEST, LEARNING_CURVES, CONFUSION, TRITON_ZIP,
                      *(state_dict_file(arm) for arm in ARMS), *models_})


def present_run_files(run_dir: Path) -> list[str]:
    """The project's files in ``run_dir`` now (``run_file_names`` that exist): what ``artifacts.files`` lists."""
    return sorted(name for name in run_file_names() if (run_dir / name).is_file())


def write_run(result: CompareResult, out_dir: str | os.PathLike, *, export: bool = True,
              on_step: Callable[[float, str], None] | None = None, keep_export_of: dict | None = None,
              explain: bool = False, defer_variants: bool = False) -> dict:
    """Write every artifact of a compare run into ``out_dir``; returns ``{name: path}``. ``on_step(fraction,
    words)``: told as each export step starts. ``keep_export_of``: the report already in ``out_dir`` of a run whose
    pretrained arm this result shares (``core.train.continue_arm``): its exported files and report section are kept
    instead of exporting the same model again. ``explain``: the exported model also outputs class activation maps
    and the "fits no class" score (``models.explain``); the app shows both, so it exports with them.
    ``defer_variants``: write the run with its verified FP32 model only, for ``add_run_variants`` to add the
    variants to afterwards (the app offers the model while they are built)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        report = result.report
        for key in ("export", "export_scratch"):  # from an earlier write of this result: not true of this folder
            report.pop(key, None)
        runs = report["runs"]
        result.dataset.write_manifest(staging / MANIFEST, result.selection_files)
        plots.save(plots.learning_curves(runs, report["target_accuracy"]), staging / LEARNING_CURVES)
        plots.save(plots.confusion_matrices(runs, report["dataset"]["classes"]), staging / CONFUSION)
        for arm, run in result.runs.items():
            torch.save(run.model.state_dict(), staging / state_dict_file(arm))
        report["artifacts"] = {
            "report": REPORT, "manifest": MANIFEST, "learning_curves": LEARNING_CURVES, "confusion_matrices": CONFUSION,
            "state_dicts": {arm: state_dict_file(arm) for arm in result.runs}, "config": CONFIG,
        }
        write_json_atomic(staging / CONFIG, report["config"])
        if export and keep_export_of and keep_export_of.get("export"):
            report["export"] = _keep_export(keep_export_of, out, staging)
        elif export and "pretrained" in result.runs:
            report["export"] = _export(result, staging, on_step, explain, defer_variants)
        names = sorted({p.name for p in staging.iterdir()} | {REPORT})
        report["artifacts"]["files"] = names
        write_json_atomic(staging / REPORT, report)
        # Everything succeeded. Replace the earlier run: its report first, then its files this run did not write;
        # then move the new files in, report.json last (so any report.json lists exactly the run files present).
        (out / REPORT).unlink(missing_ok=True)
        for name in sorted(run_file_names() - set(names)):
            stale = out / name
            if stale.is_file() or stale.is_symlink():
                stale.unlink()
        for name in sorted(names, key=lambda n: n == REPORT):
            os.replace(staging / name, out / name)
    except BaseException as exc:
        release_locals(exc)  # torch.save's writer on a full disk holds a descriptor to the staged file otherwise
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: out / name for name in names}


def _keep_export(earlier: dict, out: Path, staging: Path) -> dict:
    """Stage the earlier run's exported files (hard links where the disk allows) and return its export section."""
    own = {REPORT, CONFIG, MANIFEST, LEARNING_CURVES, CONFUSION, *(state_dict_file(arm) for arm in ARMS)}
    for name in sorted(set(earlier.get("artifacts", {}).get("files", [])) - own):
        try:
            os.link(out / name, staging / name)
        except OSError:
            shutil.copy2(out / name, staging / name)
    return earlier["export"]


def _export(result: CompareResult, staging: Path, on_step: Callable[[float, str], None] | None = None,
            explain: bool = False, defer_variants: bool = False) -> dict:
    """ONNX export of the pretrained arm, verified: a failed parity check raises, so the run's files are not moved
    into place (the folder keeps its earlier artifacts). A frozen backbone whose features came from the cached
    backbone graph is composed from that graph (``export.runs.export_run``), else the network is traced."""
    from export.runs import export_run
    report = result.report
    run = report["runs"]["pretrained"]
    arm = result.runs["pretrained"]
    features = arm.extra.get("features")
    composable = features is not None and str(arm.extra.get("feature_engine", "")).startswith("onnxruntime")
    return export_run(
        staging,
        arm.model,
        classes=report["dataset"]["classes"],
        backbone=report["backbone"],
        image_size=report["image_size"],
        training_mode="pretrained",
        metrics={k: run[k] for k in ("val_accuracy", "balanced_accuracy", "precision_macro", "recall_macro",
                                      "f1_macro")},
        val_images_uint8=result.val.crops,
        val_labels=result.val.labels,
        calib_images_uint8=result.train.crops,  # the calibrator picks its subset (export.quantize)
        on_step=on_step,
        explain=arm.ood if explain else None,
        val_features=features["other"][: len(result.val.labels)] if composable else None,
        defer_variants=defer_variants,
    )


def add_run_variants(result: CompareResult, out_dir: str | os.PathLike,
                     on_step: Callable[[float, str], None] | None = None) -> dict:
    """Build the variants a run written with ``write_run(defer_variants=True)`` left pending, beside its model in
    ``out_dir`` (each file written atomically), and rewrite its ``report.json`` with them; returns the updated export
    section (also set on ``result.report``). A run with nothing pending is returned as it is."""
    from export.runs import add_variants

    out = Path(out_dir)
    report = json.loads((out / REPORT).read_text(encoding="utf-8"))
    section = report.get("export")
    if not section or "variants_pending" not in section:
        return section or {}
    section = add_variants(out, section, result.train.crops, result.val.crops, result.val.labels, on_step=on_step)
    report["export"] = result.report["export"] = section
    report.setdefault("artifacts", {})["files"] = present_run_files(out)
    write_json_atomic(out / REPORT, report)
    return section
