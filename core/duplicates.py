"""Near-duplicate images that survive ordinary edits: resizes, recompression, small crops, mirror images, brightness
changes and greyscale copies.

Two signals, each catching what the other misses:

- two perceptual hashes (``imagehash``'s pHash, the signs of the lowest 8x8 DCT frequencies of the greyscale
  image, and dHash, the signs of its horizontal gradients at 9x8) of each image, of its mirror image and of its
  centre crops (90% and 80%). Greyscale, brightness, resizes and recompression barely move them; a mirror image
  matches the mirrored hashes, a cropped copy the crop's. Both must agree: textures and stripes make pHashes of
  unrelated pictures collide, and their dHashes then differ by more than 20 bits. A pHash with far from half of
  its bits set (stripes, flat colour: the DCT is mostly zero) says too little and is not used. Cheap: it runs when
  the data loads.
- the cosine of the pretrained backbone's pooled features, once training computed them: crops and colour changes
  that move the hash keep the features close.

A pair is a near-duplicate when both hashes are within ``Rule.hash_distance`` and ``Rule.dhash_distance`` bits, or
the features are within ``Rule.cosine``, or both are fairly close (``Rule.cosine_with_hash`` and
``Rule.hash_with_cosine``). The thresholds
come from ``scripts/bench_duplicates.py`` (planted copies in real photos, and the clean photos and built-in samples
for false flags); docs/duplicates.md has the numbers.

Each pair is named by what it does to the scores: ``leakage`` (one image in training, the other in validation or
test: inflates the scores), ``label conflict`` (the same picture under two classes: label noise) and ``repeat``
(the same class and split: a wasted label).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import ImageOps

from .runtime.images import open_rgb

log = logging.getLogger(__name__)

KINDS = ("leakage", "label conflict", "repeat")
VARIANTS = ("image", "mirror", "crop 90%", "crop 80%")  # the hashes kept per image, in this order
MAX_PAIRS = 20_000  # pairs looked at, at most: beyond this the counts are lower bounds ("truncated")


@dataclass(frozen=True)
class Rule:
    # Bits of the 64-bit pHash that may differ (between any of the two images' variants). Most copies stay within
    # 4; unrelated photos differ in about 32 and came within 12 at the closest (400 cat and dog photos); two
    # generated shapes came within 6.
    hash_distance: int = 5
    # dHash bits that may differ as well: copies stay within 12, unrelated textures whose pHashes collide differ
    # in 22 or more.
    dhash_distance: int = 12
    # Smaller images (shorter side, in pixels) are not hashed: a 32 px digit is as close to another writer's digit
    # as to its own copy. The features still compare them after training.
    min_side: int = 48
    # A pHash with fewer set bits than this (or more than 64 minus this) is degenerate: not used.
    min_set_bits: int = 24
    # Feature cosine alone: re-encodes and light crops of one photo land above 0.95 with EfficientNet-Lite0.
    cosine: float = 0.95
    # Both fairly close: features above 0.90 and the hash within 18 bits (a crop moves the hash, not the content).
    cosine_with_hash: float = 0.90
    hash_with_cosine: int = 18
    max_pairs: int = 50  # pairs listed per kind as evidence (all are counted)


DEFAULT = Rule()


class _Memo(OrderedDict):
    """Hashes by content key, the least recently added dropped beyond ``size`` (a server sees many datasets)."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self._lock = size, threading.Lock()

    def __setitem__(self, key, value) -> None:
        with self._lock:
            super().__setitem__(key, value)
            while len(self) > self.size:
                self.popitem(last=False)


HASHES = _Memo(200_000)  # about 200 bytes each: 40 MB at most


def perceptual_hashes(paths: Sequence, *, memo: dict | None = None, keys: Sequence[str] | None = None,
                      on_progress: Callable[[int, int], None] | None = None, min_side: int = DEFAULT.min_side
                      ) -> np.ndarray:
    """``[N, 2, 4]`` uint64: the pHash and dHash of each image's ``VARIANTS``. An image that cannot be decoded
    gets a degenerate pHash (all bits clear), which is never used; so does one smaller than ``min_side``.
    ``memo``/``keys``: hashes kept by a key (a content hash), so a dataset loaded again is not decoded again."""
    out = np.zeros((len(paths), 2, len(VARIANTS)), dtype=np.uint64)

    def one(i: int) -> tuple:
        key = (keys[i], min_side) if keys is not None else None
        if memo is not None and key is not None and key in memo:
            return memo[key]
        try:
            image = open_rgb(paths[i], reduce_to=64)  # pHash looks at 32x32: decoding at reduced scale is enough
            if min(image.size) < min_side:
                return ((0,) * len(VARIANTS), (0,) * len(VARIANTS))
            views = (image, ImageOps.mirror(image), _crop(image, 0.9), _crop(image, 0.8))
            pair = tuple(tuple(_bits(fn(v)) for v in views) for fn in (imagehash.phash, imagehash.dhash))
        except Exception:  # noqa: BLE001 - one unreadable file must not stop the check
            log.warning("no perceptual hash for image %d", i, exc_info=True)
            pair = ((0,) * len(VARIANTS), (0,) * len(VARIANTS))
        if memo is not None and key is not None:
            memo[key] = pair
        return pair

    with ThreadPoolExecutor(max_workers=4) as pool:  # Pillow releases the GIL while decoding
        for i, pair in enumerate(pool.map(one, range(len(paths)))):
            out[i] = pair
            if on_progress is not None and (i % 32 == 0 or i == len(paths) - 1):
                on_progress(i + 1, len(paths))
    return out


def _crop(image, keep: float):
    w, h = image.size
    dw, dh = round(w * (1 - keep) / 2), round(h * (1 - keep) / 2)
    return image.crop((dw, dh, w - dw, h - dh))


def _bits(h: imagehash.ImageHash) -> int:
    return int("".join("1" if b else "0" for b in h.hash.flatten()), 2)


def hash_distances(hashes: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
    """``[rows, N]`` uint8 (symmetric over all rows): of one family's hashes (``[N, 4]``), the fewest bits that
    differ between one image's hash and any hash of the other (itself, its mirror image, its centre crops)."""
    own, block = hashes[:, 0], hashes[rows]
    dist = np.full((len(block), len(hashes)), 64, dtype=np.uint8)
    for v in range(hashes.shape[1]):
        np.minimum(dist, np.bitwise_count(block[:, :1] ^ hashes[None, :, v]).astype(np.uint8), out=dist)
        np.minimum(dist, np.bitwise_count(block[:, v : v + 1] ^ own[None, :]).astype(np.uint8), out=dist)
    return dist


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def cosines(features: np.ndarray) -> np.ndarray:
    """``[N, N]``: the cosine of every pair of feature rows."""
    unit = _unit(features)
    return unit @ unit.T


def near_pairs(hashes: np.ndarray, features: np.ndarray | None = None, rule: Rule = DEFAULT,
               keys: Sequence[str] | None = None, block: int = 512, limit: int = MAX_PAIRS) -> list[tuple]:
    """``(i, j, pHash distance, cosine or None)`` for near-duplicate pairs ``i < j`` under ``rule``, identical files
    first (``keys``: content hashes; they pair however small); at most ``limit`` pairs (an upload of one picture
    5,000 times has 12 million). Computed ``block`` rows at a time, so 20,000 images need tens of MB."""
    n = len(hashes)
    set_bits = np.bitwise_count(hashes[:, 0])
    usable = ((set_bits >= rule.min_set_bits) & (set_bits <= 64 - rule.min_set_bits)).all(axis=1)
    unit = _unit(features) if features is not None else None

    def cosine(a: int, b: int) -> float | None:
        return None if unit is None else round(float(unit[a] @ unit[b]), 4)

    same: dict[str, list[int]] = {}
    for k, key in enumerate(keys or []):
        same.setdefault(key, []).append(k)
    pairs = list(itertools.islice(((a, b, 0, cosine(a, b)) for group in same.values()
                                   for a, b in itertools.combinations(group, 2)), limit))
    exact = {(a, b) for a, b, _, _ in pairs}
    columns = np.arange(n)
    for lo in range(0, n, block):
        if len(pairs) >= limit:
            break
        rows = slice(lo, min(n, lo + block))
        dist = hash_distances(hashes[:, 0], rows)
        match = ((dist <= rule.hash_distance) & (hash_distances(hashes[:, 1], rows) <= rule.dhash_distance)
                 & usable[rows, None] & usable[None, :])
        sim = None
        if unit is not None:
            sim = unit[rows] @ unit.T
            match |= (sim >= rule.cosine) | ((sim >= rule.cosine_with_hash) & (dist <= rule.hash_with_cosine))
        match &= columns[None, :] > columns[rows, None]  # each pair once, i < j
        for r, j in zip(*np.nonzero(match)):
            i, j = lo + int(r), int(j)
            if (i, j) not in exact:
                pairs.append((i, j, int(dist[r, j]), None if sim is None else round(float(sim[r, j]), 4)))
                if len(pairs) >= limit:
                    break
    return pairs


def kind_of(split_a: str, split_b: str, label_a: int, label_b: int) -> str:
    if label_a != label_b:
        return "label conflict"
    if (split_a == "train") != (split_b == "train"):
        return "leakage"
    return "repeat"


def find_duplicates(items: Sequence, hashes: np.ndarray, features: np.ndarray | None = None,
                    rule: Rule = DEFAULT, name: Callable[[object], str] = lambda item: str(item.path)) -> dict:
    """Near-duplicate pairs among ``items`` (``core.data.Item``: path, label, split), by kind (``KINDS``), the most
    similar first. ``name(item)``: how a file is written in the evidence (never a server path in a report).
    ``train_copies``: the training-side file of every leakage and label-conflict pair, and the second file of
    every repeat in training: what "drop the copies from training" removes."""
    found = {kind: [] for kind in KINDS}
    drop: set[int] = set()
    for i, j, distance, cosine in near_pairs(hashes, features, rule, keys=[item.sha256 for item in items],
                                             limit=MAX_PAIRS):
        a, b = items[i], items[j]
        kind = kind_of(a.split, b.split, a.label, b.label)
        if a.split != "train" and b.split == "train":  # the training image first
            a, b, i, j = b, a, j, i
        found[kind].append({"a": name(a), "b": name(b), "split_a": a.split, "split_b": b.split,
                            "hash_distance": distance, "cosine": cosine, "_i": i, "_j": j})
        if kind == "leakage":
            drop.add(i)  # the training copy of an evaluation image
        elif kind == "label conflict":  # which label is right is unknown: neither copy trains
            drop.update(k for k, item in ((i, a), (j, b)) if item.split == "train")
        elif a.split == "train":
            drop.add(j)  # one of the two is enough
    for pairs in found.values():
        pairs.sort(key=lambda p: (p["hash_distance"], -(p["cosine"] or 0.0)))
    counts = {kind: len(pairs) for kind, pairs in found.items()}
    return {"counts": counts, "flagged": any(counts.values()), "truncated": sum(counts.values()) >= MAX_PAIRS,
            "pairs": {kind: pairs[: rule.max_pairs] for kind, pairs in found.items()},
            "train_copies": sorted(drop),
            "rule": rule.__dict__ | {"hashes": "pHash and dHash, 64 bits (imagehash), with mirror and crops"},
            "used_features": features is not None}


def check_dataset(ds, features: np.ndarray | None = None, rule: Rule = DEFAULT, items: Sequence | None = None
                  ) -> dict:
    """``find_duplicates`` over ``items`` (default: every image of ``ds``, a ``core.data.Dataset``), files named
    relative to its root; hashes are remembered by content (``HASHES``). ``features``: one row per item, same
    order (None: hashes only)."""
    items = ds.items if items is None else items
    hashes = perceptual_hashes([it.path for it in items], memo=HASHES, keys=[it.sha256 for it in items],
                               min_side=rule.min_side)
    return find_duplicates(items, hashes, features, rule, name=ds.relpath)


def public(found: dict) -> dict:
    """``find_duplicates``'s result for a report: without the item indices."""
    pairs = {kind: [{k: v for k, v in p.items() if not k.startswith("_")} for p in ps]
             for kind, ps in found["pairs"].items()}
    return {**{k: v for k, v in found.items() if k not in ("pairs", "train_copies")}, "pairs": pairs,
            "n_train_copies": len(found["train_copies"])}


def message(found: dict) -> str:
    """The finding in plain words, with what to do."""
    c = found["counts"]
    if not found["flagged"]:
        how = "perceptual hashes and backbone features" if found.get("used_features") else "perceptual hashes"
        return f"No near-duplicate images found ({how}: resized, recompressed, mirrored or greyscale copies count)."
    parts = []
    if c["leakage"]:
        parts.append(f"{c['leakage']} pair(s) join a training image to a copy among the validation/test images: the "
                     "scores are inflated, because the model is tested on pictures it trained on")
    if c["label conflict"]:
        parts.append(f"{c['label conflict']} pair(s) of copies carry different classes: at least one label is wrong")
    if c["repeat"]:
        parts.append(f"{c['repeat']} pair(s) of copies sit in the same class and split: they add no information")
    copies = len(found["train_copies"]) if "train_copies" in found else found.get("n_train_copies", 0)
    advice = ("Drop the copies from training and train again." if copies else
              "None of them is a training image, so dropping cannot help: remove one image of each pair from the "
              "validation or test folder.")
    many = f" (at least: counting stopped at {MAX_PAIRS:,} pairs)" if found.get("truncated") else ""
    return ("Near-duplicates (the same picture twice, perhaps resized, cropped, mirrored or recoloured)" + many + ": "
            + "; ".join(parts) + ". " + advice)
