"""One interface for every dataset source: class folders, train/val folders, zips and samples."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.runtime.errors import UserError
from core.runtime.files import atomic_write, cache_dir, sha256_file
from core.runtime.images import IMAGE_EXTENSIONS, ImageDecodeError, is_image_file, open_rgb
from core.safezip import find_root, is_ignored_member, read_skipped, safe_extract
from core.samples import SAMPLES, SampleError, is_sample_spec, make_sample

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
_LAYOUT_HELP = (
    "Expected layout:\n"
    "  ROOT/cat/img001.jpg  ROOT/cat/...\n"
    "  ROOT/dog/img001.jpg  ROOT/dog/...\n"
    "or with fixed splits:\n"
    "  ROOT/train/cat/...  ROOT/train/dog/...\n"
    "  ROOT/val/cat/...    ROOT/val/dog/...    (optional ROOT/test/...)"
)


class DatasetError(UserError, ValueError):
    """The dataset cannot be used as given; the message names the bad value and the fix."""


@dataclass(frozen=True)
class Item:
    path: Path
    label: int
    split: str
    sha256: str


@dataclass(frozen=True)
class Skipped:
    file: str
    reason: str


@dataclass
class Dataset:
    source: str
    root: Path
    classes: list[str]
    items: list[Item]
    skipped: list[Skipped] = field(default_factory=list)
    predefined_split: bool = False
    # The shares a random split was drawn with ({"val": 0.2, "test": 0.1}); empty when the folders fixed the split.
    fractions: dict[str, float] = field(default_factory=dict)
    # Training images left out on request (near-duplicate copies, ``without``), relative to the root.
    dropped: list[str] = field(default_factory=list)

    def without(self, indices) -> Dataset:
        """The dataset with the training images at ``indices`` (into ``items``) left out; the split is kept. Only
        training images can be dropped: validation and test images are what the scores are measured on."""
        drop = {int(i) for i in indices}
        bad = sorted(i for i in drop if not 0 <= i < len(self.items) or self.items[i].split != "train")
        if bad:
            raise ValueError(f"Only training images can be dropped; item(s) {bad[:5]} are not training images.")
        return dataclasses.replace(self, items=[it for k, it in enumerate(self.items) if k not in drop],
                                   dropped=self.dropped + sorted(self.relpath(self.items[i]) for i in drop))

    def resplit(self, seed: int) -> Dataset:
        """The same images under another random stratified split (drawn as ``load_dataset`` draws it, from
        ``seed``); the dataset itself when its folders fixed the split. Images are not read again."""
        if self.predefined_split or not self.fractions:
            return self
        by_class: dict[str, list[tuple[Path, str]]] = {c: [] for c in self.classes}
        for it in self.items:
            by_class[self.classes[it.label]].append((it.path, it.sha256))
        return dataclasses.replace(self, items=_items(_stratified_split(by_class, self.fractions, seed),
                                                      self.classes))

    def split(self, name: str) -> list[Item]:
        """Items of one split (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return [it for it in self.items if it.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split per class; ``test`` only appears when the dataset has a test split."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            items = self.split(split)
            if split == "test" and not items:
                continue
            per = dict.fromkeys(self.classes, 0)
            for it in items:
                per[self.classes[it.label]] += 1
            out[split] = per
        return out

    def relpath(self, path: Item | str | os.PathLike[str]) -> str:
        """An item's (or a file's) path relative to the dataset root, with forward slashes."""
        path = Path(path.path if isinstance(path, Item) else path)
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def write_manifest(self, path: str | os.PathLike[str], selection: Iterable[str] = ()) -> None:
        """Write ``file,class,split,sha256`` CSV (files relative to root), atomically. Training images in
        ``selection`` (paths as in ``Item.path``) are listed with split ``selection``: held out to choose the epoch."""
        held_out = {str(f) for f in selection}

        def produce(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["file", "class", "split", "sha256"])
                for it in self.items:
                    split = "selection" if it.split == "train" and str(it.path) in held_out else it.split
                    writer.writerow([self.relpath(it), self.classes[it.label], split, it.sha256])

        atomic_write(path, produce)

    def public_source(self) -> str:
        """``source`` without the server's folders: a sample spec as given, a folder or zip by its base name."""
        if is_sample_spec(self.source):
            return self.source
        return Path(self.source).name or self.source

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-item list) that visitors may download: no absolute path of this machine.

        ``root`` is the dataset folder's name only; skipped files are relative to the root."""
        return {
            "source": self.public_source(),
            "root": self.root.name,
            "classes": list(self.classes),
            "counts": self.counts(),
            "num_images": len(self.items),
            "predefined_split": self.predefined_split,
            "skipped": [{"file": s.file, "reason": s.reason} for s in self.skipped],
            "dropped": list(self.dropped),
        }


# ---------------------------------------------------------------- source resolution


def _extract_zip(zip_path: Path, cache: Path) -> Path:
    # "-images": extractions from before safe_extract kept image files only are not reused
    dest = cache / "zips" / f"{sha256_file(zip_path)[:16]}-images"
    if dest.is_dir():
        return find_root(dest)
    try:
        return safe_extract(zip_path, dest)
    except FileExistsError:
        if dest.is_dir():  # another process finished the same extraction first
            return find_root(dest)
        raise


def _resolve_root(src: str | os.PathLike[str], cache: Path) -> tuple[Path, bool]:
    """Folder holding the images and whether it came from a zip."""
    if is_sample_spec(src):
        try:
            return make_sample(str(src), cache / "samples"), False
        except SampleError as exc:
            raise DatasetError(str(exc)) from None
    path = Path(os.path.abspath(Path(src).expanduser()))
    if not path.exists():
        hint = ""
        if isinstance(src, str) and ":" in src and not os.path.splitdrive(src)[0]:
            hint = f" Sample datasets are written like {', '.join('sample:' + n for n in SAMPLES)}."
        raise DatasetError(
            f"{str(src)!r} does not exist. Pass a folder of class folders, a .zip of one, or a sample spec.{hint}"
        )
    if path.is_dir():
        return path, False
    if path.suffix.lower() == ".zip" or _looks_like_zip(path):
        return _extract_zip(path, cache), True
    raise DatasetError(
        f"{str(src)!r} is a file but not a .zip; pass the folder that holds the class folders, or a .zip of it"
    )


def _looks_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


# ---------------------------------------------------------------- scanning


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_ignored_member((p.name,)))


def _scan_class_dir(class_dir: Path, root: Path, skipped: list[Skipped]) -> list[Path]:
    """Image files under one class folder (recursively, sorted); other files go to ``skipped``."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not is_ignored_member((d,)))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if is_image_file(path):
                found.append(path)
            else:
                skipped.append(Skipped(path.relative_to(root).as_posix(), "not an image file extension"))
    return found


def _loose_files(folder: Path, root: Path, skipped: list[Skipped], where: str) -> None:
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            skipped.append(Skipped(p.relative_to(root).as_posix(), f"not inside a class folder ({where})"))


def _find_split_dirs(root: Path) -> dict[str, Path]:
    by_name = {p.name.lower(): p for p in _visible_dirs(root)}
    found: dict[str, Path] = {}
    for split, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in by_name:
                found[split] = by_name[alias]
                break
    return found


# Validation only needs the whole file decoded: JPEGs at 1/8 scale, other formats reduced right after the load.
_VALIDATE_SIDE = 64


def _validate(path: Path, max_pixels: int | None = None) -> tuple[str, str | None]:
    """(sha256, None) for a decodable image, else (sha256 or '', reason)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return "", f"cannot read file ({exc.strerror or exc})"
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return digest, "empty file"
    try:
        open_rgb(io.BytesIO(data), reduce_to=_VALIDATE_SIDE, max_pixels=max_pixels).close()
    except ImageDecodeError as exc:
        return digest, exc.reason
    return digest, None


def _decode_all(paths: list[Path], max_pixels: int | None = None) -> list[tuple[str, str | None]]:
    if len(paths) < 16:
        return [_validate(p, max_pixels) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        return list(pool.map(_validate, paths, [max_pixels] * len(paths)))


# ---------------------------------------------------------------- splitting


def _need_per_class(test: bool, min_per_class: int | None) -> int:
    structural = 3 if test else 2
    return max(structural, min_per_class or 0)


def _too_few(cls: str, have: int, need: int, where: str, detail: str, skipped_in: int) -> DatasetError:
    extra = f" ({skipped_in} more file(s) there were skipped; see the skipped list)" if skipped_in else ""
    return DatasetError(
        f"class {cls!r} has {have} usable image(s){where} but at least {need} are needed ({detail}){extra}. "
        "Add images to that class folder or remove the folder"
        + (" (or lower min_per_class)." if "min_per_class" in detail else ".")
    )


def _items(assigned: dict[str, dict[str, list[tuple[Path, str]]]], classes: list[str]) -> list[Item]:
    """``Item``s in a stable order (split, then class, then path) from ``{split: {class: [(path, sha256)]}}``."""
    return [Item(path=path, label=label, split=split, sha256=digest)
            for split in SPLITS for label, cls in enumerate(classes)
            for path, digest in sorted(assigned.get(split, {}).get(cls, []), key=lambda e: e[0].as_posix())]


def _stratified_split(
    files: dict[str, list[tuple[Path, str]]],
    fractions: dict[str, float],
    seed: int,
) -> dict[str, dict[str, list[tuple[Path, str]]]]:
    """Split every class separately so each class lands in every split (deterministic from seed)."""
    from sklearn.model_selection import train_test_split  # deferred: importing sklearn takes about a second

    out: dict[str, dict[str, list[tuple[Path, str]]]] = {s: {} for s in ("train", *fractions)}
    for cls, entries in files.items():
        rest = sorted(entries, key=lambda e: e[0].as_posix())
        n = len(rest)
        state = (seed * 1_000_003 + zlib.crc32(cls.encode())) % 2**32  # independent draw per class
        for split, frac in fractions.items():
            reserve = len(fractions) - list(fractions).index(split)  # keep >= 1 for train and later splits
            k = min(max(1, round(frac * n)), len(rest) - reserve)
            rest, taken = train_test_split(rest, test_size=k, random_state=state, shuffle=True)
            out[split][cls] = sorted(taken, key=lambda e: e[0].as_posix())
        out["train"][cls] = sorted(rest, key=lambda e: e[0].as_posix())
    return out


# ---------------------------------------------------------------- public entry point


def load_dataset(
    src: str | os.PathLike[str],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    min_per_class: int | None = None,
    cache: Path | None = None,
    max_pixels: int | None = None,
) -> Dataset:
    """Load any supported source, validate every image, and assign train/val(/test) splits.

    ``src`` is a folder of class folders, a folder with ``train/`` and ``val/`` (and optional
    ``test/``) class folders, a ``.zip`` of either, or a sample spec such as ``sample:shapes``.
    Split folders that exist are respected; missing ones (and every split of a plain class-folder
    layout) are drawn per class from ``seed``, so every class appears in every split.
    Images with more than ``max_pixels`` pixels are skipped, read from their header (see
    ``core.runtime.images.check_pixels``). The members of a zip that ``safe_extract`` did not unpack are
    listed in ``skipped`` too.
    """
    if not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction={val_fraction} must be between 0 and 1, e.g. 0.2")
    if not 0 <= test_fraction < 1:
        raise DatasetError(f"test_fraction={test_fraction} must be at least 0 and below 1, e.g. 0.1")
    if val_fraction + test_fraction >= 1:
        raise DatasetError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves no training images; "
            "keep their sum below 1, e.g. 0.2 and 0.1"
        )
    if min_per_class is not None and min_per_class < 1:
        raise DatasetError(f"min_per_class={min_per_class} must be a positive integer")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise DatasetError(f"max_pixels={max_pixels!r} must be a positive integer (e.g. 40_000_000) or None")
    cache = Path(cache) if cache is not None else cache_dir()
    root, from_zip = _resolve_root(src, cache)
    what = f"zip {str(src)!r}" if from_zip else repr(str(root))
    skipped: list[Skipped] = [Skipped(file, reason) for file, reason in read_skipped(root)]

    split_dirs = _find_split_dirs(root)
    if "train" in split_dirs:
        fixed = split_dirs
        known = {p.name for p in fixed.values()}
        for p in _visible_dirs(root):
            if p.name not in known:
                skipped.append(Skipped(p.relative_to(root).as_posix() + "/", "folder outside train/val/test ignored"))
        _loose_files(root, root, skipped, "next to train/")
        class_sets: dict[str, list[str]] = {}
        for split, d in fixed.items():
            class_sets[split] = [p.name for p in _visible_dirs(d)]
            _loose_files(d, root, skipped, f"directly in {d.name}/")
        classes = class_sets["train"]
        for split, names in class_sets.items():
            if split != "train" and set(names) != set(classes):
                missing = sorted(set(classes) - set(names))
                extra = sorted(set(names) - set(classes))
                parts = []
                if missing:
                    parts.append(f"missing in {fixed[split].name}/: {', '.join(missing)}")
                if extra:
                    parts.append(f"only in {fixed[split].name}/: {', '.join(extra)}")
                raise DatasetError(
                    f"class folders differ between train/ and {fixed[split].name}/ in {what} ({'; '.join(parts)}). "
                    "Every split folder needs the same class folders."
                )
        candidates = {
            split: {cls: _scan_class_dir(d / cls, root, skipped) for cls in classes} for split, d in fixed.items()
        }
    else:
        fixed = {}
        classes = [p.name for p in _visible_dirs(root)]
        _loose_files(root, root, skipped, "directly in the root folder")
        candidates = {"all": {cls: _scan_class_dir(root / cls, root, skipped) for cls in classes}}

    if len(classes) < 2:
        n_files = sum(len(v) for per in candidates.values() for v in per.values())
        if not classes and not n_files and not skipped:
            raise DatasetError(f"no images found in {what}: it is empty.\n{_LAYOUT_HELP}")
        found = f"found {len(classes)} class folder(s)" + (f" ({classes[0]!r})" if classes else "")
        hint = ""
        if len(classes) == 1 and not fixed and _visible_dirs(root / classes[0]):
            hint = f" If {classes[0]!r} itself holds the class folders, pass {root / classes[0]} instead."
        raise DatasetError(
            f"{found} in {what}; at least two class folders with images are needed, one per class.{hint}\n"
            + _LAYOUT_HELP.replace("Expected layout:", f"Expected layout (ROOT = {root}):")
        )

    # Decode every candidate once (in parallel), keeping the order deterministic.
    flat = [(split, cls, p) for split, per in candidates.items() for cls, ps in per.items() for p in ps]
    results = _decode_all([p for _, _, p in flat], max_pixels)
    good: dict[str, dict[str, list[tuple[Path, str]]]] = {s: {c: [] for c in classes} for s in candidates}
    bad_per_class: dict[str, int] = dict.fromkeys(classes, 0)
    for (split, cls, path), (digest, reason) in zip(flat, results, strict=True):
        if reason is None:
            good[split][cls].append((path, digest))
        else:
            skipped.append(Skipped(path.relative_to(root).as_posix(), reason))
            bad_per_class[cls] += 1

    drawn: dict[str, float] = {}  # the shares of a split drawn at random from all images (see Dataset.resplit)
    if fixed:
        predefined = "val" in fixed
        for split in fixed:
            for cls in classes:
                if not good[split][cls]:
                    raise _too_few(
                        cls,
                        0,
                        1,
                        f" in {fixed[split].name}/",
                        "every split folder needs images of every class",
                        bad_per_class[cls],
                    )
        carve = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in fixed and f > 0}
        for cls in classes:
            n_train = len(good["train"][cls])
            if carve and n_train < 1 + len(carve):
                made = " and ".join(f"{s}/" for s in carve)
                raise _too_few(
                    cls,
                    n_train,
                    1 + len(carve),
                    " in train/",
                    f"train/ is also split to make the missing {made}",
                    bad_per_class[cls],
                )
            total = sum(len(good[s][cls]) for s in fixed)
            if min_per_class and total < min_per_class:
                raise _too_few(cls, total, min_per_class, "", f"min_per_class={min_per_class}", bad_per_class[cls])
        assigned = {s: good[s] for s in fixed}
        if carve:
            parts = _stratified_split(good["train"], carve, seed)
            assigned.update(parts)
    else:
        predefined = False
        test = test_fraction > 0
        need = _need_per_class(test, min_per_class)
        if need > (3 if test else 2):
            detail = f"min_per_class={min_per_class}"
        else:
            detail = "1 for training, 1 for validation" + (", 1 for test" if test else "")
        for cls in classes:
            have = len(good["all"][cls])
            if have < need:
                raise _too_few(cls, have, need, f" in {cls}/", detail, bad_per_class[cls])
        fractions = {"val": val_fraction, **({"test": test_fraction} if test else {})}
        assigned = _stratified_split(good["all"], fractions, seed)
        drawn = fractions

    items = _items(assigned, list(classes))
    skipped.sort(key=lambda s: s.file)
    return Dataset(
        source=str(src),
        root=root,
        classes=list(classes),
        items=items,
        skipped=skipped,
        predefined_split=predefined,
        fractions=drawn,
    )


__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "Dataset",
    "DatasetError",
    "Item",
    "Skipped",
    "load_dataset",
]
