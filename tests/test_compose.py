"""A frozen-backbone model composed from the cached backbone graph and the trained head (``export.compose``): the
same file as tracing gives, in a fraction of the time, checked against the head on the training's features, and
refused (the earlier file kept) when the head does not fit those features."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from core.runtime.contract import read_metadata
from core.runtime.files import CACHE_ENV
from core.runtime.model_check import check_structure
from core.runtime.predictor import read_model_info
from export.compose import ComposeError, compose_classifier_proto, feature_map_name
from export.errors import ParityError
from export.onnx_export import cached_backbone_onnx, compose_classifier, export_classifier
from export.variants import build_variants, variant_path
from export.verify import cpu_session, run_onnx
from models.explain import calibrate_ood
from tests.test_export import BACKBONE, CLASSES, SIZE, TRAIN_SEED, VAL_SEED, make_classifier, pattern_images, train_head

OUTPUTS = ["logits", "probabilities", "cam", "ood_score"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory, _session_cache):
    """A head trained on the pattern images, the cached backbone graph's features, the explain calibration, and the
    same classifier exported both ways."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(_session_cache))
        train_images, train_labels = pattern_images(12, TRAIN_SEED)
        val_images, val_labels = pattern_images(6, VAL_SEED)
        classifier = train_head(make_classifier(), train_images, train_labels)
        classifier.freeze_backbone()
        backbone = cpu_session(cached_backbone_onnx(BACKBONE, SIZE))
        train_features = run_onnx(backbone, train_images, output="features")
        val_features = run_onnx(backbone, val_images, output="features")
        ood = calibrate_ood(train_features, train_labels, val_features, len(CLASSES))
        folder = tmp_path_factory.mktemp("compose")
        composed = compose_classifier(classifier, folder / "composed.onnx", image_size=SIZE, classes=CLASSES,
                                      features=val_features, images=val_images, metrics={"val_accuracy": 1.0},
                                      explain=ood)
        traced = export_classifier(classifier, folder / "traced.onnx", image_size=SIZE, classes=CLASSES,
                                   training_mode="pretrained", metrics={"val_accuracy": 1.0}, explain=ood,
                                   parity_images=val_images)
    return dict(classifier=classifier, val_images=val_images, val_features=val_features, ood=ood,
                composed=composed, traced=traced, folder=folder)


def test_the_composed_file_answers_as_the_traced_one(parts):
    images = pattern_images(4, seed=7)[0]  # images neither export was checked on
    composed = cpu_session(parts["composed"]["path"]).run(OUTPUTS, {"image": images})
    traced = cpu_session(parts["traced"]["path"]).run(OUTPUTS, {"image": images})
    for name, a, b in zip(OUTPUTS, composed, traced):
        assert a.shape == b.shape, name
        scale = max(1.0, float(np.abs(b).max()))
        assert np.abs(a - b).max() <= 1e-5 * scale, name
    assert composed[1].argmax(1).tolist() == [0] * 4 + [1] * 4 + [2] * 4  # and it still tells the patterns apart


def test_the_composed_file_has_the_traced_ones_contract(parts):
    composed, traced = (onnx.load(str(parts[k]["path"])) for k in ("composed", "traced"))
    assert read_metadata(parts["composed"]["path"]) == read_metadata(parts["traced"]["path"])
    assert [i.name for i in composed.graph.input] == [i.name for i in traced.graph.input] == ["image"]

    def shapes(model):
        types = [o.type.tensor_type for o in model.graph.output]
        return [(o.name, t.elem_type, [d.dim_value or d.dim_param for d in t.shape.dim])
                for o, t in zip(model.graph.output, types)]
    assert shapes(composed) == shapes(traced)
    assert composed.opset_import[0].version == traced.opset_import[0].version
    info = read_model_info(parts["composed"]["path"])
    assert list(info.classes) == CLASSES and info.ood_threshold == pytest.approx(parts["ood"].threshold)


def test_the_composed_file_passes_the_upload_check_and_its_variants_build(parts, tmp_path):
    check_structure(parts["composed"]["path"])  # the app accepts it back as an upload (operators, sizes, cost)
    images, labels = pattern_images(6, VAL_SEED)
    (int8,) = build_variants(parts["composed"]["path"], pattern_images(12, TRAIN_SEED)[0], images, labels,
                             variants=("int8",))
    assert int8["accepted"], int8["reason"]
    check_structure(variant_path(parts["composed"]["path"], "int8"))


def test_the_composed_parity_is_against_the_head_on_the_features(parts):
    parity = parts["composed"]["parity"]
    assert parity["method"] == "composed" and parity["passed"]
    assert parity["n_images"] == len(parts["val_images"]) and parity["max_abs_diff_probabilities"] < 1e-5
    assert parity["explain"]["passed"] and parity["explain"]["max_abs_diff_ood_score"] < 1e-5


def test_a_head_that_does_not_fit_the_features_is_refused_and_the_earlier_file_kept(parts, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(parts["composed"]["path"].read_bytes())
    before = path.read_bytes()
    wrong = np.roll(parts["val_features"], 6, axis=0)  # the features of other images: the check must notice
    with pytest.raises(ParityError, match="composed graph disagrees"):
        compose_classifier(parts["classifier"], path, image_size=SIZE, classes=CLASSES, features=wrong,
                           images=parts["val_images"])
    assert path.read_bytes() == before


def test_only_a_frozen_backbone_is_composed(parts, tmp_path):
    classifier = make_classifier()
    classifier.unfreeze_last_blocks(1)
    with pytest.raises(ValueError, match="frozen"):
        compose_classifier(classifier, tmp_path / "m.onnx", image_size=SIZE, classes=CLASSES,
                           features=parts["val_features"], images=parts["val_images"])
    assert not (tmp_path / "m.onnx").exists()


def test_graphs_a_head_cannot_be_appended_to_are_refused(parts):
    from onnx import TensorProto, helper

    no_pool = helper.make_graph([helper.make_node("Identity", ["image"], ["features"])], "flat",
                                [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4])],
                                [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])])
    with pytest.raises(ComposeError, match="no global average pooling"):
        feature_map_name(no_pool)
    path = parts["folder"] / "classifier-as-backbone.onnx"  # a classifier: no 'features' output to extend
    path.write_bytes(parts["traced"]["path"].read_bytes())
    with pytest.raises(ComposeError, match="not a backbone graph"):
        compose_classifier_proto(path, np.zeros((3, 1280), np.float32), np.zeros(3, np.float32))
