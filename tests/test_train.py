"""Training core: cached features, frozen backbone, determinism, diagnostics, report and state dicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import models
from core import diagnostics
from core.config import ConfigError, TrainConfig
from core.data import load_dataset
from core.features import TorchFeatureExtractor
from core.metrics import classification_metrics, verdict
from core.report import run_file_names, write_run
from core.runtime.files import CACHE_ENV
from core.runtime.images import to_array
from core.train import Callbacks, TrainingCancelled, run_compare, speedup, time_to_target
from models.preprocess import ImagePreprocess

TINY = "sample:shapes?per_class=10&size=32"
# Torch features by default in this module: most tests here check training, not the feature engine, and torch
# needs no ONNX backbone build. The default engine is compared with torch below (default_engine_result).
FAST = dict(image_size=32, epochs=2, feature_engine="torch", device="cpu", batch_size=16)


def _compare(cache, *args, **kwargs):
    """run_compare with the session's cache folder (module fixtures run before conftest's per-test lab_cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))
        return run_compare(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny_result(_session_cache):
    return _compare(_session_cache, load_dataset(TINY), TrainConfig(**FAST))


@pytest.fixture(scope="module")
def default_engine_result(_session_cache):
    """The pretrained arm as a user runs it: the default feature engine ("auto": onnxruntime on CPU)."""
    cfg = TrainConfig(**{**FAST, "feature_engine": TrainConfig().feature_engine})
    return _compare(_session_cache, load_dataset(TINY), cfg, arms=("pretrained",))


def _strip_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_report_has_the_documented_schema(tiny_result, tmp_path):
    paths = write_run(tiny_result, tmp_path, export=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(paths) >= {"report.json", "manifest.csv", "learning_curves.png", "confusion_matrices.png",
                          "pretrained.pt", "scratch.pt"}
    assert {"source", "classes", "counts", "skipped"} <= set(report["dataset"])
    assert report["dataset"]["classes"] == ["circle", "square", "triangle"]
    assert report["device"] == "cpu" and report["backbone"] == "efficientnet_lite0"
    assert report["image_size"] == 32 and report["seed"] == 0 and report["target_accuracy"] == 0.85
    for arm in ("pretrained", "scratch"):
        run = report["runs"][arm]
        for key in ("val_accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "per_class",
                    "confusion_matrix", "train_seconds", "time_to_target_seconds", "best_epoch", "verdict", "history",
                    "misclassified"):
            assert key in run, (arm, key)
        assert set(run["per_class"]["circle"]) == {"precision", "recall", "f1", "support"}
        assert run["verdict"]["label"] in {"good", "fair", "poor"} and run["verdict"]["reasons"]
        assert len(run["history"]) == 2
        assert set(run["history"][0]) == {"epoch", "seconds", "train_loss", "train_accuracy", "val_loss",
                                          "val_accuracy", "selection_loss", "selection_accuracy"}
        assert np.sum(run["confusion_matrix"]) == sum(report["dataset"]["counts"]["val"].values())
    assert "speedup_time_to_target" in report
    assert set(report["diagnostics"]) == {"imbalance", "leakage", "duplicates", "shortcuts", "unfamiliar",
                                          "overfitting"}
    for arm, unfamiliar in report["diagnostics"]["unfamiliar"].items():
        assert set(unfamiliar) == {"threshold", "quantile", "n_val", "val_above", "val_median"}, arm
        assert unfamiliar["n_val"] == 6 and unfamiliar["val_above"] <= 1, arm
    assert report["diagnostics"]["shortcuts"]["checked"] and not report["diagnostics"]["shortcuts"]["flagged"]
    dupes = report["diagnostics"]["duplicates"]
    assert dupes["used_features"] and set(dupes["counts"]) == {"leakage", "label conflict", "repeat"}
    assert set(report["diagnostics"]["overfitting"]) == {"pretrained", "scratch"}
    manifest = (tmp_path / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "file,class,split,sha256" and len(manifest) == 31
    # 8 training images per class: round(0.15 * 8) = 1 of each held out to choose the epoch, listed as such
    assert report["selection"] == {"chosen_on": "selection", "images": 3, "from": "train", "fraction": 0.15,
                                   "seed": 0, "trained_on": 21, "scored_on": {"val": 6}}
    held_out = [row.split(",") for row in manifest[1:] if row.split(",")[2] == "selection"]
    assert sorted(row[1] for row in held_out) == ["circle", "square", "triangle"]


def test_the_epoch_kept_is_chosen_on_the_held_out_training_images_not_on_validation():
    from core.train import _EpochLog

    log = _EpochLog("scratch", TrainConfig(epochs=4), Callbacks(), start=0.0)
    # validation peaks at epoch 2, the held-out selection images at epoch 3
    for epoch, (val_acc, sel_acc) in enumerate([(0.5, 0.4), (0.9, 0.5), (0.6, 0.8), (0.7, 0.6)], start=1):
        log.end_epoch(epoch, 1.0, 0.5, 1.0 - val_acc, val_acc, state=lambda e=epoch: {"epoch": e},
                      selection=(1.0 - sel_acc, sel_acc))
    assert log.best["epoch"] == 3 and log.best_state == {"epoch": 3}
    without = _EpochLog("scratch", TrainConfig(epochs=4), Callbacks(), start=0.0)
    for epoch, val_acc in enumerate([0.5, 0.9, 0.6, 0.7], start=1):
        without.end_epoch(epoch, 1.0, 0.5, 1.0 - val_acc, val_acc, state=lambda e=epoch: {"epoch": e})
    assert without.best["epoch"] == 4 and without.best_state == {"epoch": 4}  # no hold-out: the last epoch


def test_selection_indices_are_stratified_seeded_and_spare_tiny_classes():
    from core.train import selection_indices

    labels = np.array([0] * 20 + [1] * 40 + [2] * 7)
    chosen = selection_indices(labels, 0.15, seed=3)
    assert np.bincount(labels[chosen]).tolist() == [3, 6, 1]  # round(0.15 * n), at least one
    assert np.array_equal(chosen, selection_indices(labels, 0.15, seed=3))
    assert not np.array_equal(chosen, selection_indices(labels, 0.15, seed=4))
    assert selection_indices(np.array([0, 0, 0, 1, 1]), 0.15, seed=0) is None  # class 1 cannot spare one
    assert selection_indices(labels, 0.0, seed=0) is None


def test_both_arms_keep_the_epoch_their_selection_images_liked_best(tiny_result):
    for arm, run in tiny_result.report["runs"].items():
        scores = [(h["selection_accuracy"], -h["selection_loss"]) for h in run["history"]]
        assert run["best_epoch"] == 1 + scores.index(max(scores)), arm


def test_report_json_names_no_server_path(tiny_result, tmp_path, _session_cache):
    """Visitors download report.json: the dataset folder is named, never located; files are relative to it."""
    write_run(tiny_result, tmp_path, export=False)
    text = (tmp_path / "report.json").read_text()
    assert str(_session_cache) not in text and str(tmp_path) not in text
    report = json.loads(text)
    assert report["dataset"]["source"] == TINY and "/" not in report["dataset"]["root"]
    wrong = [w["file"] for run in report["runs"].values() for w in run["misclassified"]]
    assert wrong and all(f.startswith("val/") for f in wrong)  # relative to the root: "val/circle/circle_0008.png"


def test_state_dicts_reload_with_weights_only(tiny_result, tmp_path):
    write_run(tiny_result, tmp_path, export=False)
    for arm in ("pretrained", "scratch"):
        state = torch.load(tmp_path / f"{arm}.pt", weights_only=True)
        model = models.build_classifier("efficientnet_lite0", 3, pretrained=False)
        model.load_state_dict(state)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), tiny_result.runs[arm].model.eval()(x))


def test_cached_feature_head_equals_the_full_network(tiny_result):
    """The head trained on cached features gives the same logits when run through the frozen backbone."""
    model = tiny_result.runs["pretrained"].model.eval()
    crops = tiny_result.val.crops
    with torch.no_grad():
        through_backbone = model(ImagePreprocess(model.spec.mean, model.spec.std)(torch.from_numpy(crops)))
        extractor = TorchFeatureExtractor(models.get_backbone("efficientnet_lite0", pretrained=True),
                                          torch.device("cpu"))
        from_cache = model.head(torch.from_numpy(extractor.extract(crops)))
    torch.testing.assert_close(from_cache, through_backbone, atol=1e-5, rtol=1e-5)
    probs = torch.softmax(through_backbone, 1).numpy()
    np.testing.assert_allclose(probs, tiny_result.runs["pretrained"].val_probabilities, atol=1e-5)


def test_backbone_batchnorm_statistics_unchanged(tiny_result):
    fresh = models.get_backbone("efficientnet_lite0", pretrained=True).state_dict()
    trained = tiny_result.runs["pretrained"].model.backbone.state_dict()
    stats = [k for k in fresh if "running_mean" in k or "running_var" in k]
    assert len(stats) > 40
    for key in stats:
        torch.testing.assert_close(trained[key], fresh[key], rtol=0, atol=0)
    assert not any(p.requires_grad for p in tiny_result.runs["pretrained"].model.backbone.parameters())


def test_feature_extraction_keeps_backbone_in_eval_mode():
    backbone = models.get_backbone("efficientnet_lite0", pretrained=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    extractor = TorchFeatureExtractor(backbone, torch.device("cpu"))
    extractor.extract(np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    assert not extractor.backbone.training
    for key, value in extractor.backbone.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_same_seed_same_metrics(tiny_result):
    again = run_compare(load_dataset(TINY), TrainConfig(**FAST))
    for arm in ("pretrained", "scratch"):
        a, b = tiny_result.report["runs"][arm], again.report["runs"][arm]
        assert _strip_seconds(a["history"]) == _strip_seconds(b["history"])
        assert a["confusion_matrix"] == b["confusion_matrix"] and a["f1_macro"] == b["f1_macro"]


def test_cancel_stops_training():
    cb = Callbacks()
    cb.cancel.set()
    with pytest.raises(TrainingCancelled):
        run_compare(load_dataset(TINY), TrainConfig(**FAST), cb)


def test_progress_and_epoch_callbacks_fire():
    stages, epochs = set(), []
    cb = Callbacks(progress=lambda s, f, m: stages.add(s), epoch=lambda arm, rec: epochs.append(arm))
    run_compare(load_dataset(TINY), TrainConfig(**{**FAST, "epochs": 1}), cb, arms=("pretrained",))
    assert {"decode", "features", "pretrained", "done"} <= stages
    assert epochs == ["pretrained"]


def test_finetuning_trains_only_the_last_blocks_and_the_head():
    cfg = TrainConfig(**{**FAST, "epochs": 1, "unfreeze_blocks": 2, "backbone_lr": 1e-2})
    result = run_compare(load_dataset(TINY), cfg, arms=("pretrained",))
    tuned = result.runs["pretrained"].model
    fresh = models.build_classifier("efficientnet_lite0", 3, pretrained=True)
    fresh_blocks, tuned_blocks = fresh.blocks(), tuned.blocks()
    for before, after in zip(fresh_blocks[:-2], tuned_blocks[:-2]):  # frozen: weights and BN statistics
        for key, value in before.state_dict().items():
            torch.testing.assert_close(after.state_dict()[key], value, rtol=0, atol=0)
    for before, after in zip(fresh_blocks[-2:], tuned_blocks[-2:]):  # unfrozen: trained
        assert any(not torch.equal(after.state_dict()[k], v) for k, v in before.state_dict().items())
    run = result.report["runs"]["pretrained"]
    assert run["unfrozen_blocks"] == 2 and 0 < run["trainable_parameters"] < sum(p.numel() for p in fresh.parameters())
    assert "feature_engine" not in run and len(run["history"]) == 1
    # the returned probabilities are the tuned network's own on the validation crops
    x = ImagePreprocess(tuned.spec.mean, tuned.spec.std)(torch.from_numpy(result.val.crops))
    with torch.no_grad():
        probs = torch.softmax(tuned.eval()(x), 1).numpy()
    np.testing.assert_allclose(probs, result.runs["pretrained"].val_probabilities, atol=1e-5)


# --- the default feature engine against torch eager -----------------------------------------------------

@pytest.mark.slow  # builds the cached ONNX backbone graph on a cold cache (~15 s on 2 cores)
def test_default_engine_features_match_torch_eager(tiny_result):
    from core.features import make_feature_extractor

    extractor = make_feature_extractor("efficientnet_lite0", 32, torch.device("cpu"))  # the default engine
    assert extractor.engine.startswith("onnxruntime"), extractor.engine  # not the torch fallback
    torch_eager = TorchFeatureExtractor(models.get_backbone("efficientnet_lite0", pretrained=True), torch.device("cpu"))
    images = np.concatenate([tiny_result.train.crops, tiny_result.val.crops])
    expected = torch_eager.extract(images)
    got = extractor.extract(images)
    assert got.shape == expected.shape == (len(images), 1280)
    scale = np.abs(expected).max()
    assert scale > 0.1  # real features, not zeros
    # Same graph, float32 both ways: only the order of floating-point operations differs (measured: 2e-6 of scale).
    assert np.abs(got - expected).max() <= 1e-4 * scale


@pytest.mark.slow
def test_default_engine_trains_the_same_head_as_torch(tiny_result, default_engine_result):
    """Same seed, same split: the features agree to ~1e-6, so the head sees the same data in the same order and its
    validation probabilities agree closely (not bit for bit: float32 differences pass through 2 epochs of AdamW)."""
    auto, eager = default_engine_result.runs["pretrained"], tiny_result.runs["pretrained"]
    assert auto.extra["feature_engine"].startswith("onnxruntime") and eager.extra["feature_engine"] == "torch-cpu"
    np.testing.assert_allclose(auto.val_probabilities, eager.val_probabilities, atol=1e-4)
    np.testing.assert_array_equal(auto.val_probabilities.argmax(1), eager.val_probabilities.argmax(1))
    for a, b in zip(auto.history, eager.history, strict=True):
        assert a["val_accuracy"] == b["val_accuracy"] and a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)


# --- TrainConfig: the one route from outside values to a config -------------------------------------------

def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unfreeze_blocks must be between 0 .* and 18"):
        TrainConfig(unfreeze_blocks=19).validated()
    with pytest.raises(ConfigError, match="Unknown config key.*epochz.*Did you mean 'epochs'.*Valid keys: backbone"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="Did you mean"):
        TrainConfig(backbone="resnet_18").validated()
    with pytest.raises(ValueError, match="image_size"):
        TrainConfig(image_size=8).validated()


@pytest.mark.parametrize(("values", "message"), [
    ({"epochs": "ten"}, "epochs must be an integer from 1 to 1000, got 'ten'."),
    ({"epochs": 0}, "epochs must be an integer from 1 to 1000, got 0."),
    ({"epochs": 2.5}, "epochs must be an integer from 1 to 1000, got 2.5."),
    ({"epochs": True}, "epochs must be an integer from 1 to 1000, got True."),  # bools are not numbers here
    ({"views": 3}, "views must be one of 1, 2, got 3."),
    ({"device": "gpu"}, "device must be one of 'auto', 'cpu', 'cuda', got 'gpu'."),
    ({"feature_engine": "tensorrt"}, "feature_engine must be one of 'auto', 'torch', 'onnxruntime', got 'tensorrt'."),
    ({"target_accuracy": 0}, "target_accuracy must be a number above 0 and at most 1, got 0."),
    ({"target_accuracy": "0.9"}, "target_accuracy must be a number above 0 and at most 1, got '0.9'."),
    ({"budget_seconds": -5}, "budget_seconds must be a number above 0, or null (no time cap), got -5."),
    ({"budget_seconds": float("nan")}, "budget_seconds must be a number above 0, or null (no time cap), got nan."),
    ({"label_smoothing": 1.0}, "label_smoothing must be a number at least 0 and below 1, got 1.0."),
    ({"train_scratch": 1}, "train_scratch must be true or false, got 1."),
    ({"batch_size": None}, "batch_size must be an integer from 1 to 4096, got None."),
    ({"backbone": 18}, "backbone must be a registered backbone name"),
])
def test_config_from_dict_names_key_value_and_valid_range(values, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(values)
    assert str(info.value).startswith(message)


def test_config_from_dict_normalises_json_numbers():
    cfg = TrainConfig.from_dict({"epochs": 15.0, "head_lr": 1, "image_size": None, "budget_seconds": 30})
    assert cfg.epochs == 15 and type(cfg.epochs) is int
    assert cfg.head_lr == 1.0 and type(cfg.head_lr) is float and cfg.budget_seconds == 30.0
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # what config.json holds comes back unchanged
    assert TrainConfig.from_dict({}) == TrainConfig()
    # A config built directly is held to the same rules when it is used.
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        TrainConfig(epochs="3").validated()


def test_every_setting_has_a_rule_and_its_default_passes():
    from core.config import FIELDS, rule

    defaults = TrainConfig()
    for name in FIELDS:
        assert rule(name).check(name, getattr(defaults, name)) == getattr(defaults, name)


# --- run folders --------------------------------------------------------------------------------------------

def test_rerun_into_a_folder_removes_the_earlier_runs_files_only(tiny_result, default_engine_result, tmp_path):
    """A pretrained-only run without export over a two-arm exported run: scratch.pt, the ONNX files and their
    variants go; a user's files stay; report.json lists exactly the project's files left."""
    write_run(tiny_result, tmp_path, export=False)
    for name in ("model.onnx", "model.int8.onnx", "model.fp16.onnx", "model-scratch.onnx", "model-scratch.int8.onnx",
                 "triton_repository.zip"):  # what an exported run, `python -m export onnx` and the app add
        (tmp_path / name).write_bytes(b"earlier run")
    user_files = {"notes.txt": b"my notes", "model.onnx.bak": b"mine", "old-report.json": b"{}"}
    for name, data in user_files.items():
        (tmp_path / name).write_bytes(data)
    assert "scratch.pt" in json.loads((tmp_path / "report.json").read_text())["artifacts"]["files"]

    write_run(default_engine_result, tmp_path, export=False)
    report = json.loads((tmp_path / "report.json").read_text())
    files = report["artifacts"]["files"]
    assert files == sorted(files) and "report.json" in files and "config.json" in files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*files, *user_files])
    assert "scratch.pt" not in files and not any(n.endswith(".onnx") for n in files)
    assert all((tmp_path / n).read_bytes() == data for n, data in user_files.items())
    assert "export" not in report


def test_run_file_names_cover_every_variant_of_both_models():
    from export.variants import VARIANTS

    names = run_file_names()
    for model in ("model", "model-scratch"):
        assert {f"{model}{v.suffix}.onnx" for v in VARIANTS.values()} <= names
    assert {"report.json", "config.json", "pretrained.pt", "scratch.pt", "triton_repository.zip"} <= names


def test_time_to_target_and_speedup():
    hist = [{"seconds": 1.0, "val_accuracy": 0.5}, {"seconds": 2.0, "val_accuracy": 0.9}]
    assert time_to_target(hist, 0.85) == 2.0 and time_to_target(hist, 0.95) is None
    assert speedup({"time_to_target_seconds": 2.0}, {"time_to_target_seconds": 10.0, "train_seconds": 10}) == 5.0
    assert speedup({"time_to_target_seconds": 2.0}, {"time_to_target_seconds": None, "train_seconds": 30.0}) == {
        "lower_bound": 15.0}


# --- diagnostics on planted cases -------------------------------------------------------------------------

def test_imbalance_flagged_on_planted_case_not_on_clean():
    imbalanced = load_dataset("sample:shapes?per_class=20&imbalance=0.1&size=32")
    assert diagnostics.class_balance(imbalanced.counts()["train"])["flagged"]
    assert not diagnostics.class_balance(load_dataset(TINY).counts()["train"])["flagged"]

    classes = ["a", "b"]
    y_true = np.array([0] * 18 + [1] * 2)
    lazy = classification_metrics(y_true, np.zeros(20, int), classes)  # always answers the majority class
    flagged = diagnostics.imbalance({"a": 90, "b": 10}, y_true, lazy, classes)
    assert flagged["flagged"] and flagged["majority_baseline_accuracy"] == 0.9
    assert "'b'" in flagged["message"]
    good = classification_metrics(np.array([0, 1] * 10), np.array([0, 1] * 10), classes)
    assert not diagnostics.imbalance({"a": 50, "b": 50}, np.array([0, 1] * 10), good, classes)["flagged"]


def test_leakage_flagged_on_planted_duplicates_not_on_clean():
    leaky = run_compare(load_dataset("sample:shapes?per_class=10&size=32&duplicates=3"),
                        TrainConfig(**{**FAST, "epochs": 1}), arms=("pretrained",))
    leak = leaky.report["diagnostics"]["leakage"]
    assert leak["flagged"] and leak["n_exact"] == 3
    assert all(p["train"] != p["other"] for p in leak["exact_duplicates"])
    clean = run_compare(load_dataset(TINY), TrainConfig(**{**FAST, "epochs": 1}), arms=("pretrained",))
    assert not clean.report["diagnostics"]["leakage"]["flagged"]
    # the near-duplicate check after training (hashes and the pretrained features) finds the same three
    assert leaky.report["diagnostics"]["duplicates"]["counts"]["leakage"] == 3
    assert clean.report["diagnostics"]["duplicates"]["counts"]["leakage"] == 0


def test_near_duplicates_found_by_feature_similarity():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(5, 16))
    other = np.vstack([train[2] + 0.01 * rng.normal(size=16), rng.normal(size=16)])
    out = diagnostics.leakage([f"t{i}" for i in range(5)], list("abcde"), ["v0", "v1"], ["x", "y"], train, other)
    assert out["flagged"] and out["n_exact"] == 0 and out["near_duplicates"][0]["train"] == "t2"


def test_overfitting_flagged_on_tiny_noisy_train_set():
    ds = load_dataset("sample:shapes?per_class=8&size=32&noise=0.4")
    res = run_compare(ds, TrainConfig(**{**FAST, "epochs": 40, "head_lr": 0.05}), arms=("pretrained",))
    assert res.report["diagnostics"]["overfitting"]["pretrained"]["flagged"]
    history = [{"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.8, "val_loss": 0.5, "val_accuracy": 0.78}
               for e in range(1, 6)]
    assert not diagnostics.overfitting(history)["flagged"]


def test_a_model_at_chance_is_flagged_as_not_learned_not_called_free_of_overfitting():
    from core.summary import diagnostic_items

    guessing = [{"epoch": e, "train_loss": 1.1, "train_accuracy": 0.34, "val_loss": 1.1, "val_accuracy": 0.333}
                for e in range(1, 4)]
    out = diagnostics.overfitting(guessing, chance=1 / 3)
    assert out["flagged"] and out["at_chance"] and "no better than guessing" in out["message"]
    assert "No sign" not in out["message"]
    learned = [{**h, "val_accuracy": 0.9, "train_accuracy": 0.92} for h in guessing]
    assert not diagnostics.overfitting(learned, chance=1 / 3)["flagged"]
    # one lucky epoch above chance does not count when the epoch kept is at chance
    lucky = guessing[:2] + [{**guessing[2], "val_accuracy": 0.4}]
    assert diagnostics.overfitting(lucky, chance=1 / 3, reported=0.333)["at_chance"]
    (title, flagged, _), = diagnostic_items({"diagnostics": {"overfitting": {"scratch": out}}})
    assert title == "Not learned yet (scratch)" and flagged


def test_verdict_rule_of_thumb():
    good = {"val_accuracy": 0.9, "precision_macro": 0.88, "recall_macro": 0.86}
    assert verdict(good)["label"] == "good"
    assert verdict({**good, "val_accuracy": 0.6})["label"] == "poor"
    assert verdict({"val_accuracy": 0.8, "precision_macro": 0.95, "recall_macro": 0.7})["label"] == "poor"
    assert verdict({"val_accuracy": 0.8, "precision_macro": 0.8, "recall_macro": 0.79})["label"] == "fair"


def test_eval_pixels_match_the_export_rule(tiny_result):
    """Training crops are exactly what ``core.runtime.images.to_array`` gives the exported model's caller."""
    from core.runtime.images import open_rgb

    spec = models.get_backbone_spec("efficientnet_lite0")
    first = tiny_result.val.files[0]
    expected = to_array(open_rgb(first), 32, spec.resize_for(32), spec.interpolation)
    np.testing.assert_array_equal(tiny_result.val.crops[0], expected)


def test_overfitting_val_loss_rule():
    def hist(val_losses, val_accs):
        return [{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "train_accuracy": 0.9, "val_loss": loss,
                 "val_accuracy": acc} for e, (loss, acc) in enumerate(zip(val_losses, val_accs))]

    losses = [0.5, 0.3, 0.35, 0.45, 0.6]
    worse = diagnostics.overfitting(hist(losses, [0.7, 0.85, 0.84, 0.8, 0.78]))
    assert worse["flagged"] and worse["val_loss_rising"] and "Validation loss rose" in worse["message"]
    # Loss drifts up while every validation image stays right: more confidence, not worse generalisation.
    confident = diagnostics.overfitting(hist(losses, [0.9, 1.0, 1.0, 1.0, 1.0]))
    assert confident["val_loss_rising"] and not confident["flagged"]


def test_misclassified_most_confident_first():
    from core.metrics import misclassified

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.05, 0.95]])
    assert misclassified([0, 0, 0, 1], probs) == [1, 2]
    assert misclassified([0, 0, 0, 1], probs, limit=1) == [1]


def test_training_waits_for_the_servers_feature_engine_warm_up(monkeypatch):
    """The app builds the feature engine in a thread at start-up; torch's exporter and a training thread must not
    run at once (torch.fx keeps global state: a seed call during an export failed with KeyError), so run_compare
    starts only once the warm-up is done."""
    import threading

    import core.features as features

    started, release = threading.Event(), threading.Event()

    def slow_build(*args, **kwargs):  # the warm-up's build, held until released
        started.set()
        release.wait(60)

    monkeypatch.setattr(features, "make_feature_extractor", slow_build)
    warm_up = features.warm_up_feature_engine("efficientnet_lite0", 32, torch.device("cpu"))
    assert started.wait(10)
    messages, results = [], []
    cfg = TrainConfig(**{**FAST, "epochs": 1, "train_scratch": False})
    run = threading.Thread(target=lambda: results.append(
        run_compare(load_dataset(TINY), cfg, Callbacks(progress=lambda stage, frac, msg: messages.append(msg)))))
    run.start()
    run.join(timeout=3)
    assert run.is_alive() and messages == ["preparing the feature engine"]  # nothing decoded or trained yet
    release.set()
    run.join(timeout=120)
    warm_up.join(timeout=10)
    assert not run.is_alive() and results and results[0].report["runs"]["pretrained"]["epochs_run"] == 1
    assert any(m.startswith("decoded") for m in messages)


def test_resplit_draws_another_stratified_split_of_the_same_images(tmp_path):
    from tests.helpers import colour_zip

    ds = load_dataset(colour_zip(tmp_path / "c.zip", per_class=10), seed=0, cache=tmp_path / "cache")
    other = ds.resplit(1)
    assert sorted(i.path for i in other.items) == sorted(i.path for i in ds.items)
    assert other.counts() == ds.counts()  # same shares per class
    assert {i.path for i in other.split("val")} != {i.path for i in ds.split("val")}
    assert ds.resplit(0).items == ds.items  # the seed load_dataset used gives its split back


def test_repeats_reuse_features_and_report_mean_spread_and_target_hits(tmp_path, monkeypatch, _session_cache):
    import core.train as train_module
    from tests.helpers import colour_zip

    ds = load_dataset(colour_zip(tmp_path / "c.zip", per_class=10), seed=0, cache=tmp_path / "cache")
    extracted = []
    make = train_module.make_feature_extractor

    def counting(*args, **kwargs):
        engine = make(*args, **kwargs)
        extract = engine.extract
        engine.extract = lambda images: extracted.append(len(images)) or extract(images)
        return engine

    monkeypatch.setattr(train_module, "make_feature_extractor", counting)
    result = _compare(_session_cache, ds, TrainConfig(**{**FAST, "epochs": 1, "repeats": 3}))
    rep = result.report["repeats"]
    assert rep["count"] == 3 and rep["seeds"] == [0, 1, 2] and rep["splits"] == "a new random split per repeat"
    assert sum(extracted) == len(ds.items)  # every image's features computed once over all three repeats
    for arm in ("pretrained", "scratch"):
        acc = rep["arms"][arm]["val_accuracy"]
        assert len(acc["values"]) == 3 and acc["mean"] == pytest.approx(np.mean(acc["values"]))
        assert acc["min"] <= acc["mean"] <= acc["max"]
        hits = [v >= result.report["target_accuracy"] for v in acc["values"]]
        assert rep["arms"][arm]["met_target"] == pytest.approx(np.mean(hits))
        assert len(rep["arms"][arm]["time_to_target_seconds"]) == 3
    assert result.report["runs"]["pretrained"]["val_accuracy"] == rep["arms"]["pretrained"]["val_accuracy"]["values"][0]


def test_repeat_summary_and_its_table_rows_on_known_values():
    from core.summary import repeat_rows
    from core.train import summarize_repeats

    def report(seed, acc, ttt):
        run = {"val_accuracy": acc, "balanced_accuracy": acc, "f1_macro": acc, "time_to_target_seconds": ttt,
               "train_seconds": 1.0, "best_epoch": 1}
        return {"seed": seed, "target_accuracy": 0.85, "runs": {"pretrained": run}}

    rep = summarize_repeats([report(0, 0.8, None), report(1, 0.9, 2.0), report(2, 1.0, 1.5)], redrawn=True)
    acc = rep["arms"]["pretrained"]["val_accuracy"]
    assert acc["mean"] == pytest.approx(0.9) and acc["sd"] == pytest.approx(0.1)  # sample SD of 0.8, 0.9, 1.0
    assert rep["arms"]["pretrained"]["met_target"] == pytest.approx(2 / 3)
    rows = dict(repeat_rows({"repeats": rep}))
    assert rows["validation accuracy over 3 repeats"]["pretrained"] == "90.0% ± 10.0 (80.0–100.0)"
    assert rows["met the 85% target"]["pretrained"] == "2 of 3"
    assert rows["time to target, each repeat"]["pretrained"] == "never, 2.0 s, 1.5 s"


def test_the_time_budget_stops_an_epoch_midway_and_the_headline_says_so(_session_cache):
    from core.summary import epochs_cell, headline

    cfg = TrainConfig(**{**FAST, "batch_size": 8, "epochs": 5, "budget_seconds": 1e-3})
    result = _compare(_session_cache, load_dataset(TINY), cfg, arms=("scratch",))
    run = result.report["runs"]["scratch"]
    (only,) = run["history"]  # the budget ran out during the first epoch, after its first batch
    assert only["epoch_fraction"] == pytest.approx(8 / 21, abs=1e-3)  # 24 training images, 3 held out for selection
    assert run["stopped_by_budget"] and run["epochs_done"] == pytest.approx(0.38, abs=0.01)
    assert epochs_cell(result.report, run) == "0.38 / 0.38 of 5 (time limit)"  # the kept evaluation, midway
    assert "when the 0.001 s time limit stopped it after 0.38 of 5 epochs" in headline(result.report)


def test_more_time_continues_the_scratch_arm_where_the_budget_stopped_it(_session_cache):
    from core.summary import epochs_cell
    from core.train import continue_arm

    cfg = TrainConfig(**{**FAST, "batch_size": 8, "epochs": 3, "budget_seconds": 1e-3})
    first = _compare(_session_cache, load_dataset(TINY), cfg)
    assert first.report["runs"]["scratch"]["epochs_done"] == pytest.approx(0.38, abs=0.01)  # one batch of 21 images
    pretrained_before = first.report["runs"]["pretrained"]["val_accuracy"]

    second = continue_arm(first, 1e-3)  # one more batch, in the same epoch
    run = second.report["runs"]["scratch"]
    assert [h["epoch"] for h in run["history"]] == [1, 1]
    assert run["history"][1]["epoch_fraction"] == pytest.approx(16 / 21, abs=1e-3)
    assert run["history"][1]["seconds"] > run["history"][0]["seconds"]
    assert run["stopped_by_budget"] and second.report["continued"]["scratch"]["times"] == 1
    assert first.report["runs"]["scratch"]["epochs_done"] == pytest.approx(0.38, abs=0.01)  # the first is unchanged
    assert second.report["runs"]["pretrained"]["val_accuracy"] == pretrained_before

    third = continue_arm(second, 600)  # plenty: it finishes the planned epochs, and the schedule with them
    run = third.report["runs"]["scratch"]
    trainer = third.runs["scratch"].trainer
    assert run["epochs_done"] == 3 and not run["stopped_by_budget"] and epochs_cell(third.report, run).endswith("/ 3")
    assert trainer.sched.last_epoch == 3 * trainer.steps_per_epoch  # every one-cycle step taken, none twice
    assert third.report["continued"]["scratch"] == {"extra_seconds": pytest.approx(600.001), "times": 2}
    with pytest.raises(ValueError, match="already trained all its 3 epochs"):
        continue_arm(third, 60)


def test_a_stopped_and_continued_arm_trains_exactly_as_one_that_never_stopped(_session_cache):
    """The same batches, order and updates: the epochs both runs completed score the same."""
    from core.train import continue_arm

    base = {**FAST, "batch_size": 8, "epochs": 2}
    whole = _compare(_session_cache, load_dataset(TINY), TrainConfig(**base), arms=("scratch",))
    cut = _compare(_session_cache, load_dataset(TINY), TrainConfig(**{**base, "budget_seconds": 1e-3}),
                   arms=("scratch",))
    resumed = continue_arm(cut, 600)

    def completed(result):
        return [(h["epoch"], round(h["train_loss"], 5), round(h["val_loss"], 5))
                for h in result.report["runs"]["scratch"]["history"] if "epoch_fraction" not in h]

    assert completed(resumed) == completed(whole)
    assert len(completed(whole)) == 2
