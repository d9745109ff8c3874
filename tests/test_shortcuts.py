"""The shortcut check (core.shortcuts) on generated sets with and without a planted confound."""

from __future__ import annotations

import numpy as np
from PIL import Image

from core import shortcuts


def _images(folder, n, size, mode, fmt, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        side = size if isinstance(size, int) else int(rng.integers(*size))
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(mode)
        paths.append(folder / f"{k:03d}.{fmt.lower().replace('jpeg', 'jpg')}")
        image.save(paths[-1], fmt)
    return paths


def test_a_class_that_comes_from_another_source_is_flagged_and_the_property_named(tmp_path):
    ok = _images(tmp_path / "ok", 20, 96, "RGB", "JPEG", 0)  # colour JPEGs from one camera...
    defect = _images(tmp_path / "defect", 20, 128, "L", "PNG", 1)  # ...greyscale PNG scans from another
    result = shortcuts.check(ok + defect, [0] * 20 + [1] * 20, ["ok", "defect"])
    assert result["flagged"] and result["accuracy"] >= 0.95 and result["baseline"] == 0.5
    assert result["by_property"]["colour mode"] == 1.0 and result["by_property"]["file format"] == 1.0
    assert "'ok' typically 96 px; 'defect' typically 128 px" in result["evidence"]  # width: the first that does it
    assert result["message"].startswith("Possible shortcut") and "re-saving them all the same way" in result["message"]


def test_classes_from_one_source_are_not_flagged(tmp_path):
    a = _images(tmp_path / "a", 20, (80, 120), "RGB", "JPEG", 2)
    b = _images(tmp_path / "b", 20, (80, 120), "RGB", "JPEG", 3)
    result = shortcuts.check(a + b, [0] * 20 + [1] * 20, ["a", "b"])
    assert result["checked"] and not result["flagged"] and result["message"].startswith("No sign of a shortcut")


def test_too_few_images_are_not_judged(tmp_path):
    a = _images(tmp_path / "a", 2, 64, "RGB", "PNG", 4)
    b = _images(tmp_path / "b", 2, 96, "L", "JPEG", 5)
    result = shortcuts.check(a + b, [0, 0, 1, 1], ["a", "b"])
    assert not result["flagged"] and not result["checked"]
