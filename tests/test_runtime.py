"""The runtime layer (core.runtime) serves an exported model in a process where torch cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models
from core.runtime.predictor import Predictor
from export.onnx_export import export_classifier

REPO = Path(__file__).resolve().parents[1]
SIZE = 48
CLASSES = ["ant", "bee", "cricket", "dragonfly"]
BLOCKED = ("torch", "torchvision", "models", "export", "onnx")  # onnx: serving needs onnxruntime alone

CHILD = """
import json, os, sys
from pathlib import Path
from core.runtime.predictor import Predictor

predictor = Predictor(sys.argv[1], device="cpu")
(result,) = predictor.predict([sys.argv[2]], top_k=len(predictor.classes))
log = Path(os.environ["BLOCKED_LOG"])
attempts = log.read_text().split() if log.exists() else []
try:  # the blocker works: importing torch here fails
    import torch  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({"result": result, "attempts": attempts, "torch_blocked": blocked,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[3].split(","))}))
"""


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    classifier = models.build_classifier("efficientnet_lite0", len(CLASSES), pretrained=True)
    with torch.no_grad():
        classifier.head[-1].weight.mul_(10)  # spread the probabilities so the top class is clear
    path = tmp_path_factory.mktemp("runtime") / "model.onnx"
    export_classifier(classifier.eval(), path, image_size=SIZE, classes=CLASSES, training_mode="pretrained")
    return path


def blocker(folder: Path, log: Path) -> Path:
    """Packages named like the blocked ones that record the attempt and raise ImportError."""
    for name in BLOCKED:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(
            f"with open({str(log)!r}, 'a') as f:\n    f.write({name!r} + '\\n')\n"
            f"raise ImportError('{name} must not be imported by the runtime layer')\n")
    return folder


def test_predictor_classifies_a_file_without_torch(exported_model, tmp_path):
    rng = np.random.default_rng(11)
    small = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    photo = small.resize((150, 110), Image.Resampling.BICUBIC)
    image_file = tmp_path / "photo.jpg"
    photo.save(image_file, quality=95)
    log = tmp_path / "blocked.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker(tmp_path / "blocked", log)), str(REPO)]),
           "BLOCKED_LOG": str(log)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(exported_model), str(image_file), ",".join(BLOCKED)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["torch_blocked"]  # the setup blocks torch, so the layer really ran without it
    assert child["attempts"] == [] and child["loaded"] == []  # and it never even tried to import a blocked name

    expected = Predictor(exported_model, device="cpu").predict([image_file], top_k=len(CLASSES))[0]
    result = child["result"]
    assert result["label"] == expected["label"]
    assert result["probability"] == pytest.approx(expected["probability"], abs=1e-6)
    assert [t["label"] for t in result["top_k"]] == [t["label"] for t in expected["top_k"]]
    assert [t["probability"] for t in result["top_k"]] == pytest.approx(
        [t["probability"] for t in expected["top_k"]], abs=1e-6)


def test_cpu_features_name_the_int8_instruction_sets():
    from core.runtime.providers import cpu_features

    avx2 = cpu_features("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx fma avx2 f16c\n"
                        "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx fma avx2 f16c\n")
    assert avx2.flags == ("avx2", "fma") and not avx2.int8_dot and avx2.known
    assert avx2.describe() == "AMD EPYC: avx2, fma (no VNNI/AMX: INT8 has no dot-product instruction here)"
    vnni = cpu_features("model name\t: Intel Xeon\nflags\t\t: avx2 fma avx512f avx512_vnni amx_int8\n")
    assert vnni.int8_dot and vnni.describe() == "Intel Xeon: avx2, fma, avx512f, avx512_vnni, amx_int8"
    unknown = cpu_features("processor\t: 0\n")  # no flags line (another platform's text)
    assert not unknown.known and "unknown" in unknown.describe()
