"""Batch prediction to CSV (``python -m core predict --input DIR --out preds.csv``), in this process and on Ray."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.batch import COLUMNS, find_images, predict_local, write_csv
from core.runtime.predictor import Predictor
from core.samples import SHAPE_CLASSES, make_shape_image

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "export" / "examples" / "shapes.int8.onnx"  # the bundled example: circles, squares, triangles


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 new shapes images in class folders (a seed the model never saw), one broken file, one empty file and a
    text file that is not an image."""
    root = tmp_path_factory.mktemp("batch") / "images"
    for i in range(240):
        shape = SHAPE_CLASSES[i % 3]
        (root / shape).mkdir(parents=True, exist_ok=True)
        make_shape_image(shape, 424242, i, 96).save(root / shape / f"{shape}_{i:03d}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def run_cli(*args: str, command: tuple[str, ...] = ("predict", "--model", str(MODEL))) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "core", *command, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_find_images_walks_folders_and_names_a_missing_input(image_folder, tmp_path):
    found = find_images([image_folder, image_folder / "circle" / "circle_000.png"])
    assert len(found) == len(set(found)) == 242  # 240 shapes + the broken and the empty file, each once; no notes.txt
    assert [Path(p).name for p in found[:3]] == ["broken.jpg", "empty.png", "circle_000.png"]  # sorted walk
    with pytest.raises(FileNotFoundError, match="gone"):
        find_images([tmp_path / "gone"])


def test_cli_writes_one_row_per_file_with_reasons_for_unreadable_ones(image_folder, tmp_path):
    out = tmp_path / "preds.csv"
    proc = run_cli("--input", str(image_folder), "--out", str(out), "--top-k", "2")
    assert proc.returncode == 1, proc.stderr  # 1: some files could not be read
    assert "2 file(s) could not be read" in proc.stderr and "images/s" in proc.stderr
    rows = read_rows(out)
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 242
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert errors == {"broken.jpg": errors["broken.jpg"], "empty.png": "empty file"} and errors["broken.jpg"]
    good = [r for r in rows if not r["error"]]
    right = sum(Path(r["path"]).parent.name == r["label"] for r in good)
    assert right / len(good) >= 0.9  # the model really classifies them: shapes it never saw
    first = good[0]
    top = json.loads(first["top_k"])
    assert len(top) == 2 and top[0][0] == first["label"] and float(first["probability"]) == top[0][1]
    expected = Predictor(MODEL, device="cpu").predict([first["path"]], top_k=2)[0]
    assert first["label"] == expected["label"]
    assert float(first["probability"]) == pytest.approx(expected["probability"], abs=1e-5)


def test_a_failed_job_keeps_the_earlier_csv(image_folder, tmp_path):
    out = tmp_path / "preds.csv"
    paths = find_images([image_folder / "circle"])[:5]
    write_csv(predict_local(MODEL, paths, device="cpu"), out, progress=False)
    before = out.read_bytes()

    def failing():
        yield from predict_local(MODEL, paths, device="cpu")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_csv(failing(), out, progress=False)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["preds.csv"]  # no temp file left behind


def test_cli_input_needs_an_output_file(image_folder):
    proc = run_cli("--input", str(image_folder))
    assert proc.returncode == 2 and "add --out PREDS.csv" in proc.stderr


@pytest.mark.slow
def test_ray_engine_gives_the_same_rows_in_the_same_order(image_folder, tmp_path):
    pytest.importorskip("ray")
    local, ray_out = tmp_path / "local.csv", tmp_path / "ray.csv"
    assert run_cli("--input", str(image_folder), "--out", str(local)).returncode == 1
    proc = run_cli("--input", str(image_folder), "--out", str(ray_out), "--engine", "ray", "--batch-size", "32")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "engine ray" in proc.stderr
    assert read_rows(ray_out) == read_rows(local)
    feats_ray = tmp_path / "ray.npy"
    proc = run_cli("--input", str(image_folder / "square"), "--out", str(feats_ray), "--engine", "ray",
                   "--image-size", "96", command=("features",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    feats_local = tmp_path / "local.npy"
    assert run_cli("--input", str(image_folder / "square"), "--out", str(feats_local), "--image-size", "96",
                   command=("features",)).returncode == 0
    np.testing.assert_array_equal(np.load(feats_ray), np.load(feats_local))


def test_features_cli_gives_the_training_features_with_nan_rows_for_unreadable_files(image_folder, tmp_path):
    import models
    from core.data import load_dataset
    from core.features import extract_all, make_feature_extractor
    from core.train import prepare_images

    out = tmp_path / "feats.npy"
    proc = run_cli("--input", str(image_folder / "circle"), "--input", str(image_folder / "broken.jpg"), "--out",
                   str(out), "--image-size", "96", command=("features",))
    assert proc.returncode == 1, proc.stderr[-2000:]
    feats, table = np.load(out), read_rows(out.with_suffix(".csv"))
    assert feats.shape == (81, 1280) and len(table) == 81
    assert table[-1]["error"] and np.isnan(feats[-1]).all() and not np.isnan(feats[:-1]).any()
    # The same images through the training route (decode, resize, centre crop, the cached backbone graph)
    spec = models.get_backbone_spec(models.DEFAULT_BACKBONE)
    items = [i for i in load_dataset(image_folder).items if i.path.parent.name == "circle"]
    by_path = {str(i.path): n for n, i in enumerate(items)}
    expected = extract_all(make_feature_extractor(models.DEFAULT_BACKBONE, 96, torch.device("cpu")),
                           prepare_images(items, 96, spec).crops)
    order = [by_path[r["path"]] for r in table[:-1]]
    np.testing.assert_allclose(feats[:-1], expected[order], atol=1e-4)
