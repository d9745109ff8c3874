"""End to end from the command line: compare -> report + verified ONNX -> predict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from core.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = "sample:shapes?per_class=8&size=32"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["compare", "--data", TINY, "--out", str(out), "--epochs", "2", "--image-size", "32",
                 "--device", "cpu"])
    assert code == 0
    return out


def test_compare_writes_report_plots_models_and_verified_onnx(run_dir, capsys):
    report = json.loads((run_dir / "report.json").read_text())
    for name in ("manifest.csv", "learning_curves.png", "confusion_matrices.png", "pretrained.pt", "scratch.pt",
                 "model.onnx"):
        assert (run_dir / name).stat().st_size > 0, name
    parity = report["export"]["parity"]
    assert parity["passed"] and parity["top1_agreement"] == 1.0 and parity["max_abs_diff_probabilities"] <= 1e-4
    session = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == report["dataset"]["classes"]
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert not list(run_dir.glob(".staging-*"))


def test_predict_prints_one_json_line_per_image(run_dir):
    root = Path(json.loads((run_dir / "report.json").read_text())["dataset"]["root"])
    rows = (run_dir / "manifest.csv").read_text().splitlines()[1:3]
    images = [root / row.split(",")[0] for row in rows]
    assert all(p.is_file() for p in images)
    bad = run_dir / "not-an-image.jpg"
    bad.write_bytes(b"hello")
    proc = subprocess.run(
        [sys.executable, "-m", "core", "predict", "--model", str(run_dir / "model.onnx"), "--device", "cpu",
         *map(str, images), str(bad)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1  # one file failed
    assert [line["file"] for line in lines] == [*map(str, images), str(bad)]
    for line in lines[:2]:
        assert line["label"] in {"circle", "square", "triangle"} and 0 <= line["probability"] <= 1
        assert line["provider"] == "CPUExecutionProvider" and len(line["top_k"]) == 3
    assert "error" in lines[2]


def test_failed_run_keeps_the_earlier_artifacts(run_dir, capsys):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code = main(["compare", "--data", str(run_dir / "missing-folder"), "--out", str(run_dir)])
    assert code == 2
    assert "error:" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before


def test_unknown_backbone_is_a_clear_cli_error(tmp_path, capsys):
    code = main(["compare", "--data", TINY, "--out", str(tmp_path), "--backbone", "resnet_18"])
    assert code == 2
    assert "Did you mean 'resnet18'" in capsys.readouterr().err
