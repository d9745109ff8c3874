"""Decoded images on disk, so a run's memory does not grow with its dataset.

Every image is decoded once into the cache (``cache_dir()/decoded``, one ``.npy`` per image, keyed by its content
hash and the resize rule), reused by every later run and arm on the same files. A run holds only the file names:
``DecodedImages`` loads an image when it is indexed (the scratch arm's augmentation reads one batch at a time) and
the centre crops live in one memory-mapped file per image set (``crop_file``), which the feature pass and the
evaluations read in slices; ``release`` hands a slice's pages back once it is used, so the resident memory stays
one batch wide. Torch-free.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from core.runtime.files import atomic_write, cache_dir
from core.runtime.images import center_crop, open_rgb, release, resize_shorter

log = logging.getLogger(__name__)

CACHE_MAX_BYTES = 8 * 1024**3  # decoded images and crops kept for reuse; the oldest go first beyond this
CROP_CHUNK = 256  # images per write when a crop file is built


def _folder(kind: str) -> Path:
    return cache_dir() / "decoded" / kind


def decoded_file(sha256: str, resize: int, interpolation: str) -> Path:
    return _folder(f"{resize}-{interpolation}") / sha256[:2] / f"{sha256}.npy"


def decode_once(path: str | os.PathLike[str], sha256: str, resize: int, interpolation: str) -> Path:
    """The cached decode of ``path`` (resized so its shorter side is ``resize``), made now if it is missing."""
    target = decoded_file(sha256, resize, interpolation)
    if target.is_file():
        return target
    array = np.asarray(resize_shorter(open_rgb(path), resize, interpolation), dtype=np.uint8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(target, write)
    return target


class DecodedImages(Sequence):
    """Decoded uint8 images ``[H, W, 3]`` that live on disk: indexing an int loads one; a slice or an index array
    gives another ``DecodedImages`` (nothing is loaded). ``sources`` (``decode_once``'s arguments per image) let an
    image trimmed from the cache meanwhile be decoded again (a run kept in the app may read its images much later)."""

    def __init__(self, files: Sequence[Path], sources: Sequence[tuple] | None = None):
        self.files = list(files)
        self.sources = list(sources) if sources is not None else [None] * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):  # noqa: ANN001 - int, slice or an index array
        if isinstance(index, slice):
            return DecodedImages(self.files[index], self.sources[index])
        if isinstance(index, np.ndarray | list | tuple):
            picked = [int(i) for i in index]
            return DecodedImages([self.files[i] for i in picked], [self.sources[i] for i in picked])
        try:
            return np.load(self.files[index])
        except FileNotFoundError:
            if self.sources[index] is None:
                raise
            return np.load(decode_once(*self.sources[index]))

    nbytes = 0  # held in memory: none (the jobs' memory accounting counts what a kept run holds)


def _crop_key(files: Sequence[Path], size: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.parent.parent.name.encode())  # the resize rule
    return digest.hexdigest()[:32]


def _memmapped(target: Path, shape: tuple[int, ...], chunk: Callable[[int, int], np.ndarray]) -> np.memmap:
    """``target`` as a copy-on-write memory map (a caller may write to it without touching the file), first built
    atomically from ``chunk(lo, hi)``, ``CROP_CHUNK`` rows at a time, if it is missing."""
    if not target.is_file():
        def write(tmp: Path) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            for lo in range(0, shape[0], CROP_CHUNK):
                hi = min(lo + CROP_CHUNK, shape[0])
                out[lo:hi] = chunk(lo, hi)
                release(out[lo:hi])
            out.flush()
            del out

        atomic_write(target, write)
    return np.load(target, mmap_mode="c")


def crop_file(images: DecodedImages, size: int) -> np.memmap:
    """The centre ``size`` crops of ``images`` as one memory-mapped uint8 array ``[N, size, size, 3]``, built once
    per image set and size."""
    target = _folder("crops") / f"{_crop_key(images.files, size)}-{len(images)}x{size}.npy"
    return _memmapped(target, (len(images), size, size, 3),
                      lambda lo, hi: np.stack([center_crop(images[i], size) for i in range(lo, hi)]))


def take(crops: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``crops[index]`` that stays on disk when ``crops`` is a memory-mapped crop file (a new one, built in chunks)."""
    if not isinstance(crops, np.memmap) or len(index) == 0:
        return crops[index]
    index = np.asarray(index)
    digest = hashlib.sha256(index.astype(np.int64).tobytes()).hexdigest()[:16]
    target = Path(crops.filename).with_name(f"{Path(crops.filename).stem}-take-{digest}.npy")

    def chunk(lo: int, hi: int) -> np.ndarray:
        rows = index[lo:hi]
        out = crops[rows]
        release(crops[rows.min(): rows.max() + 1])  # the source's pages read for it: not kept resident
        return out

    return _memmapped(target, (len(index), *crops.shape[1:]), chunk)


def trim(max_bytes: int = CACHE_MAX_BYTES, keep: Iterable[Path] = ()) -> int:
    """Delete the least recently written decoded images and crop files beyond ``max_bytes``; returns bytes freed."""
    root = cache_dir() / "decoded"
    if not root.is_dir():
        return 0
    keep = {Path(p) for p in keep}
    entries = []
    for path in root.rglob("*.npy"):
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    freed = 0
    for _, size, path in sorted(entries):
        if total - freed <= max_bytes:
            break
        if path in keep:
            continue
        try:
            path.unlink()
            freed += size
        except OSError as exc:
            log.warning("could not trim %s: %s", path, exc)
    return freed
