"""Files: atomic writes (a temp file beside the target, moved into place with ``os.replace``), the cache folder,
and file hashes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

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


def atomic_write(path: str | os.PathLike[str], produce: Callable[[Path], Any]) -> Any:
    """Call ``produce(tmp)`` to write (and check) a temp file beside ``path``, then move it into place.

    If ``produce`` raises, ``path`` is left as it was and the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        result = produce(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
