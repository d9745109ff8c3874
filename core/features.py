"""Frozen-backbone feature extraction: pure inference, done once per image and cached.

Two engines, same contract (uint8 ``[N, H, W, 3]`` in, float32 ``[N, feature_dim]`` out):
- ``TorchFeatureExtractor``: the backbone in ``eval()`` under ``inference_mode``; on CUDA with
  channels_last and autocast (fp16), which is where the GPU is fastest.
- ``core.runtime.predictor.OnnxFeatureExtractor``: an ONNX export of the backbone (built once and cached by
  ``export.onnx_export.cached_backbone_onnx``) served by onnxruntime, several times faster than torch eager on CPU.
``make_feature_extractor`` picks onnxruntime on CPU and torch on CUDA, and falls back to torch with a
warning if the ONNX path cannot be built.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

import models
from models.preprocess import ImagePreprocess

from .config import FEATURE_ENGINES
from .runtime.images import slices

log = logging.getLogger(__name__)


class FeatureEngine(Protocol):
    engine: str  # e.g. "torch-cpu", "onnxruntime-CPUExecutionProvider"

    def extract(self, images: np.ndarray) -> np.ndarray: ...


class TorchFeatureExtractor:
    def __init__(self, backbone: torch.nn.Module, device: torch.device):
        self.device = device
        self.preprocess = ImagePreprocess(backbone.spec.mean, backbone.spec.std).to(device)
        self.backbone = backbone.to(device).eval()
        if device.type == "cuda":
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.engine = f"torch-{device.type}"

    @torch.inference_mode()
    def extract(self, images: np.ndarray) -> np.ndarray:
        x = self.preprocess(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        amp = (
            torch.autocast("cuda", dtype=torch.float16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with amp:
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.backbone(x)
        return out.float().cpu().numpy()


def make_feature_extractor(
    backbone: str, image_size: int, device: torch.device, *, engine: str = "auto"
) -> FeatureEngine:
    """``engine``: "auto" (onnxruntime on CPU, torch on CUDA), "torch" or "onnxruntime"."""
    if engine not in FEATURE_ENGINES:
        raise ValueError(f"Unknown feature engine {engine!r}: use auto, torch or onnxruntime.")
    if engine == "onnxruntime" or (engine == "auto" and device.type == "cpu"):
        try:
            from core.runtime.predictor import OnnxFeatureExtractor
            from export.onnx_export import cached_backbone_onnx  # needs torch only when the file is (re)built

            return OnnxFeatureExtractor(cached_backbone_onnx(backbone, image_size), device=device.type)
        except Exception as exc:  # noqa: BLE001 - any failure here has a working fallback
            if engine == "onnxruntime":
                raise
            log.warning("onnxruntime feature extraction unavailable (%s); using torch eager instead.", exc)
    return TorchFeatureExtractor(models.get_backbone(backbone, pretrained=True), device)


def extract_all(
    extractor: FeatureEngine,
    images: np.ndarray,
    *,
    batch_size: int = 32,
    on_batch: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Features for every image, in batches; ``on_batch(done, total)`` after each batch."""
    out, done = [], 0
    for batch in slices(images, batch_size):  # a memory-mapped crop file: one batch resident, not the file
        out.append(extractor.extract(batch))
        done += len(batch)
        if on_batch is not None:
            on_batch(done, len(images))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


_warm_up: threading.Thread | None = None


def warm_up_feature_engine(backbone: str, image_size: int, device: torch.device) -> threading.Thread:
    """Build (and cache) the feature engine in a background thread ahead of the first training run; failures are
    only logged. ``run_compare`` waits for it (``wait_for_warm_up``): torch's exporter must not run beside a
    training thread, since torch.fx keeps global tracing state (a seed call during an export failed with
    ``KeyError: 'custom'``)."""
    global _warm_up

    def build() -> None:
        try:
            make_feature_extractor(backbone, image_size, device)
        except Exception as exc:  # noqa: BLE001 - a warm-up must never take the app down
            log.warning("feature engine warm-up failed: %s", exc)

    _warm_up = threading.Thread(target=build, name="feature-engine-warm-up", daemon=True)
    _warm_up.start()
    return _warm_up


def wait_for_warm_up() -> None:
    """Block until a warm-up started by ``warm_up_feature_engine`` has finished (at once if none runs)."""
    thread = _warm_up
    if thread is not None and thread is not threading.current_thread():
        thread.join()
