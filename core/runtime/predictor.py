"""Serve an exported model with onnxruntime: no torch at import time, labels and preprocessing from metadata.

``Predictor`` loads a ``model.onnx`` (see ``core.runtime.contract``), picks an execution provider
(``core.runtime.providers``), and classifies PIL images, image files or arrays after the same resize + centre-crop
rule as training (``core.runtime.images``). One ``Predictor`` may be shared by many threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from core.runtime.contract import FEATURES_OUTPUT, INPUT_NAME, OUTPUT_NAMES, ModelInfo, bad_model, parse_metadata
from core.runtime.devices import CPU, GPU_PROVIDERS
from core.runtime.images import ImageInput, as_rgb, check_batch, resize_and_crop
from core.runtime.providers import check_model_path, create_session, open_session


def check_signature(session: ort.InferenceSession, info: ModelInfo) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)":
        got = [(i.name, i.type, i.shape) for i in inputs]
        raise bad_model(info.path, f"expected one input {INPUT_NAME!r} of type uint8 [N, H, W, 3], got {got}.")
    shape = inputs[0].shape
    if len(shape) != 4 or shape[1:] != [info.image_size, info.image_size, 3]:
        raise bad_model(info.path, f"input {INPUT_NAME!r} has shape {shape}, expected "
                              f"[N, {info.image_size}, {info.image_size}, 3] (from metadata 'image_size').")
    outputs = {o.name: o for o in session.get_outputs()}
    expected = OUTPUT_NAMES if info.kind == "classifier" else (FEATURES_OUTPUT,)
    if any(name not in outputs for name in expected):
        raise bad_model(info.path, f"expected outputs {list(expected)}, got {list(outputs)}.")
    if info.kind == "classifier":
        dim = outputs["probabilities"].shape[-1]
        if isinstance(dim, int) and dim != info.num_classes:
            raise bad_model(info.path, f"output 'probabilities' has {dim} classes but metadata 'classes' lists "
                                  f"{info.num_classes}.")


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Read and validate a model's metadata and signature (CPU, no graph optimisation: fast)."""
    path = Path(path)
    check_model_path(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = open_session(path, [CPU], options)
    info = parse_metadata(session.get_modelmeta().custom_metadata_map, path)
    check_signature(session, info)
    return info


def prepare_image(image: ImageInput, info: ModelInfo) -> np.ndarray:
    """Decode if needed, then resize + centre-crop exactly as in training: uint8 ``[S, S, 3]``."""
    cropped = resize_and_crop(as_rgb(image), info.image_size, info.resize_size, info.interpolation)
    return np.asarray(cropped, dtype=np.uint8)


# ---------------------------------------------------------------- sessions


class _Runner:
    """Shared session plumbing: provider choice, fallback warning, optional IO binding, batching."""

    output_name: str

    def __init__(self, path: Path, device: str, intra_op_threads: int | None, io_binding: bool | None,
                 batch_size: int, spin: bool = False):
        self.model_path = path
        self.device = device
        self._session, self.fallback_warning = create_session(path, device, intra_op_threads=intra_op_threads,
                                                              spin=spin)
        self.providers = self._session.get_providers()
        self.provider = self.providers[0]
        self._on_gpu = self.provider in GPU_PROVIDERS
        self._io_binding = self._on_gpu if io_binding is None else io_binding
        self._device_type = "cuda" if self._on_gpu else "cpu"
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size

    def _run_batch(self, batch: np.ndarray) -> np.ndarray:
        if not self._io_binding:
            return self._session.run([self.output_name], {INPUT_NAME: batch})[0]
        binding = self._session.io_binding()  # one per call: IO bindings are not shared between threads
        binding.bind_cpu_input(INPUT_NAME, batch)
        binding.bind_output(self.output_name, self._device_type)
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) <= self.batch_size:
            return self._run_batch(batch)
        parts = [self._run_batch(batch[i:i + self.batch_size]) for i in range(0, len(batch), self.batch_size)]
        return np.concatenate(parts)

    def _warm_up(self, size: int) -> None:
        if self._on_gpu:  # the first CUDA run allocates memory and picks convolution algorithms
            self._run_batch(np.zeros((1, size, size, 3), dtype=np.uint8))


class Predictor(_Runner):
    """Classify images with an exported model; labels, input size and resize rule come from its metadata."""

    output_name = "probabilities"

    def __init__(self, model_path: str | os.PathLike[str], *, device: str = "auto",
                 intra_op_threads: int | None = None, io_binding: bool | None = None, batch_size: int = 32,
                 spin: bool = False):
        path = Path(model_path)
        super().__init__(path, device, intra_op_threads, io_binding, batch_size, spin)
        self.info = parse_metadata(self._session.get_modelmeta().custom_metadata_map, path)
        if self.info.kind != "classifier":
            raise bad_model(path, f"this is a {self.info.kind!r} model (a feature extractor), not a classifier; "
                             "load it with OnnxFeatureExtractor.")
        check_signature(self._session, self.info)
        self.classes: tuple[str, ...] = self.info.classes
        self.image_size = self.info.image_size
        self._warm_up(self.image_size)

    def __repr__(self) -> str:
        return (f"Predictor({str(self.model_path)!r}, classes={len(self.classes)}, image_size={self.image_size}, "
                f"provider={self.provider!r})")

    def prepare(self, image: ImageInput) -> np.ndarray:
        """One image as the model's uint8 ``[S, S, 3]`` input (decode, resize, centre-crop)."""
        return prepare_image(image, self.info)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, num_classes]`` float32 for prepared uint8 images ``[N, S, S, 3]``."""
        return self._run(check_batch(images, self.image_size))

    def predict(self, images: Sequence[ImageInput] | ImageInput, top_k: int = 3) -> list[dict[str, Any]]:
        """Classify images (PIL images, file paths or uint8 arrays); one result dict per image."""
        if isinstance(images, (Image.Image, str, os.PathLike, np.ndarray)):
            images = [images]
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        images = list(images)
        if not images:
            return []
        probs = self.predict_arrays(np.stack([self.prepare(im) for im in images]))
        k = min(top_k, len(self.classes))
        results = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            ranked = [{"label": self.classes[i], "probability": float(row[i])} for i in order]
            results.append({"label": ranked[0]["label"], "probability": ranked[0]["probability"],
                            "top_k": ranked, "provider": self.provider})
        return results


class OnnxFeatureExtractor(_Runner):
    """Backbone features via onnxruntime: uint8 ``[N, S, S, 3]`` -> float32 ``[N, feature_dim]``, from a ``features``
    model (``export.onnx_export.cached_backbone_onnx`` builds and caches one per backbone and image size)."""

    output_name = FEATURES_OUTPUT

    def __init__(self, model_path: str | os.PathLike[str], device: str = "auto", *,
                 intra_op_threads: int | None = None, batch_size: int = 64):
        path = Path(model_path)
        super().__init__(path, device, intra_op_threads, None, batch_size)
        self.info = parse_metadata(self._session.get_modelmeta().custom_metadata_map, path)
        if self.info.kind != "features":
            raise bad_model(path, f"this is a {self.info.kind!r} model, not a feature extractor; load it with "
                                  "Predictor.")
        check_signature(self._session, self.info)
        self.backbone = self.info.backbone
        self.image_size = self.info.image_size
        self.engine = f"onnxruntime-{self.provider}"  # the name core.features reports
        self._warm_up(self.image_size)

    def extract(self, images: np.ndarray) -> np.ndarray:
        """Float32 features for prepared uint8 images ``[N, S, S, 3]``."""
        return self._run(check_batch(images, self.image_size)).astype(np.float32, copy=False)


# ---------------------------------------------------------------- serving helpers


class PredictorCache:
    """Thread-safe LRU of ``Predictor`` keyed by (path, mtime, size, device): a server loads each model file once
    and shares it between requests; a file rewritten in place is loaded again."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, Predictor] = OrderedDict()
        self._building: dict[tuple, threading.Lock] = {}
        self.loads = 0  # how many Predictors were built

    @staticmethod
    def _key(path: Path, device: str) -> tuple:
        st = path.stat()
        return str(path.resolve()), st.st_mtime_ns, st.st_size, device

    def get(self, path: str | os.PathLike[str], device: str = "auto") -> Predictor:
        path = Path(path)
        key = self._key(path, device)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            build_lock = self._building.setdefault(key, threading.Lock())
        with build_lock:  # one build per file; other files are not blocked
            with self._lock:
                if key in self._items:
                    return self._items[key]
            predictor = Predictor(path, device=device)
            with self._lock:
                self.loads += 1
                for old in [k for k in self._items if k[0] == key[0]]:  # older versions of the same file
                    del self._items[old]
                self._items[key] = predictor
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
                self._building.pop(key, None)
            return predictor

    def evict_under(self, folder: str | os.PathLike[str]) -> None:
        """Forget every model under ``folder`` (before the folder is deleted or replaced)."""
        prefix = str(Path(folder).resolve()) + os.sep
        with self._lock:
            for key in [k for k in self._items if k[0].startswith(prefix)]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


# Run in a child process: a malformed or hostile file can only crash that process.
_CHECK_MODEL = r"""
import json, sys
import numpy as np
from core.runtime.contract import ModelFormatError
from core.runtime.predictor import Predictor
try:
    p = Predictor(sys.argv[1], device="cpu", intra_op_threads=1)
    p.predict_arrays(np.zeros((1, p.image_size, p.image_size, 3), np.uint8))
    i = p.info
    print(json.dumps({"ok": True, "classes": list(i.classes), "backbone": i.backbone, "image_size": i.image_size,
                      "variant": i.variant}))
except (ModelFormatError, ValueError, OSError) as exc:
    print(json.dumps({"ok": False, "error": str(exc)}))
"""


def check_model_file(path: str | os.PathLike[str], timeout: float = 90.0) -> dict[str, Any]:
    """Load ``path`` with a ``Predictor`` and run it once, in a child process, before trusting an uploaded file.

    Returns ``{"ok": True, "classes", "backbone", "image_size", "variant"}`` or ``{"ok": False, "error"}``; a file
    that crashes or hangs onnxruntime gives ``ok: False`` instead of taking this process down.
    """
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHECK_MODEL, str(path)], capture_output=True, text=True,
                              timeout=timeout, cwd=root, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"loading the model took longer than {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"ok": False, "error": f"onnxruntime could not load it (the check process exited with "
                                      f"{proc.returncode})"}
    return json.loads(lines[-1])
