"""Files: atomic writes (a temp file beside the target, moved into place with ``os.replace``), the cache folder,
file hashes, folder sizes, and sweeping the temp files and folders a killed process left behind.

Every temp name this project writes starts with a dot (``is_temp_name``): ``temp_path``'s ``.<name>.<hex>.tmp``,
``.<name>.partial-*`` (``core.samples``, ``core.safezip``), ``.staging-*`` (``core.report``, ``core.sessions``) and
``.triton-*`` (``export.triton``). Extracted uploads skip hidden names, so no visitor's file looks like one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.runtime.errors import exception_chain

CACHE_ENV = "TRANSFER_LAB_CACHE"


def cache_dir() -> Path:
    """Cache folder for extracted zips, generated samples, backbone graphs and TensorRT engines (env
    ``TRANSFER_LAB_CACHE``, default ``~/.cache/transfer-lab``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "transfer-lab"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A hidden, unique temp file name beside ``path`` (same folder, so ``os.replace`` onto ``path`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def release_locals(exc: BaseException) -> None:
    """Drop the local variables of the finished frames in the tracebacks of ``exc`` and of its cause and context.

    A failed write leaves its writer (an unclosed file, torch.save's ``PyTorchFileWriter``) in a frame of the
    traceback; while the exception lives on (logged, handed from a job thread, kept by a test) the descriptor stays
    open, to a temp file already deleted, so a full disk stays full. Frames still running are left alone.
    """
    for e in exception_chain(exc):
        traceback.clear_frames(e.__traceback__)


def remove_path(path: str | os.PathLike[str]) -> None:
    """Delete a file, link or folder tree if it exists; never raises."""
    path = Path(path)
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def removed_on_failure(*paths: str | os.PathLike[str]) -> Iterator[None]:
    """On any exception in the block: close what the failed frames still hold open (``release_locals``), delete
    ``paths`` (temp files or folders), re-raise."""
    try:
        yield
    except BaseException as exc:
        release_locals(exc)
        for path in paths:
            remove_path(path)
        raise


def atomic_write(path: str | os.PathLike[str], produce: Callable[[Path], Any]) -> Any:
    """Call ``produce(tmp)`` to write (and check) a temp file beside ``path``, then move it into place.

    If ``produce`` or the move fails (a full disk included), ``path`` is left as it was, the temp file is closed
    and removed, and the error is raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with removed_on_failure(tmp):
            result = produce(tmp)
            os.replace(tmp, path)
    finally:
        remove_path(tmp)  # also if produce left it on a successful run without moving it
    return result


def jsonable(value: Any) -> Any:
    """NumPy scalars to Python, non-finite floats to None, paths to str (strict JSON for other tools)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Rewrite a JSON file atomically (a reader never sees half a file)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(jsonable(data), indent=2) + "\n", encoding="utf-8"))


# ---------------------------------------------------------------- sizes and leftovers

_TEMP_NAMES = re.compile(r"^\.(?:.+\.[0-9a-f]{12}\.tmp|.+\.partial-\w+|staging-\w+|triton-\w+)$")


def is_temp_name(name: str) -> bool:
    """True for the temp names this project writes (see the module docstring), e.g. ``.model.onnx.1f2e3d4c5b6a.tmp``,
    ``.shapes-3f2a.partial-k2j4``, ``.staging-x8c1``."""
    return bool(_TEMP_NAMES.match(name))


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the files under ``path`` (a file counts itself); links are not followed, vanished files count 0."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size
    total, todo = 0, [os.fspath(path)]
    while todo:
        try:
            with os.scandir(todo.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            todo.append(entry.path)
                        else:
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def newest_mtime(path: str | os.PathLike[str]) -> float:
    """The latest modification time of ``path`` and everything under it (a folder still being written is young)."""
    newest = 0.0
    for folder, dirs, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(name).st_mtime)
    with contextlib.suppress(OSError):
        newest = max(newest, os.lstat(path).st_mtime)
    return newest


def sweep_temp(root: str | os.PathLike[str], max_age_s: float, *,
               skip: Callable[[Path], bool] | None = None) -> list[Path]:
    """Delete temp files and folders (``is_temp_name``) under ``root`` untouched for ``max_age_s`` seconds: the
    leftovers of a killed process. ``skip(folder)`` True keeps a folder and everything under it (in use by a job).
    Returns what was deleted."""
    now = time.time()
    removed: list[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        keep_dirs = []
        for name in dirs:
            path = here / name
            if skip is not None and skip(path):
                continue
            if is_temp_name(name):
                if now - newest_mtime(path) > max_age_s:
                    remove_path(path)
                    removed.append(path)
                continue  # never look inside a temp folder
            keep_dirs.append(name)
        dirs[:] = keep_dirs
        for name in files:
            path = here / name
            if is_temp_name(name) and now - newest_mtime(path) > max_age_s:
                remove_path(path)
                removed.append(path)
    return removed
