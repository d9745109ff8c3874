"""A frozen-backbone classifier's ONNX graph, composed from parts instead of traced again.

The cached backbone graph (``export.onnx_export.cached_backbone_onnx``: uint8 ``image`` -> pooled ``features``, the
preprocessing inside, checked against PyTorch once when it was built) already holds every weight of a frozen-backbone
classifier but the head. Its classifier is that graph plus the trained linear head, so the export appends the head as
a few ONNX nodes (``Gemm``, ``Softmax``; with the explain outputs also a 1x1 ``Conv`` for the class activation maps
and the cosine score of ``models.explain``) in well under a second, where tracing the whole network again with
``torch.onnx`` took most of a run's export time.

Only onnx and numpy are used here; ``export.onnx_export.compose_classifier`` checks the result against the torch
head applied to the features the training computed with the same backbone graph.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from core.runtime.contract import CAM_OUTPUT, FEATURES_OUTPUT, OOD_OUTPUT, OUTPUT_NAMES

_EPS = 1e-12  # as models.explain._unit: x * rsqrt(max(sum x^2, eps))
_POOLS = ("ReduceMean", "GlobalAveragePool")


class ComposeError(ValueError):
    """The backbone graph is not one a head can be appended to (no ``features`` output, or no pooling to map)."""


def feature_map_name(graph: onnx.GraphProto) -> str:
    """The last feature map's name: the input of the global average pooling that ``features`` is computed from
    (every registered backbone ends in one, ``models.backbones``)."""
    producer = {out: node for node in graph.node for out in node.output}
    todo, seen = [FEATURES_OUTPUT], set()
    while todo:  # breadth-first towards the input: the nearest pooling wins
        name = todo.pop(0)
        node = producer.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        if node.op_type in _POOLS:
            return node.input[0]
        todo.extend(node.input)
    raise ComposeError("the backbone graph has no global average pooling before 'features'; its class activation "
                       "maps cannot be composed (export with tracing instead).")


def _spatial_dims(model: onnx.ModelProto, name: str) -> tuple[int | str, int | str]:
    """The height and width of tensor ``name`` as shape inference gives them (symbolic names where it cannot)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    for info in inferred.graph.value_info:
        dims = info.type.tensor_type.shape.dim
        if info.name == name and len(dims) == 4:
            return tuple(d.dim_value or d.dim_param or sym for d, sym in zip(dims[2:], ("cam_height", "cam_width")))
    return "cam_height", "cam_width"


def compose_classifier_proto(backbone_path: str | os.PathLike[str], weight: np.ndarray, bias: np.ndarray, *,
                             centroids: np.ndarray | None = None) -> onnx.ModelProto:
    """The backbone graph at ``backbone_path`` with a linear head (``weight`` ``[K, D]``, ``bias`` ``[K]``) appended:
    outputs ``logits`` and ``probabilities``, and with ``centroids`` (``[K, D]``, unit rows) also ``cam``
    ``[N, K, h, w]`` and ``ood_score`` ``[N]``, as ``models.explain.ExplainedClassifier`` computes them. The
    metadata is left empty, for the caller to write."""
    model = onnx.load(str(backbone_path))
    graph = model.graph
    if [o.name for o in graph.output] != [FEATURES_OUTPUT]:
        raise ComposeError(f"{backbone_path} is not a backbone graph: its outputs are {[o.name for o in graph.output]},"
                           f" not [{FEATURES_OUTPUT!r}].")
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    bias = np.ascontiguousarray(bias, dtype=np.float32)
    k, d = weight.shape
    if bias.shape != (k,):
        raise ComposeError(f"the head's bias must have {k} values (one per class), got shape {list(bias.shape)}.")
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or batch.dim_value

    def const(name: str, array: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def output(name: str, *dims) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch_dim, *dims])

    nodes = [
        helper.make_node("Gemm", [FEATURES_OUTPUT, const("head.weight", weight), const("head.bias", bias)],
                         [OUTPUT_NAMES[0]], name="head.gemm", transB=1),
        helper.make_node("Softmax", [OUTPUT_NAMES[0]], [OUTPUT_NAMES[1]], name="head.softmax", axis=1),
    ]
    outputs = [output(OUTPUT_NAMES[0], k), output(OUTPUT_NAMES[1], k)]
    if centroids is not None:
        centroids = np.asarray(centroids, dtype=np.float32)
        if centroids.shape != (k, d):
            raise ComposeError(f"centroids must be [{k}, {d}] (classes x features), got {list(centroids.shape)}.")
        feature_map = feature_map_name(graph)
        axes = "head.axis1"
        graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), axes))
        nodes += [
            # cam = W . A: a 1x1 convolution of the last feature map with the head's weights, no bias
            helper.make_node("Conv", [feature_map, const("head.cam_weight", weight[:, :, None, None])], [CAM_OUTPUT],
                             name="head.cam"),
            # ood = 1 - max_c cos(features, centroid_c); unit(x) = x * 1 / sqrt(clip(sum x^2, eps)), the operators the
            # traced export uses (core.runtime.model_check allows only those)
            helper.make_node("Mul", [FEATURES_OUTPUT, FEATURES_OUTPUT], ["head.squares"], name="head.square"),
            helper.make_node("ReduceSum", ["head.squares", axes], ["head.sum_squares"], name="head.sum", keepdims=1),
            helper.make_node("Clip", ["head.sum_squares", const("head.eps", np.array(_EPS))], ["head.clamped"],
                             name="head.clamp"),
            helper.make_node("Sqrt", ["head.clamped"], ["head.norm"], name="head.sqrt"),
            helper.make_node("Reciprocal", ["head.norm"], ["head.inverse_norm"], name="head.inverse"),
            helper.make_node("Mul", [FEATURES_OUTPUT, "head.inverse_norm"], ["head.unit"], name="head.unit"),
            helper.make_node("MatMul", ["head.unit", const("head.centroids_t", centroids.T)], ["head.cosines"],
                             name="head.cosine"),
            helper.make_node("ReduceMax", ["head.cosines", axes], ["head.nearest"], name="head.nearest", keepdims=0),
            helper.make_node("Sub", [const("head.one", np.array(1.0)), "head.nearest"], [OOD_OUTPUT],
                             name="head.ood"),
        ]
        outputs += [output(CAM_OUTPUT, k, *_spatial_dims(model, feature_map)), output(OOD_OUTPUT)]
    graph.node.extend(nodes)
    del model.metadata_props[:]  # the backbone's; the caller writes the classifier's
    graph.value_info.append(graph.output[0])  # 'features' [N, D] stays typed inside (shape inference, FLOP count)
    del graph.output[:]
    graph.output.extend(outputs)
    return model
