"""Near-duplicate detection (core.duplicates) on generated pictures and their edited copies."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from core import duplicates


def picture(seed: int, size: int = 128) -> Image.Image:
    """A photo-like picture: a smooth random colour field with a few random ellipses."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(4):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 10, size // 4))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return field


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(image: Image.Image, keep: float) -> Image.Image:
    w, h = image.size
    dw, dh = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return image.crop((dw, dh, w - dw, h - dh))


EDITS = {
    "resized to 3/4 and saved at JPEG quality 70": lambda im: _jpeg(im.resize((96, 96)), 70),
    "centre crop 90%": lambda im: _crop(im, 0.9),
    "centre crop 80%": lambda im: _crop(im, 0.8),
    "mirror image": ImageOps.mirror,
    "15% brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.15),  # stronger: see docs/duplicates.md
    "greyscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
}


def _save(images: list[Image.Image], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        paths.append(folder / f"{k:03d}.png")
        image.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """30 distinct pictures, then one edited copy of each of the first six (one edit each)."""
    originals = [picture(seed) for seed in range(30)]
    copies = [edit(originals[k]) for k, edit in enumerate(EDITS.values())]
    paths = _save(originals + copies, tmp_path_factory.mktemp("pictures"))
    return paths, duplicates.perceptual_hashes(paths)


def test_every_kind_of_edited_copy_is_found_and_no_distinct_picture_is(planted):
    paths, hashes = planted
    found = {(i, j) for i, j, _, _ in duplicates.near_pairs(hashes)}
    for k, edit in enumerate(EDITS):
        assert (k, 30 + k) in found, f"a copy {edit} was missed"
    assert len(found) == len(EDITS), f"distinct pictures flagged: {sorted(found - {(k, 30 + k) for k in range(6)})}"


def test_pairs_are_named_by_what_they_do_and_the_training_copies_to_drop(planted):
    paths, hashes = planted
    item = lambda k, split, label: SimpleNamespace(path=paths[k], split=split, label=label, sha256=f"h{k}")  # noqa: E731
    items = [item(k, "train", 0) for k in range(30)] + [
        item(30, "val", 0),  # copy of 0 in validation: leakage
        item(31, "train", 1),  # copy of 1 under another class: label conflict
        item(32, "train", 0),  # copy of 2, same class and split: a repeat
        item(33, "val", 0), item(34, "val", 0), item(35, "val", 0)]  # more leakage
    found = duplicates.find_duplicates(items, hashes, name=lambda it: it.path.name)
    assert found["counts"] == {"leakage": 4, "label conflict": 1, "repeat": 1}
    first = found["pairs"]["leakage"][0]
    assert first["split_a"] == "train" and first["split_b"] == "val"  # the training image first
    # leakage drops the training copy; a label conflict drops both (which label is right is unknown); a repeat one
    assert found["train_copies"] == sorted({0, 3, 4, 5, 1, 31, 32})
    public = duplicates.public(found)
    assert "train_copies" not in public and all("_i" not in p for ps in public["pairs"].values() for p in ps)
    assert "Drop the copies from training" in duplicates.message(found)
    only_validation = [item(k, "val", 0) for k in range(36)]  # copies, but none of them trains
    found = duplicates.find_duplicates(only_validation, hashes, name=lambda it: it.path.name)
    assert found["counts"]["repeat"] == 6 and not found["train_copies"]
    assert "dropping cannot help" in duplicates.message(found) and "Drop the copies" not in duplicates.message(found)


def test_identical_files_pair_even_when_too_small_to_hash(tmp_path):
    tiny = _save([picture(1, size=24), picture(2, size=24)], tmp_path)
    hashes = duplicates.perceptual_hashes(tiny)
    assert not duplicates.near_pairs(hashes)  # 24 px: not hashed, so a look-alike cannot be flagged
    assert duplicates.near_pairs(hashes, keys=["same", "same"]) == [(0, 1, 0, None)]


def test_stripes_whose_hashes_carry_no_information_are_not_paired(tmp_path):
    stripes = []
    for period, colour in ((8, (200, 30, 30)), (12, (20, 20, 160))):
        a = np.zeros((128, 128, 3), np.uint8)
        a[(np.arange(128) // period) % 2 == 0] = colour
        stripes.append(Image.fromarray(a))
    hashes = duplicates.perceptual_hashes(_save(stripes, tmp_path))
    assert int(np.bitwise_count(hashes[0, 0, 0])) < duplicates.DEFAULT.min_set_bits  # degenerate pHash
    assert not duplicates.near_pairs(hashes)


def test_features_catch_a_copy_the_hashes_miss_and_blocks_give_the_same_pairs(planted):
    paths, hashes = planted
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(paths), 16)).astype(np.float32)
    features[7] = features[3] + 0.01 * rng.normal(size=16)  # two distinct pictures, near-identical features
    pairs = duplicates.near_pairs(hashes, features)
    assert (3, 7) in {(i, j) for i, j, _, _ in pairs}
    assert sorted(duplicates.near_pairs(hashes, features, block=4)) == sorted(pairs)


def test_hashes_are_remembered_by_content_key(planted):
    paths, _ = planted
    memo: dict = {}
    first = duplicates.perceptual_hashes(paths[:3], memo=memo, keys=["a", "b", "c"])
    again = duplicates.perceptual_hashes(["/nonexistent"] * 3, memo=memo, keys=["a", "b", "c"])  # never decoded
    assert np.array_equal(first, again)


def test_one_picture_uploaded_thousands_of_times_is_counted_with_bounded_work(planted, monkeypatch):
    paths, hashes = planted
    n = 3000  # 4.5 million pairs of identical files
    many = np.repeat(hashes[:1], n, axis=0)
    items = [SimpleNamespace(path=paths[0], split="train", label=0, sha256="same") for _ in range(n)]
    monkeypatch.setattr(duplicates, "MAX_PAIRS", 500)
    found = duplicates.find_duplicates(items, many, name=lambda it: it.path.name)
    assert found["truncated"] and found["counts"]["repeat"] == 500 and len(found["pairs"]["repeat"]) == 50
    assert "at least: counting stopped at 500 pairs" in duplicates.message(found)
