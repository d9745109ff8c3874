"""Serve an exported model with onnxruntime: no torch at import time, labels and preprocessing from metadata.

``Predictor`` loads a ``model.onnx`` (see ``core.runtime.contract``), picks an execution provider
(``core.runtime.providers``), and classifies PIL images, image files or arrays after the same resize + centre-crop
rule as training (``core.runtime.images``). One ``Predictor`` may be shared by many threads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from core.runtime.contract import (
    EXPLAIN_OUTPUTS,
    FEATURES_OUTPUT,
    INPUT_NAME,
    ModelFormatError,
    ModelInfo,
    bad_model,
    parse_metadata,
)
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
    expected = info.outputs if info.kind == "classifier" else (FEATURES_OUTPUT,)
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


class ModelTimeLimitError(ModelFormatError):
    """A run took longer than the ``time_limit`` it was given and onnxruntime stopped it."""

    title = "The model was too slow"


class _Runner:
    """Shared session plumbing: provider choice, fallback warning, optional IO binding, batching, time limit."""

    output_name: str

    def __init__(self, path: Path, device: str, intra_op_threads: int | None, io_binding: bool | None,
                 batch_size: int, spin: bool = False, time_limit: float | None = None, tensorrt: bool | None = None):
        if time_limit is not None and not time_limit > 0:
            raise ValueError(f"time_limit must be a number of seconds > 0 or None, got {time_limit!r}.")
        self.time_limit = time_limit
        self.model_path = path
        self.device = device
        self._session, self.fallback_warning = create_session(path, device, intra_op_threads=intra_op_threads,
                                                              spin=spin, tensorrt=tensorrt)
        self.providers = self._session.get_providers()
        self.provider = self.providers[0]
        self._on_gpu = self.provider in GPU_PROVIDERS
        self._io_binding = self._on_gpu if io_binding is None else io_binding
        self._device_type = "cuda" if self._on_gpu else "cpu"
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size

    def _run_batch(self, batch: np.ndarray, options: ort.RunOptions | None = None,
                   names: Sequence[str] | None = None) -> list[np.ndarray]:
        names = list(names or [self.output_name])
        if not self._io_binding:
            return self._session.run(names, {INPUT_NAME: batch}, options)
        binding = self._session.io_binding()  # one per call: IO bindings are not shared between threads
        binding.bind_cpu_input(INPUT_NAME, batch)
        for name in names:
            binding.bind_output(name, self._device_type)
        self._session.run_with_iobinding(binding, options)
        return binding.copy_outputs_to_cpu()

    def _run_limited(self, batch: np.ndarray, seconds: float, n_images: int,
                     names: Sequence[str] | None = None) -> list[np.ndarray]:
        """``_run_batch`` stopped by onnxruntime once ``seconds`` have passed (``RunOptions.terminate``, which the
        session checks between operators), raising ``ModelTimeLimitError``."""
        options = ort.RunOptions()
        options.log_severity_level = 4  # the stop is reported by the exception below, not by onnxruntime's log
        stopped = threading.Event()

        def stop() -> None:
            stopped.set()
            options.terminate = True

        timer = threading.Timer(max(seconds, 0.0), stop)
        timer.daemon = True
        timer.start()
        try:
            return self._run_batch(batch, options, names)
        except Exception:
            if not stopped.is_set():
                raise
        finally:
            timer.cancel()
        images = f"{n_images} image{'s' if n_images != 1 else ''}"
        raise ModelTimeLimitError(f"{self.model_path}: the model took longer than {self.time_limit:g} s to classify "
                                  f"{images} and was stopped. Models exported by this app take well under a second "
                                  "per image; try fewer images at once, or a smaller model.") from None

    def _run(self, batch: np.ndarray, names: Sequence[str] | None = None) -> list[np.ndarray]:
        """The outputs ``names`` (default: ``output_name`` alone) for ``batch``, run ``batch_size`` images at a time."""
        chunks = [batch] if len(batch) <= self.batch_size else \
            [batch[i:i + self.batch_size] for i in range(0, len(batch), self.batch_size)]
        if self.time_limit is None:
            parts = [self._run_batch(chunk, names=names) for chunk in chunks]
        else:  # one deadline for the whole call, however many batches it takes
            deadline = time.monotonic() + self.time_limit
            parts = [self._run_limited(chunk, deadline - time.monotonic(), len(batch), names) for chunk in chunks]
        return parts[0] if len(parts) == 1 else [np.concatenate(outs) for outs in zip(*parts)]

    def _warm_up(self, size: int) -> None:
        if self._on_gpu:  # the first CUDA run allocates memory and picks convolution algorithms
            self._run_batch(np.zeros((1, size, size, 3), dtype=np.uint8))


class Predictor(_Runner):
    """Classify images with an exported model; labels, input size and resize rule come from its metadata."""

    output_name = "probabilities"

    def __init__(self, model_path: str | os.PathLike[str], *, device: str = "auto",
                 intra_op_threads: int | None = None, io_binding: bool | None = None, batch_size: int = 32,
                 spin: bool = False, time_limit: float | None = None, tensorrt: bool | None = None):
        """``tensorrt``: try onnxruntime's TensorRT provider first (None: only with ``TRANSFER_LAB_TENSORRT=1``).
        ``time_limit``: seconds one ``predict``/``predict_arrays`` call may run (all its batches together);
        onnxruntime stops a longer one between two operators and ``ModelTimeLimitError`` is raised. None (the
        default): no limit. For models that visitors upload (after ``check_model_file``)."""
        path = Path(model_path)
        super().__init__(path, device, intra_op_threads, io_binding, batch_size, spin, time_limit, tensorrt)
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
        return self._run(check_batch(images, self.image_size))[0]

    @property
    def explains(self) -> bool:
        """The model also gives class activation maps and an out-of-distribution score (``explain_arrays``)."""
        return self.info.explains

    def explain_arrays(self, images: np.ndarray, *, maps: bool = True) -> dict[str, np.ndarray]:
        """``{"probabilities" [N, K], "cam" [N, K, h, w], "ood_score" [N], "fits_no_class" [N] bool}`` for prepared
        uint8 images, from a model exported with ``explain`` (``explains``); ``ModelFormatError`` otherwise.
        ``maps=False`` leaves out ``cam`` (a caller that shows one map need not hold one per image)."""
        if not self.explains:
            raise bad_model(self.model_path, "this model has no 'cam' and 'ood_score' outputs; export it with "
                                             "explain (`python -m export onnx --run RUN_DIR --explain`).")
        names = ("probabilities", *EXPLAIN_OUTPUTS) if maps else ("probabilities", EXPLAIN_OUTPUTS[1])
        outputs = dict(zip(names, self._run(check_batch(images, self.image_size), names)))
        n, k, scores = len(images), self.info.num_classes, outputs["ood_score"]
        cam = outputs.get("cam", np.zeros((n, k, 1, 1), np.float32))
        if cam.ndim != 4 or cam.shape[:2] != (n, k) or not 0 < cam.shape[2] <= self.image_size \
                or not 0 < cam.shape[3] <= self.image_size or scores.shape != (n,):
            raise bad_model(self.model_path, f"its 'cam' output should be [{n}, {k}, h, w] and 'ood_score' [{n}] for "
                                             f"{n} images, got {list(cam.shape)} and {list(scores.shape)}.")
        return {**outputs, "fits_no_class": scores > self.info.ood_threshold}

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
        return self._run(check_batch(images, self.image_size))[0].astype(np.float32, copy=False)


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
    def _key(path: Path, device: str, time_limit: float | None = None) -> tuple:
        st = path.stat()
        return str(path.resolve()), st.st_mtime_ns, st.st_size, device, time_limit

    def get(self, path: str | os.PathLike[str], device: str = "auto", *, time_limit: float | None = None
            ) -> Predictor:
        """The shared ``Predictor`` of ``path`` on ``device``, built on first use; ``time_limit`` as in
        ``Predictor`` (pass one for files that visitors uploaded)."""
        path = Path(path)
        key = self._key(path, device, time_limit)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            build_lock = self._building.setdefault(key, threading.Lock())
        with build_lock:  # one build per file; other files are not blocked
            with self._lock:
                if key in self._items:
                    return self._items[key]
            predictor = Predictor(path, device=device, time_limit=time_limit)
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


# The limits of the check's child process. Measured (VmPeak, the address space RLIMIT_AS counts, and CPU time) over
# the whole check (structure, load, three images) with the environment check_model_file sets: efficientnet_b0 at
# 512 px, the largest activations this app exports, 0.49 GB and 1.8 s; resnet18 at 512 px, the largest weights and
# cost, 0.37 GB and 1.5 s; efficientnet_lite0 at 224 px 0.25 GB and 1.0 s. The imports alone (Python, numpy, Pillow,
# onnx, onnxruntime) take ~0.2 GB. 2 GB leaves 4x room, and stops a model that would take gigabytes.
CHECK_MEMORY_BYTES = 2 * 1024 ** 3
CHECK_CPU_SECONDS = 30  # ~15x the slowest real check; a check on a loaded server waits for the CPU, not with it
CHECK_SEED = 0  # the random test image: the same pixels on every check

# Run in a child process: a malformed or hostile file can only crash that process, and the limits are set before
# anything else (not with preexec_fn, which is unsafe in a threaded server). The structural check comes first, so
# a model it refuses never reaches onnxruntime; then the model runs on a black image and on a batch of two random
# ones (a model whose cost depends on the pixels would pass on black alone).
_CHECK_MODEL = r"""
import json, sys

def limit(name, soft, hard):
    try:
        import resource  # POSIX; Linux enforces all three (macOS ignores RLIMIT_AS)
        kind = getattr(resource, name)
        old = resource.getrlimit(kind)[1]
        low = lambda v: v if old == resource.RLIM_INFINITY else min(v, old)
        resource.setrlimit(kind, (low(soft), low(hard)))
    except (ImportError, AttributeError, ValueError, OSError):
        pass

path, memory, cpu, structural, seed = sys.argv[1], *map(int, sys.argv[2:4]), sys.argv[4] == "1", int(sys.argv[5])
limit("RLIMIT_CORE", 0, 0)
if memory:
    limit("RLIMIT_AS", memory, memory)
if cpu:  # SIGXCPU at the soft limit, SIGKILL 5 s later
    limit("RLIMIT_CPU", cpu, cpu + 5)

def answer(**fields):
    print(json.dumps(fields), flush=True)

import numpy as np
from core.runtime.contract import ModelFormatError
from core.runtime.predictor import Predictor
try:
    if structural:
        from core.runtime.model_check import check_structure
        check_structure(path)
    p = Predictor(path, device="cpu", intra_op_threads=1)
    s = p.image_size
    p.predict_arrays(np.zeros((1, s, s, 3), np.uint8))
    p.predict_arrays(np.random.default_rng(seed).integers(0, 256, (2, s, s, 3), dtype=np.uint8))
    i = p.info
    answer(ok=True, classes=list(i.classes), backbone=i.backbone, image_size=i.image_size, variant=i.variant)
except MemoryError:
    answer(ok=False, error="memory")
except (ModelFormatError, ValueError, OSError) as exc:
    answer(ok=False, error=str(exc))
except Exception as exc:  # onnxruntime's own errors (Fail, RuntimeException, ...) while running the model
    text = str(exc).strip()
    alloc = any(w in text.lower() for w in ("alloc", "out of memory", "memory limit"))
    answer(ok=False, error="memory" if alloc else f"onnxruntime could not run it ({type(exc).__name__}: {text[:400]})")
"""


def check_model_file(path: str | os.PathLike[str], timeout: float = 90.0, *,
                     memory_bytes: int | None = CHECK_MEMORY_BYTES, cpu_seconds: int | None = CHECK_CPU_SECONDS,
                     structural: bool = True) -> dict[str, Any]:
    """Check an uploaded file in a child process before trusting it: ``core.runtime.model_check.check_structure``
    (operators, weights, shapes, cost: nothing runs), then a ``Predictor`` on one black and two random images.

    The child runs under an address-space limit (``memory_bytes``), a CPU-time limit (``cpu_seconds``) and the wall
    clock ``timeout``; a file that crashes, hangs or exhausts onnxruntime gives ``ok: False`` instead of taking this
    process down. This process never reads the model. ``structural=False`` skips the structural check (tests of
    the limits behind it). Returns ``{"ok": True, "classes", "backbone", "image_size", "variant"}`` or
    ``{"ok": False, "error"}``, the error worded for the person who uploaded the file.
    """
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
           # one thread each and few malloc arenas: the address space stays small and predictable under the limit
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    args = [sys.executable, "-c", _CHECK_MODEL, str(path), str(memory_bytes or 0), str(cpu_seconds or 0),
            "1" if structural else "0", str(CHECK_SEED)]
    memory = f"{memory_bytes / 1024 ** 3:g} GB" if memory_bytes else "the memory available"
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=root, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"checking the model took longer than {timeout:g} s, so it was stopped. "
                                      "Models exported by this app are checked in a few seconds."}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        result = json.loads(lines[-1])
        if result.get("error") == "memory":
            result["error"] = (f"the model needed more than {memory} of memory when it was checked, so it was "
                               "stopped. Models exported by this app need far less.")
        return result
    cpu_signal, kill_signal = (getattr(signal, name, None) for name in ("SIGXCPU", "SIGKILL"))  # POSIX only
    if cpu_signal and proc.returncode == -cpu_signal:
        return {"ok": False, "error": f"checking the model used more than {cpu_seconds} s of CPU time, so it was "
                                      "stopped. Models exported by this app are checked in a few seconds."}
    if kill_signal and proc.returncode == -kill_signal:
        return {"ok": False, "error": "checking the model was killed: it used too much CPU time or memory. Models "
                                      "exported by this app are checked in a few seconds."}
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else "a signal"
        return {"ok": False, "error": f"onnxruntime crashed on it ({name}); it is not a model this app can use."}
    tail = proc.stderr.strip().splitlines()[-1:] or [""]
    if "MemoryError" in tail[0] or "bad_alloc" in proc.stderr:
        return {"ok": False, "error": f"loading the model needed more than {memory} of memory, so it was stopped."}
    return {"ok": False, "error": f"onnxruntime could not load it (the check process exited with "
                                  f"{proc.returncode})"}
