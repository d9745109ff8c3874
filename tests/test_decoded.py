"""Decoded images on disk (core.decoded): decoded once, read back exactly, crops memory-mapped, cache bounded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import load_dataset
from core.decoded import DecodedImages, crop_file, decode_once, decoded_file, release, take, trim
from core.runtime.files import sha256_file
from core.runtime.images import center_crop, open_rgb, resize_shorter


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(5)
    paths = []
    for i in range(6):
        path = tmp_path / f"photo{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (90 + 7 * i, 120, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRANSFER_LAB_CACHE", str(cache))
    return cache


def test_an_image_is_decoded_once_per_resize_rule(photos, own_cache):
    sha = sha256_file(photos[0])
    first = decode_once(photos[0], sha, 64, "bilinear")
    stamp = first.stat().st_mtime_ns
    assert decode_once(photos[0], sha, 64, "bilinear") == first and first.stat().st_mtime_ns == stamp  # reused
    other = decode_once(photos[0], sha, 80, "bicubic")
    assert other != first and other == decoded_file(sha, 80, "bicubic")
    expected = np.asarray(resize_shorter(open_rgb(photos[0]), 64, "bilinear"))
    np.testing.assert_array_equal(np.load(first), expected)  # the cache holds exactly the decode


def test_decoded_images_load_on_index_and_subset_without_loading(photos, own_cache):
    files = [decode_once(p, sha256_file(p), 64, "bilinear") for p in photos]
    images = DecodedImages(files)
    assert len(images) == 6 and images.nbytes == 0
    np.testing.assert_array_equal(images[2], np.load(files[2]))
    assert isinstance(images[1:4], DecodedImages) and images[1:4].files == files[1:4]
    assert images[np.array([5, 0])].files == [files[5], files[0]]
    again = DecodedImages(files, [(p, sha256_file(p), 64, "bilinear") for p in photos])
    expected = np.load(files[3])
    files[3].unlink()  # trimmed from the cache meanwhile: decoded again from its source
    np.testing.assert_array_equal(again[np.array([3])][0], expected)


def test_crops_are_memory_mapped_exact_and_reused(photos, own_cache):
    images = DecodedImages([decode_once(p, sha256_file(p), 64, "bilinear") for p in photos])
    crops = crop_file(images, 56)
    assert isinstance(crops, np.memmap) and crops.shape == (6, 56, 56, 3) and crops.dtype == np.uint8
    for i in range(6):
        np.testing.assert_array_equal(crops[i], center_crop(images[i], 56))
    assert crop_file(images, 56).filename == crops.filename  # the same set and size: the same file
    picked = take(crops, np.array([4, 1]))
    assert isinstance(picked, np.memmap)
    np.testing.assert_array_equal(picked, crops[[4, 1]])
    before = np.array(crops[:3])
    release(crops[:3])  # pages handed back are read again from the file
    np.testing.assert_array_equal(crops[:3], before)
    crops[0, 0, 0] = 0  # copy-on-write: a caller's write never reaches the shared file
    assert crop_file(images, 56)[0, 0, 0].tolist() == before[0, 0, 0].tolist()


def test_trim_removes_the_oldest_beyond_the_cap_and_keeps_the_ones_in_use(photos, own_cache):
    files = [decode_once(p, sha256_file(p), 64, "bilinear") for p in photos]
    for age, f in enumerate(files):  # files[0] oldest
        os.utime(f, (1_000_000 + age, 1_000_000 + age))
    size = [f.stat().st_size for f in files]
    freed = trim(max_bytes=size[0] + size[3] + size[4] + size[5], keep=[files[0]])
    assert [f.is_file() for f in files] == [True, False, False, True, True, True]  # oldest first, but not one in use
    assert freed == size[1] + size[2]


def test_prepared_images_hold_no_pixels_in_memory(tmp_path, own_cache):
    import models
    from core.train import prepare_images

    ds = load_dataset("sample:shapes?per_class=6&size=48")
    prepared = prepare_images(ds.items, 40, models.get_backbone_spec(models.DEFAULT_BACKBONE))
    assert isinstance(prepared.resized, DecodedImages) and isinstance(prepared.crops, np.memmap)
    assert len(prepared.resized) == len(prepared.crops) == len(ds.items)
    np.testing.assert_array_equal(prepared.crops[3], center_crop(prepared.resized[3], 40))
