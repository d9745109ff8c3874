"""A loaded dataset for a reader: a one-paragraph summary, a few thumbnails per class, the skipped files and the
pitfalls to check before training (class imbalance, near-duplicate images)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from PIL import Image

from core import diagnostics, duplicates
from core.data import Dataset
from core.runtime.images import open_rgb
from core.text import md, plain

log = logging.getLogger(__name__)


def dataset_summary(ds: Dataset, label: str) -> str:
    n_split = {s: sum(c.values()) for s, c in ds.counts().items()}
    split_how = "predefined train/val folders" if ds.predefined_split else "random stratified split (seed 0)"
    text = (f"**{md(label)}**: {len(ds.classes)} classes ({md(', '.join(ds.classes[:12]))}"
            f"{', …' if len(ds.classes) > 12 else ''}), {len(ds.items)} images "
            f"({', '.join(f'{s} {n}' for s, n in n_split.items())}; {split_how}).")
    if ds.skipped:
        text += f" {len(ds.skipped)} file(s) skipped (see the table below)."
    return text


def active_dataset(ds: Dataset | None, label: str | None) -> str:
    """One line above the Train button: which dataset a run will use."""
    if ds is None:
        return "**Dataset:** none loaded yet: pick a sample or upload a `.zip` on the **Data** tab."
    counts = {s: sum(c.values()) for s, c in ds.counts().items()}
    words = {"train": "training", "val": "validation", "test": "test"}
    where = " / ".join(f"{n} {words.get(s, s)}" for s, n in counts.items() if n)
    dropped = f" ({len(ds.dropped)} copies dropped)" if ds.dropped else ""
    return (f"**Dataset:** {md(label or ds.root.name)} · {len(ds.classes)} classes · {where} images{dropped} "
            "· change it on the **Data** tab")


def validation_examples(ds: Dataset, limit: int = 8) -> tuple[list[tuple[Image.Image, str]], list[Path]]:
    """A few validation images, classes taken in turn, for the Predict tab: ``(thumbnail, "true: class")`` pairs
    for the gallery and the files they show (kept server-side: a click names an index, never a path)."""
    val = ds.split("val")
    by_class = [[it for it in val if it.label == ci] for ci in range(len(ds.classes))]
    picked = [group[i] for i in range(limit) for group in by_class if i < len(group)][:limit]
    shown, paths = [], []
    for item in picked:
        try:
            shown.append((thumbnail(item.path), plain(f"true: {ds.classes[item.label]}", 80)))
            paths.append(item.path)
        except Exception:  # noqa: BLE001 - an example is optional and must never break the page
            log.warning("validation example %s skipped", item.path.name, exc_info=True)
    return shown, paths


def thumbnail(path, size: int = 112) -> Image.Image:
    """The image fitted in a ``size`` square, decoded at reduced scale (a full-size copy lives only briefly)."""
    img = open_rgb(path, reduce_to=size)
    img.thumbnail((size, size))
    return img


def duplicate_gallery(ds: Dataset, found: dict, limit: int = 12, side: int = 112) -> list[tuple[Image.Image, str]]:
    """The near-duplicate pairs side by side, the kinds that matter most first: ``(both thumbnails, "leakage:
    train/a.jpg ↔ val/b.jpg")``."""
    shown = []
    for kind in duplicates.KINDS:
        for pair in found["pairs"][kind]:
            if len(shown) >= limit:
                return shown
            try:
                both = Image.new("RGB", (2 * side + 4, side), "white")
                for k, index in enumerate((pair["_i"], pair["_j"])):
                    thumb = thumbnail(ds.items[index].path, side)
                    both.paste(thumb, (k * (side + 4) + (side - thumb.width) // 2, (side - thumb.height) // 2))
            except Exception:  # noqa: BLE001 - a thumbnail is optional and must never break the page
                log.warning("duplicate pair thumbnail skipped", exc_info=True)
                continue
            names = (Path(pair["a"]).name, Path(pair["b"]).name)  # the full paths are in report.json
            shown.append((both, plain(f"{kind}: {names[0]} ↔ {names[1]}", 90)))
    return shown


def dataset_gallery(ds: Dataset, max_classes: int = 12) -> list[tuple[Image.Image, str]]:
    """A few ``(thumbnail, "class (split)")`` per class (six when there are at most four classes, else four)."""
    gallery = []
    per_class = 6 if len(ds.classes) <= 4 else 4
    for ci, cls in enumerate(ds.classes[:max_classes]):
        for item in [i for i in ds.items if i.label == ci][:per_class]:
            try:
                gallery.append((thumbnail(item.path), plain(f"{cls} ({item.split})", 80)))  # captions are text
            except Exception:  # noqa: BLE001 - a thumbnail must never break the page
                log.debug("no thumbnail for %s", item.path, exc_info=True)
    return gallery


def skipped_table(ds: Dataset) -> pd.DataFrame:
    return pd.DataFrame([{"file": s.file, "reason": s.reason} for s in ds.skipped], columns=["file", "reason"])


def dataset_warnings(ds: Dataset, found: dict, shortcut: dict) -> str:
    """Markdown: class balance, near-duplicates (``core.duplicates.check_dataset``'s ``found``; the pairs are in
    ``duplicate_gallery``), shortcuts in the files' properties (``core.shortcuts.check_dataset``), dropped copies,
    skipped files."""
    balance = diagnostics.class_balance(ds.counts()["train"])
    lines = ["### Before training", ("⚠️ " if balance["flagged"] else "✅ ") + md(balance["message"]),
             ("⚠️ " if shortcut["flagged"] else "✅ ") + md(shortcut["message"]),
             ("⚠️ " if found["flagged"] else "✅ ") + md(duplicates.message(found))]
    if found["flagged"]:
        lines[-1] += " The pairs are shown below."
    if ds.dropped:
        lines.append(f"ℹ️ {len(ds.dropped)} training image(s) with a copy were dropped; training uses the rest.")
    if ds.skipped:
        lines.append(f"ℹ️ {len(ds.skipped)} file(s) were skipped because they are not usable images.")
    return "\n\n".join(lines)
