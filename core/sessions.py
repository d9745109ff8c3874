"""Per-visitor session folders for a multi-user front end (the Gradio app), with no Gradio import.

Every browser session gets a random id and a private folder ``<root>/<id>/`` for its upload, runs and models.
Nothing a visitor sends is used as a server path: uploads are copied in, and model choices are keys that map to
files inside that folder. Folders are deleted when the front end drops the session, after a grace period once the
tab is closed, and in any case when idle for ``SESSION_MAX_IDLE_S`` (``sweep``). A session with a job running is
marked busy (``busy``) and never swept.

``STORE`` is the process-wide default; tests may build their own ``SessionStore``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.data import Dataset, load_dataset
from core.runtime.errors import UserError
from core.runtime.files import cache_dir
from core.runtime.predictor import PredictorCache, check_model_file
from core.safezip import safe_extract
from core.samples import preset_spec

SESSION_MAX_IDLE_S = 2 * 3600
SESSION_CLOSED_GRACE_S = 15 * 60
RUNS_KEPT_PER_SESSION = 3
# Limits on uploads beyond the front end's own upload size limit.
MAX_ZIP_ENTRIES = 20_000
MAX_ZIP_BYTES = 1024**3
MAX_ONNX_BYTES = 512 * 1024**2
SID_RE = re.compile(r"^[0-9a-f]{16}$")
UPLOADED_MODEL = "upload"  # the model-choice key of a visitor's uploaded .onnx
_CLOSED = ".closed"


class SessionError(UserError):
    """A session cannot do what was asked (busy, cleaned up, nothing uploaded); the message says what to do."""

    def __init__(self, message: str, title: str | None = None) -> None:
        super().__init__(message)
        self.title = title  # a short heading for the front end's error box


def new_state() -> dict[str, Any]:
    """A fresh session state: plain values only (front ends deep-copy it); ``ensure_state`` adds the cancel flag."""
    return {"sid": secrets.token_hex(8), "dataset": None, "source": None, "run_dir": None, "last": None,
            "uploaded_model": None}


def _sid(state: Any) -> str | None:
    sid = state.get("sid") if isinstance(state, dict) else None
    return sid if isinstance(sid, str) and SID_RE.match(sid) else None


class SessionStore:
    """The folder that holds every session's folder, the shared predictors, and which sessions are busy."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, predictors: PredictorCache | None = None):
        self._root = Path(root).resolve() if root is not None else None
        self.predictors = predictors or PredictorCache()
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._last_sweep = 0.0
        self._hash_to_sid: OrderedDict[str, str] = OrderedDict()  # front-end session hash -> our id

    # ------------------------------------------------------------------------------------------ folders

    @property
    def root(self) -> Path:
        """``configure``'s folder, else env ``TRANSFER_LAB_APP_ROOT``, else ``<tmp>/transfer-lab-app`` (created)."""
        if self._root is None:
            env = os.environ.get("TRANSFER_LAB_APP_ROOT")
            self._root = Path(env) if env else Path(tempfile.gettempdir()) / "transfer-lab-app"
        self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    def configure(self, root: str | os.PathLike[str] | None = None) -> Path:
        if root is not None:
            self._root = Path(root).resolve()
        return self.root

    def ensure_state(self, state: Any, session_hash: str | None = None) -> dict:
        """``state`` if it is a valid session state, else a new one; remembers ``session_hash`` -> id for ``closed``."""
        if _sid(state) is None:
            state = new_state()
        state.setdefault("cancel", threading.Event())
        if session_hash:
            with self._lock:
                self._hash_to_sid[session_hash] = state["sid"]
                self._hash_to_sid.move_to_end(session_hash)
                while len(self._hash_to_sid) > 10_000:
                    self._hash_to_sid.popitem(last=False)
        return state

    def folder(self, state: dict, *, create: bool = True) -> Path:
        """The session's private folder (touched on every use, so that idle sessions can be swept)."""
        sid = _sid(state)
        if sid is None:  # the id is generated here, never taken from the visitor; belt and braces
            raise SessionError("Invalid session; reload the page.")
        folder = self.root / sid
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / _CLOSED).unlink(missing_ok=True)
            os.utime(folder)
        return folder

    def _remove(self, folder: Path) -> None:
        self.predictors.evict_under(folder)
        shutil.rmtree(folder, ignore_errors=True)

    def delete(self, state: Any) -> None:
        """Remove a session's folder and its cached predictors (unless a job of it is running)."""
        sid = _sid(state)
        if sid is not None and not self.is_busy(sid):
            self._remove(self.root / sid)

    def mark_closed(self, state: Any) -> None:
        """The tab was closed: mark the folder; ``sweep`` deletes it after a grace period (the tab may reconnect)."""
        sid = _sid(state)
        if sid and (self.root / sid).is_dir():
            (self.root / sid / _CLOSED).touch()

    def closed(self, session_hash: str | None) -> None:
        """The front end says the tab with ``session_hash`` was closed."""
        with self._lock:
            sid = self._hash_to_sid.pop(session_hash, None) if session_hash else None
        if sid:
            self.mark_closed({"sid": sid})

    def sweep(self, *, max_idle_s: float = SESSION_MAX_IDLE_S, closed_grace_s: float = SESSION_CLOSED_GRACE_S,
              min_interval_s: float = 60.0) -> list[str]:
        """Delete session folders idle for ``max_idle_s`` or closed ``closed_grace_s`` ago; returns deleted ids."""
        now = time.time()
        with self._lock:
            if now - self._last_sweep < min_interval_s:
                return []
            self._last_sweep = now
        deleted = []
        for folder in self.root.iterdir():
            if not folder.is_dir() or not SID_RE.match(folder.name) or self.is_busy(folder.name):
                continue
            try:
                idle = now - folder.stat().st_mtime
                closed = folder / _CLOSED
                closed_for = now - closed.stat().st_mtime if closed.exists() else None
            except OSError:
                continue
            if idle > max_idle_s or (closed_for is not None and closed_for > closed_grace_s):
                self._remove(folder)
                deleted.append(folder.name)
        return deleted

    @contextmanager
    def busy(self, sid: str) -> Iterator[None]:
        """Marks a session busy (not swept, not deleted) for the duration of a job."""
        with self._lock:
            self._active.add(sid)
        try:
            yield
        finally:
            with self._lock:
                self._active.discard(sid)

    def is_busy(self, sid: str) -> bool:
        with self._lock:
            return sid in self._active

    def clean(self, message: Any, state: dict | None = None) -> str:
        """A message with server folders hidden (the session's own folder reads as "your upload"; the sessions
        root, the cache and the temp folder as "<server>")."""
        text = str(message)
        if _sid(state):
            mine = str(self.root / state["sid"])
            text = text.replace(mine + os.sep, "").replace(mine, "your upload")
        for folder in sorted({str(self.root), str(cache_dir()), tempfile.gettempdir()}, key=len, reverse=True):
            text = text.replace(folder, "<server>")
        return text

    # ------------------------------------------------------------------------------------------ runs

    def new_run_dir(self, state: dict) -> Path:
        """A not-yet-existing ``runs/run-<time>[-n]`` folder path in the session's folder."""
        runs = self.folder(state) / "runs"
        stamp = time.strftime("run-%Y%m%d-%H%M%S")
        run_dir, n = runs / stamp, 1
        while run_dir.exists():
            n += 1
            run_dir = runs / f"{stamp}-{n}"
        return run_dir

    def prune_runs(self, runs_dir: Path, keep: int = RUNS_KEPT_PER_SESSION) -> None:
        """Delete all but the ``keep`` newest run folders (and their cached predictors)."""
        runs = sorted((p for p in runs_dir.iterdir() if p.is_dir() and p.name.startswith("run-")),
                      key=lambda p: p.stat().st_mtime)
        for old in runs[:-keep]:
            self._remove(old)

    # ------------------------------------------------------------------------------------------ data

    def load_sample(self, state: dict, choice: str) -> tuple[str, Dataset]:
        """``(label, dataset)`` for a preset name or a bounded ``sample:`` spec (``core.samples.preset_spec``).

        Presets are generated once into a folder every session shares; a typed spec into the session's folder."""
        label, spec, shared = preset_spec(choice)
        cache = self.root / "_shared" if shared else self.folder(state) / "cache"
        return label, load_dataset(spec, cache=cache)

    def load_zip(self, state: dict, src: Path, name: str) -> Dataset:
        """Load an uploaded .zip of class folders, copied into the session folder first.

        Each upload unpacks into a new folder; the earlier one is deleted only once this one has loaded, so a
        broken zip leaves the session's current dataset as it was.
        """
        folder = self.folder(state)
        if self.is_busy(state["sid"]):
            raise SessionError("A training run of this session is using the current data; wait for it to finish "
                               "(or cancel it) before uploading another dataset.", title="Busy")
        with open(src, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise SessionError(f"{name} is not a .zip file. Zip a folder that holds one sub-folder per class "
                                   "(e.g. cats/…, dogs/…) and upload that.", title="Not a zip file")
        data = folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix="upload-", dir=data))
        try:
            zip_copy = target / "upload.zip"
            shutil.copyfile(src, zip_copy)
            root = safe_extract(zip_copy, target / "files", max_entries=MAX_ZIP_ENTRIES, max_total_bytes=MAX_ZIP_BYTES)
            zip_copy.unlink(missing_ok=True)
            dataset = load_dataset(root, cache=folder / "cache")
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        for earlier in data.iterdir():  # one uploaded dataset per session
            if earlier != target:
                shutil.rmtree(earlier, ignore_errors=True)
        return dataset

    def store_model(self, state: dict, src: Path, name: str) -> dict[str, Any]:
        """Copy an uploaded .onnx into the session folder and check it loads (in a child process).

        Returns ``check_model_file``'s info; sets ``state["uploaded_model"]``. A file that is not a usable
        classifier is deleted and raises ``SessionError`` with the reason.
        """
        if src.stat().st_size > MAX_ONNX_BYTES:
            raise SessionError(f"The model is larger than {MAX_ONNX_BYTES // 1024**2} MB.")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80]
        if not name.endswith(".onnx"):
            name += ".onnx"
        folder = self.folder(state) / "uploaded"
        self._remove(folder)
        folder.mkdir()
        dst = folder / name
        shutil.copyfile(src, dst)
        info = check_model_file(dst)
        if not info.get("ok") or not info.get("classes"):
            shutil.rmtree(folder, ignore_errors=True)
            state["uploaded_model"] = None
            reason = self.clean(info.get("error") or "it is not a classifier", state).replace(str(dst), name)
            raise SessionError(f"{name} is not a usable model: {reason}", title="Not a usable model")
        state["uploaded_model"] = str(dst)
        return info

    # ------------------------------------------------------------------------------------------ model choices

    def model_choices(self, state: dict) -> list[tuple[str, str]]:
        """``(label, key)`` for every model this session can predict with: the run's variants, then an upload."""
        from export.runs import model_filename
        from export.variants import VARIANTS, variant_path

        choices = []
        if state.get("run_dir"):
            model = Path(state["run_dir"]) / model_filename("pretrained")
            for name, variant in VARIANTS.items():
                path = variant_path(model, name)
                if path.is_file():
                    choices.append((f"trained in this session: {variant.label} ({path.name})", f"run:{name}"))
        if state.get("uploaded_model"):
            choices.append((f"uploaded: {Path(state['uploaded_model']).name}", UPLOADED_MODEL))
        return choices

    def model_path(self, state: dict, choice: str | None) -> Path:
        """Map a model-choice key to a file inside this session's folder (never a visitor-supplied path)."""
        from export.runs import model_filename
        from export.variants import VARIANTS, variant_path

        choice = choice or "run:fp32"
        if choice == UPLOADED_MODEL:
            if not state.get("uploaded_model"):
                raise SessionError("Upload an .onnx model first, or pick the model trained in this session.")
            return Path(state["uploaded_model"])
        variant = choice.removeprefix("run:")
        if not choice.startswith("run:") or variant not in VARIANTS:
            raise SessionError(f"Unknown model choice {choice!r}.")
        if not state.get("run_dir"):
            raise SessionError("Train a model first (Train & compare tab), or upload an .onnx exported earlier.",
                               title="No model yet")
        run_dir = Path(state["run_dir"])
        if not run_dir.is_dir():
            raise SessionError("This session's files were cleaned up after a long idle time; train again.",
                               title="Model gone")
        path = variant_path(run_dir / model_filename("pretrained"), variant)
        if not path.is_file():
            raise SessionError(f"This run has no {path.name}; pick another model.")
        return path


STORE = SessionStore()
