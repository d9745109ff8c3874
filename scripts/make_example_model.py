"""Rebuild the example model the ``Spacefile`` deploys: ``export/examples/shapes.int8.onnx`` and its example images.

Trains the frozen-backbone arm on the built-in shapes sample (circles, squares, triangles) with the explain
outputs, keeps its INT8 file (4.0 MB against 13.7 MB for FP32; it passed the export's accuracy check, and 7-bit
weights keep it exact on CPUs with or without VNNI), and draws one new image per class with a seed the training
set did not use. It then classifies those images with the runtime layer and fails if any answer is wrong.

    python scripts/make_example_model.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.runtime.files import atomic_write  # noqa: E402
from core.runtime.predictor import Predictor  # noqa: E402
from core.samples import SHAPE_CLASSES, make_shape_image  # noqa: E402

OUT = REPO / "export" / "examples"
MODEL = OUT / "shapes.int8.onnx"
IMAGES = OUT / "shapes"
EXAMPLE_SEED = 20261127  # not the sample's seed (0): these images were never trained on


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "core", "train", "--mode", "pretrained", "--data", "sample:shapes",
                        "--explain", "--out", tmp], cwd=REPO, check=True)
        int8 = Path(tmp) / "model.int8.onnx"
        if not int8.is_file():
            raise SystemExit("the INT8 model failed its accuracy check in this run; see the output above")
        OUT.mkdir(parents=True, exist_ok=True)
        atomic_write(MODEL, lambda tmp_file: shutil.copyfile(int8, tmp_file))
    shutil.rmtree(IMAGES, ignore_errors=True)
    IMAGES.mkdir()
    for shape in SHAPE_CLASSES:
        make_shape_image(shape, EXAMPLE_SEED, 0, image_size=128).save(IMAGES / f"{shape}.png")
    predictor = Predictor(MODEL, device="cpu")
    results = predictor.predict(sorted(IMAGES.glob("*.png")))
    wrong = [(p.stem, r["label"]) for p, r in zip(sorted(IMAGES.glob("*.png")), results) if r["label"] != p.stem]
    print(f"wrote {MODEL.relative_to(REPO)} ({MODEL.stat().st_size / 1e6:.1f} MB) and {len(SHAPE_CLASSES)} images; "
          + ("all classified right" if not wrong else f"WRONG: {wrong}"))
    if wrong:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
