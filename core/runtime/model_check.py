"""The structural check of an uploaded ONNX model: what it may contain, read from the file before anything runs it.

A visitor's ``.onnx`` file is a program. ``check_structure`` accepts only what this app's own exports contain and
rejects the rest with a message that names the problem:

- operators: exactly those of ``ALLOWED_OPS`` (default ONNX domain), no functions, no sub-graphs (Loop/If/Scan);
- weights: stored inside the file (no external data, which onnxruntime would read from any path the file names),
  each tensor and their total bounded by their *declared* size (``Limits``);
- input: one uint8 ``[N, S, S, 3]`` image, every dimension fixed but the batch ``N``; the metadata's resize
  (which the server applies to every visitor's image) at most ``Limits.resize_ratio`` times ``S``;
- sizes: for every batch size ``N`` from 1 to ``Limits.max_batch``, ONNX shape inference must fix the shape of every
  tensor in the graph; no tensor may hold more than ``Limits.tensor_elements`` numbers per image and the graph
  may not cost more than ``Limits.flops`` per image. A size that depends on the pixel values (a ``Range`` whose
  end is computed from the image, say) has no fixed shape and is refused, so a model cannot pass a check on one
  image and then allocate gigabytes on another.

The batch loop is what makes "fixed but the batch" checkable: PyTorch's exporter computes some index tensors from
``Shape(image)`` (``Shape`` -> ``Squeeze`` -> ``Range``), which ONNX shape inference cannot follow with a symbolic
``N``. With ``N`` fixed, those small integer computations are evaluated here (``_fold``, on at most
``FOLD_ELEMENTS`` numbers, never allocating more) and shape inference sees constants. ``Predictor`` runs batches
of at most its ``batch_size`` images, so checking every ``N`` up to that many covers every run (and catches a size
that grows with ``N * N``). Shape inference runs without ``data_prop``: ONNX's data propagation materialises the
values of a ``Range`` (one of 20 M numbers cost the checker itself 2.8 GB and 7 s), which ``_fold`` bounds.

``onnx`` is imported inside the functions: the serving path (``Predictor``) needs onnxruntime alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.runtime.contract import EXPORT_HINT, INPUT_NAME, ModelFormatError

# Every op type in the graphs this app exports, and nothing else (all in the default ONNX domain). Derived by exporting
# each registered backbone (efficientnet_lite0, efficientnet_b0, mobilenet_v3_large, resnet18) as a classifier with
# export.onnx_export.export_classifier, plain and with explain (class activation maps and the out-of-distribution score:
# MatMul, Reciprocal, ReduceMax, ReduceSum, Sqrt, Sub), at 32, 64 and 224 px (at 32 the pooled map is 1x1 and the
# exporter's as_strided index graph, Shape/Squeeze/Range/Mul/Unsqueeze/Add/Gather, is absent), building each variant of
# export.variants.VARIANTS from it (int8: quantize_int8, fp16: convert_fp16) and listing the union of their nodes' op
# types (torch 2.14.1, onnxruntime 1.31.1, opset 18). tests/test_model_check.py exports the default backbone's variants
# and fails if one uses an op missing here; its slow test exports every backbone and requires the union to equal this
# set, so the list cannot go stale either way.
ALLOWED_OPS: frozenset[str] = frozenset({
    "Add", "Cast", "Clip", "Conv", "DequantizeLinear", "Gather", "Gemm", "HardSigmoid", "HardSwish", "MatMul",
    "MaxPool", "Mul", "QuantizeLinear", "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceSum", "Relu",
    "Reshape", "Shape", "Sigmoid", "Softmax", "Sqrt", "Squeeze", "Sub", "Transpose", "Unsqueeze",
})
DEFAULT_DOMAINS = ("", "ai.onnx")
UPLOAD_HINT = ("Upload a model exported by this app (train a model here and download its .onnx file, or run "
               "`python -m export onnx --run RUN_DIR`).")

MiB = 1024 ** 2
FOLD_ELEMENTS = 4096  # the largest integer tensor _fold evaluates (a shape or index computation is far smaller)


@dataclass(frozen=True)
class Limits:
    """Bounds on an uploaded model, set from the largest of this app's exports.

    Measured with ``check_structure`` on every registered backbone's classifier export (fp32; int8 and fp16 are
    smaller), at 512 px, the largest image size training accepts (``core.config``): resnet18 holds 44.7 MB of
    weights, its largest single tensor is 9.4 MB (a 512x512x3x3 conv), it costs 19.0 GFLOP per image and its
    largest activation holds 4.2 M numbers (64x256x256 after the stem); efficientnet_b0's largest activation holds
    6.3 M (96x256x256) at 4.1 GFLOP, and all its tensors together hold 116 M numbers (about 360 M for the int8
    graph, whose quantize/dequantize steps add tensors). efficientnet_lite0 at 224 px: 0.78 GFLOP. Each limit
    leaves about 2x (cost, activations) to 7x (one weight) room, and stops what no classifier here needs: a 1.5 GB
    tensor, a 100-GFLOP graph, a sub-graph or a size computed from the pixels.
    """

    file_bytes: int = 512 * MiB  # the upload cap (core.sessions.MAX_ONNX_BYTES)
    weight_bytes: int = 512 * MiB  # all initializers together, by their declared shapes
    tensor_bytes: int = 64 * MiB  # any single initializer or tensor attribute
    image_size: int = 512  # the input's side S: the largest that training exports
    resize_ratio: float = 2.0  # metadata resize_size / S (exports: 256/224 = 1.14); bounds the server's resize
    tensor_elements: int = 16 * MiB  # numbers in any one tensor, per image (64 MB as float32)
    total_elements: int = 1024 * MiB  # numbers in all tensors together, per image (what could be alive at once)
    flops: float = 40e9  # per image, counted by _flops; about 1 s per image on two CPU cores
    nodes: int = 10_000  # efficientnet_b0's int8 graph has 863; bounds the time this check itself takes
    max_batch: int = 32  # batch sizes checked: 1..max_batch (Predictor's default batch_size)


LIMITS = Limits()


class UnsafeModelError(ModelFormatError):
    """The uploaded model contains something this app's exports never contain, or is too large to run safely."""


@dataclass(frozen=True)
class Structure:
    """What ``check_structure`` measured on a model that passed (per image, at batch size 1)."""

    ops: tuple[str, ...]
    image_size: int
    weight_bytes: int
    largest_tensor: int  # numbers in the largest intermediate tensor
    flops: float


def _fail(where: str, problem: str, fix: str = UPLOAD_HINT) -> UnsafeModelError:
    return UnsafeModelError(f"{where}{problem} {fix}".strip())


def _in_units(n: float, units: tuple[tuple[str, float], ...], base: str) -> str:
    for unit, scale in units:
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 1000 * scale else f"{n / scale:,.0f} {unit}"
    return f"{n:.0f} {base}"


def _size(n: float) -> str:
    return _in_units(n, (("GB", 1024 ** 3), ("MB", MiB), ("kB", 1024)), "bytes")


def _flop(n: float) -> str:
    return _in_units(n, (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)), "FLOP")


def _node(node: Any) -> str:
    return f"its {node.op_type} node {node.name[:80]!r}" if node.name else f"a {node.op_type} node"


# ---------------------------------------------------------------- the file, operators and weights


def _load(model: Any, limits: Limits) -> tuple[Any, str]:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model, ""
    path = Path(model)
    where = f"{path}: "
    size = os.path.getsize(path)
    if size > limits.file_bytes:
        raise _fail(where, f"the file is {_size(size)}; the limit is {_size(limits.file_bytes)}.")
    try:
        # load_external_data=False: a tensor stored "outside" the file is never followed (see _check_tensors)
        return onnx.load(str(path), load_external_data=False), where
    except Exception as exc:  # DecodeError, or anything the protobuf parser raises on a damaged file
        raise _fail(where, f"this is not a readable ONNX file ({type(exc).__name__}).", EXPORT_HINT) from None


def _attribute_tensors(node: Any) -> Iterable[Any]:
    from onnx import AttributeProto

    for attr in node.attribute:
        if attr.type == AttributeProto.TENSOR:
            yield attr.t
        elif attr.type == AttributeProto.TENSORS:
            yield from attr.tensors
        elif attr.type == AttributeProto.SPARSE_TENSOR:
            yield attr.sparse_tensor.values
        elif attr.type == AttributeProto.SPARSE_TENSORS:
            yield from (s.values for s in attr.sparse_tensors)


def _declared_bytes(tensor: Any) -> int:
    """Bytes by the tensor's declared shape and type (not its stored data); -1 for a negative dim or unknown type."""
    from onnx import TensorProto, helper

    if any(d < 0 for d in tensor.dims):
        return -1
    count = math.prod(tensor.dims)
    if tensor.data_type == TensorProto.STRING:
        return count * 8 + sum(len(s) for s in tensor.string_data)
    try:
        return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return -1


def _check_graph(model: Any, where: str, limits: Limits) -> tuple[str, ...]:
    """Operators, sub-graphs, functions, external data and weight sizes; returns the op types used."""
    from onnx import AttributeProto, TensorProto

    graph = model.graph
    tensors = [*graph.initializer, *(t for node in graph.node for t in _attribute_tensors(node))]
    for tensor in tensors:  # first: a file that points at other files is refused whatever else it holds
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")[:200]
            raise _fail(where, f"its weight {tensor.name[:100]!r} is stored outside the .onnx file (external data "
                               f"at {location!r}); this app only accepts self-contained files, as its exports are.")
    if len(graph.sparse_initializer):
        raise _fail(where, "it has sparse initializers, which models exported by this app never use.")
    if len(model.functions):
        names = sorted({f"{f.domain}.{f.name}" if f.domain else f.name for f in model.functions})
        raise _fail(where, f"it defines its own ONNX functions ({', '.join(names[:5])}), which models exported by "
                           "this app never use.")
    if len(model.training_info):
        raise _fail(where, "it carries training graphs (training_info), which models exported by this app never use.")
    if len(graph.node) > limits.nodes:
        raise _fail(where, f"its graph has {len(graph.node)} operators; the limit is {limits.nodes}.")
    foreign = sorted({f"{n.domain}:{n.op_type}" if n.domain not in DEFAULT_DOMAINS else n.op_type
                      for n in graph.node if n.domain not in DEFAULT_DOMAINS or n.op_type not in ALLOWED_OPS})
    if foreign:
        listed = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        word = "operator" if len(foreign) == 1 else "operators"
        raise _fail(where, f"this model uses the {word} {listed}, which models exported by this app never use.")
    for node in graph.node:  # allowed ops have no graph attributes; a crafted node could still carry one
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            raise _fail(where, f"{_node(node)} holds a sub-graph, which models exported by this app never use.")
    total = 0
    for tensor in tensors:
        size = _declared_bytes(tensor)
        if size < 0:
            raise _fail(where, f"its weight tensor {tensor.name[:100]!r} has an invalid shape or data type.")
        if size > limits.tensor_bytes:
            shape = " x ".join(f"{d:,}" for d in tensor.dims)
            raise _fail(where, f"its weight tensor {tensor.name[:100]!r} declares {shape} values ({_size(size)}); "
                               f"the limit for one tensor is {_size(limits.tensor_bytes)}.")
        total += size
    if total > limits.weight_bytes:
        raise _fail(where, f"its weights declare {_size(total)} in all; the limit is {_size(limits.weight_bytes)}.")
    return tuple(sorted({n.op_type for n in graph.node}))


def _input_side(graph: Any, where: str, limits: Limits) -> tuple[Any, int]:
    """The one image input (uint8 [N, S, S, 3], N symbolic) and its side S."""
    from onnx import TensorProto

    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise _fail(where, f"it has {len(inputs)} inputs ({', '.join(repr(i.name[:40]) for i in inputs[:5])}); "
                           f"this app's models have one, {INPUT_NAME!r}.")
    (image,) = inputs
    kind = image.type.WhichOneof("value")
    tensor = image.type.tensor_type
    dims = list(tensor.shape.dim) if kind == "tensor_type" and tensor.HasField("shape") else None
    expected = f"one input {INPUT_NAME!r} of type uint8 with shape [N, S, S, 3], N the batch and S fixed"
    if kind != "tensor_type" or tensor.elem_type != TensorProto.UINT8 or dims is None or len(dims) != 4:
        raise _fail(where, f"its input {image.name[:40]!r} is not a uint8 image batch; expected {expected}.")
    if dims[0].HasField("dim_value"):
        raise _fail(where, f"its input fixes the batch size at {dims[0].dim_value}; expected {expected}.")
    sides = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    if sides[0] is None or sides[0] != sides[1] or sides[2] != 3 or sides[0] < 1:
        shown = ["N", *(s if s is not None else "?" for s in sides)]
        raise _fail(where, f"its input has shape {shown}; expected {expected}.")
    if sides[0] > limits.image_size:
        raise _fail(where, f"its input images are {sides[0]}x{sides[0]} pixels; the limit is {limits.image_size}.")
    return image, sides[0]


def _check_resize(model: Any, side: int, where: str, limits: Limits) -> None:
    """The metadata's resize rule: the server resizes every visitor's image to ``resize_size`` before the crop, so
    a huge one would make the server, not the model, allocate (``parse_metadata`` checks the rest later)."""
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        resize = int(meta.get("resize_size", ""))
    except ValueError:
        return
    if resize > limits.resize_ratio * side:
        raise _fail(where, f"its metadata asks for images resized to {resize:,} pixels before the {side}-pixel crop; "
                           f"this app's exports resize to at most {limits.resize_ratio:g}x the crop.")


# ---------------------------------------------------------------- shapes for each batch size


_INTS = (np.int64, np.int32)
_NOT_NUMBERS = (0, 8)  # TensorProto.UNDEFINED, STRING
_FOLDABLE = frozenset({"Shape", "Squeeze", "Unsqueeze", "Range", "Add", "Mul", "Cast", "Gather", "Reshape"})


def _fold(node: Any, values: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> np.ndarray | None:
    """The value of a small integer computation (a shape, an index range), or None if it cannot be known here.

    Sizes are worked out before any array is built, so a hostile graph cannot make this allocate.
    """
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    args = [values.get(name) if name else None for name in node.input]
    op = node.op_type
    if op == "Shape":
        shape = shapes.get(node.input[0])
        if shape is None:
            return None
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        return np.asarray(shape[slice(start, end)], np.int64)
    if any(a is None for a in args) or not args:
        return None
    if any(a.dtype not in _INTS for a in args):
        return None
    if op in ("Squeeze", "Unsqueeze"):
        axes = args[1].tolist() if len(args) > 1 else attrs.get("axes")
        x = args[0]
        if axes is None:
            return np.squeeze(x) if op == "Squeeze" else None
        rank = x.ndim + (len(axes) if op == "Unsqueeze" else 0)
        if any(not -rank <= a < rank for a in axes):
            return None
        return np.squeeze(x, tuple(a % rank for a in axes)) if op == "Squeeze" else \
            np.expand_dims(x, tuple(a % rank for a in axes))
    if op == "Range":
        start, limit, delta = (int(a.reshape(-1)[0]) if a.size == 1 else None for a in args)
        if None in (start, limit, delta) or delta == 0:
            return None
        count = max(0, -((start - limit) // delta))  # ceil((limit - start) / delta), in integers as ONNX defines it
        if count > FOLD_ELEMENTS:
            return None  # too long to evaluate here; shape inference still sizes it from the folded inputs
        return (start + delta * np.arange(count, dtype=np.int64)).astype(args[0].dtype)
    if op in ("Add", "Mul"):
        try:
            shape = np.broadcast_shapes(*(a.shape for a in args))
        except ValueError:
            return None
        if math.prod(shape) > FOLD_ELEMENTS:
            return None
        with np.errstate(over="ignore"):
            return args[0] + args[1] if op == "Add" else args[0] * args[1]
    if op == "Cast":
        to = helper.tensor_dtype_to_np_dtype(attrs.get("to", 0)) if attrs.get("to") else None
        return args[0].astype(to) if to in _INTS else None
    if op == "Gather":
        data, indices = args
        axis = attrs.get("axis", 0)
        if not -data.ndim <= axis < data.ndim or data.ndim == 0:
            return None
        n = data.shape[axis]
        if indices.size * max(1, data.size // max(n, 1)) > FOLD_ELEMENTS or \
                np.any((indices < -n) | (indices >= n)):
            return None
        return np.take(data, indices, axis=axis)
    if op == "Reshape":
        data, shape = args
        target = [data.shape[i] if v == 0 and not attrs.get("allowzero", 0) and i < data.ndim else int(v)
                  for i, v in enumerate(shape.tolist())]
        try:
            return data.reshape(target)
        except ValueError:
            return None
    return None


def _analysis_model(model: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """A copy of ``model`` for shape inference: weights become typed inputs (no data copied 32 times), recorded
    shapes are dropped (a file could declare false ones), small integer initializers are kept as known values."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.name = graph.name
    light.graph.node.extend(graph.node)
    initializers = {t.name for t in graph.initializer}
    light.graph.input.extend(i for i in graph.input if i.name not in initializers)
    known: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        if tensor.data_type in (TensorProto.INT64, TensorProto.INT32) and math.prod(tensor.dims) <= FOLD_ELEMENTS:
            try:
                known[tensor.name] = numpy_helper.to_array(tensor)
                light.graph.initializer.append(tensor)
                continue
            except Exception:  # a damaged tensor: its value stays unknown
                pass
        light.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    for output in graph.output:
        copy = light.graph.output.add()
        copy.name = output.name
        copy.type.tensor_type.elem_type = output.type.tensor_type.elem_type
    return light, known


def _static(value_info: Any) -> tuple[int, ...] | None:
    tensor = value_info.type.tensor_type
    if value_info.type.WhichOneof("value") != "tensor_type" or not tensor.HasField("shape"):
        return None
    dims = tensor.shape.dim
    return tuple(d.dim_value for d in dims) if all(d.HasField("dim_value") for d in dims) else None


def _shapes_at_batch(light: Any, known: dict[str, np.ndarray], batch: int, where: str
                     ) -> tuple[dict[str, tuple[int, ...]], set[str], Any]:
    """Every tensor's static shape at batch size ``batch`` (None where unknown), after folding the integer
    computations that depend on it; also the names of folded tensors and the graph inference saw."""
    import onnx
    from onnx import numpy_helper, shape_inference

    base = onnx.ModelProto()
    base.CopyFrom(light)
    dim = base.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = batch
    values = dict(known)
    shapes: dict[str, tuple[int, ...]] = {i.name: s for i in base.graph.input if (s := _static(i)) is not None}
    folded: set[str] = set()
    inferred = None
    for _ in range(4):  # each round can fold Shape nodes of tensors whose shapes the previous inference found
        progress = False
        for node in base.graph.node:
            if node.op_type not in _FOLDABLE or len(node.output) != 1 or node.output[0] in folded:
                continue
            try:
                value = _fold(node, values, shapes)
            except (ValueError, TypeError, KeyError, IndexError, OverflowError):  # not foldable: its size stays unknown
                value = None
            if value is not None:
                values[node.output[0]] = value
                shapes[node.output[0]] = value.shape
                folded.add(node.output[0])
                progress = True
        if inferred is not None and not progress:
            break
        graph = onnx.ModelProto()
        graph.CopyFrom(base)
        del graph.graph.node[:]
        graph.graph.node.extend(n for n in base.graph.node if not (len(n.output) == 1 and n.output[0] in folded))
        graph.graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in sorted(folded))
        try:
            inferred = shape_inference.infer_shapes(graph, check_type=True, strict_mode=True)
        except Exception as exc:  # InferenceError, ValidationError: the graph is inconsistent
            raise _fail(where, f"ONNX shape inference rejects its graph at batch size {batch} "
                               f"({type(exc).__name__}: {str(exc).strip()[:300]}).") from None
        for info in [*inferred.graph.value_info, *inferred.graph.output]:
            if info.name not in folded and (s := _static(info)) is not None:
                shapes[info.name] = s
    return shapes, folded, inferred


def _flops(node: Any, shapes: dict[str, tuple[int, ...]]) -> float:
    """A rough count: 2 per multiply-add of Conv/Gemm/MatMul (and their integer forms), 1 per output element and
    kernel element for pooling, 1 per input element for reductions, 1 per output element elsewhere."""
    out = math.prod(shapes.get(node.output[0], (0,))) if node.output else 0
    op = node.op_type
    weight = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}.get(op)
    if weight is not None and len(node.input) > weight:
        w = shapes.get(node.input[weight], ())
        return 2.0 * out * math.prod(w[1:]) if len(w) > 1 else out
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shapes.get(node.input[0], ())
        if not a:
            return out
        k = a[0] if op == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute) else a[-1]
        return 2.0 * out * k
    if op in ("MaxPool", "AveragePool"):
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [])
        return float(out * math.prod(kernel))
    if op in ("ReduceMean", "GlobalAveragePool") and node.input:
        return float(math.prod(shapes.get(node.input[0], (0,))))
    return float(out)


def _check_sizes(model: Any, where: str, limits: Limits) -> tuple[int, float]:
    """Fixed shapes, tensor sizes and cost for every batch size; returns (largest tensor, flops) per image."""
    light, known = _analysis_model(model)
    per_image = (0, 0.0)
    for batch in range(1, limits.max_batch + 1):
        shapes, folded, inferred = _shapes_at_batch(light, known, batch, where)
        types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
        flops = 0.0
        largest = total = 0
        for node in inferred.graph.node:  # topological order: the first unknown shape is the cause
            for name in node.output:
                if not name:
                    continue
                shape = shapes.get(name)
                if shape is None:
                    raise _fail(where, f"the size of tensor {name[:80]!r} (output of {_node(node)}) is not "
                                       "fixed by the file: it depends on the image's "
                                       "pixel values, or on a computation this check cannot follow. In models "
                                       "exported by this app every size is fixed except the batch.")
                if types.get(name) in _NOT_NUMBERS:
                    raise _fail(where, f"its tensor {name[:80]!r} (output of {_node(node)}) holds strings; "
                                       "models exported by this app compute with numbers only.")
                elements = math.prod(shape)
                if elements > batch * limits.tensor_elements:
                    raise _fail(where, f"its tensor {name[:80]!r} (output of {_node(node)}) holds "
                                       f"{elements:,} numbers for a batch of {batch} "
                                       f"image{'s' if batch > 1 else ''}; the limit is "
                                       f"{limits.tensor_elements:,} per image.")
                largest = max(largest, elements)
                total += elements
            flops += _flops(node, shapes)
        for name in folded:
            largest = max(largest, math.prod(shapes[name]))
        if total > batch * limits.total_elements:
            raise _fail(where, f"its tensors hold {total:,} numbers in all for a batch of {batch} "
                               f"image{'s' if batch > 1 else ''}; the limit is {limits.total_elements:,} per image.")
        if flops > batch * limits.flops:
            raise _fail(where, f"it needs about {_flop(flops / batch)} per image; the limit is {_flop(limits.flops)}.")
        if batch == 1:
            per_image = (largest, flops)
    return per_image


def check_structure(model: str | os.PathLike[str] | Any, *, limits: Limits = LIMITS) -> Structure:
    """Refuse (``UnsafeModelError``, a ``ModelFormatError``) a model this app's exports could not have produced,
    or one whose sizes or cost are out of ``limits``; nothing is run. ``model``: a path or an ``onnx.ModelProto``.

    Reads the file once with ``onnx.load(load_external_data=False)`` (memory: a few times the file size), so run
    it where a large file cannot hurt (``check_model_file`` runs it in its limited child process).
    """
    proto, where = _load(model, limits)
    try:
        return _check(proto, where, limits)
    except UnsafeModelError:
        raise
    except Exception as exc:  # fail closed: what this check cannot read, it refuses
        raise _fail(where, f"its graph could not be checked ({type(exc).__name__}: {str(exc).strip()[:300]}).") \
            from None


def _check(proto: Any, where: str, limits: Limits) -> Structure:
    import onnx

    ops = _check_graph(proto, where, limits)
    _, side = _input_side(proto.graph, where, limits)
    _check_resize(proto, side, where, limits)
    weight_bytes = sum(_declared_bytes(t) for t in proto.graph.initializer)
    light, _ = _analysis_model(proto)
    del light.graph.output[:]
    light.graph.output.extend(proto.graph.output)
    try:
        onnx.checker.check_model(light)  # node attributes and opset against the ONNX schemas (weights left out)
    except Exception as exc:  # ValidationError
        raise _fail(where, f"it is not a valid ONNX graph ({type(exc).__name__}: {str(exc).strip()[:300]}).") \
            from None
    largest, flops = _check_sizes(proto, where, limits)
    return Structure(ops=ops, image_size=side, weight_bytes=weight_bytes, largest_tensor=largest, flops=flops)
