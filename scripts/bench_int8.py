"""Which INT8 recipe keeps a model's accuracy: each lever of ``export.quantize.Int8Recipe`` tried on trained runs.

For each run folder (``python -m core train --mode pretrained --data SRC --out RUN``) the FP32 ``model.onnx`` is
quantized with every recipe in ``RECIPES``, on the run's own training images, and scored on its validation images
on this machine's CPU: accuracy drop against FP32 (Newcombe's paired 95% interval), top-1 agreement with FP32
(Wilson 95% interval) and the time the recipe took to build. INT8 accuracy depends on the CPU's kernels (u8*s8
pair sums overflow int16 on AVX2 without VNNI), so the table says which instruction sets this CPU has.

    python -m core train --mode pretrained --data ../shared/dev-photos/cats-vs-dogs --out /tmp/q/cats
    python scripts/bench_int8.py /tmp/q/cats /tmp/q/textures /tmp/q/shapes [--recipes base,all,...] [--json F]

``--layers`` asks where the default recipe's error comes from instead: each convolution in turn gets its float
weights back (``weights``) or its input activation unrounded (``inputs``: the quantizer's clamp, which stands for the
ReLU6 it removed, is kept as a Clip), and the change in KL divergence from FP32 is printed, most helpful first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.runtime.contract import CAM_OUTPUT, INPUT_NAME, OUTPUT_NAMES  # noqa: E402
from core.runtime.intervals import paired_difference_interval, wilson_interval  # noqa: E402
from core.runtime.predictor import Predictor  # noqa: E402
from core.runtime.providers import cpu_features  # noqa: E402
from export.quantize import DEFAULT_RECIPE, Int8Recipe, quantize_int8  # noqa: E402
from export.runs import load_run_classifier, load_run_images  # noqa: E402

BASE = Int8Recipe(max_images=64, reduce_range=False)  # the recipe before this study (u8 activations, s8 weights)
RECIPES: dict[str, Int8Recipe] = {
    "base": BASE,
    "all": replace(BASE, max_images=None),
    "all+flip": replace(BASE, max_images=None, flips=True),
    "entropy": replace(BASE, method="Entropy"),
    "percentile": replace(BASE, method="Percentile"),
    "reduce": replace(BASE, reduce_range=True),
    "u8u8": replace(BASE, weight_type="QUInt8"),
    "s8s8": replace(BASE, activation_type="QInt8"),
    "conv0": replace(BASE, first_conv_float=True),
    "refit": replace(BASE, head_refit=True),
    "refit+all+flip": replace(BASE, max_images=None, flips=True, head_refit=True),
    "reduce+conv0": replace(BASE, reduce_range=True, first_conv_float=True),
    "u8u8+conv0": replace(BASE, weight_type="QUInt8", first_conv_float=True),
    "reduce+all+flip": replace(BASE, reduce_range=True, max_images=None, flips=True),
    "reduce+percentile": replace(BASE, reduce_range=True, method="Percentile"),
    "reduce+refit": replace(BASE, reduce_range=True, head_refit=True),
    "reduce+dw": replace(BASE, reduce_range=True, depthwise_float=True),
    "reduce+conv0+all+flip": replace(BASE, reduce_range=True, first_conv_float=True, max_images=None, flips=True),
    "u8u8+last": replace(BASE, weight_type="QUInt8", last_conv_float=True),
    "reduce+last": replace(BASE, reduce_range=True, last_conv_float=True),
    "u8u8+conv0+last": replace(BASE, weight_type="QUInt8", first_conv_float=True, last_conv_float=True),
    "last": replace(BASE, last_conv_float=True),
    "u8u8+all": replace(BASE, weight_type="QUInt8", max_images=None),
    "u8u8+all+flip": replace(BASE, weight_type="QUInt8", max_images=None, flips=True),
    "u8u8+percentile": replace(BASE, weight_type="QUInt8", method="Percentile"),
    "u8u8+refit": replace(BASE, weight_type="QUInt8", head_refit=True),
    "default": DEFAULT_RECIPE,
}


SURE_MARGIN = 0.2


def _logits(model: str | bytes, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT_NAMES[0]], {INPUT_NAME: images[i:i + 64]})[0]
                           for i in range(0, len(images), 64)])


def _kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(reference || model) of the softmax of two logit arrays."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    lp, lq = log_softmax(reference), log_softmax(logits)
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


def _unquantize(int8: onnx.ModelProto, floats: dict[str, onnx.TensorProto], conv: str, part: str) -> bytes:
    """``int8`` with one convolution's weights and bias back in float (``weights``), or its input's rounding removed
    and only the quantizer's clamp kept (``inputs``)."""
    model = onnx.ModelProto()
    model.CopyFrom(int8)
    node = next(n for n in model.graph.node if n.name == conv)
    producer = {o: n for n in model.graph.node for o in n.output}
    if part == "weights":
        for k in (1, 2):
            name = node.input[k].removesuffix("_DequantizeLinear_Output")
            if name in floats and producer[node.input[k]].op_type == "DequantizeLinear":
                tensor = onnx.TensorProto()
                tensor.CopyFrom(floats[name])
                tensor.name = f"{name}_float"
                model.graph.initializer.append(tensor)
                node.input[k] = tensor.name
        return model.SerializeToString()
    dq = producer.get(node.input[0])
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear":
        return model.SerializeToString()
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    scale, zero = float(inits[q.input[1]]), int(inits[q.input[2]])
    bounds = [onnx.numpy_helper.from_array(np.array(v * scale, np.float32), f"{conv}_{k}")
              for k, v in (("low", -zero), ("high", 255 - zero))]
    model.graph.initializer.extend(bounds)
    clip = onnx.helper.make_node("Clip", [q.input[0], *(b.name for b in bounds)], [f"{conv}_clamped"])
    model.graph.node.insert(list(model.graph.node).index(node), clip)
    node.input[0] = clip.output[0]
    return model.SerializeToString()


def layers(run: Path) -> None:
    """Where the default recipe's error comes from, one convolution at a time (see the module's docstring)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _, report = load_run_classifier(run, "pretrained")
    train, _ = load_run_images(run, report, ("train",))
    val, _ = load_run_images(run, report, ("val",))
    val = np.concatenate([val, val[:, :, ::-1]])
    with tempfile.TemporaryDirectory() as tmp:
        int8_path, pre = Path(tmp) / "int8.onnx", Path(tmp) / "pre.onnx"
        quantize_int8(run / "model.onnx", int8_path, train)
        quant_pre_process(str(run / "model.onnx"), str(pre), skip_symbolic_shape=True)  # the quantizer's input
        floats = {i.name: i for i in onnx.load(str(pre)).graph.initializer}
        int8 = onnx.load(str(int8_path))
    reference = _logits(str(run / "model.onnx"), val)
    base = _kl(reference, _logits(int8.SerializeToString(), val))
    print(f"{run.name}: default INT8 KL from FP32 {base:.4f} on {len(val)} images (validation + mirrors)")
    convs = [n.name for n in int8.graph.node if n.op_type == "Conv" and CAM_OUTPUT not in n.output]
    for part in ("weights", "inputs"):
        gains = sorted((base - _kl(reference, _logits(_unquantize(int8, floats, c, part), val)), c) for c in convs)
        best = gains[::-1][:5]
        print(f"  {part} in float, one convolution at a time: best {', '.join(f'{g / base:+.0%}' for g, _ in best)}"
              f" of the KL; median {gains[len(gains) // 2][0] / base:+.1%}; all {len(convs)} summed "
              f"{sum(g for g, _ in gains) / base:+.0%}")


def score(run: Path, names: list[str], mirrors: bool) -> list[dict]:
    _, report = load_run_classifier(run, "pretrained")
    train, _ = load_run_images(run, report, ("train",))
    val, labels = load_run_images(run, report, ("val",))
    if mirrors:  # the mirror images too: twice the held-out inputs (not independent, but not seen in calibration)
        val, labels = np.concatenate([val, val[:, :, ::-1]]), np.concatenate([labels, labels])
    fp32_p = Predictor(run / "model.onnx", device="cpu").predict_arrays(val)
    fp32 = fp32_p.argmax(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            recipe = RECIPES[name]
            out = Path(tmp) / f"{name}.onnx"
            start = time.perf_counter()
            quantize_int8(run / "model.onnx", out, train, recipe=recipe)
            seconds = time.perf_counter() - start
            int8_p = Predictor(out, device="cpu").predict_arrays(val)
            int8 = int8_p.argmax(1)
            # how far the probability of FP32's answer moved: a finer measure than agreement on few images
            moved = float(np.abs(int8_p[np.arange(len(val)), fp32] - fp32_p[np.arange(len(val)), fp32]).mean())
            agree = int((int8 == fp32).sum())
            top2 = np.sort(fp32_p, 1)
            sure = top2[:, -1] - top2[:, -2] >= SURE_MARGIN  # FP32 put its answer 0.2 above the runner-up
            low, high = paired_difference_interval(fp32 == labels, int8 == labels)
            a_low, a_high = wilson_interval(agree, len(val))
            rows.append({"run": run.name, "recipe": name, "describe": recipe.describe(), "n": len(val),
                         "fp32": float(np.mean(fp32 == labels)), "int8": float(np.mean(int8 == labels)),
                         "drop": float(np.mean(fp32 == labels) - np.mean(int8 == labels)), "drop_ci": [low, high],
                         "agreement": agree / len(val), "agreement_ci": [a_low, a_high], "build_s": seconds,
                         "dp": moved, "sure_share": float(sure.mean()),
                         "sure_agreement": float(np.mean(int8[sure] == fp32[sure])) if sure.any() else None,
                         "recipe_fields": asdict(recipe)})
            r = rows[-1]
            print(f"{r['run']:<10} {name:<16} n={r['n']:<4} FP32 {r['fp32']:.3f}  INT8 {r['int8']:.3f}  "
                  f"drop {r['drop'] * 100:+5.2f} pt [{low * 100:+.1f}, {high * 100:+.1f}]  "
                  f"agree {r['agreement']:.1%} [{a_low:.1%}, {a_high:.1%}]  |dp| {moved:.3f}  "
                  f"sure {r['sure_share']:.0%}: agree {r['sure_agreement'] or 0:.1%}  "
                  f"build {seconds:4.1f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with a pretrained model.onnx")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {list(RECIPES)}")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--mirrors", action="store_true", help="also score the validation images' mirrors")
    parser.add_argument("--layers", action="store_true", help="where the default recipe's error comes from, per "
                        "convolution (see above), instead of the recipe table")
    args = parser.parse_args()
    if args.layers:
        for run in args.runs:
            layers(run)
        return
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; pick from {list(RECIPES)}")
    print("CPU:", cpu_features().describe(), "| drop: FP32 minus INT8 accuracy, Newcombe 95% interval; agree: same "
          "top-1 as FP32, Wilson 95% interval; |dp|: mean change of FP32's top probability")
    rows = [row for run in args.runs for row in score(run, names, args.mirrors)]
    if args.json:
        args.json.write_text(json.dumps({"cpu": asdict(cpu_features()), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
