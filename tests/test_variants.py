"""The variants table (export.variants.VARIANTS): file names, what Triton serves each on, names build_variants
refuses, and that naming a variant's file needs none of the quantization tools."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.runtime.contract import FORMAT, read_metadata, set_metadata
from core.runtime.predictor import Predictor
from export.triton import write_triton_repository
from export.variants import VARIANTS, build_variants, variant_path

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
CLASSES = ["red", "green", "blue"]


def tiny_classifier(path: Path, variant: str = "fp32") -> Path:
    """A transfer-lab classifier file without torch: mean colour -> logits; enough for everything but accuracy."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["pixels", "axes"], ["colour"], keepdims=0),
         helper.make_node("MatMul", ["colour", "weights"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
         numpy_helper.from_array(np.eye(3, dtype=np.float32) / 10, "weights")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    set_metadata(model, {"format": FORMAT, "kind": "classifier", "image_size": str(SIZE),
                         "resize_size": str(SIZE + 4), "interpolation": "bilinear", "classes": json.dumps(CLASSES),
                         "training_mode": "pretrained", "variant": variant})
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


def test_tiny_classifier_is_a_working_model(tmp_path):
    predictor = Predictor(tiny_classifier(tmp_path / "model.onnx"), device="cpu")
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[..., 1] = 255
    assert predictor.predict([image])[0]["label"] == "green"


def test_variant_path_needs_no_quantization_tools():
    """The app names variant files for its download buttons without loading onnxruntime's quantization tools
    (slow to import) or torch."""
    code = ("import sys\n"
            "from export.variants import variant_path\n"
            "print(variant_path('runs/a/model.onnx', 'int8').as_posix())\n"
            "print(sorted(m for m in sys.modules if m.startswith(('onnxruntime.quantization', 'export.quantize'))"
            " or m.split('.')[0] == 'torch'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.splitlines()
    assert out == ["runs/a/model.int8.onnx", "[]"]


def test_every_variant_has_its_own_onnx_file(tmp_path):
    files = {}
    for stem in ("model", "model-scratch"):  # both arms of a run share its folder
        fp32 = tmp_path / f"{stem}.onnx"
        assert variant_path(fp32, "fp32") == fp32
        for name in VARIANTS:
            path = variant_path(fp32, name)
            assert path.parent == tmp_path and path.name.endswith(".onnx"), path
            files[(stem, name)] = path
    assert len(set(files.values())) == len(files) == 2 * len(VARIANTS)
    with pytest.raises(ValueError, match=r"variant must be one of .*'int8'.*got 'int4'"):
        variant_path(tmp_path / "model.onnx", "int4")


def _instance_kind(model: Path, out: Path) -> str | None:
    config = (write_triton_repository(model, out, model_name="m") / "config.pbtxt").read_text()
    (group,) = re.findall(r"instance_group \[\s*\{([^}]*)\}", config)
    kinds = re.findall(r"kind: (\w+)", group)
    assert len(kinds) <= 1 and "count: 1" in group
    return kinds[0] if kinds else None


@pytest.mark.parametrize(("variant", "kind"), [
    ("fp32", None),  # no kind line: KIND_AUTO, Triton puts it on a GPU when it has one
    ("int8", "KIND_CPU"),  # the INT8 graph is built for CPUs (VNNI/AMX); on a GPU it would run slower
    ("fp16", "KIND_GPU"),  # FP16 on a CPU only adds casts
    ("bf16", None),  # a variant this version does not know: Triton decides
])
def test_triton_instance_kind_follows_the_files_variant(tmp_path, variant, kind):
    path = tiny_classifier(tmp_path / "model.onnx")
    copy = onnx.load(str(path))
    set_metadata(copy, {"variant": variant})
    onnx.save_model(copy, str(tmp_path / "copy.onnx"))
    assert read_metadata(tmp_path / "copy.onnx")["variant"] == variant
    assert _instance_kind(tmp_path / "copy.onnx", tmp_path / "repo") == kind


@pytest.mark.parametrize(("names", "message"), [
    (("fp32",), r"'fp32' is the export itself, not a variant to build; pick from \[.*'int8'"),
    (("int4",), r"variant must be one of \[.*'int8'.*\], got 'int4'"),
    (("int8", "int4"), r"got 'int4'"),  # every name is checked before anything is built
])
def test_build_variants_refuses_what_it_cannot_build(tmp_path, names, message):
    path = tiny_classifier(tmp_path / "model.onnx")
    images = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        build_variants(path, images, images, [0, 0], variants=names)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_cuda_probe_model_loads_in_this_onnxruntime():
    # cuda_usable() asks onnxruntime to open this model on CUDA; if onnxruntime cannot read it at all (a newer IR
    # version than it supports), every GPU machine is told CUDA is unusable and no FP16 variant is ever built.
    import onnxruntime as ort

    from export.variants import probe_model

    session = ort.InferenceSession(probe_model(), providers=["CPUExecutionProvider"])
    x = np.array([1.5], dtype=np.float32)
    assert session.run(None, {"x": x})[0] == x
