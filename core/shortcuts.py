"""Shortcuts: can the classes be told apart by how their files were made rather than by what they show?

When one class's images all come from one source (512x512 greyscale PNG scans) and another's from a second (240 px
colour JPEGs), a network learns the source, scores well, and fails in use. Before training, this reads each
image's header (no pixels are decoded) and asks a tiny cross-validated classifier (a scikit-learn decision tree)
to predict the class from the file's properties alone: width, height, aspect ratio, colour mode, file format and
file size. When it closes at least ``GAP_CLOSED`` of the gap between always answering the most common class and
being always right, the property that does it best is named with what each class looks like in it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Sequence

import numpy as np
from PIL import Image
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.tree import DecisionTreeClassifier

log = logging.getLogger(__name__)

# Share of the way from the majority baseline to 100% that the properties' cross-validated accuracy must cover to
# flag a shortcut. A planted confound covers nearly all of it. Real photos of one source covered 14% (400 cats and
# dogs: 56.8% against 50%) and 22% (800 textures in 10 classes: 29.5% against 10%; file size follows content:
# stripes compress differently from bubbles); the generated samples at most 10%.
GAP_CLOSED = 0.5
MIN_PER_CLASS = 3  # fewer images of a class than this: too few to cross-validate
PROPERTIES = ("width", "height", "aspect ratio", "colour mode", "file format", "file size")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def file_properties(paths: Sequence) -> list[dict]:
    """Each image's header properties (``PROPERTIES``); ``None`` values for a file that cannot be read."""
    rows = []
    for path in paths:
        try:
            with Image.open(path) as im:  # lazy: reads the header only
                w, h, mode, fmt = im.width, im.height, im.mode, im.format or "?"
            size = path.stat().st_size if hasattr(path, "stat") else 0
            rows.append({"width": w, "height": h, "aspect ratio": round(w / max(h, 1), 3),
                         "colour mode": "greyscale" if mode in GREY_MODES else "colour", "file format": fmt,
                         "file size": size})
        except Exception:  # noqa: BLE001 - an unreadable header leaves this image out of the check
            log.warning("no header properties for an image", exc_info=True)
            rows.append(dict.fromkeys(PROPERTIES))
    return rows


def _column(rows: list[dict], name: str) -> np.ndarray:
    values = [r[name] for r in rows]
    if name in ("colour mode", "file format"):
        codes = {v: k for k, v in enumerate(sorted(set(values), key=str))}
        return np.array([codes[v] for v in values], dtype=float)
    if name == "file size":
        return np.array([math.log2(max(v, 1)) for v in values], dtype=float)
    return np.array(values, dtype=float)


def _cv_accuracy(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float:
    tree = DecisionTreeClassifier(max_depth=3, min_samples_leaf=2, random_state=seed)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(tree, x, y, cv=cv)))


def describe(rows: list[dict], labels: np.ndarray, classes: list[str], name: str) -> str:
    """What each class looks like in one property: "'defect': 512x512 (typical), 'ok': 240x240"."""
    parts = []
    for c, cls in enumerate(classes):
        values = [r[name] for r, y in zip(rows, labels) if y == c]
        if not values:
            continue
        if name in ("colour mode", "file format"):
            value, count = Counter(values).most_common(1)[0]
            said = f"{count / len(values):.0%} {value}"
        elif name == "file size":
            said = f"typically {np.median(values) / 1024:.0f} KB"
        elif name == "aspect ratio":
            said = f"typically {np.median(values):.2f} (width / height)"
        else:
            said = f"typically {np.median(values):.0f} px"
        parts.append(f"'{cls}' {said}")
    return "; ".join(parts)


def check(paths: Sequence, labels: Sequence[int], classes: list[str], seed: int = 0) -> dict:
    """Whether the files' properties alone predict the class (see the module docstring). Returns ``flagged``, the
    cross-validated ``accuracy`` from all properties, the ``baseline`` (always the most common class), each
    property's own accuracy, the ``property`` that predicts best with ``evidence`` per class, and ``message``."""
    rows = file_properties(paths)
    keep = [k for k, r in enumerate(rows) if r["width"] is not None]
    rows = [rows[k] for k in keep]
    y = np.asarray(labels)[keep]
    counts = np.bincount(y, minlength=len(classes)) if len(y) else np.zeros(len(classes), int)
    present = counts[counts > 0]
    if len(present) < 2 or present.min() < MIN_PER_CLASS:
        return {"flagged": False, "checked": False, "message": "Too few images per class to check for shortcuts."}
    folds = int(min(5, present.min()))
    baseline = float(present.max() / present.sum())
    columns = {name: _column(rows, name) for name in PROPERTIES}
    x = np.stack(list(columns.values()), axis=1)
    accuracy = _cv_accuracy(x, y, folds, seed)
    alone = {name: round(_cv_accuracy(col[:, None], y, folds, seed), 3) for name, col in columns.items()}
    best = max(alone, key=alone.get)
    flagged = accuracy >= baseline + GAP_CLOSED * (1 - baseline)
    evidence = describe(rows, y, classes, best)
    if flagged:
        message = (f"Possible shortcut: the files' properties alone predict the class {accuracy:.0%} of the time "
                   f"(always answering the most common class: {baseline:.0%}), above all the {best}: {evidence}. "
                   "A model can learn where the images came from instead of what they show, score well here and "
                   "fail on new images. Make the classes' images alike (the same source, size and format), for "
                   "example by resizing and re-saving them all the same way, or test on images from the source "
                   "you will use.")
    else:
        message = (f"No sign of a shortcut: the files' size, shape, colour mode, format and file size guess the class "
                   f"right {accuracy:.0%} of the time ({baseline:.0%} by always answering the most common class), far "
                   "from telling the classes apart, as they would if each class came from its own source.")
    return {"flagged": bool(flagged), "checked": True, "accuracy": round(accuracy, 3), "baseline": round(baseline, 3),
            "gap_closed": round((accuracy - baseline) / (1 - baseline), 3), "by_property": alone, "property": best,
            "evidence": evidence, "images": len(y),
            "folds": folds, "message": message}


def check_dataset(ds) -> dict:
    """``check`` over every image of ``ds`` (``core.data.Dataset``): all splits, since a shortcut in any of them
    decides what the model learns or how it is scored. Remembered (``REMEMBERED`` results, by a digest of the files,
    their contents and labels): every page load checks the built-in sample again."""
    listing = [[str(it.path), it.sha256, it.label] for it in ds.items] + [list(ds.classes)]
    key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    found = _remembered.get(key)
    if found is None:
        found = _remembered[key] = check([it.path for it in ds.items], [it.label for it in ds.items], ds.classes)
        while len(_remembered) > REMEMBERED:
            _remembered.popitem(last=False)
    return copy.deepcopy(found)


REMEMBERED = 32
_remembered: OrderedDict[str, dict] = OrderedDict()
