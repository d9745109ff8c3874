"""Faster variants of an exported FP32 model: offline-optimised graph, INT8 (static, QDQ) and FP16 (CUDA).

A variant is offered only if its top-1 accuracy on the validation images is within ``tolerance`` of the FP32
model's; rejected variants are deleted and the reason recorded.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from core.inference import CPU, CUDA, INPUT_NAME, ModelInfo, read_model_info
from export.onnx_export import set_metadata
from export.verify import evaluate_onnx

log = logging.getLogger(__name__)

VARIANTS = ("optimized", "int8", "fp16")
SUFFIXES = {"optimized": "opt", "int8": "int8", "fp16": "fp16"}
MAX_CALIBRATION_IMAGES = 64
_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds prepared uint8 images ``[N, S, S, 3]`` (``core.preprocess`` rule) to the INT8 calibrator in batches."""

    def __init__(self, images: np.ndarray, *, batch_size: int = 4, max_images: int = MAX_CALIBRATION_IMAGES,
                 seed: int = 0):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f"calibration images must be a non-empty uint8 array [N, S, S, 3], got {images.dtype} "
                             f"{images.shape}; prepare them with core.preprocess.to_array().")
        if len(images) > max_images:  # a fixed random subset keeps calibration time bounded and repeatable
            keep = np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False))
            images = images[keep]
        self.images = images
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


def prepare_images(paths: Sequence[str | os.PathLike[str]], info: ModelInfo) -> np.ndarray:
    """Decode image files and apply the model's resize + centre-crop rule: uint8 ``[N, S, S, 3]``."""
    from core.images import open_rgb
    from core.preprocess import to_array

    return np.stack([to_array(open_rgb(p), info.image_size, info.resize_size, info.interpolation) for p in paths])


def variant_path(fp32_path: str | os.PathLike[str], variant: str) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` (``.opt``, ``.fp16``)."""
    if variant not in SUFFIXES:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}.{SUFFIXES[variant]}{path.suffix}")


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _copy_metadata(src: Path, dst: Path, variant: str) -> None:
    source = onnx.load(str(src), load_external_data=False)
    model = onnx.load(str(dst))
    meta = {p.key: p.value for p in source.metadata_props}
    meta["variant"] = variant
    set_metadata(model, meta)
    onnx.save_model(model, str(dst))


def optimize_model(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, level: str = "extended") -> Path:
    """Save onnxruntime's optimised graph (constant folding, fusions) so sessions start faster.

    ``extended`` fusions target the CPU provider; use ``basic`` for a graph portable to every provider.
    """
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {sorted(_LEVELS)}, got {level!r}.")
    src, dst = Path(src), Path(dst)
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[level]
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), sess_options=options, providers=[CPU])
    _copy_metadata(src, dst, "optimized")
    return dst


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
    pre = _tmp_beside(out.with_name(out.stem + ".pre.onnx"))
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


def cuda_usable() -> bool:
    """True when onnxruntime can actually run a session on CUDA (not just list the provider)."""
    if CUDA not in ort.get_available_providers():
        return False
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the probe's own failure is expected on CPU-only machines
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=[CUDA, CPU])
    except Exception:
        return False
    return session.get_providers()[0] == CUDA


def default_variants() -> tuple[str, ...]:
    return ("int8", "fp16") if cuda_usable() else ("int8",)


def _build(variant: str, src: Path, tmp: Path, calib_images: np.ndarray | None) -> None:
    if variant == "optimized":
        optimize_model(src, tmp)
    elif variant == "int8":
        if calib_images is None or len(calib_images) == 0:
            raise ValueError("no calibration images were given (INT8 needs prepared training images)")
        quantize_int8(src, tmp, calib_images)
    else:
        convert_fp16(src, tmp)
    onnx.checker.check_model(str(tmp), full_check=True)


def build_variants(fp32_path: str | os.PathLike[str], calib_images: np.ndarray | None, val_images: np.ndarray,
                   val_labels: Sequence[int] | np.ndarray, *, tolerance: float = 0.01,
                   variants: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Build each variant beside ``fp32_path`` and keep it only if accuracy drops by at most ``tolerance``.

    Returns one {"variant", "path", "accuracy", "baseline_accuracy", "accuracy_drop", "accepted", "reason"}
    per variant. ``tolerance`` is a fraction (0.01 = one percentage point). Rejected variants (and stale
    files of the same name from an earlier export) are deleted; their ``path`` is None.
    """
    src = Path(fp32_path)
    read_model_info(src)
    variants = tuple(default_variants() if variants is None else variants)
    for v in variants:
        variant_path(src, v)  # validates the name before any work
    val_labels = np.asarray(val_labels)
    have_val = val_images is not None and len(val_images) > 0
    baseline = evaluate_onnx(src, val_images, val_labels) if have_val else None
    on_cuda = cuda_usable() if "fp16" in variants else False
    results = []
    for variant in variants:
        target = variant_path(src, variant)
        tmp = _tmp_beside(target)
        record: dict[str, Any] = {"variant": variant, "path": None, "accuracy": None, "baseline_accuracy": baseline,
                                  "accuracy_drop": None, "accepted": False, "reason": ""}
        try:
            if not have_val:
                raise ValueError("no validation images to measure the accuracy drop on")
            _build(variant, src, tmp, calib_images)
            providers = [CUDA, CPU] if variant == "fp16" and on_cuda else [CPU]
            accuracy = evaluate_onnx(tmp, val_images, val_labels, providers=providers)
        except Exception as exc:  # a variant that cannot be built or run is rejected, never fatal
            tmp.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            record["reason"] = f"not built: {exc}"
            log.warning("%s variant rejected: %s", variant, exc)
            results.append(record)
            continue
        drop = baseline - accuracy
        record.update(accuracy=accuracy, accuracy_drop=drop)
        summary = (f"accuracy {accuracy:.4f} vs FP32 {baseline:.4f} on {len(val_labels)} validation images: "
                   f"drop {drop * 100:.2f} points")
        if drop <= tolerance + 1e-9:
            os.replace(tmp, target)
            record.update(path=str(target), accepted=True, reason=f"{summary} <= {tolerance * 100:.2f} allowed")
        else:
            tmp.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            record["reason"] = f"{summary} > {tolerance * 100:.2f} allowed; deleted"
        results.append(record)
    return results
