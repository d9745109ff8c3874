"""Hostile ONNX classifiers for the upload checks (``core.runtime.model_check``, ``check_model_file``).

Each is a few hundred bytes, carries this app's metadata and the contract's input and outputs (uint8 ``image``
``[N, S, S, 3]`` -> ``logits``, ``probabilities``), so only its hostile part can be the reason to refuse it. The
shared part is a real classifier: mean colour -> Gemm -> Softmax. The hostile part computes a number that is
added to the logits (a zero, once it has cost what it costs), so onnxruntime cannot skip it.

Never run one without the limits of ``check_model_file``: that is the point of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from core.runtime.contract import FORMAT, set_metadata

SIZE = 32
CLASSES = ["red", "blue"]


def _const(name: str, value, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def classifier(path: Path, hostile_nodes: list[onnx.NodeProto], hostile_initializers: list[onnx.TensorProto],
               extra: str | None, *, opset: int = 18) -> Path:
    """The shared classifier; ``extra`` (a float tensor that broadcasts to ``[N, 2]``) is added to the logits."""
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "hw_axes"], ["colour"], keepdims=0),
        helper.make_node("Gemm", ["colour", "weights", "bias"], ["raw_logits" if extra else "logits"]),
        *hostile_nodes,
    ]
    if extra:
        nodes.append(helper.make_node("Add", ["raw_logits", extra], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    initializers = [
        _const("hw_axes", [1, 2]),
        numpy_helper.from_array(np.array([[0.05, -0.05], [0, 0], [-0.05, 0.05]], np.float32), "weights"),
        numpy_helper.from_array(np.zeros(2, np.float32), "bias"),
        *hostile_initializers,
    ]
    graph = helper.make_graph(
        nodes, "hostile",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    set_metadata(model, {"format": FORMAT, "kind": "classifier", "image_size": str(SIZE),
                         "resize_size": str(SIZE), "interpolation": "bilinear", "classes": json.dumps(CLASSES),
                         "training_mode": "pretrained", "variant": "fp32", "backbone": "hostile"})
    path.write_bytes(model.SerializeToString())  # not onnx.save: it would follow external data (hostile iii)
    return path


def plain(path: Path) -> Path:
    """The shared classifier alone: every check passes it."""
    return classifier(path, [], [], None)


def constant_of_shape_bomb(path: Path, gigabytes: float = 1.5) -> Path:
    """(i) A constant computed from constants: onnxruntime folds it while creating the session, so the server
    holds ``gigabytes`` of zeros before the first image, from a file of a few hundred bytes."""
    n = int(gigabytes * 1e9 / 4)
    return classifier(path, [
        helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"],
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("ReduceMean", ["bomb"], ["bomb_mean"], keepdims=0),
    ], [_const("bomb_shape", [n])], "bomb_mean")


def range_bomb(path: Path, elements: int = 400_000_000) -> Path:
    """(i, with allowed operators only) ``Range(0, elements)`` of constants: also folded at load; refused by the
    size bound, since every operator in it is one the app's exports use."""
    return classifier(path, [
        helper.make_node("Range", ["zero", "bomb_end", "one"], ["bomb"]),
        helper.make_node("Cast", ["bomb"], ["bomb_float"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["bomb_float"], ["bomb_mean"], keepdims=0),
        helper.make_node("Mul", ["bomb_mean", "zero_float"], ["bomb_zero"]),
    ], [_const("zero", 0), _const("bomb_end", elements), _const("one", 1), _const("zero_float", 0, np.float32)],
        "bomb_zero")


def pixel_sized_range(path: Path, numbers_per_level: int = 3_000_000) -> Path:
    """(ii) Allocation from the pixel values: ``Range(0, mean pixel * numbers_per_level)`` int64. A black image
    makes it empty (the check on zeros passes in microseconds); a mid-grey one allocates
    ``127.5 * numbers_per_level * 8`` bytes (3 GB by default)."""
    return classifier(path, [
        helper.make_node("ReduceMean", ["pixels"], ["level"], keepdims=0),
        helper.make_node("Mul", ["level", "per_level"], ["count_float"]),
        helper.make_node("Cast", ["count_float"], ["count"], to=TensorProto.INT64),
        helper.make_node("Range", ["zero", "count", "one"], ["big"]),
        helper.make_node("Shape", ["big"], ["big_shape"]),
        helper.make_node("Cast", ["big_shape"], ["big_size"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["big_size", "zero_float"], ["big_zero"]),
    ], [_const("per_level", numbers_per_level, np.float32), _const("zero", 0), _const("one", 1),
        _const("zero_float", 0, np.float32)], "big_zero")


def batch_squared_range(path: Path, numbers_per_square: int = 4 * 1024 ** 2) -> Path:
    """A size computed from the batch size alone, but growing with its square: ``Range(0, N * N * k)``. Small
    enough for a batch of 1, over the per-image bound from a batch of 5 (``k`` = a quarter of the default bound)."""
    return classifier(path, [
        helper.make_node("Shape", ["image"], ["n"], start=0, end=1),
        helper.make_node("Mul", ["n", "n"], ["n2"]),
        helper.make_node("Mul", ["n2", "per_square"], ["count_1d"]),
        helper.make_node("Squeeze", ["count_1d"], ["count"]),
        helper.make_node("Range", ["zero", "count", "one"], ["big"]),
        helper.make_node("Shape", ["big"], ["big_shape"]),
        helper.make_node("Cast", ["big_shape"], ["big_size"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["big_size", "zero_float"], ["big_zero"]),
    ], [_const("per_square", [numbers_per_square]), _const("zero", 0), _const("one", 1),
        _const("zero_float", 0, np.float32)], "big_zero")


def pixel_counted_loop(path: Path, iterations_per_level: int = 10_000_000) -> Path:
    """(ii) Time from the pixel values: a ``Loop`` of ``mean pixel * iterations_per_level`` additions. Zero
    iterations on a black image; minutes of CPU on any other."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "step"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [])],
        [_const("step", 0, np.float32)])
    return classifier(path, [
        helper.make_node("ReduceMean", ["pixels"], ["level"], keepdims=0),
        helper.make_node("Mul", ["level", "per_level"], ["trips_float"]),
        helper.make_node("Cast", ["trips_float"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trips", "true", "acc0"], ["acc"], body=body),
    ], [_const("per_level", iterations_per_level, np.float32), _const("true", True, np.bool_),
        _const("acc0", 0, np.float32)], "acc")


def pooling_bomb(path: Path, kernel: int = 1024, pad: int = 1000) -> Path:
    """Cost that no output size shows: a MaxPool whose padded window covers ``kernel`` x ``kernel`` pixels for
    each of about a million outputs per channel (~3 TFLOP per image), on a 32-pixel image."""
    return classifier(path, [
        helper.make_node("Transpose", ["pixels"], ["planes"], perm=[0, 3, 1, 2]),
        helper.make_node("MaxPool", ["planes"], ["pooled"], kernel_shape=[kernel, kernel], pads=[pad] * 4),
        helper.make_node("ReduceMean", ["pooled"], ["pooled_mean"], keepdims=0),
        helper.make_node("Mul", ["pooled_mean", "zero_float"], ["pooled_zero"]),
    ], [_const("zero_float", 0, np.float32)], "pooled_zero")


def huge_resize(path: Path, resize_size: int = 1_000_000) -> Path:
    """A harmless graph whose metadata tells the server to resize every image to ``resize_size`` pixels (shorter
    side) before the crop: the cost falls on the server's image code, not on onnxruntime."""
    plain(path)
    model = onnx.load(str(path))
    set_metadata(model, {"resize_size": str(resize_size)})
    path.write_bytes(model.SerializeToString())
    return path


def external_weights(path: Path, location: str = "../../etc/passwd") -> Path:
    """(iii) A weight stored "outside" the file: onnxruntime would read it from ``location``, relative to the
    model's folder."""
    plain(path)
    model = onnx.load(str(path), load_external_data=False)
    (weights,) = [t for t in model.graph.initializer if t.name == "weights"]
    weights.ClearField("raw_data")
    weights.ClearField("float_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "24")):
        weights.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())
    return path


def huge_initializer(path: Path, declared_gigabytes: float = 4.0) -> Path:
    """(iv) A weight that declares ``declared_gigabytes`` of float32 but stores 4 bytes: the check must refuse it
    on the declared size, without reading (or being able to read) the data."""
    n = int(declared_gigabytes * 1e9 / 4)
    big = onnx.TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[n], raw_data=b"\0\0\0\0")
    return classifier(path, [
        helper.make_node("ReduceMean", ["huge"], ["huge_mean"], keepdims=0),
    ], [big], "huge_mean")
