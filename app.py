"""Gradio UI of the transfer-learning lab: data -> train & compare -> predict -> export -> benchmark.

This file is only the user interface: every piece of logic lives in ``core/``, ``export/`` and ``models/``.
Importing it starts nothing and makes no network calls; ``python app.py --help`` lists the launch options.

Multi-user design (public Hugging Face Space):
- every browser session gets a random id in ``gr.State`` and a private folder ``<root>/<id>/`` for its upload,
  runs and exported models; nothing a visitor sends is used as a server path (uploads are copied in, model
  choices are keys that map to files inside that folder);
- session folders are deleted when Gradio drops the session state, shortly after the tab is closed, and
  in any case when idle for 2 hours (swept whenever a new session starts);
- training (and benchmarking) take turns in one queue (``--concurrency`` at a time, the queue shows each
  visitor's position); predictions run concurrently through one shared ``core.runtime.predictor.Predictor`` per model
  file, cached by path and modification time.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

import models
from core import diagnostics, plots
from core.data import Dataset, DatasetError, load_dataset
from core.device import describe_device, resolve_device
from core.features import warm_up_feature_engine
from core.runtime.images import open_rgb
from core.runtime.predictor import PredictorCache, check_model_file
from core.metrics import misclassified
from core.safezip import UnsafeArchiveError, safe_extract
from core.samples import SampleError, is_sample_spec, parse_sample_spec
from core.summary import ARM_TITLES, comparison_rows
from core.summary import pct as _pct
from core.summary import sec as _sec
from export.triton import write_triton_zip

log = logging.getLogger("transfer_lab.app")

# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------

PRESETS: dict[str, str] = {
    "shapes (balanced)": "sample:shapes?per_class=60&size=64",
    "shapes (imbalanced 10:1)": "sample:shapes?per_class=60&imbalance=0.1&size=64",
    "shapes (with train/val duplicates)": "sample:shapes?per_class=60&duplicates=10&size=64",
    "digits": "sample:digits",
}
DEFAULT_PRESET = "shapes (balanced)"
# Limits on sample specs typed by a visitor (sample generation costs CPU and disk).
MAX_SPEC_PER_CLASS = 300
MAX_SPEC_IMAGE_SIZE = 256
# Limits on uploads beyond Gradio's max_file_size.
MAX_ZIP_ENTRIES = 20_000
MAX_ZIP_BYTES = 1024**3
MAX_PREDICT_IMAGES = 64
MAX_ONNX_BYTES = 512 * 1024**2
# Session housekeeping.
SESSION_MAX_IDLE_S = 2 * 3600
SESSION_CLOSED_GRACE_S = 15 * 60
RUNS_KEPT_PER_SESSION = 3
_SID_RE = re.compile(r"^[0-9a-f]{16}$")

TRAINED_MODELS = {  # model-choice key -> (file name in the run folder, label)
    "run:fp32": ("model.onnx", "trained in this session: FP32 (model.onnx)"),
    "run:int8": ("model.int8.onnx", "trained in this session: INT8 (model.int8.onnx)"),
    "run:fp16": ("model.fp16.onnx", "trained in this session: FP16 (model.fp16.onnx)"),
}
UPLOADED_MODEL = "upload"

INTRO = """
# 🔬 Transfer-learning lab
Train a new classifier head on a **frozen pretrained backbone** and the **same network from scratch** on your
images, compare them side by side, try the exported ONNX model, and download it.
**To start, just click _Train_ on the _Train & compare_ tab**: a built-in sample is already loaded and the defaults
work on a CPU in about a minute. To use your own images, upload a `.zip` of class folders on the _Data_ tab.
"""

CSS = """
#verdicts .good {color: #15803d; font-weight: 600}
#verdicts .fair {color: #b45309; font-weight: 600}
#verdicts .poor {color: #b91c1c; font-weight: 600}
.small-note {font-size: 0.85em; opacity: 0.8}
"""

# Errors caused by what the visitor gave us, shown as their message (ModelFormatError is a ValueError).
USER_ERRORS: tuple[type[BaseException], ...] = (DatasetError, UnsafeArchiveError, SampleError, ValueError,
                                                models.BackboneWeightsError, FileNotFoundError)


# ---------------------------------------------------------------------------------------------------------------
# Sessions: a random id in gr.State -> a private folder under the session root
# ---------------------------------------------------------------------------------------------------------------

_ROOT: Path | None = None
_ACTIVE: set[str] = set()  # sessions with a job running: never swept
_ACTIVE_LOCK = threading.Lock()
_SWEEP_LOCK = threading.Lock()
_LAST_SWEEP = [0.0]


def session_root() -> Path:
    """Folder that holds every session's folder (``--session-root`` / env ``TRANSFER_LAB_APP_ROOT``)."""
    global _ROOT
    if _ROOT is None:
        env = os.environ.get("TRANSFER_LAB_APP_ROOT")
        _ROOT = Path(env) if env else Path(tempfile.gettempdir()) / "transfer-lab-app"
    _ROOT.mkdir(parents=True, exist_ok=True)
    return _ROOT


def configure(session_root_dir: str | os.PathLike[str] | None = None) -> Path:
    global _ROOT
    if session_root_dir is not None:
        _ROOT = Path(session_root_dir).resolve()
    return session_root()


def new_session() -> dict[str, Any]:
    """Initial value of the per-browser-session ``gr.State`` (called by Gradio once per session, then deep-copied,
    so it holds plain values only; the cancel flag is added by ``_ensure_state``)."""
    return {"sid": secrets.token_hex(8), "dataset": None, "source": None, "run_dir": None, "last": None,
            "uploaded_model": None}


_HASH_TO_SID: OrderedDict[str, str] = OrderedDict()  # Gradio session hash -> our id, for the unload event
_HASH_LOCK = threading.Lock()


def _ensure_state(state: dict | None, request: gr.Request | None = None) -> dict:
    if not isinstance(state, dict) or not _SID_RE.match(str(state.get("sid", ""))):
        state = new_session()
    state.setdefault("cancel", threading.Event())
    session_hash = getattr(request, "session_hash", None)
    if session_hash:
        with _HASH_LOCK:
            _HASH_TO_SID[session_hash] = state["sid"]
            _HASH_TO_SID.move_to_end(session_hash)
            while len(_HASH_TO_SID) > 10_000:
                _HASH_TO_SID.popitem(last=False)
    return state


def session_dir(state: dict, *, create: bool = True) -> Path:
    """The session's private folder (touched on every use, so that idle sessions can be swept)."""
    sid = state["sid"]
    if not _SID_RE.match(sid):  # the id is generated here, never taken from the visitor; belt and braces
        raise gr.Error("Invalid session; reload the page.")
    folder = session_root() / sid
    if create:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".closed").unlink(missing_ok=True)
        os.utime(folder)
    return folder


def delete_session(state: Any) -> None:
    """``gr.State`` delete callback: remove the session folder and its cached predictors."""
    sid = state.get("sid") if isinstance(state, dict) else None
    if not sid or not _SID_RE.match(sid):
        return
    with _ACTIVE_LOCK:
        if sid in _ACTIVE:
            return
    folder = session_root() / sid
    PREDICTORS.evict_under(folder)
    shutil.rmtree(folder, ignore_errors=True)


def mark_closed(state: Any) -> None:
    """The tab was closed: mark the folder; the sweep deletes it after a grace period (the tab may reconnect)."""
    sid = state.get("sid") if isinstance(state, dict) else None
    if sid and _SID_RE.match(sid) and (session_root() / sid).is_dir():
        (session_root() / sid / ".closed").touch()


def sweep_sessions(*, max_idle_s: float = SESSION_MAX_IDLE_S, closed_grace_s: float = SESSION_CLOSED_GRACE_S,
                   min_interval_s: float = 60.0) -> list[str]:
    """Delete session folders idle for ``max_idle_s`` or closed ``closed_grace_s`` ago; returns deleted ids."""
    now = time.time()
    with _SWEEP_LOCK:
        if now - _LAST_SWEEP[0] < min_interval_s:
            return []
        _LAST_SWEEP[0] = now
    deleted = []
    root = session_root()
    for folder in root.iterdir():
        if not folder.is_dir() or not _SID_RE.match(folder.name):
            continue
        with _ACTIVE_LOCK:
            if folder.name in _ACTIVE:
                continue
        try:
            idle = now - folder.stat().st_mtime
            closed = folder / ".closed"
            closed_for = now - closed.stat().st_mtime if closed.exists() else None
        except OSError:
            continue
        if idle > max_idle_s or (closed_for is not None and closed_for > closed_grace_s):
            PREDICTORS.evict_under(folder)
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(folder.name)
    return deleted


class _Active:
    """Marks a session busy (not swept) for the duration of a job."""

    def __init__(self, sid: str):
        self.sid = sid

    def __enter__(self):
        with _ACTIVE_LOCK:
            _ACTIVE.add(self.sid)

    def __exit__(self, *exc):
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self.sid)


def _clean(message: str, state: dict | None = None) -> str:
    """Hide server folders in messages shown to visitors."""
    text = str(message)
    if state is not None:
        text = text.replace(str(session_root() / state["sid"]) + os.sep, "").replace(
            str(session_root() / state["sid"]), "your upload")
    return text.replace(str(session_root()), "<server>")


# ---------------------------------------------------------------------------------------------------------------
# Shared predictors: one onnxruntime session per model file, shared by every request
# ---------------------------------------------------------------------------------------------------------------

@functools.cache  # the GPU does not come or go while the server runs: probe it once, not on every request
def _inference_device() -> str:
    """"auto" where a CUDA GPU is visible; else "cpu", so a GPU build of onnxruntime does not warn on every load."""
    return "auto" if resolve_device("auto").type == "cuda" else "cpu"


PREDICTORS = PredictorCache()


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------

_PLOT_LOCK = threading.Lock()  # pyplot's figure registry is global state


def _figure(make: Callable[..., Any], *args, **kwargs):
    """Build a matplotlib figure with ``core.plots`` and detach it from pyplot (no leak, thread-safe)."""
    import matplotlib.pyplot as plt

    with _PLOT_LOCK:
        fig = make(*args, **kwargs)
        plt.close(fig)
    return fig


def _thumb(path: Path, size: int = 112) -> Image.Image:
    img = open_rgb(path)
    img.thumbnail((size, size))
    return img


def _preset_spec(choice: str) -> tuple[str, str, bool]:
    """(label, sample spec, shared) for a preset name or a typed ``sample:`` spec; never a path."""
    choice = (choice or "").strip()
    if choice in PRESETS:
        return choice, PRESETS[choice], True
    if is_sample_spec(choice):
        name, kwargs = parse_sample_spec(choice)  # SampleError names the bad option
        if kwargs.get("per_class", 0) > MAX_SPEC_PER_CLASS:
            raise SampleError(f"per_class={kwargs['per_class']} is more than this app allows ({MAX_SPEC_PER_CLASS}); "
                              "run `python -m core compare` locally for bigger samples")
        if kwargs.get("image_size", 0) > MAX_SPEC_IMAGE_SIZE:
            raise SampleError(f"size={kwargs['image_size']} is more than this app allows ({MAX_SPEC_IMAGE_SIZE})")
        return choice, choice, False
    raise SampleError(f"{choice!r} is not one of the built-in samples ({', '.join(PRESETS)}) or a sample spec "
                      "such as 'sample:shapes?per_class=20&noise=0.1'. To use your own images, upload a .zip.")


def _backbone_choices() -> list[tuple[str, str]]:
    out = []
    for name in models.list_backbones():
        spec = models.get_backbone_spec(name)
        out.append((f"{name} ({'offline' if spec.offline else 'downloads weights'})", name))
    return out


def unfreeze_range(backbone: str) -> dict:
    """The fine-tune slider's range for ``backbone`` (its number of blocks)."""
    return gr.update(maximum=models.block_count(backbone), value=0)


def _device_choices() -> list[tuple[str, str]]:
    auto = resolve_device("auto")
    choices = [(f"auto → {describe_device(auto)}", "auto"), ("cpu", "cpu")]
    if auto.type == "cuda":
        choices.append((f"cuda ({describe_device(auto)})", "cuda"))
    return choices


def _default_image_size() -> int:
    """The training core's default: the backbone's own size on a GPU, 160 px on a CPU."""
    from core.train import TrainConfig

    return TrainConfig().resolved_image_size(resolve_device("auto"))


# ---------------------------------------------------------------------------------------------------------------
# Data tab
# ---------------------------------------------------------------------------------------------------------------

DATA_OUTPUTS = ("state", "summary", "counts_plot", "gallery", "skipped", "warnings")


def _dataset_views(ds: Dataset, label: str) -> tuple:
    counts = ds.counts()
    n_split = {s: sum(c.values()) for s, c in counts.items()}
    split_how = "predefined train/val folders" if ds.predefined_split else "random stratified split (seed 0)"
    summary = (f"**{label}**: {len(ds.classes)} classes ({', '.join(ds.classes[:12])}"
               f"{', …' if len(ds.classes) > 12 else ''}), {len(ds.items)} images "
               f"({', '.join(f'{s} {n}' for s, n in n_split.items())}; {split_how}).")
    if ds.skipped:
        summary += f" {len(ds.skipped)} file(s) skipped (see the table below)."
    fig = _figure(plots.class_counts, counts)
    gallery = []
    per_class = 6 if len(ds.classes) <= 4 else 4
    for ci, cls in enumerate(ds.classes[:12]):
        for it in [i for i in ds.items if i.label == ci][:per_class]:
            try:
                gallery.append((_thumb(it.path), f"{cls} ({it.split})"))
            except Exception:  # noqa: BLE001 - a thumbnail must never break the page
                continue
    skipped = pd.DataFrame([{"file": s.file, "reason": s.reason} for s in ds.skipped], columns=["file", "reason"])
    balance = diagnostics.class_balance(counts["train"])
    dupes = diagnostics.duplicate_hashes_across_splits(ds.items)
    lines = ["### Before training"]
    lines.append(("⚠️ " if balance["flagged"] else "✅ ") + balance["message"])
    if dupes["flagged"]:
        pairs = dupes.get("exact_duplicates", [])[:5]
        root = str(ds.root) + os.sep
        shown = "; ".join(f"`{p['train'].replace(root, '')}` = `{p['other'].replace(root, '')}`" for p in pairs)
        lines.append(f"⚠️ {dupes['message']} Examples: {shown}")
    else:
        lines.append("✅ " + dupes["message"])
    if ds.skipped:
        lines.append(f"ℹ️ {len(ds.skipped)} file(s) were skipped because they are not usable images.")
    return summary, fig, gallery, skipped, "\n\n".join(lines)


def _load(state: dict, label: str, loader: Callable[[], Dataset]) -> tuple:
    try:
        ds = loader()
    except USER_ERRORS as exc:
        raise gr.Error(_clean(exc, state), title="Cannot use this dataset") from None
    state["dataset"], state["source"] = ds, label
    summary, fig, gallery, skipped, warnings = _dataset_views(ds, label)
    return state, summary, fig, gallery, skipped, warnings


def load_sample(choice: str, state: dict | None, request: gr.Request = None) -> tuple:
    """Load a built-in sample (preset name or a ``sample:`` spec). Outputs: ``DATA_OUTPUTS``."""
    state = _ensure_state(state, request)
    sweep_sessions()
    folder = session_dir(state)
    try:
        label, spec, shared = _preset_spec(choice)
    except SampleError as exc:
        raise gr.Error(str(exc), title="Unknown sample") from None
    cache = session_root() / "_shared" if shared else folder / "cache"
    return _load(state, label, lambda: load_dataset(spec, cache=cache))


def load_zip(file: Any, state: dict | None, request: gr.Request = None) -> tuple:
    """Load an uploaded .zip of class folders (copied into the session folder first). Outputs: ``DATA_OUTPUTS``."""
    state = _ensure_state(state, request)
    sweep_sessions()
    src = _upload_path(file)
    if src is None:
        raise gr.Error("No file was uploaded.")
    name = Path(getattr(file, "orig_name", None) or src.name).name
    folder = session_dir(state)
    with _ACTIVE_LOCK:
        busy = state["sid"] in _ACTIVE
    if busy:
        raise gr.Error("A training run of this session is using the current data; wait for it to finish "
                       "(or cancel it) before uploading another dataset.", title="Busy")
    with open(src, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise gr.Error(f"{name} is not a .zip file. Zip a folder that holds one sub-folder per class "
                           "(e.g. cats/…, dogs/…) and upload that.", title="Not a zip file")
    # Each upload unpacks into a new folder; the earlier one is deleted only once this one has loaded, so a
    # broken zip leaves the session's current dataset as it was.
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="upload-", dir=data))
    zip_copy = target / "upload.zip"
    shutil.copyfile(src, zip_copy)

    def loader() -> Dataset:
        root = safe_extract(zip_copy, target / "files", max_entries=MAX_ZIP_ENTRIES, max_total_bytes=MAX_ZIP_BYTES)
        zip_copy.unlink(missing_ok=True)
        return load_dataset(root, cache=folder / "cache")

    try:
        out = _load(state, f"upload {name}", loader)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    for earlier in data.iterdir():  # one uploaded dataset per session
        if earlier != target:
            shutil.rmtree(earlier, ignore_errors=True)
    return out


def _upload_path(file: Any) -> Path | None:
    """The server-side path of a Gradio upload (a path string or a FileData-like object), or None."""
    if file is None:
        return None
    if isinstance(file, list | tuple):
        file = file[0] if file else None
        if file is None:
            return None
    path = getattr(file, "path", None) or getattr(file, "name", None) or file
    path = Path(str(path))
    if not path.is_file() or path.is_symlink():
        raise gr.Error("The uploaded file could not be read; please upload it again.")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Train & compare tab
# ---------------------------------------------------------------------------------------------------------------

TRAIN_OUTPUTS = (
    "state", "status", "log", "curves", "speedup", "results", "verdicts", "confusion", "per_class", "mistakes",
    "diagnostics", "threshold_group", "positive", "threshold", "threshold_md", "threshold_cm", "export_md",
    "dl_onnx", "dl_int8", "dl_fp16", "dl_triton", "dl_report", "parity", "model_choice", "train_btn", "cancel_btn",
)


def _out(names: tuple[str, ...], **values) -> tuple:
    unknown = set(values) - set(names)
    if unknown:  # pragma: no cover - programming error
        raise KeyError(f"unknown outputs {unknown}")
    return tuple(values.get(n, gr.skip()) for n in names)


def make_config(backbone: str, epochs: float, budget: float | None, image_size: float | None, target: float,
                device: str, scratch: bool, seed: float | None = 0, unfreeze: float | None = 0):
    """A validated ``TrainConfig`` from the form values (ValueError with a readable message otherwise)."""
    from core.train import TrainConfig

    if backbone not in models.list_backbones():
        models.get_backbone_spec(str(backbone))  # raises with the valid names
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}.")
    return TrainConfig(
        backbone=backbone,
        epochs=int(epochs),
        budget_seconds=float(budget) if budget else None,
        image_size=int(image_size) if image_size else None,
        target_accuracy=float(target),
        device=device,
        seed=int(seed or 0),
        train_scratch=bool(scratch),
        unfreeze_blocks=int(unfreeze or 0),
    ).validated()


def arm_training(state: dict | None) -> tuple:
    """Runs (unqueued) right when Train is clicked: a fresh cancel flag, so Cancel also works while queued."""
    state = _ensure_state(state)
    state["cancel"] = threading.Event()
    return state, "⏳ Waiting for a free training slot…", gr.update(interactive=False), gr.update(interactive=True)


def cancel_training(state: dict | None) -> str:
    state = _ensure_state(state)
    state["cancel"].set()
    return "🛑 Cancelling after the current step…"


_STAGES = {  # (scratch arm?, backbone blocks fine-tuned?) -> stage -> (start, end) of the overall progress bar
    (True, False): {"decode": (0.0, 0.1), "features": (0.1, 0.3), "pretrained": (0.3, 0.4), "scratch": (0.4, 0.9),
                    "done": (0.9, 0.9), "export": (0.9, 1.0)},
    (False, False): {"decode": (0.0, 0.2), "features": (0.2, 0.6), "pretrained": (0.6, 0.8), "done": (0.8, 0.8),
                     "export": (0.8, 1.0)},
    (True, True): {"decode": (0.0, 0.05), "pretrained": (0.05, 0.45), "scratch": (0.45, 0.9), "done": (0.9, 0.9),
                   "export": (0.9, 1.0)},
    (False, True): {"decode": (0.0, 0.1), "pretrained": (0.1, 0.85), "done": (0.85, 0.85), "export": (0.85, 1.0)},
}


def _live_curves(history: dict[str, list[dict]], target: float):
    runs = {arm: {"history": h, "time_to_target_seconds": next((r["seconds"] for r in h
                                                                if r["val_accuracy"] >= target), None)}
            for arm, h in history.items() if h}
    return _figure(plots.learning_curves, runs, target) if runs else gr.skip()


def _epoch_line(arm: str, r: dict, epochs: int) -> str:
    return (f"{arm:10s} epoch {r['epoch']:>3}/{epochs}  {r['seconds']:7.1f}s  train acc {r['train_accuracy']:6.1%}"
            f"  val acc {r['val_accuracy']:6.1%}  val loss {r['val_loss']:.3f}")


def train(state: dict | None, backbone: str, epochs: float, budget: float | None, image_size: float | None,
          target: float, device: str, scratch: bool, seed: float | None = 0, unfreeze: float | None = 0,
          progress: gr.Progress = gr.Progress(), request: gr.Request = None) -> Iterator[tuple]:  # noqa: B008
    """Train both arms in a worker thread and stream progress; the last update holds every result.

    Outputs: ``TRAIN_OUTPUTS``.
    """
    from core.report import write_run
    from core.train import Callbacks, TrainingCancelled, run_compare

    state = _ensure_state(state, request)
    idle_buttons = dict(train_btn=gr.update(interactive=True), cancel_btn=gr.update(interactive=False))
    ds: Dataset | None = state.get("dataset")
    if ds is None:
        raise gr.Error("Load a dataset first (Data tab): pick a sample or upload a .zip.", title="No data")
    try:
        cfg = make_config(backbone, epochs, budget, image_size, target, device, scratch, seed, unfreeze)
    except USER_ERRORS as exc:
        raise gr.Error(str(exc), title="Invalid setting") from None
    cancel: threading.Event = state["cancel"]
    if cancel.is_set():
        state["cancel"] = threading.Event()
        yield _out(TRAIN_OUTPUTS, state=state, status="🛑 Cancelled before training started.", **idle_buttons)
        return
    folder = session_dir(state)
    runs_dir = folder / "runs"
    run_dir = runs_dir / time.strftime("run-%Y%m%d-%H%M%S")
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = runs_dir / time.strftime(f"run-%Y%m%d-%H%M%S-{n}")

    events: queue.Queue = queue.Queue()
    holder: dict[str, Any] = {}
    callbacks = Callbacks(progress=lambda stage, frac, msg: events.put(("progress", stage, frac, msg)),
                          epoch=lambda arm, rec: events.put(("epoch", arm, dict(rec))), cancel=cancel)

    def work() -> None:
        try:
            result = run_compare(ds, cfg, callbacks)
            events.put(("progress", "export", 0.0, "exporting ONNX (parity check, INT8 variant)…"))
            holder["paths"] = write_run(result, run_dir, export=True)
            holder["result"] = result
        except BaseException as exc:  # noqa: BLE001 - handed to the generator
            holder["error"] = exc
        finally:
            events.put(("done",))

    history: dict[str, list[dict]] = {}
    log_lines: list[str] = [f"dataset: {state.get('source')}  backbone: {cfg.backbone}  epochs: {cfg.epochs}  "
                            f"image size: {cfg.image_size or 'auto'}  device: {cfg.device}"]
    stages = _STAGES[bool(cfg.train_scratch), bool(cfg.unfreeze_blocks)]
    worker = threading.Thread(target=work, name=f"train-{state['sid']}", daemon=True)
    start = time.perf_counter()
    with _Active(state["sid"]):
        worker.start()
        try:
            yield _out(TRAIN_OUTPUTS, state=state, status="🚀 Training started…", log="\n".join(log_lines),
                       curves=None, speedup="", results=None, verdicts="", confusion=None, per_class=None,
                       mistakes=None, diagnostics="", threshold_group=gr.update(visible=False),
                       train_btn=gr.update(interactive=False), cancel_btn=gr.update(interactive=True))
            last_yield, status, dirty = 0.0, "", False
            while True:
                try:
                    event = events.get(timeout=0.25)
                except queue.Empty:
                    event = None
                if event is not None and event[0] == "done":
                    break
                if event is not None and event[0] == "progress":
                    _, stage, frac, msg = event
                    lo, hi = stages.get(stage, (0.0, 1.0))
                    progress(lo + (hi - lo) * frac, desc=msg or stage)
                    status = f"⏳ {msg or stage} ({time.perf_counter() - start:.0f} s)"
                    dirty = True
                elif event is not None and event[0] == "epoch":
                    _, arm, rec = event
                    history.setdefault(arm, []).append(rec)
                    log_lines.append(_epoch_line(arm, rec, cfg.epochs))
                    yield _out(TRAIN_OUTPUTS, status=status, log="\n".join(log_lines),
                               curves=_live_curves(history, cfg.target_accuracy))
                    last_yield, dirty = time.perf_counter(), False
                    continue
                if dirty and time.perf_counter() - last_yield > 1.0:
                    yield _out(TRAIN_OUTPUTS, status=status)
                    last_yield, dirty = time.perf_counter(), False
        finally:
            if worker.is_alive():  # the visitor left (generator closed): stop the worker
                cancel.set()
        worker.join()

    error = holder.get("error")
    if isinstance(error, TrainingCancelled):
        state["cancel"] = threading.Event()
        shutil.rmtree(run_dir, ignore_errors=True)
        log_lines.append("cancelled")
        yield _out(TRAIN_OUTPUTS, state=state, status="🛑 Training cancelled. Change the settings and train again.",
                   log="\n".join(log_lines), **idle_buttons)
        return
    if error is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(error, USER_ERRORS):
            raise gr.Error(_clean(error, state), title="Training failed") from None
        log.error("training failed", exc_info=error)
        raise gr.Error(f"Training failed unexpectedly ({type(error).__name__}: {_clean(error, state)}). "
                       "Try a smaller image size or fewer epochs.", title="Training failed") from None

    result = holder["result"]
    state["run_dir"] = str(run_dir)
    _prune_runs(runs_dir, keep=RUNS_KEPT_PER_SESSION)
    progress(1.0, desc="done")
    views = results_views(result.report, result, run_dir, state)
    state["last"] = views.pop("_last")
    log_lines.append(f"finished in {time.perf_counter() - start:.1f} s; files in the Export tab")
    yield _out(TRAIN_OUTPUTS, state=state, log="\n".join(log_lines), **views, **idle_buttons)


def _prune_runs(runs_dir: Path, keep: int) -> None:
    runs = sorted((p for p in runs_dir.iterdir() if p.is_dir() and p.name.startswith("run-")),
                  key=lambda p: p.stat().st_mtime)
    for old in runs[:-keep]:
        PREDICTORS.evict_under(old)
        shutil.rmtree(old, ignore_errors=True)


def _speedup_text(report: dict) -> str:
    target = report["target_accuracy"]
    runs = report["runs"]
    sp = report.get("speedup_time_to_target")
    pre = runs.get("pretrained", {})
    if "scratch" not in runs:
        t = pre.get("time_to_target_seconds")
        return (f"Pretrained reached the {target:.0%} target after **{_sec(t)}**." if t is not None else
                f"Pretrained did not reach the {target:.0%} target; best {_pct(pre.get('val_accuracy'))}.")
    if isinstance(sp, dict):
        return (f"⚡ Scratch never reached {target:.0%}: pretrained got there **at least {sp['lower_bound']:.1f}× "
                f"sooner** ({_sec(pre['time_to_target_seconds'])} vs more than "
                f"{_sec(runs['scratch']['train_seconds'])}).")
    if sp is not None:
        return (f"⚡ Pretrained reached {target:.0%} **{sp:.1f}× sooner** than training from scratch "
                f"({_sec(pre['time_to_target_seconds'])} vs {_sec(runs['scratch']['time_to_target_seconds'])}).")
    t_scratch = runs["scratch"].get("time_to_target_seconds")
    if t_scratch is not None:
        return (f"From scratch reached {target:.0%} after {_sec(t_scratch)}, the pretrained head did not "
                f"(best {_pct(pre.get('val_accuracy'))}): this data may be far from what the backbone was trained on.")
    return f"Neither arm reached the {target:.0%} target; compare the accuracies below or train longer."


def results_table(report: dict) -> pd.DataFrame:
    rows = comparison_rows(report)
    table = {"metric": [label for label, _ in rows]}
    for arm in report["runs"]:
        table[ARM_TITLES.get(arm, arm)] = [values[arm] for _, values in rows]
    return pd.DataFrame(table)


def per_class_table(report: dict) -> pd.DataFrame:
    runs = report["runs"]
    classes = report["dataset"]["classes"]
    rows = []
    for cls in classes:
        row: dict[str, Any] = {"class": cls}
        for arm, run in runs.items():
            pc = run["per_class"].get(cls, {})
            row["support"] = pc.get("support")
            for k in ("precision", "recall", "f1"):
                row[f"{arm} {k}"] = round(float(pc.get(k, 0.0)), 3)
        rows.append(row)
    df = pd.DataFrame(rows)
    return df[["class", "support", *[c for c in df.columns if c not in ("class", "support")]]]


def _md(text: Any) -> str:
    """Plain text (messages from core) made safe for Markdown: no HTML tags."""
    return str(text).replace("<", "&lt;").replace(">", "&gt;")


def _verdicts_md(report: dict) -> str:
    parts = []
    icons = {"good": "🟢", "fair": "🟠", "poor": "🔴"}
    for arm, run in report["runs"].items():
        v = run["verdict"]
        reasons = "".join(f"\n  - {_md(r)}" for r in v["reasons"])
        parts.append(f"- {icons.get(v['label'], '')} **{ARM_TITLES.get(arm, arm)}: "
                     f"<span class='{v['label']}'>{v['label']}</span>**{reasons}")
    return "### Verdicts\n" + "\n".join(parts)


def _diagnostics_md(report: dict) -> str:
    diag = report.get("diagnostics", {})
    lines = ["### What to watch out for"]
    for key, title in (("imbalance", "Class imbalance"), ("leakage", "Train/validation leakage")):
        d = diag.get(key)
        if d:
            lines.append(f"- {'⚠️' if d['flagged'] else '✅'} **{title}**: {_md(d['message'])}")
    for arm, d in diag.get("overfitting", {}).items():
        lines.append(f"- {'⚠️' if d['flagged'] else '✅'} **Overfitting ({arm})**: {_md(d['message'])}")
    return "\n".join(lines)


def _mistakes(result, classes: list[str], limit: int = 24) -> list[tuple]:
    items = []
    labels = np.asarray(result.val.labels)
    for arm, run in result.runs.items():
        probs = np.asarray(run.val_probabilities)
        pred = probs.argmax(1)
        for i in misclassified(labels, probs, limit):
            caption = f"{arm}: {classes[labels[i]]} → {classes[pred[i]]} {probs[i, pred[i]]:.0%}"
            items.append((np.ascontiguousarray(result.val.crops[i]), caption))
    return items


def _export_views(report: dict, run_dir: Path) -> dict[str, Any]:
    exp = report.get("export") or {}
    files = {name: run_dir / name for name in ("model.onnx", "model.int8.onnx", "model.fp16.onnx", "report.json")}

    def button(name: str, label: str):
        path = files[name]
        return gr.update(value=str(path), visible=True, label=label) if path.is_file() else gr.update(
            value=None, visible=False)

    lines = ["### Exported files"]
    if exp.get("error"):
        lines.append(f"⚠️ The ONNX export failed: {_md(str(exp['error']))}")
    elif files["model.onnx"].is_file():
        mb = files["model.onnx"].stat().st_size / 1e6
        lines.append(f"✅ `model.onnx` ({mb:.1f} MB): the pretrained arm, input uint8 RGB `[N, {report['image_size']}, "
                     f"{report['image_size']}, 3]`, outputs `logits` and `probabilities`; class names and the resize "
                     "rule are in its metadata.")
    else:
        lines.append("ℹ️ No ONNX model was exported for this run.")
    parity_rows = []
    parity = exp.get("parity")
    if isinstance(parity, dict):
        diff = parity.get("max_abs_diff_probabilities", parity.get("max_abs_diff"))
        details = [f"max |Δ probability| {diff:.1e} (allowed {parity.get('atol', 0):.0e})" if diff is not None else "",
                   f"top-1 agreement {parity['top1_agreement']:.0%}" if "top1_agreement" in parity else "",
                   f"{parity.get('n_images', '?')} images on {parity.get('provider', '?')}"]
        parity_rows.append({"model": "model.onnx (FP32) vs PyTorch", "check": "parity",
                            "result": "✅ passed" if parity.get("passed") else "❌ failed",
                            "details": ", ".join(d for d in details if d)})
    for v in exp.get("variants") or []:
        if not isinstance(v, dict):
            continue
        parity_rows.append({"model": f"{str(v.get('variant')).upper()} variant", "check": "accuracy vs FP32",
                            "result": "✅ accepted" if v.get("accepted") else "❌ rejected",
                            "details": str(v.get("reason", ""))})
    if not any(isinstance(v, dict) and v.get("variant") == "fp16" for v in exp.get("variants") or []):
        lines.append("ℹ️ An FP16 variant is built only where a CUDA GPU is available.")
    triton = _triton_zip(files["model.onnx"], run_dir) if files["model.onnx"].is_file() else None
    if triton is None and files["model.onnx"].is_file():
        lines.append("ℹ️ The Triton repository could not be built (see the server log).")
    parity_df = pd.DataFrame(parity_rows, columns=["model", "check", "result", "details"])
    return dict(
        export_md="\n\n".join(lines),
        dl_onnx=button("model.onnx", "⬇️ model.onnx (FP32)"),
        dl_int8=button("model.int8.onnx", "⬇️ model.int8.onnx (INT8)"),
        dl_fp16=button("model.fp16.onnx", "⬇️ model.fp16.onnx (FP16)"),
        dl_report=button("report.json", "⬇️ report.json"),
        dl_triton=gr.update(value=str(triton), visible=True) if triton else gr.update(value=None, visible=False),
        parity=parity_df,
    )


def _triton_zip(model_path: Path, run_dir: Path) -> Path | None:
    """The Triton repository zip for the Export tab, or None: an optional extra must not fail the run."""
    try:
        return write_triton_zip(model_path, run_dir / "triton_repository.zip", model_name="classifier")
    except Exception:  # noqa: BLE001
        log.exception("building the Triton repository failed")
        return None


def _model_choices(state: dict) -> list[tuple[str, str]]:
    choices = []
    run_dir = Path(state["run_dir"]) if state.get("run_dir") else None
    if run_dir is not None:
        for key, (name, label) in TRAINED_MODELS.items():
            if (run_dir / name).is_file():
                choices.append((label, key))
    if state.get("uploaded_model"):
        choices.append((f"uploaded: {Path(state['uploaded_model']).name}", UPLOADED_MODEL))
    return choices


def results_views(report: dict, result, run_dir: Path, state: dict | None = None) -> dict[str, Any]:
    """Every result component of the Train tab (and the Export/Predict updates) for a finished run."""
    classes = report["dataset"]["classes"]
    runs = report["runs"]
    two = len(classes) == 2
    last = {"classes": classes, "labels": np.asarray(result.val.labels),
            "probs": {arm: np.asarray(r.val_probabilities) for arm, r in result.runs.items()},
            "report_path": str(run_dir / "report.json"), "backbone": report["backbone"]}
    thr_md, thr_cm = threshold_views(last, classes[1] if two else None, 0.5) if two else ("", None)
    views = dict(
        _last=last,
        status=f"✅ Done: {len(runs)} arm(s) trained on {report.get('device', '?')} at {report['image_size']} px.",
        curves=_figure(plots.learning_curves, runs, report["target_accuracy"]),
        speedup=_speedup_text(report),
        results=results_table(report),
        verdicts=_verdicts_md(report),
        confusion=_figure(plots.confusion_matrices, runs, classes),
        per_class=per_class_table(report),
        mistakes=_mistakes(result, classes) or None,
        diagnostics=_diagnostics_md(report),
        threshold_group=gr.update(visible=two),
        positive=gr.update(choices=classes, value=classes[1]) if two else gr.skip(),
        threshold=gr.update(value=0.5),
        threshold_md=thr_md,
        threshold_cm=thr_cm,
    )
    views.update(_export_views(report, run_dir))
    state_like = {"run_dir": str(run_dir), "uploaded_model": (state or {}).get("uploaded_model")}
    choices = _model_choices(state_like)
    views["model_choice"] = gr.update(choices=choices, value=choices[0][1] if choices else None)
    return views


def threshold_views(last: dict, positive: str | None, threshold: float) -> tuple[str, pd.DataFrame | None]:
    from core.metrics import binary_threshold_metrics

    classes = last["classes"]
    if len(classes) != 2 or "pretrained" not in last["probs"]:
        return "The threshold applies to two-class tasks only.", None
    pos = classes.index(positive) if positive in classes else 1
    probs = last["probs"]["pretrained"][:, pos]
    m = binary_threshold_metrics(last["labels"], probs, float(threshold), classes, positive=pos)
    pc = m["per_class"][classes[pos]]
    md = (f"Predict **{classes[pos]}** when its probability ≥ **{threshold:.2f}** (pretrained arm, validation set): "
          f"precision **{pc['precision']:.1%}**, recall **{pc['recall']:.1%}**, F1 {pc['f1']:.1%}; "
          f"accuracy {m['val_accuracy']:.1%}, balanced accuracy {m['balanced_accuracy']:.1%}.")
    cm = np.asarray(m["confusion_matrix"])
    df = pd.DataFrame(cm, columns=[f"predicted {c}" for c in classes])
    df.insert(0, "true class", classes)
    return md, df


def update_threshold(state: dict | None, positive: str, threshold: float) -> tuple[str, Any]:
    state = _ensure_state(state)
    last = state.get("last")
    if not last:
        return "Train a model first.", None
    return threshold_views(last, positive, threshold)


# ---------------------------------------------------------------------------------------------------------------
# Predict tab
# ---------------------------------------------------------------------------------------------------------------


def _model_path(state: dict, choice: str | None) -> Path:
    """Map a model-choice key to a file inside this session's folder (never a visitor-supplied path)."""
    choice = choice or "run:fp32"
    if choice == UPLOADED_MODEL:
        path = state.get("uploaded_model")
        if not path:
            raise gr.Error("Upload an .onnx model first, or pick the model trained in this session.")
        return Path(path)
    if choice not in TRAINED_MODELS:
        raise gr.Error(f"Unknown model choice {choice!r}.")
    if not state.get("run_dir"):
        raise gr.Error("Train a model first (Train & compare tab), or upload an .onnx exported earlier.",
                       title="No model yet")
    run_dir = Path(state["run_dir"])
    if not run_dir.is_dir():
        raise gr.Error("This session's files were cleaned up after a long idle time; train again.",
                       title="Model gone")
    path = run_dir / TRAINED_MODELS[choice][0]
    if not path.is_file():
        raise gr.Error(f"This run has no {TRAINED_MODELS[choice][0]}; pick another model.")
    return path


def upload_model(file: Any, state: dict | None) -> tuple:
    """Copy an uploaded .onnx into the session folder and check it loads. Outputs: state, model_choice, info."""
    state = _ensure_state(state)
    src = _upload_path(file)
    if src is None:
        return state, gr.skip(), gr.skip()
    if src.stat().st_size > MAX_ONNX_BYTES:
        raise gr.Error(f"The model is larger than {MAX_ONNX_BYTES // 1024**2} MB.")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(getattr(file, "orig_name", None) or src.name).name)[:80]
    if not name.endswith(".onnx"):
        name += ".onnx"
    folder = session_dir(state) / "uploaded"
    PREDICTORS.evict_under(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    dst = folder / name
    shutil.copyfile(src, dst)
    info = check_model_file(dst)
    if not info.get("ok") or not info.get("classes"):
        shutil.rmtree(folder, ignore_errors=True)
        state["uploaded_model"] = None
        reason = _clean(info.get("error") or "it is not a classifier", state).replace(str(dst), name)
        raise gr.Error(f"{name} is not a usable model: {reason}", title="Not a usable model")
    state["uploaded_model"] = str(dst)
    classes = info["classes"]
    desc = (f"Uploaded **{name}**: {len(classes)} classes ({', '.join(classes[:10])}"
            f"{', …' if len(classes) > 10 else ''}), backbone {info.get('backbone') or '?'}, input "
            f"{info.get('image_size')} px, variant {info.get('variant')}.")
    return state, gr.update(choices=_model_choices(state), value=UPLOADED_MODEL), desc


def predict(state: dict | None, model_choice: str | None, image: Any, files: Any = None) -> tuple:
    """Classify one image (and/or several files). Outputs: label (top-k dict), info markdown, batch table."""
    from core.runtime.contract import ModelFormatError
    from core.runtime.images import ImageDecodeError

    state = _ensure_state(state)
    session_dir(state)  # keeps an active session from being swept as idle
    path = _model_path(state, model_choice)
    inputs: list[tuple[str, Any]] = []
    if image is not None:
        inputs.append(("image", image if isinstance(image, Image.Image) else _as_pil(image)))
    file_list = files if isinstance(files, list | tuple) else ([files] if files else [])
    if len(file_list) > MAX_PREDICT_IMAGES:
        raise gr.Error(f"At most {MAX_PREDICT_IMAGES} images per request, got {len(file_list)}.")
    for f in file_list:
        p = _upload_path(f)
        name = Path(getattr(f, "orig_name", None) or p.name).name
        try:
            inputs.append((name, open_rgb(p)))
        except (ImageDecodeError, OSError, ValueError) as exc:
            raise gr.Error(f"{name} is not a readable image ({getattr(exc, 'reason', exc)}).") from None
    if not inputs:
        raise gr.Error("Upload an image (or paste one / use the webcam) to classify.", title="No image")
    try:
        predictor = PREDICTORS.get(path, _inference_device())
        t0 = time.perf_counter()
        results = predictor.predict([im for _, im in inputs], top_k=min(5, len(predictor.classes)))
        ms = (time.perf_counter() - t0) * 1000
    except (ModelFormatError, ValueError) as exc:
        raise gr.Error(_clean(exc, state), title="Prediction failed") from None
    first = results[0]
    label = {r["label"]: float(r["probability"]) for r in first["top_k"]}
    info = (f"Model **{path.name}** · provider **{first.get('provider', predictor.provider)}** · "
            f"{len(inputs)} image(s) in **{ms:.1f} ms** ({ms / len(inputs):.1f} ms per image, "
            f"preprocessing included)")
    warning = getattr(predictor, "fallback_warning", None)
    if warning:
        info += f"\n\n⚠️ {warning}"
    table = pd.DataFrame([{"image": name, "prediction": r["label"], "probability": round(r["probability"], 4),
                           "top-k": ", ".join(f"{t['label']} {t['probability']:.0%}" for t in r["top_k"])}
                          for (name, _), r in zip(inputs, results)],
                         columns=["image", "prediction", "probability", "top-k"])
    return label, info, table


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    if isinstance(image, str | os.PathLike):
        return open_rgb(image)
    raise gr.Error("Unsupported image input.")


# ---------------------------------------------------------------------------------------------------------------
# Benchmark tab
# ---------------------------------------------------------------------------------------------------------------


BENCH_REPEATS, BENCH_WARMUP = 10, 2  # median of interleaved runs; tests lower these
ENGINE_TITLES = {"torch": "PyTorch eager", "torch_nchw": "PyTorch eager (NCHW float input)",
                 "onnx_fp32": "onnxruntime FP32", "onnx_int8": "onnxruntime INT8"}


def benchmark(state: dict | None, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
    """Torch eager vs onnxruntime FP32 vs INT8 at batch 1 and 16. Outputs: markdown, bar chart, table."""
    state = _ensure_state(state)
    path = _model_path(state, "run:fp32")
    from export.bench import benchmark as run_benchmark  # loads onnxruntime's quantization tools: on first use

    progress(0.1, desc="timing PyTorch eager, onnxruntime FP32 and INT8 at batch 1 and 16")
    with _Active(state["sid"]):
        try:
            result = run_benchmark(path, batch_sizes=(1, 16), run_dir=path.parent, repeats=BENCH_REPEATS,
                                   warmup=BENCH_WARMUP, print_table=False)
        except USER_ERRORS as exc:
            raise gr.Error(_clean(exc, state), title="Benchmark failed") from None
    table = benchmark_table(result)
    fig = _figure(_bench_figure, table) if len(table) else None
    return _bench_md(result), fig, table


def benchmark_table(result: dict) -> pd.DataFrame:
    """One row per engine and batch size from ``export.bench.benchmark``'s result."""
    rows = []
    for batch_size, row in (result.get("batches") or {}).items():
        base = row.get("torch", {}).get("ms")
        for engine in ENGINE_TITLES:
            if engine not in row:
                continue
            value = row[engine]
            rows.append({"engine": ENGINE_TITLES[engine], "batch size": int(batch_size),
                         "latency (ms)": round(value["ms"], 2), "images/s": round(value["images_per_s"], 1),
                         "speed-up vs PyTorch": f"{base / value['ms']:.2f}×" if base else "–",
                         "CPU time in kernel": f"{value.get('kernel_share', 0.0):.0%}"})
    return pd.DataFrame(rows, columns=["engine", "batch size", "latency (ms)", "images/s", "speed-up vs PyTorch",
                                       "CPU time in kernel"])


def _bench_md(result: dict) -> str:
    from export.bench import allocator_note

    device = describe_device(resolve_device("cpu"))
    lines = [f"onnxruntime provider **{result.get('provider', '?')}** · device **{device}** · "
             f"{result.get('threads', '?')} threads · input {result.get('image_size', '?')} px · median of "
             f"{result.get('repeats', '?')} runs, engines interleaved; in brackets each ratio's range over the "
             "rounds, which shows how much other load on this machine moved it. onnxruntime runs with its default "
             "busy-waiting worker threads here, as on a dedicated server; the Predict tab lets them sleep, since "
             "this server also trains, which costs it some latency at batch 1."]
    for batch_size, row in (result.get("batches") or {}).items():
        ratios, ranges = row.get("ratios") or {}, row.get("ratio_ranges") or {}
        if ratios:
            text = ", ".join(f"{k.replace('_vs_', ' vs ').replace('onnx_', 'ORT ')} {v:.2f}×"
                             + (" ({:.2f}–{:.2f}×)".format(*ranges[k]) if k in ranges else "")
                             for k, v in ratios.items())
            lines.append(f"- batch {batch_size}: {text}")
    note = allocator_note(result) if result.get("batches") else None
    if note:
        lines.append(f"- ⚠️ {_md(note)}")
    if not any("onnx_int8" in row for row in (result.get("batches") or {}).values()):
        lines.append("- no INT8 model: the variant was not built or lost too much accuracy (see the Export tab).")
    return "\n".join(lines)


def _bench_figure(table: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    engines = list(dict.fromkeys(table["engine"]))
    batches = sorted(set(table["batch size"]))
    width = 0.8 / max(len(engines), 1)
    colors = ["#7f7f7f", "#1f77b4", "#2ca02c", "#ff7f0e"]
    for i, engine in enumerate(engines):
        sub = table[table["engine"] == engine].set_index("batch size")
        values = [float(sub["images/s"].get(b, 0.0)) for b in batches]
        bars = ax.bar(np.arange(len(batches)) + i * width, values, width, label=engine, color=colors[i % len(colors)])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(np.arange(len(batches)) + width * (len(engines) - 1) / 2, [f"batch {b}" for b in batches])
    ax.set_ylabel("images per second (higher is better)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Throughput on this server")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Export tab snippet
# ---------------------------------------------------------------------------------------------------------------

_FALLBACK_SNIPPET = '''import json
import numpy as np
import onnxruntime as ort
from PIL import Image

session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
classes = json.loads(meta["classes"])
size, resize = int(meta["image_size"]), int(meta["resize_size"])

img = Image.open("photo.jpg").convert("RGB")
scale = resize / min(img.size)                       # shorter side -> resize_size
img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
left, top = (img.width - size) // 2, (img.height - size) // 2
img = img.crop((left, top, left + size, top + size))  # centre crop image_size
probs = session.run(["probabilities"], {"image": np.asarray(img, np.uint8)[None]})[0][0]
print(classes[int(probs.argmax())], float(probs.max()))
'''


def example_snippet() -> str:
    path = Path(__file__).resolve().parent / "export" / "example_predict.py"
    try:
        text = path.read_text(encoding="utf-8")
        return text if text.strip() else _FALLBACK_SNIPPET
    except OSError:
        return _FALLBACK_SNIPPET


# ---------------------------------------------------------------------------------------------------------------
# The Blocks
# ---------------------------------------------------------------------------------------------------------------


def on_page_load(state: dict | None, choice: str, request: gr.Request = None) -> tuple:
    """New browser session: sweep old session folders, then load the selected sample so Train works at once."""
    return load_sample(choice, state, request)


def on_unload(request: gr.Request = None) -> None:
    with _HASH_LOCK:
        sid = _HASH_TO_SID.pop(getattr(request, "session_hash", None), None)
    if sid:
        mark_closed({"sid": sid})


def build_app(session_root_dir: str | os.PathLike[str] | None = None, *, concurrency: int = 1,
              predict_concurrency: int = 8) -> gr.Blocks:
    """Build the UI (nothing is launched, loaded or downloaded here)."""
    if session_root_dir is not None:
        configure(session_root_dir)
    image_size = _default_image_size()
    with gr.Blocks(title="Transfer-learning lab", analytics_enabled=False, delete_cache=(1800, 7200)) as demo:
        state = gr.State(new_session, delete_callback=delete_session)
        gr.Markdown(INTRO)
        with gr.Tabs(selected="data"):
            # ------------------------------------------------------------------ Data
            with gr.Tab("1 · Data", id="data"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=320):
                        preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, allow_custom_value=True,
                                             label="Built-in sample (works offline)",
                                             info="or type a spec such as sample:shapes?per_class=30&noise=0.1",
                                             elem_id="preset")
                        zip_in = gr.File(label="…or upload a .zip of class folders (cats/…, dogs/…)",
                                         file_types=[".zip"], type="filepath", elem_id="zip-upload")
                        summary = gr.Markdown("Loading the sample…", elem_id="data-summary")
                        warnings_md = gr.Markdown(elem_id="data-warnings")
                    with gr.Column(scale=3, min_width=320):
                        counts_plot = gr.Plot(label="Images per class", show_label=False, elem_id="counts-plot")
                data_gallery = gr.Gallery(label="A few images per class", columns=8, height=300, format="png",
                                          object_fit="contain", elem_id="data-gallery", allow_preview=True,
                                          fit_columns=False)
                with gr.Accordion("Skipped files (with the reason)", open=False):
                    skipped_df = gr.Dataframe(headers=["file", "reason"], interactive=False, wrap=True,
                                              elem_id="skipped")
            # ------------------------------------------------------------------ Train & compare
            with gr.Tab("2 · Train & compare", id="train"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=300):
                        backbone = gr.Dropdown(_backbone_choices(), value=models.DEFAULT_BACKBONE, label="Backbone",
                                               elem_id="backbone")
                        epochs = gr.Slider(1, 50, value=10, step=1, label="Epochs (cap for each arm)",
                                           elem_id="epochs")
                        budget = gr.Number(value=60, minimum=0, label="Time budget per arm (seconds, 0 = none)",
                                           elem_id="budget")
                        image_size_in = gr.Slider(32, 320, value=image_size, step=8, label="Image size (pixels)",
                                                  info="smaller trains faster; 224 is the backbone's native size",
                                                  elem_id="image-size")
                        target = gr.Slider(0.5, 1.0, value=0.85, step=0.01, label="Target validation accuracy",
                                           elem_id="target")
                        device = gr.Dropdown(_device_choices(), value="auto", label="Device", elem_id="device")
                        scratch = gr.Checkbox(value=True, label="Also train the same network from scratch",
                                              elem_id="scratch")
                        with gr.Accordion("Advanced", open=False):
                            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                            unfreeze = gr.Slider(0, models.block_count(models.DEFAULT_BACKBONE), value=0, step=1,
                                                 label="Fine-tune the last N backbone blocks",
                                                 info="0: frozen backbone, features computed once (seconds). "
                                                      "N > 0: those blocks train too, on augmented images, like "
                                                      "the scratch arm (minutes on a CPU).", elem_id="unfreeze")
                        with gr.Row():
                            train_btn = gr.Button("🚀 Train", variant="primary", elem_id="train-btn")
                            cancel_btn = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel-btn")
                    with gr.Column(scale=2, min_width=400):
                        status = gr.Markdown("Ready: click **Train**.", elem_id="train-status", min_height=72,
                                             container=True, padding=True)
                        curves = gr.Plot(label="Learning curves (live)", show_label=False, elem_id="curves")
                        log_box = gr.Textbox(label="Per-epoch log", lines=6, max_lines=12, autoscroll=True,
                                             interactive=False, elem_id="train-log")
                gr.Markdown("## Results")
                speedup = gr.Markdown(elem_id="speedup")
                results_df = gr.Dataframe(label="Side by side (validation set)", interactive=False,
                                          elem_id="results-table")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        verdicts = gr.Markdown(elem_id="verdicts")
                    with gr.Column(scale=1):
                        diagnostics_md = gr.Markdown(elem_id="diagnostics")
                confusion = gr.Plot(label="Confusion matrices", show_label=False, elem_id="confusion")
                with gr.Group(visible=False) as threshold_group:
                    gr.Markdown("### Decision threshold (two classes)")
                    with gr.Row():
                        positive = gr.Dropdown([], label="Positive class", allow_custom_value=True, scale=1)
                        threshold = gr.Slider(0.01, 0.99, value=0.5, step=0.01, label="Threshold", scale=3,
                                              elem_id="threshold")
                    threshold_md = gr.Markdown(elem_id="threshold-md")
                    threshold_cm = gr.Dataframe(label="Confusion matrix at this threshold", interactive=False)
                per_class_df = gr.Dataframe(label="Per-class report (validation set)", interactive=False,
                                            elem_id="per-class")
                mistakes = gr.Gallery(label="Misclassified validation images (true → predicted, confidence)",
                                      columns=6, height=300, format="png", object_fit="contain", elem_id="mistakes",
                                      fit_columns=False)
            # ------------------------------------------------------------------ Predict
            with gr.Tab("3 · Predict", id="predict"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=320):
                        model_choice = gr.Dropdown([], label="Model", allow_custom_value=True,
                                                   info="the ONNX export of this session's run, or an uploaded one",
                                                   elem_id="model-choice")
                        image_in = gr.Image(label="Image (upload, webcam or paste from the clipboard)", type="pil",
                                            sources=["upload", "webcam", "clipboard"], height=280,
                                            elem_id="predict-image")
                        predict_btn = gr.Button("🔎 Predict", variant="primary", elem_id="predict-btn")
                        with gr.Accordion("Classify several images at once", open=False):
                            files_in = gr.File(label="Images", file_count="multiple", file_types=["image"],
                                               type="filepath", elem_id="predict-files")
                        with gr.Accordion("Use a model exported earlier (.onnx)", open=False):
                            onnx_in = gr.File(label="Exported model (.onnx)", file_types=[".onnx"], type="filepath",
                                              elem_id="onnx-upload")
                    with gr.Column(scale=1, min_width=320):
                        label_out = gr.Label(num_top_classes=5, label="Prediction (top-k)", elem_id="predict-label")
                        predict_info = gr.Markdown(elem_id="predict-info")
                        batch_df = gr.Dataframe(label="All images", interactive=False, elem_id="predict-table")
            # ------------------------------------------------------------------ Export
            with gr.Tab("4 · Export", id="export"):
                export_md = gr.Markdown("Train a model first: its files appear here.", elem_id="export-md")
                with gr.Row():
                    dl_onnx = gr.DownloadButton("⬇️ model.onnx (FP32)", visible=False, variant="primary",
                                                elem_id="dl-onnx")
                    dl_int8 = gr.DownloadButton("⬇️ model.int8.onnx", visible=False, elem_id="dl-int8")
                    dl_fp16 = gr.DownloadButton("⬇️ model.fp16.onnx", visible=False, elem_id="dl-fp16")
                    dl_triton = gr.DownloadButton("⬇️ Triton repository (.zip)", visible=False, elem_id="dl-triton")
                    dl_report = gr.DownloadButton("⬇️ report.json", visible=False, elem_id="dl-report")
                parity_df = gr.Dataframe(label="Checks: parity with PyTorch and accuracy of the variants",
                                         interactive=False, wrap=True, elem_id="parity")
                gr.Markdown("### Use the model without PyTorch\nOnly `onnxruntime`, `numpy` and `Pillow` are needed:")
                gr.Code(example_snippet(), language="python", interactive=False, elem_id="snippet")
            # ------------------------------------------------------------------ Benchmark
            with gr.Tab("5 · Benchmark", id="bench"):
                gr.Markdown("Time the exported model: PyTorch eager vs onnxruntime FP32 vs INT8, at batch size 1 "
                            "and 16, on this server. Runs in the training queue so timings are not disturbed.")
                bench_btn = gr.Button("⏱️ Run benchmark", variant="primary", elem_id="bench-btn")
                bench_md = gr.Markdown(elem_id="bench-md")
                bench_plot = gr.Plot(label="Throughput", show_label=False, elem_id="bench-plot")
                bench_df = gr.Dataframe(label="Timings", interactive=False, elem_id="bench-table")

        comps = dict(state=state, summary=summary, counts_plot=counts_plot, gallery=data_gallery, skipped=skipped_df,
                     warnings=warnings_md, status=status, log=log_box, curves=curves, speedup=speedup,
                     results=results_df, verdicts=verdicts, confusion=confusion, per_class=per_class_df,
                     mistakes=mistakes, diagnostics=diagnostics_md, threshold_group=threshold_group,
                     positive=positive, threshold=threshold, threshold_md=threshold_md, threshold_cm=threshold_cm,
                     export_md=export_md,
                     dl_onnx=dl_onnx, dl_int8=dl_int8, dl_fp16=dl_fp16, dl_triton=dl_triton, dl_report=dl_report,
                     parity=parity_df, model_choice=model_choice, train_btn=train_btn, cancel_btn=cancel_btn)
        data_out = [comps[n] for n in DATA_OUTPUTS]
        train_out = [comps[n] for n in TRAIN_OUTPUTS]

        # Data: the default sample is loaded when the page opens, so Train works right away.
        demo.load(on_page_load, [state, preset], data_out, api_visibility="private", concurrency_limit=2,
                  concurrency_id="data")
        preset.input(load_sample, [preset, state], data_out, api_name="load_sample", concurrency_limit=2,
                     concurrency_id="data")
        zip_in.upload(load_zip, [zip_in, state], data_out, api_name="load_zip", concurrency_limit=2,
                      concurrency_id="data")

        # Train: the Train click arms a fresh cancel flag (unqueued), then the job waits its turn.
        train_btn.click(arm_training, [state], [state, status, train_btn, cancel_btn], queue=False,
                                    api_visibility="private").then(
            train, [state, backbone, epochs, budget, image_size_in, target, device, scratch, seed, unfreeze], train_out,
            api_name="train", concurrency_limit=concurrency, concurrency_id="train", show_progress_on=[status])
        cancel_btn.click(cancel_training, [state], [status], queue=False, api_name="cancel")
        backbone.change(unfreeze_range, [backbone], [unfreeze], queue=False, api_visibility="private")
        threshold.input(update_threshold, [state, positive, threshold], [threshold_md, threshold_cm],
                        api_name="threshold", concurrency_limit=None, show_progress="hidden")
        positive.input(update_threshold, [state, positive, threshold], [threshold_md, threshold_cm],
                       api_visibility="private", concurrency_limit=None, show_progress="hidden")

        # Predict: concurrent, one shared Predictor per model file.
        predict_in = [state, model_choice, image_in, files_in]
        predict_out = [label_out, predict_info, batch_df]
        predict_btn.click(predict, predict_in, predict_out, api_name="predict",
                          concurrency_limit=predict_concurrency, concurrency_id="predict")
        for upload in (image_in.upload, files_in.upload):
            upload(predict, predict_in, predict_out, api_visibility="private", concurrency_limit=predict_concurrency,
                   concurrency_id="predict")
        onnx_in.upload(upload_model, [onnx_in, state], [state, model_choice, predict_info], api_name="upload_model",
                       concurrency_limit=2, concurrency_id="data")

        # Benchmark: heavy, so it shares the training slot.
        bench_btn.click(benchmark, [state], [bench_md, bench_plot, bench_df], api_name="benchmark",
                        concurrency_limit=concurrency, concurrency_id="train")

        # Tab closed: mark the folder (deleted after a grace period, or when Gradio drops the session state).
        demo.unload(on_unload)
    return demo


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    on_space = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Transfer-learning lab web UI: train a new head on a frozen pretrained backbone and the same "
                    "network from scratch, compare them, predict with the exported ONNX model, download it.",
    )
    p.add_argument("--host", default="0.0.0.0" if on_space else "127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 when env SPACE_ID is set, i.e. on "
                        "Hugging Face Spaces)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                   help="port (default 7860, or env GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--max-file-size", default="200mb", help="largest upload accepted (default 200mb)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="training jobs that run at once (default 1; others wait in the queue)")
    p.add_argument("--session-root", default=None,
                   help="folder for the per-session data, runs and models (default: $TRANSFER_LAB_APP_ROOT or "
                        "<tmp>/transfer-lab-app)")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = configure(args.session_root)
    # Build the default backbone's cached ONNX feature engine while the first visitor looks at the Data tab.
    threading.Thread(target=warm_up_feature_engine, daemon=True,
                     args=(models.DEFAULT_BACKBONE, _default_image_size(), resolve_device("auto"))).start()
    demo = build_app(root, concurrency=args.concurrency)
    demo.queue(max_size=64, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=args.max_file_size,
                allowed_paths=[str(root)], css=CSS, theme=gr.themes.Soft(), footer_links=["api", "gradio"])


def __getattr__(name: str) -> Any:
    """``app.demo`` (what ``gradio app.py`` looks for) is built on first use, not at import."""
    if name == "demo":
        demo = build_app()
        globals()["demo"] = demo
        return demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
