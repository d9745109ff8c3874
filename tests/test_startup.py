"""Starting is cheap: the command lines' help, ``core datasets`` and ``import app`` run where torch, torchvision,
matplotlib and scikit-learn cannot be imported (they load when training, plotting or exporting starts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "matplotlib", "sklearn")


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory) -> dict[str, str]:
    """PYTHONPATH with packages named like the training stack's that raise ImportError when imported."""
    folder = tmp_path_factory.mktemp("blocked")
    for name in BLOCKED:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} was imported at start-up')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


@pytest.mark.parametrize("args, expect", [
    (["-m", "core", "--help"], "datasets"),
    (["-m", "export", "--help"], "onnx"),
    (["-m", "export", "onnx", "--help"], "--no-variants"),
    (["-m", "core", "datasets", "sample:shapes?per_class=4&size=32"], "circle"),
    (["-c", "import app; print(app.TRAIN_OUTPUTS[1])"], "status"),
])
def test_starts_without_the_training_stack(blocked_env, args, expect):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=blocked_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout
    assert "was imported at start-up" not in proc.stderr


def test_the_blocker_stops_the_training_stack(blocked_env):
    proc = subprocess.run([sys.executable, "-c", "import models"], cwd=REPO, env=blocked_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "torch was imported at start-up" in proc.stderr
