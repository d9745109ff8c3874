"""Gradio UI of the transfer-learning lab: data -> train & compare -> predict -> export -> benchmark.

This file is the layout and thin handlers only; the logic lives in ``core/`` (sessions, the training job, the
report, dataset and benchmark views), ``export/`` and ``models/``. Importing it starts nothing and makes no
network calls; ``python app.py --help`` lists the launch options.

Multi-user design (public Hugging Face Space), see ``core.sessions``:
- every browser session gets a random id in ``gr.State`` and a private folder for its upload, runs and exported
  models; nothing a visitor sends is used as a server path;
- session folders are deleted when Gradio drops the session state, shortly after the tab is closed, and in any
  case when idle for 2 hours (swept whenever a data request comes in);
- training (and benchmarking) take turns in one queue (``--concurrency`` at a time, the queue shows each
  visitor's position); predictions run concurrently through one shared predictor per model file.
"""

from __future__ import annotations

import sys

from core.serve_view import (  # torch-free
    add_launch_options,
    default_port,
    serving_model,
    upload_name,
    upload_path,
    uploaded_image,
)

if __name__ == "__main__" and serving_model(sys.argv[1:]):
    # `python app.py --model MODEL.onnx` (or env TRANSFER_LAB_MODEL): one model's Predict page. Dispatched before the
    # lab's imports below, so a host without torch (requirements-serve.txt) runs it.
    from core.serve_view import main as serve

    serve(sys.argv[1:])
    raise SystemExit(0)

import argparse
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import gradio as gr

# The training stack (torch, models, matplotlib, scikit-learn) is imported inside the functions that use it: importing
# this module loads Gradio and the torch-free layers only, and builds nothing.
from core import duplicates, sessions, summary, text
from core.config import TrainConfig
from core.data import Dataset
from core.data_view import (
    active_dataset,
    dataset_gallery,
    dataset_summary,
    dataset_warnings,
    duplicate_gallery,
    skipped_table,
    thumbnail,
    validation_examples,
)
from core.jobs import (
    Cancelled,
    Epoch,
    Failed,
    Finished,
    KeptRuns,
    Progress,
    TrainingJob,
    VariantsReady,
    epoch_line,
    live_runs,
    status_line,
)
from core.predict_view import classify, load_images, model_description
from core.queue_limits import QueueLimits
from core.runtime.errors import UserError, os_error_message
from core.samples import DEFAULT_PRESET, PRESETS
from export.variants import VARIANTS, variant_path

log = logging.getLogger("transfer_lab.app")

# An uploaded model passed a structural check (core.runtime.model_check) that bounds its cost; this stops a call
# anyway. The largest legitimate export (resnet18, 512 px) takes ~20 s for 64 images on a 2-core CPU.
UPLOAD_TIME_LIMIT_S = 30.0
DEFAULT_BUDGET_S = 60  # per arm in the form: the sample's pretrained arm needs seconds, scratch gets a minute
MAX_BUDGET_S = 300  # default --max-budget: 5x the form's default; one job holds the training slot ~10 min at most
# Requests one session may have waiting or running per queue group, checked when a request joins the queue, so
# one visitor cannot fill the queue (or the training slot) and leave the others "Queue is full".
PENDING_PER_SESSION = {"train": 1, "predict": 8, "data": 1}  # predict: as many as run at once, no more queued
BENCH_REPEATS, BENCH_WARMUP = 10, 2  # median of interleaved runs; tests lower these
SESSIONS = sessions.STORE
PREDICTORS = SESSIONS.predictors
UPLOADED_MODEL = sessions.UPLOADED_MODEL
AUTO_MODEL = sessions.AUTO_MODEL
DOWNLOADS = {name: "dl_onnx" if name == "fp32" else f"dl_{name}" for name in VARIANTS}  # variant -> output name

INTRO = """
# 🔬 Transfer Lab
What does a pretrained network buy you? Train a new classifier head on a **frozen pretrained backbone** and the
**same network from scratch** on your images, compare them side by side, try the exported model, and download it.
**Press _Train_ below** to try it on the built-in sample the page starts with, or first upload a `.zip` of class
folders of your own images on the _Data_ tab. Each arm stops at its time budget.
"""

CSS = """
#verdicts .good {color: #15803d; font-weight: 600}
#verdicts .fair {color: #b45309; font-weight: 600}
#verdicts .poor {color: #b91c1c; font-weight: 600}
/* gallery captions ("true → predicted 92%") wrap in full instead of being cut with an ellipsis */
#mistakes .caption-label, #data-gallery .caption-label, #predict-examples .caption-label, #dup-gallery .caption-label {
  white-space: normal; overflow-wrap: anywhere; max-width: 100%; left: 0}
/* on a phone all five tabs fit in one row instead of hiding behind a "•••" menu */
@media (max-width: 480px) {
  .tab-wrapper .tab-container button {padding: 0 9px !important; min-width: 0 !important}
  /* galleries of pictures to look at: two (pairs: one) per row, so captions stay short and the pictures visible */
  #mistakes .grid-container {grid-template-columns: repeat(2, minmax(0, 1fr)) !important}
  #dup-gallery .grid-container {grid-template-columns: minmax(0, 1fr) !important}
}
"""


# A finished run's headline sits below the settings (far below on a phone): bring it into view, unless the run was
# cancelled (the status then says so) or the visitor is on another tab (the element is hidden: nothing moves).
SCROLL_TO_RESULTS = """() => {
  if ((document.querySelector('#train-status')?.innerText || '').includes('Done'))
    document.querySelector('#speedup')?.scrollIntoView({behavior: 'smooth', block: 'start'});
}"""


# On a phone the status (the only progress display) sits below the whole form: bring it to the top of the screen when
# a run starts; where it is already in view (beside the form on a wide screen) nothing moves.
SCROLL_TO_STATUS = """() => {
  const status = document.querySelector('#train-status');
  const box = status?.getBoundingClientRect();
  if (box && (box.top < 0 || box.top + 150 > window.innerHeight))  // 150 px: the box once its bar shows
    status.scrollIntoView({behavior: 'smooth', block: 'start'});
}"""


# -------- Sessions and errors ----------------------------------------------------------------------------------

def new_session() -> dict[str, Any]:
    """The initial value of each browser session's ``gr.State`` (Gradio also lists it in the API by this name)."""
    return sessions.new_state()


configure = SESSIONS.configure  # the folder that holds every session's folder
KEPT = KeptRuns()  # each session's latest run, in memory, while its scratch arm can be given more time


def delete_session(state: dict) -> None:
    """gr.State's delete callback: the session's folder, cached predictors and kept run go."""
    KEPT.drop((state or {}).get("sid"))
    SESSIONS.delete(state)


def _state(state: Any, request: gr.Request | None = None) -> dict:
    return SESSIONS.ensure_state(state, getattr(request, "session_hash", None))


def _fail(message: Any, title: str | None = None) -> gr.Error:
    """An error pop-up; its message is rendered as HTML, so it is escaped (it may hold a visitor's file name)."""
    return gr.Error(text.html(message, max_chars=1000), title=title or "Error")


def _error(exc: BaseException, title: str, state: dict | None = None, hint: str = "") -> gr.Error:
    """A visitor's mistake shows its own (cleaned) message; anything else is the server's problem (a bug, a full
    disk): logged with its traceback, shown generically."""
    if isinstance(exc, UserError):  # not OSError: a full disk or a permission problem is the server's, not theirs
        return _fail(SESSIONS.clean(exc, state), getattr(exc, "title", None) or title)
    if message := os_error_message(exc):  # a full disk, a name too long: said plainly, without a path
        log.warning("%s: %s", title, exc)
        return _fail(message, title)
    log.error("%s", title, exc_info=exc)
    return _fail(f"Something went wrong on the server ({type(exc).__name__}); it has been logged. {hint}".strip(),
                 title)


@contextmanager
def _errors_shown_as(title: str, state: dict | None = None, hint: str = "") -> Iterator[None]:
    try:
        yield
    except gr.Error:
        raise
    except Exception as exc:  # noqa: BLE001 - sorted by _error
        raise _error(exc, title, state, hint) from None


# -------- Per-session queue limits -----------------------------------------------------------------------------

LIMITS: dict[str, Any] = {"max_budget": MAX_BUDGET_S, "demo": None}  # set by build_app


def _queued_events() -> list[tuple[str, str]]:
    """``(session hash, concurrency group)`` of every request waiting or running. Reads Gradio's queue internals
    (gradio is pinned; tests/test_security.py floods the queue over HTTP to keep this honest)."""
    queue = getattr(LIMITS["demo"], "_queue", None)
    if queue is None:
        return []
    waiting = [e for group in list(queue.event_queue_per_concurrency_id.values()) for e in list(group.queue)]
    running = [e for job in list(queue.active_jobs) if job for e in job]
    return [(e.session_hash, e.concurrency_id) for e in [*waiting, *running]]


QUEUE_LIMITS = QueueLimits(PENDING_PER_SESSION, _queued_events)


def _session_limit(group: str, n_inputs: int, what: str):
    """A Gradio validator (it runs when a request joins the queue) refusing a session's request beyond
    ``PENDING_PER_SESSION[group]`` of that group."""

    def validator(request: gr.Request, *_inputs: Any) -> list[dict]:  # Gradio puts the request first, by its type
        if not QUEUE_LIMITS.admit(getattr(request, "session_hash", None), group):
            raise _fail(QUEUE_LIMITS.refusal(group, what), "Please wait")
        return [gr.validate(True, "")] * n_inputs

    return validator


# -------- Data tab ---------------------------------------------------------------------------------------------

DATA_OUTPUTS = ("state", "summary", "counts_plot", "gallery", "skipped", "warnings", "preset", "active", "examples",
                "dup_box", "dup_gallery", "drop_btn")


def _loaded(state: dict, label: str, ds: Dataset, sample: str | None = None) -> tuple:
    """The Data tab for a newly loaded dataset; the sample menu is emptied for an upload (the page names one
    dataset), and ``state["sample"]`` remembers which sample is loaded."""
    from core import plots, shortcuts

    state["dataset"], state["source"], state["sample"] = ds, label, sample
    examples, state["examples"] = validation_examples(ds)
    found = state["duplicates"] = duplicates.check_dataset(ds)
    return (state, dataset_summary(ds, label), plots.detached(plots.class_counts, ds.counts()), dataset_gallery(ds),
            skipped_table(ds), dataset_warnings(ds, found, shortcuts.check_dataset(ds)),
            gr.skip() if sample else gr.update(value=None),
            active_dataset(ds, label), examples, *_duplicate_views(ds, found))


def _duplicate_views(ds: Dataset, found: dict) -> tuple:
    """The Data tab's near-duplicate box, pairs and drop button for ``found`` (``core.duplicates.check_dataset``)."""
    copies = len(found["train_copies"])
    return (gr.update(visible=found["flagged"]), duplicate_gallery(ds, found) or None,
            gr.update(visible=copies > 0, value=f"🧹 Drop the {copies} training cop{'y' if copies == 1 else 'ies'}"))


def drop_copies(state: dict | None, request: gr.Request = None) -> tuple:
    """Leave the near-duplicate copies out of training (``core.duplicates``: the training side of each leakage
    and label-conflict pair, one of each repeat); the split stays. Outputs: ``DATA_OUTPUTS``."""
    state = _state(state, request)
    found, ds = state.get("duplicates"), state.get("dataset")
    if ds is None or not found or not found["train_copies"]:
        raise _fail("There are no copies to drop in this dataset.", "Nothing to drop")
    with _errors_shown_as("Cannot drop the copies", state):
        smaller = ds.without(found["train_copies"])
    return _loaded(state, state["source"], smaller, sample=state.get("sample"))


def load_sample(choice: str, state: dict | None, request: gr.Request = None) -> tuple:
    """Load a built-in sample (preset name or a ``sample:`` spec). Outputs: ``DATA_OUTPUTS``.

    An empty choice, or the sample already loaded, changes nothing: the menu also reports its value when it is
    merely opened and closed, which must not replace an uploaded dataset or reload the same sample."""
    state = _state(state, request)
    if not choice or (choice == state.get("sample") and state.get("dataset") is not None):
        return (state, *(gr.skip() for _ in DATA_OUTPUTS[1:]))
    SESSIONS.sweep()
    with _errors_shown_as("Cannot use this dataset", state):  # a SampleError brings its own title
        label, ds = SESSIONS.load_sample(state, choice)
    return _loaded(state, label, ds, sample=choice)


def load_zip(file: Any, state: dict | None, request: gr.Request = None) -> tuple:
    """Load an uploaded .zip of class folders (copied into the session folder first). Outputs: ``DATA_OUTPUTS``."""
    state = _state(state, request)
    SESSIONS.sweep()
    src = upload_path(file)
    if src is None:
        raise _fail("No file was uploaded.")
    name = upload_name(file, src)
    with _errors_shown_as("Cannot use this dataset", state):
        ds = SESSIONS.load_zip(state, src, name)
    return _loaded(state, f"upload {name}", ds)


def on_page_load(state: dict | None, choice: str, request: gr.Request = None) -> tuple:
    """New browser session: load the selected sample so Train works at once (its own function, so the public API
    name ``load_sample`` stays with the dropdown's event)."""
    return load_sample(choice, state, request)


def on_unload(request: gr.Request = None) -> None:
    SESSIONS.closed(getattr(request, "session_hash", None))


# -------- Train tab ----------------------------------------------------------------------------------------------

TRAIN_INPUTS = ("backbone", "epochs", "budget", "image_size", "target", "device", "scratch", "seed", "unfreeze",
                "repeats")
TRAIN_OUTPUTS = (
    "state", "status", "log", "curves", "speedup", "results", "verdicts", "confusion", "per_class", "mistakes",
    "diagnostics", "threshold_group", "positive", "threshold", "threshold_md", "threshold_cm", "export_md",
    *DOWNLOADS.values(), "dl_triton", "dl_report", "parity", "model_choice", "train_btn", "cancel_btn",
    "live_box", "results_box", "more_box", "more_md",  # shown once they have something to show
    "dup_box", "dup_gallery", "drop_btn",  # the Data tab's near-duplicate pairs, found again with the features
)
_IDLE = dict(train_btn=gr.update(interactive=True), cancel_btn=gr.update(interactive=False))


def _out(names: tuple[str, ...], **values) -> tuple:
    unknown = set(values) - set(names)
    if unknown:  # pragma: no cover - programming error
        raise KeyError(f"unknown outputs {unknown}")
    return tuple(values.get(n, gr.skip()) for n in names)


def unfreeze_range(backbone: str) -> dict:
    """The fine-tune slider's range for ``backbone`` (its number of blocks)."""
    import models

    return gr.update(maximum=models.block_count(backbone), value=0)


def arm_training(state: dict | None, request: gr.Request = None) -> tuple:
    """Runs (unqueued) right when Train is clicked: a fresh cancel flag, so Cancel also works while queued. A
    session whose training is already waiting or running is told so (and its cancel flag is left alone)."""
    state = _state(state, request)
    if QUEUE_LIMITS.pending(getattr(request, "session_hash", None), "train"):
        raise _fail("Your training is already waiting for its turn or running: wait for it, or press Cancel.",
                    "Already training")
    state["cancel"] = threading.Event()
    return state, "⏳ Waiting for a free training slot…", gr.update(interactive=False), gr.update(interactive=True)


def cancel_training(state: dict | None) -> str:
    _state(state)["cancel"].set()
    return "🛑 Cancelling after the current step…"


def train(state: dict | None, backbone: str, epochs: float, budget: float | None, image_size: float | None,
          target: float, device: str, scratch: bool, seed: float | None = 0, unfreeze: float | None = 0,
          repeats: float | None = 1, request: gr.Request = None) -> Iterator[tuple]:
    """Train both arms (``core.jobs``) and stream progress; the last update holds every result. ``TRAIN_OUTPUTS``."""
    from core.train_form import make_config

    state = _state(state, request)
    if state.get("dataset") is None:
        raise _fail("Load a dataset first (Data tab): pick a sample or upload a .zip.", title="No data")
    with _errors_shown_as("Invalid setting"):
        cfg = make_config(backbone, epochs, budget, image_size, target, device, scratch, seed, unfreeze, repeats,
                          max_budget=LIMITS["max_budget"])
    if state["cancel"].is_set():
        state["cancel"] = threading.Event()
        yield _out(TRAIN_OUTPUTS, state=state, status="🛑 Cancelled before training started.", **_IDLE)
        return
    with _errors_shown_as("Cannot train now", state):
        SESSIONS.reserve(state, sessions.TRAIN_RUN_BYTES)
    KEPT.drop(state["sid"])  # a new run replaces the kept one: free its memory before training
    state["continuable"] = "a newer training was started"  # what more time says if this one fails
    job = TrainingJob(state["dataset"], cfg, SESSIONS.new_run_dir(state), state["cancel"])
    log_lines = [f"dataset: {state.get('source')}  backbone: {cfg.backbone}  epochs: {cfg.epochs}  "
                 f"image size: {cfg.image_size or 'auto'}  device: {cfg.device}"]
    first = dict(status="🚀 Training started…", curves=None, speedup="", results=None, verdicts="", confusion=None,
                 per_class=None, mistakes=None, diagnostics="", threshold_group=gr.update(visible=False),
                 more_box=gr.update(visible=False))
    yield from _stream(state, job, log_lines, first)


def more_time(state: dict | None, request: gr.Request = None) -> Iterator[tuple]:
    """Give the scratch arm of this session's run its time budget again: it goes on from where the budget stopped
    it (``core.train.continue_arm``), the curves continue, and the results and files are updated. ``TRAIN_OUTPUTS``."""
    from core import plots

    state = _state(state, request)
    kept = KEPT.get(state["sid"], state.get("run_dir"))
    if kept is None:
        if not state.get("run_dir"):
            raise _fail("Train first: more time goes to the scratch arm of this session's last run.", "Cannot go on")
        why = (state.get("continuable") or "the server keeps only the latest few runs in memory, and this one was "
               "let go")
        raise _fail(f"This run can no longer go on: {why}. Press Train to train again (a larger time budget lets "
                    "scratch get further).", "Cannot go on")
    if state["cancel"].is_set():
        state["cancel"] = threading.Event()
        yield _out(TRAIN_OUTPUTS, state=state, status="🛑 Cancelled before training started.", **_IDLE)
        return
    seconds = more_seconds(kept.cfg)
    with _errors_shown_as("Cannot train now", state):
        SESSIONS.reserve(state, sessions.TRAIN_RUN_BYTES, replaces=Path(state["run_dir"]))
    job = TrainingJob(kept.dataset, kept.cfg, Path(state["run_dir"]), state["cancel"], resume=kept,
                      more_seconds=seconds)
    done = kept.report["runs"]["scratch"]["epochs_done"]
    log_lines = [f"scratch: {seconds:g} s more, from epoch {done:g} of {kept.cfg.epochs}"]
    first = dict(status=f"🚀 Scratch arm: {seconds:g} s more…", more_box=gr.update(visible=False),
                 curves=plots.detached(plots.learning_curves, live_runs(job.history(), kept.cfg.target_accuracy),
                                       kept.cfg.target_accuracy))
    yield from _stream(state, job, log_lines, first)


def more_seconds(cfg: TrainConfig) -> float:
    """How much more time "give scratch more time" adds: the run's own budget (or the server's cap, or the form's
    default budget when neither is set)."""
    return float(cfg.budget_seconds or LIMITS["max_budget"] or DEFAULT_BUDGET_S)


def _stream(state: dict, job: TrainingJob, log_lines: list[str], first: dict) -> Iterator[tuple]:
    """Run ``job`` and stream it into ``TRAIN_OUTPUTS``: ``first`` at once, then the status, log and live curves,
    then every result (a kept run, when its scratch arm can go on) with the verified FP32 model, and last the
    smaller variants once they are built and checked (Train stays off until then: they are written into the run)."""
    from core import plots

    cfg = job.cfg
    with SESSIONS.busy(state["sid"]), closing(job.events()) as events:
        yield _out(TRAIN_OUTPUTS, state=state, log="\n".join(log_lines), live_box=gr.update(visible=True),
                   train_btn=gr.update(interactive=False), cancel_btn=gr.update(interactive=True), **first)
        for event in events:  # Progress and Epoch while it runs, then one of Finished, Failed, Cancelled
            if isinstance(event, Progress):  # the status is the only progress display: Gradio's own bar would
                yield _out(TRAIN_OUTPUTS, status=status_line(event))  # flash over it with a second timer
            elif isinstance(event, Epoch):
                log_lines.append(epoch_line(event.arm, event.record, cfg.epochs))
                curves = plots.detached(plots.learning_curves, live_runs(event.history, cfg.target_accuracy),
                                        cfg.target_accuracy)
                yield _out(TRAIN_OUTPUTS, log="\n".join(log_lines), curves=curves)
            elif isinstance(event, Finished):
                finished = event
                yield _finished(state, finished, log_lines, cfg)
            elif isinstance(event, VariantsReady):  # the finished run's report now has its variants (or the error)
                yield _variants_ready(state, finished.result.report, event.error)
    if isinstance(event, Cancelled):
        state["cancel"] = threading.Event()
        again = "🛑 Training cancelled. Change the settings and train again."
        if job.resume is not None:  # its scratch arm trained on past the results shown: it cannot go on from them
            KEPT.drop(state["sid"])
            state["continuable"] = "its more time was cancelled partway"
            again = "🛑 Cancelled: the results below are as they were. To go further, train again."
        yield _out(TRAIN_OUTPUTS, state=state, status=again, log="\n".join([*log_lines, "cancelled"]), **_IDLE,
                   more_box=gr.update(visible=False))
        return
    if isinstance(event, Failed):
        raise _error(event.error, "Training failed", state, "Try a smaller image size or fewer epochs.")


def _finished(state: dict, finished: Finished, log_lines: list[str], cfg: TrainConfig) -> tuple:
    """Every result of a finished run, its FP32 model offered; while its variants are still being built, Train and
    Cancel stay off and the status says so."""
    state["run_dir"] = str(finished.run_dir)
    SESSIONS.prune_runs(finished.run_dir.parent)
    views = results_views(finished.result.report, finished.result, finished.run_dir, state)
    kept = KEPT.keep(state["sid"], finished.run_dir, finished.result)
    state["continuable"] = None if kept else KEPT.why_not(finished.result) or "it is too large to keep in memory"
    log_lines.append(f"finished in {finished.elapsed:.1f} s; files in the Export tab")
    buttons = _IDLE
    if finished.variants_pending:
        views["status"] += (" `model.onnx` is ready in the Export tab; its smaller copy is being built and checked "
                            "(a few seconds).")
        buttons = dict(train_btn=gr.update(interactive=False), cancel_btn=gr.update(interactive=False))
    return _out(TRAIN_OUTPUTS, state=state, log="\n".join(log_lines), **views, **buttons,
                results_box=gr.update(visible=True), more_box=gr.update(visible=kept),
                more_md=summary.more_time_text(finished.result.report, more_seconds(cfg)) if kept else "")


def _variants_ready(state: dict, report: dict, error: str | None) -> tuple:
    """The Export and Predict tabs once the variants are built (or the reason they were not), and Train back on."""
    run_dir = Path(state["run_dir"])
    choices = SESSIONS.model_choices(state)
    status = (f"✅ Done: trained at {report['image_size']} px; the model and its checked copies are in the Export tab."
              if error is None else "✅ Done. The smaller copies of the model could not be built (the Export tab says "
              "why); `model.onnx` is unaffected.")
    return _out(TRAIN_OUTPUTS, status=status, **export_views(report, run_dir, state), **_IDLE,
                model_choice=gr.update(choices=choices, value=choices[0][1] if choices else None))


def results_views(report: dict, result, run_dir: Path, state: dict) -> dict[str, Any]:
    """Every result component of the Train tab (and the Export/Predict updates) for a finished run; sets
    ``state["last"]`` for the threshold slider."""
    from core import plots

    classes, runs = report["dataset"]["classes"], report["runs"]
    two = len(classes) == 2
    state["last"] = summary.threshold_inputs(report, result)
    thr_md, thr_cm = summary.threshold_view(state["last"], classes[1], 0.5) if two else ("", None)
    choices = SESSIONS.model_choices({"run_dir": str(run_dir), "uploaded_model": state.get("uploaded_model")})
    pairs = {}
    if result.duplicates is not None and state.get("dataset") is result.dataset:  # the pairs with features, too
        state["duplicates"] = result.duplicates
        pairs = dict(zip(("dup_box", "dup_gallery", "drop_btn"), _duplicate_views(result.dataset, result.duplicates)))
    return dict(
        status=f"✅ Done: {len(runs)} arm(s) trained on {report.get('device', '?')} at {report['image_size']} px.",
        curves=plots.detached(plots.learning_curves, runs, report["target_accuracy"]),
        speedup=summary.speedup_text(report), results=summary.results_table(report),
        verdicts=summary.verdicts_md(report),
        confusion=plots.detached(plots.confusion_matrices, runs, classes), per_class=summary.per_class_table(report),
        mistakes=summary.misclassified_gallery(result, classes) or None, diagnostics=summary.diagnostics_md(report),
        threshold_group=gr.update(visible=two), positive=gr.update(choices=classes, value=classes[1]) if two else
        gr.skip(), threshold=gr.update(value=0.5), threshold_md=thr_md, threshold_cm=thr_cm,
        model_choice=gr.update(choices=choices, value=choices[0][1] if choices else None),
        **export_views(report, run_dir, state), **pairs,
    )


def _download_label(variant: str) -> str:
    """The Export tab's button for one variant of the deployable model, e.g. "⬇️ model.int8.onnx (INT8)"."""
    from export.runs import model_filename

    return f"⬇️ {variant_path(model_filename('pretrained'), variant).name} ({VARIANTS[variant].label})"


def export_views(report: dict, run_dir: Path, state: dict | None = None) -> dict[str, Any]:
    """The Export tab for a run: the summary, a download button per file that exists, the checks table."""
    exported = summary.export_summary(report, run_dir, clean=lambda message: SESSIONS.clean(message, state))

    def button(path: Path | None, **label):
        return gr.update(value=str(path), visible=True, **label) if path else gr.update(value=None, visible=False)

    downloads = {output: button(exported.downloads[name], label=_download_label(name))
                 for name, output in DOWNLOADS.items()}
    return dict(export_md=exported.markdown, parity=exported.checks, dl_triton=button(exported.downloads["triton"]),
                dl_report=button(exported.downloads["report"], label="⬇️ report.json"), **downloads)


def update_threshold(state: dict | None, positive: str, threshold: float) -> tuple[str, Any]:
    last = _state(state).get("last")
    return summary.threshold_view(last, positive, threshold) if last else ("Train a model first.", None)


# -------- Predict, Export and Benchmark tabs -------------------------------------------------------------------


def upload_model(file: Any, state: dict | None) -> tuple:
    """Copy an uploaded .onnx into the session folder and check it loads. Outputs: state, model_choice, info."""
    state = _state(state)
    src = upload_path(file)
    if src is None:
        return state, gr.skip(), gr.skip()
    with _errors_shown_as("Not a usable model", state):
        info = SESSIONS.store_model(state, src, upload_name(file, src))
    choice = gr.update(choices=SESSIONS.model_choices(state), value=UPLOADED_MODEL)
    return state, choice, model_description(Path(state["uploaded_model"]).name, info)


def predict(state: dict | None, model_choice: str | None, image: Any, files: Any = None) -> tuple:
    """Classify one image (and/or several files). Outputs: label (top-k dict), info markdown, batch table, and where
    the model looked in the first image (a heat map over it; None for a model exported without the explain outputs)."""
    state = _state(state)
    path = _model_for(state, model_choice)
    file_list = files if isinstance(files, list | tuple) else ([files] if files else [])
    # The Image component gives a file path (so the file is decoded here, bounded); Python callers may pass a PIL image.
    named = [] if image is None else [("image", upload_path(image) if isinstance(image, str | os.PathLike) else image)]
    named += [(upload_name(f, p), p) for f in file_list if (p := upload_path(f)) is not None]
    if not named:
        raise _fail("Upload an image (or paste one / use the webcam) to classify.", title="No image")
    return _classify(state, model_choice, path, named)


def _model_for(state: dict, model_choice: str | None) -> Path:
    with _errors_shown_as("No model", state):
        SESSIONS.folder(state)  # keeps an active session from being swept as idle
        return SESSIONS.model_path(state, model_choice)


def _classify(state: dict, model_choice: str | None, path: Path, named: list[tuple[str, Any]]) -> tuple:
    from core.train_form import inference_device

    limit = UPLOAD_TIME_LIMIT_S if model_choice == UPLOADED_MODEL else None  # a stranger's model is stopped
    with _errors_shown_as("Prediction failed", state):
        predictor = PREDICTORS.get(path, inference_device(), time_limit=limit)
        label, info, table, looked = classify(predictor, load_images(named, predictor), path.name)
    if model_choice in (None, AUTO_MODEL):  # say which variant "the fastest here" is, and why
        reason = sessions.served_choice(path.parent).get("reason")
        info += f"\n\n⚡ {text.md(str(reason))}" if reason else ""
    return label, info, table, looked


def predict_example(state: dict | None, model_choice: str | None, event: gr.SelectData) -> tuple:
    """Classify the validation image clicked in the Predict tab's examples (by its index: the files stay
    server-side). Outputs as ``predict``, the true class first in the info, then the image (shown in the input box,
    so you see which one was classified)."""
    state = _state(state)
    examples = state.get("examples") or []
    if not isinstance(event.index, int) or not 0 <= event.index < len(examples):
        raise _fail("That example is gone: the dataset changed. Pick another one.", title="No image")
    path = _model_for(state, model_choice)
    item = examples[event.index]
    label, info, table, looked = _classify(state, model_choice, path, [(item.name, item)])
    truth = state["dataset"].classes[next(i.label for i in state["dataset"].items if i.path == item)]
    shown = thumbnail(item, 448)  # re-encoded, never the uploaded file itself
    return label, f"True class: **{text.md(truth)}**\n\n{info}", table, looked, shown


def example_snippet() -> str:
    """The Export tab's example: ``export/example_predict.py`` itself, so it can never drift from the real one."""
    return (Path(__file__).resolve().parent / "export" / "example_predict.py").read_text(encoding="utf-8")


EFFICIENCY_OUTPUTS = ("status", "eff_md", "eff_plot", "eff_table", "train_btn", "cancel_btn")


def data_efficiency(state: dict | None, backbone: str, epochs: float, budget: float | None, image_size: float | None,
                    target: float, device: str, scratch: bool, seed: float | None = 0, unfreeze: float | None = 0,
                    repeats: float | None = 1, progress: gr.Progress = gr.Progress(),  # noqa: B008
                    request: gr.Request = None) -> Iterator[tuple]:
    """The data-efficiency curve (``core.efficiency``) with the form's settings and a frozen backbone; scratch
    points stop at one time budget in all. Yields a status when it starts, then the curve. ``EFFICIENCY_OUTPUTS``."""
    from core import plots
    from core.train_form import make_config

    state = _state(state, request)
    if state.get("dataset") is None:
        raise _fail("Load a dataset first (Data tab): pick a sample or upload a .zip.", title="No data")
    with _errors_shown_as("Invalid setting"):
        cfg = make_config(backbone, epochs, budget, image_size, target, device, scratch, seed, 0, 1,
                          max_budget=LIMITS["max_budget"])
    from core.efficiency import DEFAULT_SCRATCH_BUDGET, efficiency_curve, efficiency_frame, efficiency_text
    from core.train import Callbacks, TrainingCancelled

    callbacks = Callbacks(progress=lambda stage, frac, msg: progress(frac, desc=msg), cancel=state["cancel"])
    scratch_budget = LIMITS["max_budget"] or DEFAULT_SCRATCH_BUDGET
    scratch_note = f"; scratch points take up to {scratch_budget / 60:.3g} minutes in all" if cfg.train_scratch else ""
    yield _out(EFFICIENCY_OUTPUTS, status=f"⏳ Drawing the curve: the pretrained points take seconds{scratch_note}.")
    with _errors_shown_as("The curve failed", state), SESSIONS.busy(state["sid"]):
        try:
            curve = efficiency_curve(state["dataset"], cfg, callbacks=callbacks, scratch_budget=scratch_budget)
        except TrainingCancelled:
            yield _out(EFFICIENCY_OUTPUTS, status="🛑 Cancelled.", **_IDLE)
            return
    yield _out(EFFICIENCY_OUTPUTS, status="✅ Curve done: see below the results.", eff_md=efficiency_text(curve),
               eff_plot=plots.detached(plots.efficiency, curve), eff_table=efficiency_frame(curve), **_IDLE)


def benchmark(state: dict | None, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
    """Torch eager vs onnxruntime FP32 vs INT8 at batch 1 and 16. Outputs: markdown, bar chart, table."""
    from core import plots
    from core.bench_view import benchmark_md, benchmark_table, throughput_figure
    from core.device import describe_device, resolve_device

    state = _state(state)
    with _errors_shown_as("Benchmark failed", state):
        path = SESSIONS.model_path(state, "run:fp32")
        from export.bench import benchmark as run_benchmark  # loads onnxruntime's quantization tools: on first use

        progress(0.1, desc="timing PyTorch eager, onnxruntime FP32 and INT8 at batch 1 and 16")
        with SESSIONS.busy(state["sid"]):
            result = run_benchmark(path, batch_sizes=(1, 16), run_dir=path.parent, repeats=BENCH_REPEATS,
                                   warmup=BENCH_WARMUP, print_table=False)
    table = benchmark_table(result)
    fig = plots.detached(throughput_figure, table) if len(table) else None
    return benchmark_md(result, describe_device(resolve_device("cpu"))), fig, table


# -------- The Blocks: one function per tab returns its components by name --------------------------------------


def _data_tab() -> dict[str, Any]:
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, allow_custom_value=True,
                                 label="Built-in sample (works offline)",
                                 info="or type a spec such as sample:shapes?per_class=30&noise=0.1", elem_id="preset")
            zip_in = gr.File(label="…or upload a .zip of class folders (cats/…, dogs/…)", file_types=[".zip"],
                             type="filepath", elem_id="zip-upload")
            data_summary = gr.Markdown("Loading the sample…", elem_id="data-summary")
            warnings = gr.Markdown(elem_id="data-warnings")
        with gr.Column(scale=3, min_width=320):
            counts_plot = gr.Plot(label="Images per class", show_label=False, elem_id="counts-plot")
    gallery = gr.Gallery(label="A few images per class", columns=8, height=300, format="png", object_fit="contain",
                         elem_id="data-gallery", allow_preview=True, fit_columns=False)
    with gr.Column(visible=False, elem_id="dup-box") as dup_box:  # shown when copies are found
        dup_gallery = gr.Gallery(label="Near-duplicate pairs (kind: first file ↔ second file)", columns=3,
                                 height=300, format="png", object_fit="contain", elem_id="dup-gallery",
                                 fit_columns=False)
        drop_btn = gr.Button("🧹 Drop the copies from training", elem_id="drop-btn")
    with gr.Accordion("Skipped files (with the reason)", open=False):
        skipped = gr.Dataframe(headers=["file", "reason"], interactive=False, wrap=True, elem_id="skipped")
    return dict(preset=preset, zip_in=zip_in, summary=data_summary, warnings=warnings, counts_plot=counts_plot,
                gallery=gallery, skipped=skipped, dup_box=dup_box, dup_gallery=dup_gallery, drop_btn=drop_btn)


def _train_settings(image_size: int) -> dict[str, Any]:
    import models
    from core.train_form import backbone_choices, device_choices, run_estimate

    cap = LIMITS["max_budget"]
    c: dict[str, Any] = {"active": gr.Markdown(active_dataset(None, None), elem_id="active-dataset")}
    with gr.Row():
        c["train_btn"] = gr.Button("🚀 Train", variant="primary", elem_id="train-btn", scale=2)
        c["cancel_btn"] = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel-btn", scale=1)
    c["estimate"] = gr.Markdown(run_estimate(DEFAULT_BUDGET_S, True, cap), elem_id="run-estimate")
    c.update(
        backbone=gr.Dropdown(backbone_choices(), value=models.DEFAULT_BACKBONE, label="Backbone", elem_id="backbone"),
        epochs=gr.Slider(1, 50, value=TrainConfig().epochs, step=1, label="Epochs (cap for each arm)",
                         elem_id="epochs"),
        budget=gr.Number(value=DEFAULT_BUDGET_S, minimum=0, maximum=cap or None, elem_id="budget",
                         label=f"Time budget per arm (seconds, at most {cap:g}; 0 = {cap:g})" if cap else
                         "Time budget per arm (seconds, 0 = none)"),
        image_size=gr.Slider(32, 320, value=image_size, step=8, label="Image size (pixels)", elem_id="image-size",
                             info="smaller trains faster; 224 is the backbone's native size"),
        target=gr.Slider(0.5, 1.0, value=0.85, step=0.01, label="Target validation accuracy", elem_id="target"),
        device=gr.Dropdown(device_choices(), value="auto", label="Device", elem_id="device"),
        scratch=gr.Checkbox(value=True, label="Also train the same network from scratch", elem_id="scratch"))
    with gr.Accordion("Advanced", open=False):
        c["seed"] = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
        c["unfreeze"] = gr.Slider(0, models.block_count(models.DEFAULT_BACKBONE), value=0, step=1,
                                  label="Fine-tune the last N backbone blocks", elem_id="unfreeze",
                                  info="0: frozen backbone, features computed once (seconds). N > 0: those blocks "
                                       "train too, on augmented images, like the scratch arm (minutes on a CPU).")
        c["repeats"] = gr.Slider(1, 5, value=1, step=1, label="Repeats", elem_id="repeats",
                                 info="Train both arms this many times (new seed, and a new split unless your folders "
                                      "fix it) and show the average and spread. Each repeat trains the scratch arm "
                                      "again, within its own time budget.")
    return c


def _train_tab(image_size: int) -> dict[str, Any]:
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            c = _train_settings(image_size)
        with gr.Column(scale=2, min_width=400):
            c["status"] = gr.Markdown("Ready: click **Train**.", elem_id="train-status", min_height=72, container=True,
                                      padding=True)
            with gr.Column(visible=False) as c["live_box"]:  # appears when training starts
                c["curves"] = gr.Plot(label="Learning curves (live)", show_label=False, elem_id="curves")
                c["log"] = gr.Textbox(label="Per-epoch log", lines=6, max_lines=12, autoscroll=True,
                                      interactive=False, elem_id="train-log")
    with gr.Column(visible=False) as c["results_box"]:  # appears with the first results
        c.update(_results())
    with gr.Accordion("What the words mean", open=False, elem_id="glossary"):
        gr.Markdown(summary.GLOSSARY)
    with gr.Accordion("How many images do you need?", open=False, elem_id="efficiency"):
        gr.Markdown("Train on 1, 2, 5, 10, 25, 50 and all of your images per class and see each arm's accuracy on the "
                    "same validation images. Uses the settings above with a frozen backbone; the pretrained points "
                    "take seconds, the scratch points share one time budget.")
        c["eff_btn"] = gr.Button("📈 Draw the curve", elem_id="eff-btn")
        c["eff_plot"] = gr.Plot(show_label=False, elem_id="eff-plot")
        c["eff_md"] = gr.Markdown(elem_id="eff-md")
        c["eff_table"] = gr.Dataframe(headers=["per class", "training images"], interactive=False,
                                      label="Accuracy (95% interval) by training images per class", elem_id="eff-table")
    return c


def _results() -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown("## Results")
    c["speedup"] = gr.Markdown(elem_id="speedup")
    with gr.Column(visible=False, elem_id="more-box") as c["more_box"]:  # scratch stopped by its budget
        c["more_md"] = gr.Markdown(elem_id="more-md")
        c["more_btn"] = gr.Button("⏩ Give scratch more time", elem_id="more-btn", size="md")
    c["results"] = gr.Dataframe(headers=["metric"], label="Side by side (validation set)", interactive=False,
                                elem_id="results-table")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            c["verdicts"] = gr.Markdown(elem_id="verdicts")
        with gr.Column(scale=1):
            c["diagnostics"] = gr.Markdown(elem_id="diagnostics")
    c["confusion"] = gr.Plot(label="Confusion matrices", show_label=False, elem_id="confusion")
    with gr.Group(visible=False) as c["threshold_group"]:
        gr.Markdown("### Decision threshold (two classes)")
        with gr.Row():
            c["positive"] = gr.Dropdown([], label="Positive class", allow_custom_value=True, scale=1)
            c["threshold"] = gr.Slider(0.01, 0.99, value=0.5, step=0.01, label="Threshold", scale=3,
                                       elem_id="threshold")
        c["threshold_md"] = gr.Markdown(elem_id="threshold-md")
        c["threshold_cm"] = gr.Dataframe(headers=["true \\ predicted"], label="Confusion matrix at this threshold",
                                         interactive=False)
    c["per_class"] = gr.Dataframe(headers=["class", "support"], label="Per-class report (validation set)",
                                  interactive=False, elem_id="per-class")
    gr.Markdown("**Misclassified validation images** (true → predicted, confidence). Bright: where the model looked "
                "for the class it chose.", elem_id="mistakes-title")
    c["mistakes"] = gr.Gallery(label="Misclassified validation images", show_label=False, columns=6, height=300,
                               format="png", object_fit="contain", elem_id="mistakes", fit_columns=False)
    return c


def _predict_tab() -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            c["model_choice"] = gr.Dropdown([], label="Model", allow_custom_value=True, elem_id="model-choice",
                                            info="the ONNX export of this session's run, or an uploaded one")
            c["image_in"] = uploaded_image(label="Image (upload, webcam or paste from the clipboard)", image_mode=None,
                                           sources=["upload", "webcam", "clipboard"], height=280,
                                           elem_id="predict-image")
            c["predict_btn"] = gr.Button("🔎 Predict", variant="primary", elem_id="predict-btn")
            c["examples"] = gr.Gallery(label="…or click one of your validation images (after training)", columns=4,
                                       height=220, format="png", object_fit="contain", allow_preview=False,
                                       elem_id="predict-examples")
            with gr.Accordion("Classify several images at once", open=False):
                c["files_in"] = gr.File(label="Images", file_count="multiple", file_types=["image"], type="filepath",
                                        elem_id="predict-files")
            with gr.Accordion("Use a model exported earlier (.onnx)", open=False):
                c["onnx_in"] = gr.File(label="Exported model (.onnx)", file_types=[".onnx"], type="filepath",
                                       elem_id="onnx-upload")
        with gr.Column(scale=1, min_width=320):
            c["label_out"] = gr.Label(num_top_classes=5, label="Prediction (top-k)", elem_id="predict-label")
            c["predict_info"] = gr.Markdown(elem_id="predict-info")
            c["looked"] = gr.Image(label="Where it looked", type="numpy", format="png", interactive=False,
                                   height=240, elem_id="predict-looked",
                                   placeholder="After a prediction: which parts of the picture the answer rests on "
                                               "(models trained here; bright = counted most)")
            c["batch_df"] = gr.Dataframe(headers=["image", "prediction", "fits a class?", "probability", "top-k"],
                                         label="All images", interactive=False, wrap=True, elem_id="predict-table",
                                         column_widths=["26%", "18%", "14%", "14%", "28%"])
    return c


def _export_tab() -> dict[str, Any]:
    c: dict[str, Any] = {"export_md": gr.Markdown("Train a model first: its files appear here.", elem_id="export-md")}
    with gr.Row():
        for name, output in DOWNLOADS.items():
            c[output] = gr.DownloadButton(_download_label(name),
                                          visible=False, variant="primary" if name == "fp32" else "secondary",
                                          elem_id=output.replace("_", "-"))
        c["dl_triton"] = gr.DownloadButton("⬇️ Triton repository (.zip)", visible=False, elem_id="dl-triton")
        c["dl_report"] = gr.DownloadButton("⬇️ report.json", visible=False, elem_id="dl-report")
    c["parity"] = gr.Dataframe(headers=["model", "check", "result", "details"], interactive=False,
                               label="Checks: parity with PyTorch and accuracy of the variants",
                               wrap=True, elem_id="parity", column_widths=["24%", "18%", "24%", "34%"],
                               max_height=1000)
    gr.Markdown("### Use the model without PyTorch\nOnly `onnxruntime`, `numpy` and `Pillow` are needed:")
    gr.Code(example_snippet(), language="python", interactive=False, elem_id="snippet")
    return c


def _bench_tab() -> dict[str, Any]:
    from core.bench_view import COLUMNS as BENCH_COLUMNS

    gr.Markdown("Time the exported model: PyTorch eager vs onnxruntime (FP32, and the smaller variants the export "
                "kept), at batch size 1 and 16, on this server. It runs in the training queue so timings are not "
                "disturbed, and takes about half a minute on a 2-core CPU.")
    return dict(bench_btn=gr.Button("⏱️ Run benchmark", variant="primary", elem_id="bench-btn"),
                bench_md=gr.Markdown(elem_id="bench-md"),
                bench_plot=gr.Plot(label="Throughput", show_label=False, elem_id="bench-plot"),
                bench_df=gr.Dataframe(headers=BENCH_COLUMNS, label="Timings", interactive=False,
                                      elem_id="bench-table"))


def build_app(session_root_dir: str | os.PathLike[str] | None = None, *, concurrency: int = 1,
              predict_concurrency: int = 8, max_budget: float = MAX_BUDGET_S) -> gr.Blocks:
    """Build the UI (nothing is launched, loaded or downloaded here). ``max_budget``: seconds per arm at most
    (0: no limit, for a private server)."""
    from core.train_form import default_image_size

    if session_root_dir is not None:
        configure(session_root_dir)
    LIMITS["max_budget"] = max_budget
    with gr.Blocks(title="Transfer Lab", analytics_enabled=False, delete_cache=(1800, 7200)) as demo:
        c: dict[str, Any] = {"state": gr.State(new_session, delete_callback=delete_session)}
        gr.Markdown(INTRO)
        with gr.Tabs(selected="train"):  # the first screen: the active dataset and the Train button
            # Short titles: all five fit a phone's width instead of hiding behind a "•••" menu.
            for tab_id, title, make in (("train", "Train", lambda: _train_tab(default_image_size())),
                                        ("data", "Data", _data_tab), ("predict", "Predict", _predict_tab),
                                        ("export", "Export", _export_tab), ("bench", "Benchmark", _bench_tab)):
                with gr.Tab(title, id=tab_id):
                    c.update(make())
        _wire(demo, c, concurrency, predict_concurrency)
    LIMITS["demo"] = demo
    return demo


def _wire(demo: gr.Blocks, c: dict[str, Any], concurrency: int, predict_concurrency: int) -> None:
    """The events. Page loads have their own pool; uploads share a small one; training and the benchmark take turns
    in one queue; predictions run wide. Every queued request counts against its session's ``PENDING_PER_SESSION``."""
    from core.train_form import run_estimate

    state, data_out, train_out = c["state"], [c[n] for n in DATA_OUTPUTS], [c[n] for n in TRAIN_OUTPUTS]

    def data(n_inputs: int, what: str = "upload") -> dict:
        return dict(concurrency_limit=2, concurrency_id="data", validator=_session_limit("data", n_inputs, what))

    # Loading the page never waits behind someone's upload: it only loads a built-in sample.
    demo.load(on_page_load, [state, c["preset"]], data_out, api_visibility="private", concurrency_limit=4,
              concurrency_id="page")
    c["preset"].input(load_sample, [c["preset"], state], data_out, api_name="load_sample", trigger_mode="once",
                      **data(2, "dataset load"))
    c["zip_in"].upload(load_zip, [c["zip_in"], state], data_out, api_name="load_zip", **data(2))
    c["drop_btn"].click(drop_copies, [state], data_out, api_name="drop_copies", **data(1, "dataset change"))
    # Train: the click arms a fresh cancel flag (unqueued, so Cancel works while queued), then the job waits its turn.
    train_inputs = [state, *(c[n] for n in TRAIN_INPUTS)]
    c["train_btn"].click(arm_training, [state], [state, c["status"], c["train_btn"], c["cancel_btn"]], queue=False,
                         api_visibility="private").success(
        train, train_inputs, train_out, api_name="train", concurrency_limit=concurrency, concurrency_id="train",
        show_progress_on=[c["status"]], validator=_session_limit("train", len(train_inputs), "training")).success(
        None, js=SCROLL_TO_RESULTS)
    for button in ("train_btn", "eff_btn", "more_btn"):
        c[button].click(None, js=SCROLL_TO_STATUS, queue=False)
    c["eff_btn"].click(arm_training, [state], [state, c["status"], c["train_btn"], c["cancel_btn"]], queue=False,
                       api_visibility="private").success(
        data_efficiency, train_inputs, [c[n] for n in EFFICIENCY_OUTPUTS], api_name="efficiency",
        concurrency_limit=concurrency, concurrency_id="train", show_progress_on=[c["status"]],
        validator=_session_limit("train", len(train_inputs), "training"))
    c["more_btn"].click(arm_training, [state], [state, c["status"], c["train_btn"], c["cancel_btn"]], queue=False,
                        api_visibility="private").success(
        more_time, [state], train_out, api_name="more_time", concurrency_limit=concurrency, concurrency_id="train",
        show_progress_on=[c["status"]], validator=_session_limit("train", 1, "training")).success(
        None, js=SCROLL_TO_RESULTS)
    c["cancel_btn"].click(cancel_training, [state], [c["status"]], queue=False, api_name="cancel")
    for field in (c["budget"], c["scratch"]):
        field.change(lambda budget, scratch: run_estimate(budget, scratch, LIMITS["max_budget"]),
                     [c["budget"], c["scratch"]], [c["estimate"]], queue=False, api_visibility="private")
    c["backbone"].change(unfreeze_range, [c["backbone"]], [c["unfreeze"]], queue=False, api_visibility="private")
    threshold_io = ([state, c["positive"], c["threshold"]], [c["threshold_md"], c["threshold_cm"]])
    c["threshold"].input(update_threshold, *threshold_io, api_name="threshold", concurrency_limit=None,
                         show_progress="hidden")
    c["positive"].input(update_threshold, *threshold_io, api_visibility="private", concurrency_limit=None,
                        show_progress="hidden")
    predict_io = ([state, c["model_choice"], c["image_in"], c["files_in"]],
                  [c["label_out"], c["predict_info"], c["batch_df"], c["looked"]])
    wide = dict(concurrency_limit=predict_concurrency, concurrency_id="predict",
                validator=_session_limit("predict", len(predict_io[0]), "prediction"))
    c["predict_btn"].click(predict, *predict_io, api_name="predict", **wide)
    c["examples"].select(predict_example, [state, c["model_choice"]], [*predict_io[1], c["image_in"]],
                         api_visibility="private", **{
        **wide, "validator": _session_limit("predict", 2, "prediction")})
    for upload in (c["image_in"].upload, c["files_in"].upload):
        upload(predict, *predict_io, api_visibility="private", **wide)
    c["onnx_in"].upload(upload_model, [c["onnx_in"], state], [state, c["model_choice"], c["predict_info"]],
                        api_name="upload_model", **data(2))
    c["bench_btn"].click(benchmark, [state], [c["bench_md"], c["bench_plot"], c["bench_df"]], api_name="benchmark",
                         concurrency_limit=concurrency, concurrency_id="train",
                         validator=_session_limit("train", 1, "training or benchmark run"))
    demo.unload(on_unload)  # tab closed: mark the folder (deleted after a grace period)


# -------- Command line -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Transfer Lab web UI: train a new head on a frozen pretrained backbone and the same "
                    "network from scratch, compare them, predict with the exported ONNX model, download it.",
    )
    add_launch_options(p)
    p.add_argument("--concurrency", type=int, default=1,
                   help="training jobs that run at once (default 1; others wait in the queue). Above 1, one job's "
                        "ONNX export can break another's training: torch's exporter keeps process-wide state")
    p.add_argument("--max-budget", type=float, default=MAX_BUDGET_S, metavar="SECONDS",
                   help=f"longest time budget per arm a visitor may ask for; a budget of 0 in the form means this "
                        f"(default {MAX_BUDGET_S}; 0 = no limit, only for a private server)")
    p.add_argument("--session-quota", type=float, default=sessions.SESSION_QUOTA_BYTES / 1024**2, metavar="MB",
                   help="disk space one visitor's session may use (uploads, runs, models; default %(default).0f MB)")
    p.add_argument("--disk-quota", type=float, default=None, metavar="MB",
                   help="disk space all sessions together may use; the longest idle sessions are removed first "
                        f"(default: half the free disk at start, at most "
                        f"{sessions.GLOBAL_QUOTA_MAX_BYTES // 1024**3} GB)")
    p.add_argument("--session-root", default=None,
                   help="folder for the per-session data, runs and models (default: $TRANSFER_LAB_APP_ROOT or "
                        "<tmp>/transfer-lab-app)")
    args = p.parse_args(argv)
    args.port = args.port or default_port()
    if args.model or args.examples:
        p.error("--model and --examples start the serving app: run `python app.py --model MODEL.onnx` on its own")
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if args.session_quota <= 0 or (args.disk_quota is not None and args.disk_quota <= 0):
        p.error("--session-quota and --disk-quota must be positive numbers of MB")
    if args.max_budget < 0:
        p.error("--max-budget must be 0 (no limit) or a number of seconds")
    return args


def servable_root(root: Path) -> Path:
    """``root`` if Gradio can hand its files to a browser. Gradio serves only its own cache and copies an output
    there when the file lies under the temp folder or the working directory. The root is deliberately not in
    ``allowed_paths``: that would serve every file under it, inline and with its real type, to anyone with a path."""
    root = Path(root).resolve()
    homes = [Path(tempfile.gettempdir()).resolve(), Path.cwd().resolve()]
    if not any(root == h or h in root.parents for h in homes):
        raise SystemExit(f"--session-root {root} must be inside the temp folder ({homes[0]}) or the working "
                         f"directory ({homes[1]}): the app's outputs are handed to browsers only from there.")
    return root


def main(argv: list[str] | None = None) -> None:
    import models
    from core.device import resolve_device
    from core.features import warm_up_feature_engine
    from core.train_form import default_image_size

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mb = 1024**2
    root = servable_root(configure(args.session_root, session_quota_bytes=int(args.session_quota * mb),
                                   global_quota_bytes=int(args.disk_quota * mb) if args.disk_quota else None))
    SESSIONS.start_housekeeping()  # stale temp files, idle sessions and the sample cache: now, then every 10 min
    # Build the default backbone's cached ONNX feature engine while the first visitor looks at the Data tab.
    warm_up_feature_engine(models.DEFAULT_BACKBONE, default_image_size(), resolve_device("auto"))
    demo = build_app(root, concurrency=args.concurrency, max_budget=args.max_budget)
    demo.queue(max_size=64, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=args.max_file_size,
                css=CSS, theme=gr.themes.Soft(), footer_links=["api", "gradio"])


def __getattr__(name: str) -> Any:
    """``app.demo`` (what ``gradio app.py`` looks for) is built on first use, not at import."""
    if name == "demo":
        demo = build_app()
        globals()["demo"] = demo
        return demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
