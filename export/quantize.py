"""The builders of an exported FP32 model's variants: INT8 (static, QDQ, calibrated on training images) and FP16
(for CUDA). Which variants exist, their file names and when one is kept: ``export.variants``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from core.runtime.contract import CAM_OUTPUT, INPUT_NAME, OUTPUT_NAMES, read_metadata, set_metadata
from core.runtime.files import temp_path
from core.runtime.images import check_batch

# Enough images to see each activation's range; more costs calibration time for little change.
MAX_CALIBRATION_IMAGES = 64


def calibration_indices(n: int, limit: int = MAX_CALIBRATION_IMAGES) -> np.ndarray:
    """Which of ``n`` training images calibrate INT8: all of them up to ``limit``, else ``limit`` evenly spaced ones
    (the split lists images class by class, so an even spread covers every class; and it is repeatable)."""
    return np.linspace(0, n - 1, min(limit, n), dtype=int) if n else np.zeros(0, dtype=int)


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds prepared uint8 images ``[N, S, S, 3]`` (``core.runtime.images`` rule) to the INT8 calibrator in batches;
    at most ``max_images`` of them, picked by ``calibration_indices``."""

    def __init__(self, images: np.ndarray, *, batch_size: int = 4, max_images: int | None = MAX_CALIBRATION_IMAGES):
        images = check_batch(images, what="calibration images")
        self.images = images if max_images is None else images[calibration_indices(len(images), max_images)]
        self.batch_size = batch_size
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        batch = self.images[self._next:self._next + self.batch_size]
        self._next += self.batch_size
        return {INPUT_NAME: np.ascontiguousarray(batch)}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)


def _copy_metadata(src: Path, dst: Path, variant: str) -> None:
    model = onnx.load(str(dst))
    meta = read_metadata(src)
    meta["variant"] = variant
    set_metadata(model, meta)
    onnx.save_model(model, str(dst))


def _float_only_nodes(model_path: Path, *, first_conv: bool = False, depthwise: bool = False,
                      last_conv: bool = False) -> list[str]:
    """Nodes kept in float: the in-graph preprocessing before the first Conv (quantized element-wise ops on the
    full-size image cost more than they save), the head (Gemm/MatMul, Softmax: tiny, keeps outputs exact) and the
    class activation maps' 1x1 convolution (the head's weights, kept equal to them by ``refit_head``); with
    ``first_conv``, the first convolution too (it sees the raw image, the widest-ranged activations); with
    ``depthwise``, every depthwise convolution (``group`` > 1); with ``last_conv``, the backbone's last convolution
    (the one before the maps' 1x1 convolution), whose output is averaged into the head's features."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    before_conv = {i.name for i in graph.input}
    keep = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type in ("Gemm", "MatMul", "Softmax") or CAM_OUTPUT in node.output:
            keep.append(node.name)
        elif node.op_type == "Conv" and first_conv and any(i in before_conv for i in node.input):
            keep.append(node.name)
            first_conv = False
        elif node.op_type == "Conv" and depthwise and any(a.name == "group" and a.i > 1 for a in node.attribute):
            keep.append(node.name)
        elif node.op_type != "Conv" and any(i in before_conv for i in node.input):
            before_conv.update(node.output)
            keep.append(node.name)
    if last_conv:
        convs = [n.name for n in graph.node if n.op_type == "Conv" and CAM_OUTPUT not in n.output]
        keep += convs[-1:]
    return keep


def _scalarize_preprocessing(path: Path, node_names: list[str]) -> None:
    """Per-channel constants of the in-graph normalisation that are equal in every channel become scalars.

    Exact (same broadcast result), and much faster once onnxruntime moves these ops into the NHWC layout of
    its INT8 convolutions, where broadcasting a 3-vector over the last axis is slow.
    """
    model = onnx.load(str(path))
    graph = model.graph
    names = set(node_names)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info]
             if v.type.tensor_type.HasField("shape")}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    changed = set()
    for init in graph.initializer:
        nodes = users.get(init.name, [])
        if len(init.dims) < 2 or not nodes or any(
            n.name not in names or n.op_type not in ("Mul", "Add", "Sub", "Div") or len(n.input) != 2
            or ranks.get(next(i for i in n.input if i != init.name), 0) < len(init.dims)
            for n in nodes
        ):
            continue  # only constants whose every use keeps its output shape when the constant is a scalar
        values = onnx.numpy_helper.to_array(init)
        if values.size > 1 and np.all(values == values.flat[0]):
            init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(values.flat[0], dtype=values.dtype), init.name))
            changed.add(init.name)
    if changed:
        stale = [v for v in model.graph.value_info if v.name in changed]
        for v in stale:
            model.graph.value_info.remove(v)
        onnx.save_model(model, str(path))


@dataclass(frozen=True)
class Int8Recipe:
    """How an INT8 model is made. The defaults are the recipe measured best in ``scripts/bench_int8.py`` (README,
    "INT8"): 7-bit signed weights ("reduced range") and unsigned 8-bit activations. With full 8-bit signed weights,
    x86 CPUs without VNNI add pairs of u8*s8 products in 16 bits, which saturate: on the dev textures that cost 5.7
    points of agreement with FP32 (88.8% against 94.5%). Unsigned weights avoid it too (95.5%) but onnxruntime has
    no fast u8*u8 convolution on AVX2: 10x slower than FP32 there. All training images, mirrors, Entropy or
    Percentile calibration, float first or last convolutions and a head refit each moved agreement by about a point
    or less."""

    max_images: int | None = MAX_CALIBRATION_IMAGES  # calibration images (evenly spread); None: all given
    flips: bool = False  # also calibrate on the mirror images
    method: str = "MinMax"  # onnxruntime CalibrationMethod: MinMax, Entropy or Percentile
    reduce_range: bool = True  # 7-bit weights: no 16-bit overflow in u8*s8 pair sums (AVX2 without VNNI)
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    first_conv_float: bool = False  # keep the convolution that sees the image in float
    depthwise_float: bool = False  # keep depthwise convolutions (one filter per channel, few weights) in float
    last_conv_float: bool = False  # keep the last backbone convolution (its output is the pooled features) in float
    head_refit: bool = False  # refit the float head on the INT8 backbone's features (``refit_head``)

    def describe(self) -> str:
        images = "all" if self.max_images is None else f"{self.max_images}"
        parts = [f"{images} training images{' + mirrors' if self.flips else ''}", self.method,
                 f"{self.activation_type[1:]}/{self.weight_type[1:]}"]
        parts += ["reduced range"] * self.reduce_range + ["first conv in float"] * self.first_conv_float
        parts += ["depthwise in float"] * self.depthwise_float + ["last conv in float"] * self.last_conv_float
        parts += ["head refit on INT8 features"] * self.head_refit
        return ", ".join(parts)


DEFAULT_RECIPE = Int8Recipe()


def calibration_set(images: np.ndarray, recipe: Int8Recipe) -> np.ndarray:
    """The images a recipe calibrates (and refits the head) on: its spread subset, plus their mirrors."""
    images = check_batch(images, what="calibration images")
    if recipe.max_images is not None:
        images = images[calibration_indices(len(images), recipe.max_images)]
    return np.concatenate([images, images[:, :, ::-1]]) if recipe.flips else images


def quantize_int8(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str], calib_images: np.ndarray, *,
                  recipe: Int8Recipe = DEFAULT_RECIPE, per_channel: bool = True) -> Path:
    """Static INT8 quantization (QDQ, per-channel weights) calibrated on prepared uint8 training images."""
    src, out = Path(fp32_path), Path(out_path)
    images = calibration_set(calib_images, recipe)
    reader = ImageCalibrationReader(images, max_images=None)  # calibration_set already picked them
    pre = temp_path(out.with_name(out.stem + ".pre.onnx"))
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        float_nodes = _float_only_nodes(pre, first_conv=recipe.first_conv_float, depthwise=recipe.depthwise_float,
                                       last_conv=recipe.last_conv_float)
        quantize_static(
            str(pre), str(out), reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=QuantType[recipe.activation_type],
            weight_type=QuantType[recipe.weight_type],
            calibrate_method=CalibrationMethod[recipe.method],
            nodes_to_exclude=float_nodes,
        )
        _scalarize_preprocessing(out, float_nodes)
    finally:
        pre.unlink(missing_ok=True)
    if recipe.head_refit:
        refit_head(out, src, images)
    _copy_metadata(src, out, "int8")
    return out


def _head(graph: onnx.GraphProto) -> tuple[onnx.NodeProto, dict[str, onnx.TensorProto]]:
    """The classifier's head: the Gemm that writes the logits, and the graph's initializers by name."""
    heads = [n for n in graph.node if n.op_type == "Gemm" and OUTPUT_NAMES[0] in n.output]
    if len(heads) != 1:
        raise ValueError("the model has no single Gemm head writing 'logits'; it was not made by export_classifier.")
    return heads[0], {i.name: i for i in graph.initializer}


def _session_outputs(model: onnx.ModelProto, names: list[str], images: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    parts = [session.run(names, {INPUT_NAME: images[i:i + batch]}) for i in range(0, len(images), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]


# Ridge strength of the head refit, relative to the features' mean energy (a scale-free choice: 1e-2 moved
# agreement least across the dev sets, see scripts/bench_int8.py).
REFIT_RIDGE = 1e-2


def refit_head(int8_path: str | os.PathLike[str], fp32_path: str | os.PathLike[str], images: np.ndarray, *,
               ridge: float = REFIT_RIDGE) -> None:
    """Distil the FP32 model's head into the INT8 model's, on the INT8 backbone's own features.

    The float head (Gemm weights W, bias b, and the class-activation-map weights that share W) is refit in place so
    that ``W' f_int8 + b'`` matches the FP32 model's logits on ``images``: ridge regression towards the original
    head, closed form (centred features, so b' absorbs the mean shift). Labels are not needed: the target is what
    the FP32 model said, which is what the INT8 model must agree with.
    """
    int8_path = Path(int8_path)
    fp32 = onnx.load(str(fp32_path))
    int8 = onnx.load(str(int8_path))
    head, inits = _head(int8.graph)
    features_name = head.input[0]
    (target,) = _session_outputs(fp32, [OUTPUT_NAMES[0]], images)
    (feats,) = _session_outputs(int8, [features_name], images)
    weight = onnx.numpy_helper.to_array(inits[head.input[1]]).astype(np.float64)
    trans_b = next((a.i for a in head.attribute if a.name == "transB"), 0)
    w = weight if trans_b else weight.T  # [classes, features]
    bias = onnx.numpy_helper.to_array(inits[head.input[2]]).astype(np.float64)
    x = feats.astype(np.float64)
    mean = x.mean(0)
    xc = x - mean
    residual = target.astype(np.float64) - (x @ w.T + bias)
    lam = ridge * float((xc ** 2).sum(1).mean())
    # argmin_D |xc D^T - (residual - mean residual)|^2 + lam |D|^2, then W' = W + D, b' = b + mean residual - D mean
    r_mean = residual.mean(0)
    gram = xc @ xc.T + lam * np.eye(len(xc))  # the dual form: N x N (N images < feature width)
    delta = (xc.T @ np.linalg.solve(gram, residual - r_mean)).T
    new_w = w + delta
    new_b = bias + r_mean - delta @ mean
    inits[head.input[1]].CopyFrom(onnx.numpy_helper.from_array(
        (new_w if trans_b else new_w.T).astype(np.float32), head.input[1]))
    inits[head.input[2]].CopyFrom(onnx.numpy_helper.from_array(new_b.astype(np.float32), head.input[2]))
    cam = [n for n in int8.graph.node if CAM_OUTPUT in n.output]
    if cam:  # the maps use the same weights as a 1x1 convolution: keep them the head's
        name = next(i for i in cam[0].input if i in inits)
        shape = tuple(inits[name].dims)
        inits[name].CopyFrom(onnx.numpy_helper.from_array(new_w.astype(np.float32).reshape(shape), name))
    onnx.save_model(int8, str(int8_path))


def convert_fp16(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """FP16 weights and compute for CUDA; the uint8 input and float32 outputs keep their types."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, out = Path(fp32_path), Path(out_path)
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save_model(model, str(out))
    _copy_metadata(src, out, "fp16")
    return out
