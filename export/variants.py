"""The model variants, in one table: the FP32 export and the faster copies built beside it.

Every part that deals with variants reads ``VARIANTS``: the export (which to build, how, and on which providers
to check them), the benchmark (which files to time), the app (the Predict choices and download buttons) and the
Triton writer (which instance kind serves a file). A variant is kept only if its top-1 accuracy on the validation
images is within ``tolerance`` of the FP32 model's; a rejected one is deleted and the reason recorded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from core.runtime.devices import CPU, CUDA
from core.runtime.files import temp_path
from core.runtime.predictor import read_model_info
from core.runtime.providers import nvidia_gpu_visible, preload_gpu_libraries

log = logging.getLogger(__name__)

Builder = Callable[[Path, Path, "np.ndarray | None"], object]  # (fp32 file, output file, calibration images)


def _build_int8(src: Path, dst: Path, calib_images: np.ndarray | None) -> None:
    from export.quantize import quantize_int8  # onnxruntime's quantization tools load only when building

    if calib_images is None or len(calib_images) == 0:
        raise ValueError("no calibration images were given (INT8 needs prepared training images)")
    quantize_int8(src, dst, calib_images)


def _build_fp16(src: Path, dst: Path, calib_images: np.ndarray | None) -> None:
    from export.quantize import convert_fp16

    convert_fp16(src, dst)


@dataclass(frozen=True)
class Variant:
    name: str  # also the model's metadata 'variant'
    suffix: str  # inserted before ".onnx": model.onnx -> model.int8.onnx
    label: str  # what the app shows
    build: Builder | None  # None: the FP32 export itself (export.onnx_export)
    check_providers: tuple[str, ...]  # where its accuracy is measured, best first (CUDA only where usable)
    needs_cuda: bool  # built by default only where a CUDA GPU is usable
    triton_kind: str  # Triton instance_group kind that serves this file


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("fp32", "", "FP32", None, (CPU,), False, "KIND_AUTO"),
    # Static QDQ INT8: smaller, and faster on CPUs with VNNI/AMX (not on every CPU: measure with export bench).
    Variant("int8", ".int8", "INT8", _build_int8, (CPU,), False, "KIND_CPU"),
    # FP16 weights and compute: for GPUs; on a CPU it only adds casts.
    Variant("fp16", ".fp16", "FP16", _build_fp16, (CUDA, CPU), True, "KIND_GPU"),
)}
OPTIONAL = tuple(name for name, v in VARIANTS.items() if v.build is not None)


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {name!r}.")
    return VARIANTS[name]


def variant_path(fp32_path: str | os.PathLike[str], variant: str) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` / ``model.fp16.onnx`` (``fp32``: the path itself)."""
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}{get_variant(variant).suffix}{path.suffix}")


def cuda_usable() -> bool:
    """True when onnxruntime can actually run a session on CUDA (not just list the provider)."""
    if CUDA not in ort.get_available_providers() or not nvidia_gpu_visible():
        return False
    preload_gpu_libraries()  # as create_session does: pip's CUDA/cuDNN wheels are not on the loader's path
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the probe's own failure is expected on CPU-only machines
    try:
        session = ort.InferenceSession(probe_model(), options, providers=[CUDA, CPU])
    except Exception:
        return False
    return session.get_providers()[0] == CUDA


def probe_model() -> bytes:
    """The smallest model (one Identity), serialized, for asking onnxruntime whether a provider starts. Its IR
    version is pinned: onnx's helper writes its own newest one, which a released onnxruntime may not read yet."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8).SerializeToString()


def default_variants() -> tuple[str, ...]:
    """The optional variants worth building on this machine (FP16 only where CUDA is usable)."""
    needs_probe = any(VARIANTS[v].needs_cuda for v in OPTIONAL)
    on_cuda = cuda_usable() if needs_probe else False
    return tuple(v for v in OPTIONAL if on_cuda or not VARIANTS[v].needs_cuda)


def evaluate_onnx(path: str | os.PathLike[str], images: np.ndarray, labels: Sequence[int] | np.ndarray, *,
                  device: str = "cpu") -> float:
    """Top-1 accuracy of an exported classifier on prepared uint8 images ``[N, S, S, 3]`` and integer labels."""
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels; pass one label per image.")
    return float(np.mean(top1(path, images, device=device) == labels))


def top1(path: str | os.PathLike[str], images: np.ndarray, *, device: str = "cpu", chunk: int = 256) -> np.ndarray:
    """The class index an exported classifier picks for each prepared uint8 image, ``chunk`` images at a time (a
    memory-mapped set of any size is read a slice at a time, and its pages handed back)."""
    from core.runtime.images import slices
    from core.runtime.predictor import Predictor

    predictor = Predictor(path, device=device)
    return np.concatenate([np.zeros(0, np.int64), *(predictor.predict_arrays(part).argmax(1)
                                                     for part in slices(images, chunk))])


def accuracy_check(baseline: np.ndarray, variant: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """A variant's answers against the FP32 model's on the same validation images: the accuracy drop (with
    Newcombe's paired 95% interval) and the top-1 agreement (with its Wilson 95% interval)."""
    from core.runtime.intervals import paired_difference_interval, wilson_interval

    right_fp32, right = baseline == labels, variant == labels
    agree = int((baseline == variant).sum())
    return {"images": len(labels), "accuracy": float(right.mean()), "baseline_accuracy": float(right_fp32.mean()),
            "accuracy_drop": float(right_fp32.mean() - right.mean()),
            "drop_interval": list(paired_difference_interval(right_fp32, right)),
            "agreement": agree / len(labels), "agreement_interval": list(wilson_interval(agree, len(labels)))}


def _record_check(path: Path, check: dict[str, Any]) -> None:
    """Write the accuracy check into the variant file's metadata ('check'), where a server reads it back."""
    from core.runtime.contract import set_metadata

    model = onnx.load(str(path))
    set_metadata(model, {"check": json.dumps(check)})
    onnx.save_model(model, str(path))


def _build(variant: Variant, src: Path, tmp: Path, calib_images: np.ndarray | None) -> None:
    variant.build(src, tmp, calib_images)
    onnx.checker.check_model(str(tmp), full_check=True)


def build_variants(fp32_path: str | os.PathLike[str], calib_images: np.ndarray | None, val_images: np.ndarray,
                   val_labels: Sequence[int] | np.ndarray, *, tolerance: float = 0.01,
                   variants: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Build each optional variant beside ``fp32_path`` and keep it only if accuracy drops by at most ``tolerance``.

    Returns one {"variant", "path", "accuracy", "baseline_accuracy", "accuracy_drop", "accepted", "reason", "check"}
    per variant (``check``: ``accuracy_check``, also written into the variant's metadata). ``tolerance`` is a
    fraction (0.01 = one percentage point). Rejected variants (and stale files of the same name from an earlier
    export) are deleted; their ``path`` is None.
    """
    src = Path(fp32_path)
    read_model_info(src)
    names = tuple(default_variants() if variants is None else variants)
    for name in names:
        if get_variant(name).build is None:  # validates the name before any work
            raise ValueError(f"{name!r} is the export itself, not a variant to build; pick from {list(OPTIONAL)}.")
    val_labels = np.asarray(val_labels)
    have_val = val_images is not None and len(val_images) > 0
    if have_val and len(val_labels) != len(val_images):
        raise ValueError(f"got {len(val_images)} images but {len(val_labels)} labels; pass one label per image.")
    baseline_top1 = top1(src, val_images) if have_val else None
    baseline = float(np.mean(baseline_top1 == val_labels)) if have_val else None
    on_cuda = cuda_usable() if any(CUDA in VARIANTS[n].check_providers for n in names) else False
    results = []
    for name in names:
        variant = VARIANTS[name]
        target = variant_path(src, name)
        tmp = temp_path(target)
        record: dict[str, Any] = {"variant": name, "path": None, "accuracy": None, "baseline_accuracy": baseline,
                                  "accuracy_drop": None, "accepted": False, "reason": ""}
        try:
            if not have_val:
                raise ValueError("no validation images to measure the accuracy drop on")
            _build(variant, src, tmp, calib_images)
            device = "cuda" if on_cuda and CUDA in variant.check_providers else "cpu"
            check = accuracy_check(baseline_top1, top1(tmp, val_images, device=device), val_labels)
            _record_check(tmp, check)
        except Exception as exc:  # a variant that cannot be built or run is rejected, never fatal
            tmp.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            record["reason"] = f"not built: {exc}"
            log.warning("%s variant rejected: %s", name, exc)
            results.append(record)
            continue
        accuracy, drop = check["accuracy"], check["accuracy_drop"]
        low, high = check["drop_interval"]
        record.update(accuracy=accuracy, accuracy_drop=drop, check=check)
        summary = (f"accuracy {accuracy:.4f} vs FP32 {baseline:.4f} on {len(val_labels)} validation images: "
                   f"drop {drop * 100:.2f} points (95% interval {low * 100:+.1f} to {high * 100:+.1f})")
        agreement = f"same answer as FP32 on {check['agreement']:.1%} of them"
        if drop <= tolerance + 1e-9:
            os.replace(tmp, target)
            record.update(path=str(target), accepted=True,
                          reason=f"{summary} <= {tolerance * 100:.2f} allowed; {agreement}")
        else:
            tmp.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            record["reason"] = f"{summary} > {tolerance * 100:.2f} allowed; deleted; {agreement}"
        results.append(record)
    return results
