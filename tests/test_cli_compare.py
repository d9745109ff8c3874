"""End to end from the command line: compare -> report + config + verified ONNX -> predict; --config round trip."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from core.cli import build_parser, config_from_args, main
from core.config import TrainConfig
from core.report import run_file_names
from core.runtime.files import CACHE_ENV

REPO = Path(__file__).resolve().parents[1]
TINY = "sample:shapes?per_class=8&size=32"
FLAGS = ["--epochs", "2", "--image-size", "32", "--device", "cpu", "--target", "0.6"]
NOTES = {"notes.txt": "a user's file in the run folder"}


def _main(cache: Path, argv: list[str]) -> int:
    """``main`` with the session's cache folder (module fixtures run before conftest's per-test lab_cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))
        return main(argv)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, _session_cache):
    """Both arms with export, into a folder that already holds a user's notes."""
    out = tmp_path_factory.mktemp("run")
    for name, text in NOTES.items():
        (out / name).write_text(text)
    assert _main(_session_cache, ["compare", "--data", TINY, "--out", str(out), *FLAGS]) == 0
    return out


@pytest.fixture(scope="module")
def rerun_dir(run_dir, tmp_path_factory, _session_cache):
    """A copy of ``run_dir`` overwritten by a pretrained-only run without export, configured by run_dir's
    config.json alone."""
    out = tmp_path_factory.mktemp("rerun") / "run"
    shutil.copytree(run_dir, out)
    code = _main(_session_cache, ["train", "--mode", "pretrained", "--data", TINY, "--out", str(out),
                                  "--config", str(run_dir / "config.json"), "--no-export"])
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
    project_files = sorted(p.name for p in run_dir.iterdir() if p.name in run_file_names())
    assert report["artifacts"]["files"] == project_files
    assert {"model.onnx", "scratch.pt", "config.json"} <= set(project_files)
    assert (run_dir / "notes.txt").read_text() == NOTES["notes.txt"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]  # no --explain: as before


def test_export_explain_adds_the_maps_and_the_calibrated_score(run_dir, tmp_path, _session_cache):
    import numpy as np

    from core.runtime.predictor import Predictor
    from export.__main__ import main as export_main
    from export.runs import load_run_images

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(_session_cache))
        assert export_main(["onnx", "--run", str(out), "--explain", "--no-variants"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["outputs"] == ["logits", "probabilities", "cam", "ood_score"]
    predictor = Predictor(out / "model.onnx", device="cpu")
    val, _ = load_run_images(out, report, ("val",))
    scores = predictor.explain_arrays(val)["ood_score"]
    threshold = predictor.info.ood_threshold  # taken on these validation images: the highest one or just under it
    assert threshold == report["export"]["ood"]["threshold"] and scores.min() <= threshold <= scores.max() + 1e-6
    assert (scores > threshold + 1e-6).sum() <= int(np.ceil(0.01 * len(scores)))


def test_config_json_is_the_runs_config_and_round_trips(run_dir, rerun_dir):
    config = json.loads((run_dir / "config.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    assert config == report["config"]
    assert (config["epochs"], config["image_size"], config["device"], config["target_accuracy"]) == (2, 32, "cpu", 0.6)
    assert TrainConfig.from_dict(config).to_dict() == config
    # `--config RUN/config.json` and no training flags: the same config again.
    assert json.loads((rerun_dir / "config.json").read_text()) == config


def test_rerun_leaves_only_its_own_files_and_the_users(run_dir, rerun_dir):
    """A pretrained-only run without export over a two-arm exported run: the folder holds exactly what the new
    report lists, plus the user's files; nothing of the earlier run (scratch.pt, model.onnx, model.int8.onnx)."""
    report = json.loads((rerun_dir / "report.json").read_text())
    files = report["artifacts"]["files"]
    assert list(report["runs"]) == ["pretrained"] and "export" not in report
    user_files = {p.name for p in run_dir.iterdir() if p.name not in run_file_names()}
    assert "notes.txt" in user_files
    assert sorted(p.name for p in rerun_dir.iterdir()) == sorted({*files, *user_files})
    assert "scratch.pt" not in files and not any(name.endswith(".onnx") for name in files)
    assert (rerun_dir / "notes.txt").read_text() == NOTES["notes.txt"]


def test_flags_win_over_the_config_file(tmp_path):
    toml = tmp_path / "cfg.toml"
    toml.write_text('epochs = 7\nbackbone = "resnet18"\nhead_lr = 0.01\nviews = 2\n')
    args = build_parser().parse_args(["compare", "--data", TINY, "--out", str(tmp_path), "--config", str(toml),
                                      "--epochs", "3", "--target", "0.7"])
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.target_accuracy) == (3, 0.7)  # flags
    assert (cfg.backbone, cfg.head_lr, cfg.views) == ("resnet18", 0.01, 2)  # file
    assert cfg.image_size is None and cfg.seed == 0  # TrainConfig defaults
    args = build_parser().parse_args(["bench", "--data", TINY, "--seed", "4", "--device", "cpu"])
    assert config_from_args(args) == TrainConfig(seed=4, device="cpu")


@pytest.mark.parametrize(("content", "message"), [
    ('{"epochs": 2, "epochz": 3}', "Unknown config key(s): epochz. Did you mean 'epochs'? Valid keys: backbone,"),
    ('{"epochs": "ten"}', "epochs must be an integer from 1 to 1000, got 'ten'."),
    ('{"epochs": 2,}', "is not valid JSON"),
    ("[2]", "must hold a JSON object of TrainConfig keys"),
])
def test_bad_config_file_is_a_clear_cli_error(tmp_path, capsys, content, message):
    bad = tmp_path / "cfg.json"
    bad.write_text(content)
    out = tmp_path / "out"
    code = main(["compare", "--data", TINY, "--out", str(out), "--config", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: config file {bad}") and message in err, err
    assert not out.exists()  # nothing ran


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


def test_the_terminal_summary_tells_what_the_app_tells(run_dir):
    from core.summary import summary_text

    report = json.loads((run_dir / "report.json").read_text())
    report["diagnostics"]["leakage"].update(flagged=True, message="3 validation images are copies of training ones")
    report["diagnostics"]["imbalance"].update(flagged=False, message="classes are balanced")
    text = summary_text(report)
    assert "**" not in text and not re.search(r"</?[A-Za-z]", text)  # the app's Markdown/HTML, read in a terminal
    target = f"{report['target_accuracy']:.0%}"
    sentences = [line for line in text.splitlines() if target in line and line.endswith(".")]
    assert len(sentences) == 1 and ("pretrained" in sentences[0].lower() or "neither" in sentences[0].lower())
    for arm, run in report["runs"].items():
        assert f"{arm} verdict: {run['verdict']['label']}" in text
    assert "(paired McNemar test, exact binomial)" in text  # both arms ran; under 25 images differ
    assert "WARNING Train/validation leakage: 3 validation images are copies of training ones" in text
    assert "classes are balanced" not in text  # only what was flagged
    assert "Triton repository not built" not in text
