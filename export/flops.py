"""Floating-point operations of one image through an exported model, counted once from its ONNX graph.

Only the operations that dominate a CNN are counted, as multiply-adds x 2: Conv (per output element, its input
channels per group x kernel area), Gemm and MatMul. Element-wise ops, pooling and the in-graph preprocessing are
left out (well under 1% of the total here). ``python -m export bench`` divides this by the measured time to give
GFLOP/s, and by a measured SGEMM rate to say how close a run comes to what the CPU can do.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnx


def _dims(value: onnx.ValueInfoProto) -> list[int] | None:
    shape = value.type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return None if any(d is None for d in dims) else dims


def count_flops(model: onnx.ModelProto | str | os.PathLike[str]) -> int:
    """FLOPs of one image (batch 1): 2 x the multiply-adds of every Conv, Gemm and MatMul."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(Path(model)))
    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's model stays as it was
    # batch 1: the inputs' first axis, and every axis named as one of them (typed values inside, outputs)
    firsts = [v.type.tensor_type.shape.dim[0] for v in model.graph.input if v.type.tensor_type.shape.dim]
    batch = {d.dim_param for d in firsts if d.dim_param}
    for dim in firsts:
        if not dim.HasField("dim_value"):
            dim.dim_value = 1
    for value in [*model.graph.value_info, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in batch:
                dim.dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: _dims(v) for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    shapes.update({i.name: list(i.dims) for i in inferred.graph.initializer})
    total = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type == "Conv":
            weight = shapes.get(node.input[1])
            if weight:  # [out channels, in channels / group, kh, kw]
                total += 2 * math.prod(out) * math.prod(weight[1:])
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            if a:
                trans_a = any(x.name == "transA" and x.i for x in node.attribute)
                k = a[-2] if trans_a else a[-1]
                total += 2 * math.prod(out) * k
    return int(total)
