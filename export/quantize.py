"""The builders of an exported FP32 model's variants: INT8 (static, QDQ, calibrated on training images) and FP16
(for CUDA). Which variants exist, their file names and when one is kept: ``export.variants``.
"""

from __future__ import annotations

import os
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

from core.runtime.contract import INPUT_NAME, read_metadata, set_metadata
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

    def __init__(self, images: np.ndarray, *, batch_size: int = 4, max_images: int = MAX_CALIBRATION_IMAGES):
        images = check_batch(images, what="calibration images")
        self.images = images[calibration_indices(len(images), max_images)]
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


def _float_only_nodes(model_path: Path) -> list[str]:
    """Nodes kept in float: the in-graph preprocessing before the first Conv (quantized element-wise ops on the
    full-size image cost more than they save) and the head (Gemm/MatMul, Softmax: tiny, keeps outputs exact)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    before_conv = {i.name for i in graph.input}
    keep = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type in ("Gemm", "MatMul", "Softmax"):
            keep.append(node.name)
        elif node.op_type != "Conv" and any(i in before_conv for i in node.input):
            before_conv.update(node.output)
            keep.append(node.name)
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


def quantize_int8(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str], calib_images: np.ndarray, *,
                  per_channel: bool = True, calibrate_method: CalibrationMethod = CalibrationMethod.MinMax,
                  max_calibration_images: int = MAX_CALIBRATION_IMAGES) -> Path:
    """Static INT8 quantization (QDQ, per-channel weights) calibrated on prepared uint8 training images."""
    src, out = Path(fp32_path), Path(out_path)
    reader = ImageCalibrationReader(calib_images, max_images=max_calibration_images)
    pre = temp_path(out.with_name(out.stem + ".pre.onnx"))
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        float_nodes = _float_only_nodes(pre)
        quantize_static(
            str(pre), str(out), reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method,
            nodes_to_exclude=float_nodes,
        )
        _scalarize_preprocessing(out, float_nodes)
    finally:
        pre.unlink(missing_ok=True)
    _copy_metadata(src, out, "int8")
    return out


def convert_fp16(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """FP16 weights and compute for CUDA; the uint8 input and float32 outputs keep their types."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, out = Path(fp32_path), Path(out_path)
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save_model(model, str(out))
    _copy_metadata(src, out, "fp16")
    return out
