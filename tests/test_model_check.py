"""Uploaded models: the structural check (``core.runtime.model_check``) passes every variant this app exports and
refuses hostile files with a message naming the problem; behind it, ``check_model_file``'s child process limits
(memory, CPU time) and ``Predictor``'s per-call time limit stop what would get through."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import models
from core.runtime.model_check import ALLOWED_OPS, DEFAULT_DOMAINS, Limits, UnsafeModelError, check_structure
from core.runtime.predictor import ModelTimeLimitError, Predictor, PredictorCache, check_model_file
from export.onnx_export import export_classifier
from export.variants import VARIANTS, variant_path
from models.explain import calibrate_ood, pooled_features
from tests import hostile_models

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # big enough that the pooled map is 2x2: the exporter's Shape/Range/Gather index graph appears (not at 32)
CLASSES = ["cat", "dog", "fox"]


def export_variants(folder: Path, backbone: str, size: int = SIZE, *, explain: bool = True) -> dict[str, Path]:
    """``backbone`` (random weights: no download) exported at ``size`` px, with the explain outputs as the app
    exports it or plain as the command line does by default, and every variant of ``VARIANTS``."""
    torch.manual_seed(0)
    classifier = models.build_classifier(backbone, len(CLASSES), pretrained=False).eval()
    fp32 = folder / f"{backbone}{'-explained' if explain else ''}.onnx"
    calibration = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    ood = calibrate_ood(pooled_features(classifier, calibration[:3]), np.arange(3), pooled_features(
        classifier, calibration[3:]), len(CLASSES)) if explain else None
    export_classifier(classifier, fp32, image_size=size, classes=CLASSES, training_mode="scratch", explain=ood)
    paths = {}
    for name, variant in VARIANTS.items():
        paths[name] = variant_path(fp32, name)
        if variant.build is not None:
            variant.build(fp32, paths[name], calibration)
    return paths


def ops_of(path: Path) -> set[tuple[str, str]]:
    return {(node.domain, node.op_type) for node in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_variants(tmp_path_factory.mktemp("variants"), models.DEFAULT_BACKBONE)


# ------------------------------------------------------------------------------------------ the app's own exports


def test_every_variant_uses_only_allowed_operators(exported):
    assert set(exported) == set(VARIANTS)
    for name, path in exported.items():
        ops = ops_of(path)
        assert {domain for domain, _ in ops} <= set(DEFAULT_DOMAINS), name
        assert {op for _, op in ops} <= ALLOWED_OPS, f"{name} uses {sorted({op for _, op in ops} - ALLOWED_OPS)}"


def test_every_variant_passes_the_check_and_runs(exported):
    for name, path in exported.items():
        structure = check_structure(path)
        assert structure.image_size == SIZE and 0 < structure.flops < 1e9, name
        info = check_model_file(path)
        assert info["ok"], (name, info)
        assert info["variant"] == name and info["classes"] == CLASSES and info["image_size"] == SIZE


@pytest.mark.slow  # exports four backbones, plain and explained, with three variants each: minutes on two cores
def test_allowlist_is_exactly_what_every_backbone_exports(tmp_path):
    """The allowlist is the union of the ops of every registered backbone's variants, no more (a stale entry would
    widen what uploads may use) and no less (a new exporter op would refuse the app's own files)."""
    used: set[tuple[str, str]] = set()
    for backbone, explain in itertools.product(models.list_backbones(), (False, True)):
        for name, path in export_variants(tmp_path, backbone, explain=explain).items():
            used |= ops_of(path)
            assert check_structure(path).image_size == SIZE, (backbone, name)
    assert {domain for domain, _ in used} <= set(DEFAULT_DOMAINS)
    assert {op for _, op in used} == ALLOWED_OPS


def test_a_plain_classifier_passes(tmp_path):
    path = hostile_models.plain(tmp_path / "plain.onnx")
    structure = check_structure(path)
    assert structure.ops == ("Cast", "Gemm", "ReduceMean", "Softmax") and structure.weight_bytes == 48
    assert check_model_file(path)["ok"]


# ------------------------------------------------------------------------------------------ hostile files


HOSTILE = {
    "constant_of_shape_bomb": r"uses the operator ConstantOfShape, which models exported by this app never use",
    "range_bomb": r"tensor 'bomb' \(output of a Range node\) holds 400,000,000 numbers for a batch of 1 image; "
                  r"the limit is 16,777,216 per image",
    "pixel_sized_range": r"the size of tensor 'big' \(output of a Range node\) is not fixed by the file: it depends "
                         r"on the image's pixel values",
    "pixel_counted_loop": r"uses the operator Loop, which models exported by this app never use",
    "batch_squared_range": r"tensor 'big' .* for a batch of 5 images; the limit is 16,777,216 per image",
    "external_weights": r"its weight 'weights' is stored outside the .onnx file \(external data at "
                        r"'\.\./\.\./etc/passwd'\)",
    "huge_initializer": r"weight tensor 'huge' declares 1,000,000,000 values \(3.73 GB\); the limit for one "
                        r"tensor is 64 MB",
    "pooling_bomb": r"it needs about 3,203 GFLOP per image; the limit is 40 GFLOP",
    "huge_resize": r"its metadata asks for images resized to 1,000,000 pixels before the 32-pixel crop",
}


@pytest.mark.parametrize("builder", sorted(HOSTILE))
def test_hostile_models_are_refused_before_they_run(tmp_path, builder):
    path = getattr(hostile_models, builder)(tmp_path / f"{builder}.onnx")
    assert path.stat().st_size < 2000  # each is tiny: its size says nothing about its cost
    start = time.perf_counter()
    with pytest.raises(UnsafeModelError, match=HOSTILE[builder]) as caught:
        check_structure(path)
    assert time.perf_counter() - start < 2.0
    assert "Upload a model exported by this app" in str(caught.value)
    start = time.perf_counter()
    info = check_model_file(path)
    assert time.perf_counter() - start < 20.0  # one child process start; running some of them takes minutes
    assert not info["ok"]
    assert info["error"] == str(caught.value)


def test_the_server_process_never_reads_the_upload(tmp_path):
    """``check_model_file`` leaves parsing to its child: the server process does not even import onnx for it."""
    path = hostile_models.constant_of_shape_bomb(tmp_path / "m.onnx")
    code = ("import sys\n"
            "from core.runtime.predictor import check_model_file\n"
            "info = check_model_file(sys.argv[1])\n"
            "print(info['ok'], 'onnx' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
    assert out == ["False", "False"]


def test_a_pixel_sized_model_really_passes_on_black_images(tmp_path):
    """Why the check cannot rely on running the model once: on black images the hostile Range is empty."""
    path = hostile_models.pixel_sized_range(tmp_path / "m.onnx")
    predictor = Predictor(path, device="cpu")
    start = time.perf_counter()
    predictor.predict_arrays(np.zeros((2, hostile_models.SIZE, hostile_models.SIZE, 3), np.uint8))
    assert time.perf_counter() - start < 1.0


def test_declared_shapes_are_not_trusted(tmp_path):
    """A file that writes a small shape for its pixel-sized tensor (value_info, outputs) is refused all the same."""
    model = onnx.load(str(hostile_models.pixel_sized_range(tmp_path / "m.onnx")))
    model.graph.value_info.extend([helper.make_tensor_value_info("big", TensorProto.INT64, [1]),
                                   helper.make_tensor_value_info("big_shape", TensorProto.INT64, [1])])
    with pytest.raises(UnsafeModelError, match="size of tensor 'big'"):
        check_structure(model)


@pytest.mark.parametrize(("limits", "message"), [
    (Limits(tensor_bytes=16), r"weight tensor 'weights' declares 3 x 2 values \(24 bytes\); the limit for one "
                              r"tensor is 16 bytes"),
    (Limits(weight_bytes=32), r"its weights declare 48 bytes in all; the limit is 32 bytes"),
    (Limits(tensor_elements=1000), r"tensor 'pixels' \(output of a Cast node\) holds 3,072 numbers for a batch of "
                                   r"1 image; the limit is 1,000 per image"),
    (Limits(total_elements=3000), r"its tensors hold 3,079 numbers in all for a batch of 1 image; the limit is "
                                  r"3,000 per image"),
    (Limits(flops=1000), r"it needs about 6.16 kFLOP per image; the limit is 1 kFLOP"),
    (Limits(image_size=16), r"its input images are 32x32 pixels; the limit is 16"),
    (Limits(nodes=3), r"its graph has 4 operators; the limit is 3"),
    (Limits(file_bytes=100), r"the file is \d+ bytes; the limit is 100 bytes"),
])
def test_each_limit_is_enforced(tmp_path, limits, message):
    path = hostile_models.plain(tmp_path / "plain.onnx")
    with pytest.raises(UnsafeModelError, match=message):
        check_structure(path, limits=limits)


def _plain_model(tmp_path: Path) -> onnx.ModelProto:
    return onnx.load(str(hostile_models.plain(tmp_path / "plain.onnx")))


def test_the_input_must_be_one_uint8_image_batch(tmp_path):
    model = _plain_model(tmp_path)
    model.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.UINT8, ["batch", 32, 32, 1]))
    with pytest.raises(UnsafeModelError, match=r"it has 2 inputs \('image', 'mask'\)"):
        check_structure(model)
    model = _plain_model(tmp_path)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    with pytest.raises(UnsafeModelError, match=r"is not a uint8 image batch"):
        check_structure(model)
    model = _plain_model(tmp_path)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(UnsafeModelError, match=r"fixes the batch size at 1"):
        check_structure(model)
    model = _plain_model(tmp_path)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "width"
    with pytest.raises(UnsafeModelError, match=r"its input has shape \['N', 32, '\?', 3\]"):
        check_structure(model)


def test_functions_subgraphs_and_foreign_domains_are_refused(tmp_path):
    model = _plain_model(tmp_path)
    model.graph.node[-1].domain = "com.evil"
    with pytest.raises(UnsafeModelError, match=r"uses the operator com.evil:Softmax"):
        check_structure(model)
    model = _plain_model(tmp_path)
    model.functions.append(helper.make_function("local", "F", ["x"], ["y"],
                                                [helper.make_node("Identity", ["x"], ["y"])],
                                                [helper.make_opsetid("", 18)]))
    with pytest.raises(UnsafeModelError, match=r"defines its own ONNX functions \(local.F\)"):
        check_structure(model)
    model = _plain_model(tmp_path)
    body = helper.make_graph([], "g", [], [])
    model.graph.node[-1].attribute.append(helper.make_attribute("then_branch", body))
    with pytest.raises(UnsafeModelError, match=r"a Softmax node holds a sub-graph"):
        check_structure(model)


def test_a_damaged_file_is_refused(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x08\x01\x12\xff\xffgarbage")
    with pytest.raises(UnsafeModelError, match="not a readable ONNX file"):
        check_structure(path)


# ------------------------------------------------------------------------------------------ the limits behind it


@pytest.mark.parametrize(("builder", "limits", "message"), [
    ("pixel_sized_range", {"memory_bytes": 1024 ** 3}, "needed more than 1 GB of memory when it was checked"),
    ("constant_of_shape_bomb", {"memory_bytes": 1024 ** 3}, "needed more than 1 GB of memory when it was checked"),
    ("pixel_counted_loop", {"cpu_seconds": 2}, "used more than 2 s of CPU time"),
])
def test_without_the_structural_check_the_child_limits_stop_them(tmp_path, builder, limits, message):
    """Defence in depth: were a hostile model to pass the structural check, the check's child process still runs
    it on random pixels (not only black ones) under an address-space and a CPU-time limit."""
    path = getattr(hostile_models, builder)(tmp_path / f"{builder}.onnx")
    start = time.perf_counter()
    info = check_model_file(path, structural=False, **limits)
    assert time.perf_counter() - start < 30.0
    assert not info["ok"] and message in info["error"], info


def test_the_time_limit_stops_a_slow_call_and_the_predictor_still_works(exported):
    path = exported["fp32"]
    images = np.random.default_rng(0).integers(0, 256, (64, SIZE, SIZE, 3), dtype=np.uint8)
    predictor = Predictor(path, device="cpu", time_limit=0.001)
    with pytest.raises(ModelTimeLimitError, match=r"took longer than 0.001 s to classify 64 images and was stopped"):
        predictor.predict_arrays(images)
    predictor.time_limit = None
    unlimited = predictor.predict_arrays(images)
    predictor.time_limit = 60.0
    np.testing.assert_allclose(predictor.predict_arrays(images), unlimited, atol=1e-6)
    with pytest.raises(ValueError, match="time_limit must be a number of seconds > 0"):
        Predictor(path, device="cpu", time_limit=0)


def test_the_cache_keeps_limited_and_unlimited_predictors_apart(exported):
    cache = PredictorCache()
    limited = cache.get(exported["fp32"], "cpu", time_limit=10.0)
    assert limited.time_limit == 10.0 and cache.get(exported["fp32"], "cpu", time_limit=10.0) is limited
    assert cache.get(exported["fp32"], "cpu").time_limit is None and cache.loads == 2
