"""Check an exported graph against PyTorch: the same uint8 images through onnxruntime and torch eager."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from core.runtime.contract import INPUT_NAME
from core.runtime.devices import CPU
from core.runtime.images import check_batch, slices
from models.explain import ExplainedClassifier
from models.preprocess import ImageClassifier


def cpu_session(path: str | os.PathLike[str], *, providers: Sequence[str] = (CPU,)) -> ort.InferenceSession:
    """A plain session for checks (CPU by default so results are deterministic)."""
    return ort.InferenceSession(str(path), providers=list(providers))


def run_onnx(session: ort.InferenceSession, images: np.ndarray, *, output: str = "probabilities",
             batch_size: int = 32) -> np.ndarray:
    """Run ``images`` (uint8 NHWC) through ``session`` in batches and return ``output``."""
    return run_onnx_outputs(session, images, [output], batch_size=batch_size)[output]


def run_onnx_outputs(session: ort.InferenceSession, images: np.ndarray, outputs: Sequence[str], *,
                     batch_size: int = 32) -> dict[str, np.ndarray]:
    """Run ``images`` (uint8 NHWC) through ``session`` in batches, one run per batch for all ``outputs``."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for batch in slices(images, batch_size):
        for name, out in zip(outputs, session.run(list(outputs), {INPUT_NAME: np.ascontiguousarray(batch)})):
            parts[name].append(out)
    return {name: np.concatenate(got) for name, got in parts.items()}


def torch_reference(module: nn.Module) -> nn.Module:
    """The uint8-NHWC module to compare against: ``module`` itself or ``ImageClassifier(module)``."""
    return module if isinstance(module, ImageClassifier | ExplainedClassifier) else ImageClassifier(module)


@torch.inference_mode()
def torch_outputs(module: nn.Module, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """PyTorch eager outputs (probabilities for a classifier, the tensor itself otherwise) on the CPU."""
    was_training = module.training
    module.eval()
    try:
        parts = []
        for i in range(0, len(images), batch_size):
            out = module(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])))
            parts.append((out[1] if isinstance(out, tuple) else out).float().numpy())
    finally:
        module.train(was_training)
    return np.concatenate(parts)


def compare_outputs(expected: np.ndarray, actual: np.ndarray, *, atol: float, provider: str,
                    classify: bool = True) -> dict[str, Any]:
    """Parity report for two output arrays; argmax disagreements count as failures unless they are near-ties."""
    diff = float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64))))
    report: dict[str, Any] = {"max_abs_diff": diff, "n_images": int(len(expected)), "provider": provider,
                              "atol": atol}
    passed = diff <= atol
    if classify:
        top_ref, top_onnx = expected.argmax(1), actual.argmax(1)
        agree = top_ref == top_onnx
        rows = np.arange(len(expected))
        near_tie = np.abs(expected[rows, top_ref] - expected[rows, top_onnx]) <= atol
        report["max_abs_diff_probabilities"] = report.pop("max_abs_diff")
        report["top1_agreement"] = float(agree.mean())
        passed = passed and bool(np.all(agree | near_tie))
    report["passed"] = bool(passed)
    return report


def check_parity(onnx_path: str | os.PathLike[str], classifier: nn.Module, images_uint8_nhwc: np.ndarray, *,
                 atol: float = 1e-4, provider: str = CPU) -> dict[str, Any]:
    """Compare onnxruntime's probabilities with PyTorch's on the same uint8 images.

    Returns {"max_abs_diff_probabilities", "top1_agreement", "n_images", "provider", "atol", "passed"};
    ``passed`` requires the largest probability difference <= ``atol`` and the same top-1 class (ties aside).
    """
    images = check_batch(images_uint8_nhwc, what="parity images")
    session = cpu_session(onnx_path, providers=[provider])
    actual = run_onnx(session, images)
    expected = torch_outputs(torch_reference(classifier), images)
    return compare_outputs(expected, actual, atol=atol, provider=session.get_providers()[0])


@torch.inference_mode()
def check_explain_parity(onnx_path: str | os.PathLike[str], module: ExplainedClassifier, images: np.ndarray, *,
                         rtol: float = 1e-4, batch_size: int = 32) -> dict[str, Any]:
    """Compare the ``cam`` and ``ood_score`` outputs of an explained export with PyTorch's on the same images.

    The maps are compared relative to their largest magnitude (``rtol``), the scores (in [0, 2]) absolutely.
    Returns ``{"max_abs_diff_cam", "max_abs_cam", "max_abs_diff_ood_score", "n_images", "passed"}``.
    """
    images = check_batch(images, what="parity images")
    session = cpu_session(onnx_path)
    was_training = module.training
    module.eval()
    scale, cam_diff, ood_diff = 1.0, 0.0, 0.0
    try:  # in batches, as torch_outputs and run_onnx: a thousand validation images at once would take gigabytes
        for i in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[i:i + batch_size])
            _, _, cam, ood = module(torch.from_numpy(batch))
            cam_onnx, ood_onnx = session.run(["cam", "ood_score"], {INPUT_NAME: batch})  # one run, both outputs
            scale = max(scale, float(cam.abs().max()))
            cam_diff = max(cam_diff, float(np.max(np.abs(cam.numpy() - cam_onnx))))
            ood_diff = max(ood_diff, float(np.max(np.abs(ood.numpy() - ood_onnx))))
    finally:
        module.train(was_training)
    return {"max_abs_diff_cam": cam_diff, "max_abs_cam": scale, "max_abs_diff_ood_score": ood_diff,
            "n_images": int(len(images)), "passed": cam_diff <= rtol * scale and ood_diff <= rtol * 10}
