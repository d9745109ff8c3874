"""The data-efficiency curve: subsets per class, draws, the same validation images, the scratch budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.cli import main
from core.config import TrainConfig
from core.data import load_dataset
from core.efficiency import efficiency_curve, efficiency_table, subsample
from tests.helpers import colour_zip

FAST = dict(image_size=32, epochs=2, device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eff")
    return load_dataset(colour_zip(tmp / "c.zip", per_class=10), seed=0, cache=tmp / "cache")  # 8 train per class


def test_subsample_keeps_n_per_class_and_every_validation_image(dataset):
    small = subsample(dataset, 3, seed=0)
    assert small.counts()["train"] == {"blue": 3, "red": 3}
    assert small.split("val") == dataset.split("val")
    assert small.items == subsample(dataset, 3, seed=0).items
    assert small.split("train") != subsample(dataset, 3, seed=1).split("train")
    assert subsample(dataset, None, seed=0) is dataset


def test_curve_points_draws_and_the_scratch_budget(dataset):
    curve = efficiency_curve(dataset, TrainConfig(**FAST), sizes=(1, 2, 5, 50), draws=2, scratch_budget=1e-6)
    pretrained = [p for p in curve["points"] if p["arm"] == "pretrained"]
    assert [p["per_class"] for p in pretrained] == ["1 per class", "2 per class", "5 per class", "all per class"]
    assert [p["train_images"] for p in pretrained] == [2, 4, 10, 16]  # 50 is more than the 8 there are: "all"
    assert [len(p["draws"]) for p in pretrained] == [2, 2, 2, 1]
    for p in pretrained:
        assert p["ci"][0] <= p["val_accuracy"] <= p["ci"][1]
        assert p["val_accuracy"] == pytest.approx(np.mean(p["draws"]))
    assert pretrained[-1]["val_accuracy"] >= 0.75  # red vs blue on a frozen backbone with every image
    # the first scratch point spends the (tiny) budget; the rest are skipped and say so
    scratch = [p for p in curve["points"] if p["arm"] == "scratch"]
    assert [p["per_class"] for p in scratch] == ["1 per class"]
    assert [s["per_class"] for s in curve["skipped"]] == ["2 per class", "5 per class", "all per class"]
    assert all("budget" in s["reason"] for s in curve["skipped"])
    table = efficiency_table(curve)
    assert table[0] == ("per class", "training images", "pretrained", "scratch")
    assert table[2][3] == "skipped" and table[1][0] == "1"


def test_cli_writes_the_curve_and_its_plot(tmp_path, dataset, lab_cache, capsys):
    out = tmp_path / "eff"
    argv = ["efficiency", "--data", str(dataset.source), "--out", str(out), "--sizes", "2", "--draws", "1",
            "--scratch-budget", "0", "--epochs", "2", "--image-size", "32", "--device", "cpu"]
    assert main(argv) == 0
    curve = json.loads((out / "efficiency.json").read_text())
    assert {p["arm"] for p in curve["points"]} == {"pretrained"}  # --scratch-budget 0: no scratch points
    assert (out / "efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "per class" in capsys.readouterr().out
