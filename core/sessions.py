"""Per-visitor session folders for a multi-user front end (the Gradio app), with no Gradio import.

Every browser session gets a random id and a private folder ``<root>/<id>/`` for its upload, runs and models.
Nothing a visitor sends is used as a server path: uploads are copied in, and model choices are keys that map to
files inside that folder. Folders are deleted when the front end drops the session, after a grace period once the
tab is closed, and in any case when idle for ``SESSION_MAX_IDLE_S`` (``sweep``). A session with a job running is
marked busy (``busy``) and never swept.

Strangers share one disk, so the store keeps it in bounds:

- a byte quota per session and one for the whole root (``reserve``, called before anything that writes); over the
  global quota the least recently used idle sessions are evicted first, never a busy one or the caller's;
- sample specs a visitor types go into one shared cache, ``<root>/_shared/specs/``, capped in bytes and trimmed
  least recently used first (presets stay in ``<root>/_shared/``);
- the temp files and folders of a killed process are swept once they are ``STALE_TEMP_AGE_S`` old
  (``sweep_stale``), at start-up and on a timer (``start_housekeeping``), ``_shared/`` included.

``STORE`` is the process-wide default; tests may build their own ``SessionStore``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.data import Dataset, load_dataset
from core.runtime.errors import UserError
from core.runtime.files import cache_dir, remove_path, removed_on_failure, sweep_temp, tree_bytes
from core.runtime.predictor import PredictorCache, check_model_file
from core.safezip import safe_extract
from core.samples import COMPLETE_MARKER, estimate_sample_bytes, preset_spec, sample_key

log = logging.getLogger(__name__)

SESSION_MAX_IDLE_S = 2 * 3600
SESSION_CLOSED_GRACE_S = 15 * 60
RUNS_KEPT_PER_SESSION = 3
# Limits on uploads beyond the front end's own upload size limit.
MAX_ZIP_ENTRIES = 20_000
MAX_ZIP_BYTES = 1024**3
MAX_ONNX_BYTES = 512 * 1024**2
MAX_IMAGE_PIXELS = 40_000_000  # larger images in an upload are skipped (with the reason) before anything decodes them
# Disk quotas. A session holds one dataset (the front end's 200 MB zip unpacks to about as much again), one uploaded
# model (at most MAX_ONNX_BYTES) and up to RUNS_KEPT_PER_SESSION runs (TRAIN_RUN_BYTES each at most): 1 GB fits a
# normal visit and stops one visitor from filling the disk.
SESSION_QUOTA_BYTES = 1024**3
# All sessions together: half the disk that is free (or used by the root) at start-up, at most 20 GB. Half, because
# the root shares its disk with Gradio's upload folder, the model cache and the logs; a fixed ceiling, because a
# Space's 50 GB disk is not ours alone, and because measuring a larger tree gets slow.
GLOBAL_QUOTA_MAX_BYTES = 20 * 1024**3
GLOBAL_QUOTA_FREE_SHARE = 0.5
# What one training run writes at most (registry's largest backbone, ResNet-18, 47 MB of weights: two state dicts,
# model.onnx, its FP16 and INT8 variants, the Triton zip); what the front end reserves before training.
TRAIN_RUN_BYTES = 256 * 1024**2
# Typed sample specs: one shared cache (the largest allowed spec writes about 130 MB), and how many new ones a session
# may generate per hour (42 s of CPU each at the largest).
SPEC_CACHE_BYTES = 512 * 1024**2
SPEC_GENERATIONS_PER_HOUR = 10
USAGE_TTL_S = 30.0  # how long a folder's measured size is trusted before it is walked again
STALE_TEMP_AGE_S = 10 * 60  # a temp file or folder untouched this long belongs to no running writer
HOUSEKEEPING_INTERVAL_S = 10 * 60
SID_RE = re.compile(r"^[0-9a-f]{16}$")
UPLOADED_MODEL = "upload"  # the model-choice key of a visitor's uploaded .onnx
AUTO_MODEL = "run:auto"  # the run's variant timed fastest on this machine at export (report.json export.served)
SHARED = "_shared"
STORAGE_LIMIT = "Storage limit"
_CLOSED = ".closed"


def format_bytes(n: float) -> str:
    """``1288490188`` -> ``"1.2 GB"`` (binary units, as the quotas are set)."""
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{int(n)} bytes"


class SessionError(UserError):
    """A session cannot do what was asked (busy, cleaned up, nothing uploaded); the message says what to do."""


def new_state() -> dict[str, Any]:
    """A fresh session state: plain values only (front ends deep-copy it); ``ensure_state`` adds the cancel flag."""
    return {"sid": secrets.token_hex(8), "dataset": None, "source": None, "sample": None, "run_dir": None,
            "last": None, "uploaded_model": None}


def _sid(state: Any) -> str | None:
    sid = state.get("sid") if isinstance(state, dict) else None
    return sid if isinstance(sid, str) and SID_RE.match(sid) else None


class SessionStore:
    """The folder that holds every session's folder, the shared predictors, and which sessions are busy."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, predictors: PredictorCache | None = None,
                 session_quota_bytes: int = SESSION_QUOTA_BYTES, global_quota_bytes: int | None = None,
                 spec_cache_bytes: int = SPEC_CACHE_BYTES, spec_generations_per_hour: int = SPEC_GENERATIONS_PER_HOUR,
                 usage_ttl_s: float = USAGE_TTL_S):
        """``global_quota_bytes`` None: ``GLOBAL_QUOTA_FREE_SHARE`` of the disk free (or used by the root) when first
        needed (``start_housekeeping`` at start-up), at most ``GLOBAL_QUOTA_MAX_BYTES``."""
        self._root = Path(root).resolve() if root is not None else None
        self.predictors = predictors or PredictorCache()
        self.session_quota_bytes = session_quota_bytes
        self._global_quota = global_quota_bytes
        self.spec_cache_bytes = spec_cache_bytes
        self.spec_generations_per_hour = spec_generations_per_hour
        self.usage_ttl_s = usage_ttl_s
        self._active: set[str] = set()  # sessions with a job running
        self._writing: Counter[str] = Counter()  # sessions with an upload or sample being written
        self._lock = threading.Lock()
        self._spec_lock = threading.RLock()  # one sample generation at a time; the spec cache is trimmed under it
        self._quota_lock = threading.RLock()  # a check and its reservation are one step
        self._last_sweep = 0.0
        self._hash_to_sid: OrderedDict[str, str] = OrderedDict()  # front-end session hash -> our id
        self._sizes: dict[str, tuple[float, int]] = {}  # top-level name under root -> (monotonic time, bytes)
        self._reserved: Counter[str] = Counter()  # session id -> bytes reserved for a write not yet measured
        self._entry_sizes: dict[Path, int] = {}  # finished spec samples never change
        self._spec_users: dict[str, Path] = {}  # session id -> the spec-cache entry its dataset was loaded from
        self._generated: dict[str, list[float]] = {}  # session id -> times it generated a new spec sample
        self._housekeeper: threading.Thread | None = None
        self._stop_housekeeper = threading.Event()

    # ------------------------------------------------------------------------------------------ folders

    @property
    def root(self) -> Path:
        """``configure``'s folder, else env ``TRANSFER_LAB_APP_ROOT``, else ``<tmp>/transfer-lab-app`` (created)."""
        if self._root is None:
            env = os.environ.get("TRANSFER_LAB_APP_ROOT")
            self._root = Path(env) if env else Path(tempfile.gettempdir()) / "transfer-lab-app"
        self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    def configure(self, root: str | os.PathLike[str] | None = None, *, session_quota_bytes: int | None = None,
                  global_quota_bytes: int | None = None) -> Path:
        """Set the root folder and, where given, the quotas; returns the root (created)."""
        if root is not None:
            self._root = Path(root).resolve()
        if session_quota_bytes is not None:
            self.session_quota_bytes = session_quota_bytes
        if global_quota_bytes is not None:
            self._global_quota = global_quota_bytes
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
        self._forget(folder)
        if folder.parent == self.root:
            with self._lock:
                self._spec_users.pop(folder.name, None)

    def delete(self, state: Any) -> None:
        """Remove a session's folder and its cached predictors (unless a job of it is running)."""
        sid = _sid(state)
        if sid is not None and not self._protected(sid):
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
            if not folder.is_dir() or not SID_RE.match(folder.name) or self._protected(folder.name):
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
            self._forget(self.root / sid)  # the job wrote files: measure again

    def is_busy(self, sid: str) -> bool:
        with self._lock:
            return sid in self._active

    @contextmanager
    def _writing_in(self, sid: str) -> Iterator[None]:
        """Marks a session as being written to (an upload, a sample): not evicted, swept or deleted meanwhile."""
        with self._lock:
            self._writing[sid] += 1
        try:
            yield
        finally:
            with self._lock:
                self._writing[sid] -= 1
                if self._writing[sid] <= 0:
                    del self._writing[sid]
            self._forget(self.root / sid)

    def _protected(self, sid: str) -> bool:
        with self._lock:
            return sid in self._active or self._writing[sid] > 0

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
        self._forget(runs_dir)

    # ------------------------------------------------------------------------------------------ disk quotas

    @property
    def global_quota_bytes(self) -> int:
        """The byte quota of the whole root (fixed on first use; see ``GLOBAL_QUOTA_FREE_SHARE``)."""
        if self._global_quota is None:
            free = shutil.disk_usage(self.root).free
            self._global_quota = min(GLOBAL_QUOTA_MAX_BYTES, int(GLOBAL_QUOTA_FREE_SHARE * (free + self.total_bytes())))
        return self._global_quota

    def _forget(self, path: str | os.PathLike[str]) -> None:
        """Drop the cached size of the top-level folder that holds ``path`` (it changed), and the session's
        reservations with it (the write they were for is done: the next walk sees it)."""
        try:
            name = Path(path).relative_to(self.root).parts[0]
        except (ValueError, IndexError):
            return
        with self._lock:
            self._sizes.pop(name, None)
            self._reserved.pop(name, None)

    def _measure(self, name: str, *, fresh: bool = False) -> int:
        """Bytes under ``<root>/<name>``, walked at most every ``usage_ttl_s`` seconds unless ``fresh``."""
        now = time.monotonic()
        with self._lock:
            hit = self._sizes.get(name)
        if hit is not None and not fresh and now - hit[0] < self.usage_ttl_s:
            return hit[1]
        size = tree_bytes(self.root / name)
        with self._lock:
            self._sizes[name] = (now, size)
        return size

    def session_bytes(self, state: dict, *, fresh: bool = False) -> int:
        """Bytes in the session's folder (0 if it has none) and reserved for its writes under way."""
        sid = _sid(state)
        if sid is None:
            return 0
        with self._lock:
            reserved = self._reserved[sid]
        return self._measure(sid, fresh=fresh) + reserved

    def total_bytes(self, *, fresh: bool = False) -> int:
        """Bytes under the root (every session and ``_shared/``) and reserved for writes under way."""
        names = [p.name for p in self.root.iterdir()]
        with self._lock:
            for gone in set(self._sizes) - set(names):
                del self._sizes[gone]
            reserved = sum(self._reserved.values())
        return sum(self._measure(name, fresh=fresh) for name in names) + reserved

    def usage(self, state: dict | None = None) -> dict[str, int]:
        """Bytes used and allowed, for display: ``total_bytes``, ``global_quota_bytes`` and, with a session state,
        ``session_bytes`` and ``session_quota_bytes``."""
        out = {"total_bytes": self.total_bytes(), "global_quota_bytes": self.global_quota_bytes}
        if _sid(state):
            out.update(session_bytes=self.session_bytes(state), session_quota_bytes=self.session_quota_bytes)
        return out

    def usage_text(self, state: dict | None = None) -> str:
        """One line for a front end, e.g. "Storage: this session 120 MB of 1 GB; all visitors 3.2 GB of 20 GB"."""
        u = self.usage(state)
        mine = (f"this session {format_bytes(u['session_bytes'])} of {format_bytes(u['session_quota_bytes'])}; "
                if "session_bytes" in u else "")
        return (f"Storage: {mine}all visitors {format_bytes(u['total_bytes'])} of "
                f"{format_bytes(u['global_quota_bytes'])}")

    def reserve(self, state: dict, expected_bytes: int = 0, *, replaces: Path | None = None) -> None:
        """Check there is room for ``expected_bytes`` more before writing them; raises ``SessionError`` ("Storage
        limit") with what to do if not.

        Over the session's quota, its runs other than the current one are removed first. Over the global quota, the
        least recently used idle sessions are evicted first (never a busy one, never this one). ``replaces``: a
        folder of this session the write will replace on success (an earlier upload), not counted against the
        session's quota. The reservation counts until the write is over (the end of ``busy``, or of the store's own
        upload or sample).
        """
        folder = self.folder(state)
        sid = folder.name
        need = max(0, int(expected_bytes))
        quota = self.session_quota_bytes
        if need > quota:
            raise SessionError(f"This needs about {format_bytes(need)}, more than the {format_bytes(quota)} a session "
                               "may store; upload a smaller dataset or model.", title=STORAGE_LIMIT)

        def used(fresh: bool = False) -> int:
            return self.session_bytes(state, fresh=fresh) - (tree_bytes(replaces) if replaces is not None else 0)

        with self._quota_lock:
            if used() + need > quota:
                pruned = self._remove_older_runs(state)
                if used(fresh=True) + need > quota:
                    note = "; its older runs were removed already" if pruned else ""
                    raise SessionError(f"This session uses {format_bytes(used())} of its {format_bytes(quota)} of "
                                       f"storage{note}, and this needs about {format_bytes(need)} more. Upload a "
                                       "smaller dataset or model, or reload the page to start a new session.",
                                       title=STORAGE_LIMIT)
            self._reserve_global(need, keep=sid)
            with self._lock:
                self._reserved[sid] += need

    def check_quota(self, state: dict) -> None:
        """``reserve(state, 0)``: raises ``SessionError`` if this session or the server is already over its quota."""
        self.reserve(state, 0)

    def _reserve_global(self, need: int, *, keep: str | None) -> None:
        with self._quota_lock:
            self._make_room(need, keep=keep)

    def _make_room(self, need: int, *, keep: str | None) -> None:
        quota = self.global_quota_bytes
        if self.total_bytes() + need <= quota:
            return
        total = self.total_bytes(fresh=True)  # stale sizes must not evict anyone
        if total + need > quota:
            self.evict_idle(total + need - quota, keep=keep)
            total = self.total_bytes()
        if total + need > quota:
            raise SessionError(f"The server's storage for all visitors is full right now ({format_bytes(total)} of "
                               f"{format_bytes(quota)}); your earlier model and data are kept. Try again in a few "
                               "minutes or with a smaller dataset.", title=STORAGE_LIMIT)

    def _remove_older_runs(self, state: dict) -> int:
        """Delete this session's runs except the current one (unless a job of it runs); returns how many."""
        sid = state["sid"]
        runs = self.root / sid / "runs"
        if self._protected(sid) or not runs.is_dir():
            return 0
        current = Path(state["run_dir"]).resolve() if state.get("run_dir") else None
        removed = 0
        for run in sorted(runs.iterdir(), key=lambda p: p.stat().st_mtime):
            if run.is_dir() and run.name.startswith("run-") and run.resolve() != current:
                self._remove(run)
                removed += 1
        return removed

    def evict_idle(self, need_bytes: int, *, keep: str | None = None) -> list[str]:
        """Delete whole idle sessions, least recently used first, until ``need_bytes`` are freed; never a busy
        session or ``keep``. Evicts nobody if all idle sessions together hold less. Returns the evicted ids."""
        candidates = []
        for folder in self.root.iterdir():
            if folder.is_dir() and SID_RE.match(folder.name) and folder.name != keep \
                    and not self._protected(folder.name):
                try:
                    candidates.append((folder.stat().st_mtime, folder, self._measure(folder.name)))
                except OSError:
                    continue
        if sum(size for *_, size in candidates) < need_bytes:
            return []  # evicting them all would not make room: keep them
        freed, evicted = 0, []
        for _, folder, size in sorted(candidates):
            if freed >= need_bytes:
                break
            with self._lock:  # claim it: a job starting now would find no folder rather than lose it midway
                if folder.name in self._active or self._writing[folder.name] > 0:
                    continue
                doomed = folder.with_name(f".staging-{folder.name}")  # a temp name: swept if removing fails
                try:
                    os.rename(folder, doomed)
                except OSError:
                    continue
            self.predictors.evict_under(folder)
            shutil.rmtree(doomed, ignore_errors=True)
            self._forget(folder)
            with self._lock:
                self._spec_users.pop(folder.name, None)
            freed += size
            evicted.append(folder.name)
            log.info("evicted idle session %s (%s) for disk space", folder.name, format_bytes(size))
        if evicted:
            self.trim_spec_cache()  # samples only those sessions used may go now
        return evicted

    # ------------------------------------------------------------------------------------------ housekeeping

    def sweep_stale(self, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
        """Delete temp files and folders (``core.runtime.files.is_temp_name``: ``.partial-*``, ``.staging-*``,
        ``.*.tmp``, ``.triton-*``) untouched for ``max_age_s`` anywhere under the root, ``_shared/`` included; a
        session with a job or an upload running is left alone. Returns what was deleted."""

        def in_use(path: Path) -> bool:
            return path.parent == self.root and bool(SID_RE.match(path.name)) and self._protected(path.name)

        with self._spec_lock:  # no generation of a sample meanwhile (its .partial folder is young anyway)
            removed = sweep_temp(self.root, max_age_s, skip=in_use)
        for path in removed:
            self._forget(path)
        if removed:
            log.info("swept %d stale temp file(s) or folder(s) under %s", len(removed), self.root)
        return removed

    def housekeep(self, *, stale_age_s: float = STALE_TEMP_AGE_S) -> dict[str, list]:
        """One round: stale temp files, idle or closed sessions, the spec cache over its cap."""
        return {"stale": self.sweep_stale(stale_age_s), "idle": self.sweep(min_interval_s=0),
                "specs": self.trim_spec_cache()}

    def start_housekeeping(self, interval_s: float = HOUSEKEEPING_INTERVAL_S, *,
                           stale_age_s: float = STALE_TEMP_AGE_S) -> threading.Thread:
        """At start-up: fix the global quota, run ``housekeep`` once now, then every ``interval_s`` seconds on a
        daemon thread (started once; a second call returns the running thread)."""
        _ = self.global_quota_bytes
        self.housekeep(stale_age_s=stale_age_s)
        with self._lock:
            if self._housekeeper is not None and self._housekeeper.is_alive():
                return self._housekeeper
            self._stop_housekeeper = stop = threading.Event()
            thread = threading.Thread(target=self._housekeeping_loop, args=(stop, interval_s, stale_age_s),
                                      name="session-housekeeping", daemon=True)
            self._housekeeper = thread
        thread.start()
        return thread

    def stop_housekeeping(self, timeout: float = 5.0) -> None:
        self._stop_housekeeper.set()
        if self._housekeeper is not None:
            self._housekeeper.join(timeout)
            self._housekeeper = None

    def _housekeeping_loop(self, stop: threading.Event, interval_s: float, stale_age_s: float) -> None:
        while not stop.wait(interval_s):
            try:
                self.housekeep(stale_age_s=stale_age_s)
            except Exception:  # noqa: BLE001 - the timer must survive one bad round
                log.exception("session housekeeping failed")

    # ------------------------------------------------------------------------------------------ shared spec cache

    @property
    def spec_cache(self) -> Path:
        """The one cache of typed sample specs every session shares."""
        return self.root / SHARED / "specs"

    def _spec_entries(self) -> list[Path]:
        """Finished samples in the spec cache (at depth 1 or 2: ``core.data`` adds a ``samples/`` level)."""
        markers = [*self.spec_cache.glob(f"*/{COMPLETE_MARKER}"), *self.spec_cache.glob(f"*/*/{COMPLETE_MARKER}")]
        return [m.parent for m in markers if not m.parent.name.startswith(".")]

    def _spec_entry(self, key: str) -> Path | None:
        return next((e for e in self._spec_entries() if e.name == key), None)

    def spec_cache_bytes_used(self) -> int:
        total = 0
        for entry in self._spec_entries():
            if entry not in self._entry_sizes:
                self._entry_sizes[entry] = tree_bytes(entry)
            total += self._entry_sizes[entry]
        return total

    def trim_spec_cache(self, room_bytes: int = 0) -> list[Path]:
        """Delete cached spec samples, least recently used first, until they and ``room_bytes`` more fit in
        ``spec_cache_bytes``; never one a live session's dataset was loaded from. Skipped (returns ``[]``) while
        another thread generates a sample. Returns the deleted folders."""
        if not self._spec_lock.acquire(blocking=False):
            return []
        try:
            with self._lock:
                in_use = {entry for sid, entry in self._spec_users.items() if (self.root / sid).is_dir()}
            entries = []
            for entry in self._spec_entries():
                try:
                    entries.append((entry.stat().st_mtime, entry))
                except OSError:
                    continue
            total = self.spec_cache_bytes_used()
            removed = []
            for _, entry in sorted(entries):
                if total + room_bytes <= self.spec_cache_bytes:
                    break
                if entry in in_use:
                    continue
                remove_path(entry)
                total -= self._entry_sizes.pop(entry, 0)
                removed.append(entry)
            if removed:
                self._forget(self.spec_cache)
            return removed
        finally:
            self._spec_lock.release()

    def _count_generation(self, sid: str) -> None:
        now = time.time()
        with self._lock:
            recent = [t for t in self._generated.get(sid, []) if now - t < 3600]
            if len(recent) >= self.spec_generations_per_hour:
                wait = max(1, round((3600 - (now - recent[0])) / 60))
                raise SessionError(
                    f"This session generated {len(recent)} new samples in the last hour, the most this shared server "
                    f"allows. Pick a preset or a sample you generated before, or wait about {wait} min.",
                    title="Too many samples")
            self._generated[sid] = [*recent, now]

    # ------------------------------------------------------------------------------------------ data

    def load_sample(self, state: dict, choice: str) -> tuple[str, Dataset]:
        """``(label, dataset)`` for a preset name or a bounded ``sample:`` spec (``core.samples.preset_spec``).

        Presets are generated once into ``<root>/_shared/``; a typed spec into the shared, size-capped spec cache
        (``trim_spec_cache``), one generation at a time, counted against the global quota and, per session,
        ``spec_generations_per_hour``."""
        label, spec, shared = preset_spec(choice)
        if shared:  # no session folder needed
            dataset = load_dataset(spec, cache=self.root / SHARED)
            with self._lock:
                self._spec_users.pop(_sid(state) or "", None)
            return label, dataset
        sid = self.folder(state).name
        key = sample_key(spec)
        with self._spec_lock, self._writing_in(sid):
            if self._spec_entry(key) is None:
                need = estimate_sample_bytes(spec)
                self._count_generation(sid)
                self.trim_spec_cache(room_bytes=need)
                self._reserve_global(need, keep=sid)
            dataset = load_dataset(spec, cache=self.spec_cache)
            self._forget(self.spec_cache)
            entry = self._spec_entry(key)
            if entry is not None:
                os.utime(entry)  # most recently used
                with self._lock:
                    self._spec_users[sid] = entry
            self.trim_spec_cache()
        return label, dataset

    def load_zip(self, state: dict, src: Path, name: str) -> Dataset:
        """Load an uploaded .zip of class folders, copied into the session folder first.

        Each upload unpacks into a new folder; the earlier one is deleted only once this one has loaded, so a
        broken zip, a full disk or a refusal for space leaves the session's current dataset as it was.
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
        self.reserve(state, _zip_bytes(src), replaces=data)
        with self._writing_in(folder.name):
            data.mkdir(parents=True, exist_ok=True)
            target = Path(tempfile.mkdtemp(prefix="upload-", dir=data))
            with removed_on_failure(target):
                zip_copy = target / "upload.zip"
                shutil.copyfile(src, zip_copy)
                root = safe_extract(zip_copy, target / "files", max_entries=MAX_ZIP_ENTRIES,
                                    max_total_bytes=MAX_ZIP_BYTES)
                zip_copy.unlink(missing_ok=True)
                dataset = load_dataset(root, cache=folder / "cache", max_pixels=MAX_IMAGE_PIXELS)
            for skipped in dataset.skipped:  # named like an image but not one (or too large): not kept on disk
                path = (root / skipped.file).resolve()
                if root.resolve() in path.parents and path.is_file():
                    path.unlink()
            for earlier in data.iterdir():  # one uploaded dataset per session
                if earlier != target:
                    remove_path(earlier)
        with self._lock:
            self._spec_users.pop(folder.name, None)
        return dataset

    def store_model(self, state: dict, src: Path, name: str) -> dict[str, Any]:
        """Copy an uploaded .onnx into the session folder and check it loads (in a child process).

        Returns ``check_model_file``'s info; sets ``state["uploaded_model"]``. The copy is staged and checked
        beside the earlier upload, which is replaced only then: a file that is not a usable classifier (a
        ``SessionError`` with the reason) or a failed copy (a full disk) keeps the earlier model.
        """
        size = src.stat().st_size
        if size > MAX_ONNX_BYTES:
            raise SessionError(f"The model is larger than {MAX_ONNX_BYTES // 1024**2} MB.")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80]
        if not name.endswith(".onnx"):
            name += ".onnx"
        folder = self.folder(state)
        uploaded = folder / "uploaded"
        self.reserve(state, size, replaces=uploaded)
        with self._writing_in(folder.name):
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
            with removed_on_failure(staging):
                staged = staging / name
                shutil.copyfile(src, staged)
                info = check_model_file(staged)
                if not info.get("ok") or not info.get("classes"):
                    reason = str(info.get("error") or "it is not a classifier").replace(str(staged), name)
                    raise SessionError(f"{name} is not a usable model: {self.clean(reason, state)}",
                                       title="Not a usable model")
                self._remove(uploaded)
                os.rename(staging, uploaded)
        state["uploaded_model"] = str(uploaded / name)
        return info

    # ------------------------------------------------------------------------------------------ model choices

    def model_choices(self, state: dict) -> list[tuple[str, str]]:
        """``(label, key)`` for every model this session can predict with: the run's variants, then an upload."""
        from export.runs import model_filename
        from export.variants import VARIANTS, variant_path

        choices = []
        if state.get("run_dir"):
            model = Path(state["run_dir"]) / model_filename("pretrained")
            if model.is_file():
                choices.append(("trained in this session: fastest here (timed)", AUTO_MODEL))
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

        choice = choice or AUTO_MODEL
        if choice == UPLOADED_MODEL:
            if not state.get("uploaded_model"):
                raise SessionError("Upload an .onnx model first, or pick the model trained in this session.")
            return Path(state["uploaded_model"])
        variant = choice.removeprefix("run:")
        if not choice.startswith("run:") or variant not in (*VARIANTS, "auto"):
            raise SessionError(f"Unknown model choice {choice!r}.")
        if not state.get("run_dir"):
            raise SessionError("Train a model first (Train tab), or upload an .onnx exported earlier.",
                               title="No model yet")
        run_dir = Path(state["run_dir"])
        if not run_dir.is_dir():
            raise SessionError("This session's files were cleaned up after a long idle time; train again.",
                               title="Model gone")
        if variant == "auto":
            variant = served_variant(run_dir)
        path = variant_path(run_dir / model_filename("pretrained"), variant)
        if not path.is_file():
            raise SessionError(f"This run has no {path.name}; pick another model.")
        return path


def served_choice(run_dir: Path) -> dict:
    """What the export timed fastest here (``export.runs.serve_choice``: variant, reason); {} where none was."""
    try:
        served = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))["export"]["served"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return served if isinstance(served, dict) else {}


def served_variant(run_dir: Path) -> str:
    """The variant ``served_choice`` names; FP32 where none was recorded."""
    from export.variants import VARIANTS

    served = served_choice(run_dir).get("variant")
    return served if served in VARIANTS else "fp32"


def _zip_bytes(src: Path) -> int:
    """What unpacking ``src`` writes: its copy plus the sizes its entries declare (at most ``MAX_ZIP_BYTES``,
    which ``safe_extract`` enforces)."""
    size = src.stat().st_size
    try:
        with zipfile.ZipFile(src) as zf:
            declared = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        declared = size  # safe_extract says what is wrong with it
    return size + min(declared, MAX_ZIP_BYTES)


STORE = SessionStore()
