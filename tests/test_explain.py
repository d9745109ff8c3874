"""Where the model looked and "fits no class" (``models.explain``): exact class activation maps, the same maps and
scores from the exported graph as from PyTorch, a default export without them, and an out-of-distribution score
that tells another dataset's images from the validation images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import models
from core import summary
from core.config import TrainConfig
from core.data import load_dataset
from core.predict_view import UNFAMILIAR, classify
from core.runtime.contract import EXPLAIN_OUTPUTS, ModelFormatError, parse_metadata
from core.runtime.files import CACHE_ENV
from core.runtime.images import heatmap_overlay
from core.runtime.predictor import Predictor
from core.train import prepare_images, run_compare
from export.onnx_export import export_classifier
from models.explain import calibrate_ood, class_activation_maps, explain, pooled_features
from models.preprocess import ImagePreprocess

SHAPES = "sample:shapes?per_class=30&size=64"
SIZE = 64
FAST = dict(image_size=SIZE, epochs=5, device="cpu", batch_size=16, train_scratch=False)
AUROC_FLOOR = 0.95  # measured 1.000 (scripts/bench_unfamiliar.py, shapes vs digits at 160 px); 64 px here


@pytest.fixture(scope="module")
def shapes(_session_cache):
    """The frozen-backbone arm trained on the shapes sample, and the digits sample's images at the same size."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(_session_cache))
        result = run_compare(load_dataset(SHAPES), TrainConfig(**FAST), arms=("pretrained",))
        digits = load_dataset("sample:digits")
        other = prepare_images(digits.items[::9], SIZE, models.get_backbone_spec(models.DEFAULT_BACKBONE)).crops
    return result, other


@pytest.fixture(scope="module")
def explained(shapes, tmp_path_factory):
    """The shapes model exported with the explain outputs, and the same model exported plain."""
    result, _ = shapes
    run = result.runs["pretrained"]
    folder = tmp_path_factory.mktemp("explained")
    classes = result.dataset.classes
    export_classifier(run.model, folder / "explained.onnx", image_size=SIZE, classes=classes,
                      training_mode="pretrained", explain=run.ood, parity_images=result.val.crops)
    export_classifier(run.model, folder / "plain.onnx", image_size=SIZE, classes=classes, training_mode="pretrained")
    return folder / "explained.onnx", folder / "plain.onnx"


@pytest.mark.parametrize("backbone", models.list_backbones())
def test_a_class_map_averages_to_its_logit_less_the_bias(backbone):
    torch.manual_seed(0)
    classifier = models.build_classifier(backbone, 4, pretrained=backbone == models.DEFAULT_BACKBONE).eval()
    images = torch.randint(0, 256, (3, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = ImagePreprocess(classifier.spec.mean, classifier.spec.std)(images)
    with torch.no_grad():
        # An untrained backbone's features can be tiny (1e-8): scale the head so the logits are of order one.
        linear = classifier.head[-1]
        linear.weight.copy_(torch.randn(linear.weight.shape) / classifier.backbone(x).norm(dim=1).max())
        linear.bias.fill_(0.5)
        maps, _ = class_activation_maps(classifier, x)
        logits = classifier(x)
    bias = linear.bias.detach()
    assert maps.shape[:2] == (3, 4) and maps.shape[2] >= 2  # a map, not one pooled number
    assert float((logits - bias).abs().max()) > 0.1  # the logits carry signal, so agreement below is not 0 == 0
    torch.testing.assert_close(maps.mean(dim=(2, 3)), logits - bias, rtol=1e-4, atol=1e-5)


def test_onnx_and_torch_give_the_same_maps_and_scores(shapes, explained):
    result, other = shapes
    run = result.runs["pretrained"]
    predictor = Predictor(explained[0], device="cpu")
    images = np.concatenate([result.val.crops[:6], other[:6]])
    onnx_out = predictor.explain_arrays(images)
    torch_out = explain(run.model, images, run.ood)
    scale = float(np.abs(torch_out["cam"]).max())
    assert scale > 1e-3
    np.testing.assert_allclose(onnx_out["cam"], torch_out["cam"], atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(onnx_out["ood_score"], torch_out["ood_score"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx_out["probabilities"], torch_out["probabilities"], atol=1e-4, rtol=0)
    assert predictor.info.ood_threshold == pytest.approx(run.ood.threshold)
    assert onnx_out["fits_no_class"].tolist() == (onnx_out["ood_score"] > predictor.info.ood_threshold).tolist()


def test_the_default_export_keeps_its_two_outputs(explained):
    predictor = Predictor(explained[1], device="cpu")
    assert [o.name for o in predictor._session.get_outputs()] == ["logits", "probabilities"]
    assert not predictor.explains and predictor.info.ood_threshold is None
    with pytest.raises(ModelFormatError, match="--explain"):
        predictor.explain_arrays(np.zeros((1, SIZE, SIZE, 3), np.uint8))


def test_another_datasets_images_score_as_unfamiliar(shapes):
    result, other = shapes
    run = result.runs["pretrained"]
    familiar = explain(run.model, result.val.crops, run.ood)["ood_score"]
    unfamiliar = explain(run.model, other, run.ood)["ood_score"]
    y = np.r_[np.zeros(len(familiar)), np.ones(len(unfamiliar))]
    auroc = roc_auc_score(y, np.r_[familiar, unfamiliar])
    assert auroc >= AUROC_FLOOR, auroc
    assert (unfamiliar > run.ood.threshold).mean() >= 0.5  # most digits are flagged at the exported threshold


def test_the_threshold_is_the_validation_quantile(shapes):
    result, _ = shapes
    ood = result.runs["pretrained"].ood
    scores = ood.val_scores
    above = int((scores > ood.threshold).sum())  # about 1 in 100 validation images, at least none, at most one more
    assert above <= int(np.ceil((1 - ood.quantile) * len(scores))) and scores.min() <= ood.threshold <= scores.max()
    report = result.report["diagnostics"]["unfamiliar"]["pretrained"]
    assert report["threshold"] == ood.threshold and report["val_above"] == int((scores > ood.threshold).sum())


def test_calibration_from_features_matches_the_trained_arms(shapes):
    """The frozen arm's calibration reuses the training features; computing them again in torch gives the same."""
    result, _ = shapes
    run = result.runs["pretrained"]
    again = calibrate_ood(pooled_features(run.model, result.train.crops), result.train.labels,
                          pooled_features(run.model, result.val.crops), len(result.dataset.classes))
    np.testing.assert_allclose(again.val_scores, run.ood.val_scores, atol=1e-4)


def test_predict_shows_where_it_looked_and_flags_an_unfamiliar_image(shapes, explained):
    result, other = shapes
    predictor = Predictor(explained[0], device="cpu")
    from PIL import Image

    shape = Image.fromarray(result.val.crops[0])
    digit = Image.fromarray(other[0])
    _, info, table, looked = classify(predictor, [("shape", shape), ("digit", digit)], "explained.onnx")
    assert looked is not None and looked.shape == (SIZE, SIZE, 3)
    assert table["fits a class?"].tolist() == ["yes", "⚠️ no"]
    assert UNFAMILIAR not in info  # the first image is a validation shape
    assert "1 of the other 1 image(s) look unlike anything" in info  # the others are flagged above the table too
    _, info, _, _ = classify(predictor, [("digit", digit)], "explained.onnx")
    assert info.startswith(UNFAMILIAR)
    _, info, table, looked = classify(Predictor(explained[1], device="cpu"), [("shape", shape)], "plain.onnx")
    assert looked is None and "fits a class?" not in table.columns


def test_the_heat_map_is_bright_where_the_map_is_high():
    image = np.full((64, 64, 3), 100, np.uint8)
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 3.0
    out = heatmap_overlay(image, cam)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[:8, :8].mean() > out[-8:, -8:].mean() + 60
    flat = heatmap_overlay(image, np.zeros((4, 4)))
    assert (flat == flat[0, 0]).all()  # a flat map colours every pixel alike
    with pytest.raises(ValueError, match="one class's map"):
        heatmap_overlay(image, np.zeros((2, 4, 4)))


def test_misclassified_images_carry_the_map_of_the_class_chosen(shapes):
    result, _ = shapes
    run = result.runs["pretrained"]
    probs = run.val_probabilities.copy()
    wrong = int(np.flatnonzero(probs.argmax(1) == result.val.labels)[0])  # make one right answer a mistake
    probs[wrong] = np.roll(probs[wrong], 1)
    run.val_probabilities, original = probs, run.val_probabilities
    try:
        items = summary.misclassified_gallery(result, result.dataset.classes)
    finally:
        run.val_probabilities = original
    crop = result.val.crops[wrong]
    shown = [image for image, _ in items if image.shape == crop.shape]
    assert shown and not any(np.array_equal(image, crop) for image in shown)
    maps = explain(run.model, crop[None])["cam"]
    expected = heatmap_overlay(crop, maps[0, int(probs[wrong].argmax())])
    assert any(np.array_equal(image, expected) for image in shown)


def test_the_report_says_what_fits_no_class_means(shapes):
    items = {title: (flagged, message) for title, flagged, message in summary.diagnostic_items(shapes[0].report)}
    above = shapes[0].report["diagnostics"]["unfamiliar"]["pretrained"]["val_above"]
    assert items["Images that fit no class"] == (None, items["Images that fit no class"][1])  # an explanation
    assert f"({above} of these 24 are)" in items["Images that fit no class"][1]
    assert "heat maps" in items["Where the model looked"][1]
    shown = summary.diagnostics_md(shapes[0].report)
    assert "ℹ️ **Images that fit no class**" in shown and shown.rstrip().endswith("more varied pictures\\.")


def test_metadata_with_a_score_output_needs_its_threshold():
    meta = {"format": "transfer-lab/1", "image_size": "64", "resize_size": "73", "interpolation": "bilinear",
            "classes": json.dumps(["a", "b"]), "outputs": json.dumps(["logits", "probabilities", *EXPLAIN_OUTPUTS])}
    with pytest.raises(ModelFormatError, match="ood_threshold"):
        parse_metadata(meta, "m.onnx")
    assert parse_metadata({**meta, "ood_threshold": "0.25"}, "m.onnx").explains
    with pytest.raises(ModelFormatError, match="'outputs'"):
        parse_metadata({**meta, "outputs": json.dumps(["cam"])}, "m.onnx")


def test_the_standalone_example_warns_and_says_where_it_looked(shapes, explained, tmp_path):
    """``export/example_predict.py`` (onnxruntime, numpy, Pillow only) uses the explain outputs when present."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    image_file = tmp_path / "digit.png"
    Image.fromarray(shapes[1][0]).save(image_file)
    example = Path(__file__).resolve().parents[1] / "export" / "example_predict.py"
    out = subprocess.run([sys.executable, str(example), str(explained[0]), str(image_file)], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    predictor = Predictor(explained[0], device="cpu")
    result = predictor.explain_arrays(predictor.prepare(image_file)[None])
    where = result["cam"][0, result["probabilities"][0].argmax()]
    row, col = np.unravel_index(where.argmax(), where.shape)
    assert result["fits_no_class"][0] and "looks unlike anything the model was trained on" in out
    assert f"region {row + 1},{col + 1} of a {where.shape[0]}x{where.shape[1]} grid" in out
    plain = subprocess.run([sys.executable, str(example), str(explained[1]), str(image_file)], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert len(plain.strip().splitlines()) == 3 and "region" not in plain


def test_a_map_with_infinite_or_missing_values_still_draws():
    """An uploaded model's map may hold inf or NaN (or float32 extremes whose range overflows): a picture, no error."""
    image = np.full((32, 32, 3), 90, np.uint8)
    for cam in ([[0, np.inf], [0, 0]], [[3e38, -3e38], [0, 0]], [[np.nan] * 2] * 2, [[np.nan, 1], [0, -np.inf]]):
        out = heatmap_overlay(image, np.array(cam, np.float32))
        assert out.shape == image.shape and out.dtype == np.uint8
    hot = heatmap_overlay(image, np.array([[np.nan, 1], [0, -np.inf]], np.float32))
    assert hot[:16, 16:].mean() > hot[16:, :16].mean()  # the one finite high value is the brightest quarter
