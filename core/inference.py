"""Serve an exported model with onnxruntime: no torch at import time, labels and preprocessing from metadata.

``Predictor`` loads a ``model.onnx`` written by ``python -m export onnx`` (graph input ``image``: uint8 RGB
``[N, H, W, 3]``; outputs ``logits`` and ``probabilities``), picks an execution provider, and classifies
PIL images, image files or arrays after the same resize + centre-crop rule as training (``core.preprocess``).
One ``Predictor`` may be shared by many threads.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from core.images import open_rgb, to_rgb
from core.preprocess import resize_and_crop

log = logging.getLogger(__name__)

FORMAT = "transfer-lab/1"
FORMAT_PREFIX = "transfer-lab/"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")
FEATURES_OUTPUT = "features"
INTERPOLATIONS = ("bilinear", "bicubic")
DEVICES = ("auto", "cpu", "cuda")
TENSORRT_ENV = "TRANSFER_LAB_TENSORRT"
MAX_DEFAULT_THREADS = 8

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_GPU_PROVIDERS = (TENSORRT, CUDA)

_EXPORT_HINT = "Export a trained run with `python -m export onnx --run RUN_DIR`."
_REQUIRED_KEYS = ("format", "image_size", "resize_size", "interpolation")

ImageInput = Image.Image | str | os.PathLike[str] | np.ndarray


class ModelFormatError(ValueError):
    """The file is not a usable transfer-lab ONNX model; the message says what was expected."""


@dataclass(frozen=True)
class ModelInfo:
    """What an exported model's metadata says about itself."""

    path: Path
    kind: str  # "classifier" | "features"
    image_size: int
    resize_size: int
    interpolation: str
    classes: tuple[str, ...] = ()
    backbone: str = ""
    training_mode: str = ""
    variant: str = "fp32"
    metrics: dict[str, Any] = field(default_factory=dict)
    project_version: str = ""
    format: str = FORMAT
    resize_rule: str = ""
    feature_dim: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------- metadata


def _bad(path: Path, problem: str) -> ModelFormatError:
    return ModelFormatError(f"{path}: {problem}")


def _int_key(meta: Mapping[str, str], key: str, path: Path) -> int:
    try:
        value = int(meta[key])
    except (KeyError, ValueError):
        got = meta.get(key)
        raise _bad(path, f"metadata {key!r} must be a positive integer, got {got!r}. {_EXPORT_HINT}") from None
    if value <= 0:
        raise _bad(path, f"metadata {key!r} must be a positive integer, got {value}. {_EXPORT_HINT}")
    return value


def parse_metadata(meta: Mapping[str, str], path: str | os.PathLike[str]) -> ModelInfo:
    """Validate an exported model's ``metadata_props`` and return them typed; raise ``ModelFormatError``."""
    path = Path(path)
    fmt = meta.get("format")
    if fmt is None:
        raise _bad(
            path,
            "this ONNX model was not exported by transfer-lab: its metadata has no 'format' entry "
            f"(expected {FORMAT!r} with 'classes', 'image_size', 'resize_size' and 'interpolation'). {_EXPORT_HINT}",
        )
    if not fmt.startswith(FORMAT_PREFIX):
        raise _bad(path, f"metadata 'format' is {fmt!r}, expected {FORMAT!r}. {_EXPORT_HINT}")
    if fmt != FORMAT:
        raise _bad(path, f"model format {fmt!r} is not supported by this version (reads {FORMAT!r}); "
                         "upgrade transfer-lab or re-export the model with this version.")
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise _bad(path, f"metadata is missing {', '.join(map(repr, missing))}. {_EXPORT_HINT}")
    image_size = _int_key(meta, "image_size", path)
    resize_size = _int_key(meta, "resize_size", path)
    if resize_size < image_size:
        raise _bad(path, f"metadata 'resize_size' ({resize_size}) is smaller than 'image_size' ({image_size}).")
    interpolation = meta["interpolation"]
    if interpolation not in INTERPOLATIONS:
        raise _bad(path, f"metadata 'interpolation' must be one of {INTERPOLATIONS}, got {interpolation!r}.")
    kind = meta.get("kind", "classifier")
    classes: tuple[str, ...] = ()
    if kind == "classifier":
        try:
            parsed = json.loads(meta["classes"])
        except (KeyError, ValueError):
            raise _bad(path, f"metadata 'classes' must be a JSON list of class names, got {meta.get('classes')!r}. "
                             f"{_EXPORT_HINT}") from None
        if not isinstance(parsed, list) or len(parsed) < 2 or not all(isinstance(c, str) for c in parsed):
            raise _bad(path, f"metadata 'classes' must list at least two class names, got {parsed!r}.")
        classes = tuple(parsed)
    elif kind != "features":
        raise _bad(path, f"metadata 'kind' must be 'classifier' or 'features', got {kind!r}.")
    try:
        metrics = json.loads(meta.get("metrics") or "{}")
    except ValueError:
        metrics = {}
    feature_dim = int(meta["feature_dim"]) if meta.get("feature_dim", "").isdigit() else None
    return ModelInfo(
        path=path,
        kind=kind,
        image_size=image_size,
        resize_size=resize_size,
        interpolation=interpolation,
        classes=classes,
        backbone=meta.get("backbone", ""),
        training_mode=meta.get("training_mode", ""),
        variant=meta.get("variant", "fp32"),
        metrics=metrics if isinstance(metrics, dict) else {},
        project_version=meta.get("project_version", ""),
        format=fmt,
        resize_rule=meta.get("resize_rule", ""),
        feature_dim=feature_dim,
    )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"Model file {path} does not exist. {_EXPORT_HINT}")
    if path.is_dir():
        raise _bad(path, "is a folder; pass the .onnx file inside it (e.g. RUN_DIR/model.onnx).")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise _bad(path, f"the file is empty, not an ONNX model. {_EXPORT_HINT}")
    if head.startswith(b"PK"):
        raise _bad(path, f"this is a zip file (a PyTorch .pt checkpoint?), not an ONNX model. {_EXPORT_HINT}")


def _open_session(path: Path, providers: Sequence[str | tuple[str, dict]],
                  options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, InvalidGraph, ... (pybind types)
        raise _bad(path, f"not a readable ONNX model ({type(exc).__name__}: {str(exc).strip()[:600]}). "
                         f"Expected an .onnx file written by transfer-lab. {_EXPORT_HINT}") from exc


def _check_signature(session: ort.InferenceSession, info: ModelInfo) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)":
        got = [(i.name, i.type, i.shape) for i in inputs]
        raise _bad(info.path, f"expected one input {INPUT_NAME!r} of type uint8 [N, H, W, 3], got {got}.")
    shape = inputs[0].shape
    if len(shape) != 4 or shape[1:] != [info.image_size, info.image_size, 3]:
        raise _bad(info.path, f"input {INPUT_NAME!r} has shape {shape}, expected "
                              f"[N, {info.image_size}, {info.image_size}, 3] (from metadata 'image_size').")
    outputs = {o.name: o for o in session.get_outputs()}
    expected = OUTPUT_NAMES if info.kind == "classifier" else (FEATURES_OUTPUT,)
    if any(name not in outputs for name in expected):
        raise _bad(info.path, f"expected outputs {list(expected)}, got {list(outputs)}.")
    if info.kind == "classifier":
        dim = outputs["probabilities"].shape[-1]
        if isinstance(dim, int) and dim != info.num_classes:
            raise _bad(info.path, f"output 'probabilities' has {dim} classes but metadata 'classes' lists "
                                  f"{info.num_classes}.")


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Read and validate a model's metadata and signature (CPU, no graph optimisation: fast)."""
    path = Path(path)
    _check_file(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = _open_session(path, [CPU], options)
    info = parse_metadata(session.get_modelmeta().custom_metadata_map, path)
    _check_signature(session, info)
    return info


# ---------------------------------------------------------------- providers and threads


def tensorrt_opted_in() -> bool:
    """TensorRT engines take minutes to build, so the provider is used only with ``TRANSFER_LAB_TENSORRT=1``."""
    return os.environ.get(TENSORRT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def select_providers(available: Sequence[str], device: str = "auto", *, tensorrt: bool | None = None) -> list[str]:
    """Execution providers to request, best first: TensorRT (opt-in), CUDA, CPU; CPU only for ``device='cpu'``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}.")
    if device == "cpu":
        return [CPU]
    use_trt = tensorrt_opted_in() if tensorrt is None else tensorrt
    chosen = []
    if use_trt and TENSORRT in available:
        chosen.append(TENSORRT)
    if CUDA in available:
        chosen.append(CUDA)
    chosen.append(CPU)
    return chosen


def default_threads() -> int:
    """Intra-op threads: physical cores this process may use, capped at 8 (more rarely helps a CNN)."""
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:
        logical = os.cpu_count() or 1
    physical = logical
    try:
        cores = set()
        phys_id = "0"
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys_id = value.strip()
                elif key == "core id":
                    cores.add((phys_id, value.strip()))
        if cores:
            physical = min(logical, len(cores))
    except OSError:
        pass
    return max(1, min(physical, MAX_DEFAULT_THREADS))


def _provider_options(name: str) -> str | tuple[str, dict]:
    if name != TENSORRT:
        return name
    env = os.environ.get("TRANSFER_LAB_CACHE")
    cache = Path(env).expanduser() if env else Path.home() / ".cache" / "transfer-lab"
    return name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache / "tensorrt")}


def _preload_gpu_libraries() -> None:
    """Let onnxruntime find the CUDA/cuDNN libraries shipped in pip wheels (no-op where unsupported)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # a missing optional library must not stop a CPU fallback
        log.debug("onnxruntime.preload_dlls() failed: %s", exc)


def nvidia_gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible to this process (Linux: the driver's device nodes; elsewhere assume yes).

    onnxruntime-gpu lists CUDAExecutionProvider whether or not a GPU exists; without one, asking for it only
    produces error lines before the CPU takes over. ``auto`` skips it when no GPU is visible.
    """
    if not sys.platform.startswith("linux"):
        return True
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/dxg", "/proc/driver/nvidia/gpus"))


def usable_providers(available: Sequence[str], device: str, gpu_visible: bool) -> list[str]:
    """``available`` minus the GPU providers when ``device='auto'`` and no GPU is visible."""
    if device == "auto" and not gpu_visible:
        return [p for p in available if p not in _GPU_PROVIDERS]
    return list(available)


def _fallback_message(device: str, available: Sequence[str], provider: str) -> str | None:
    if provider != CPU:
        return None
    if device == "cuda" and CUDA not in available:
        return ("CUDA was requested but this onnxruntime build has no CUDAExecutionProvider "
                f"(available: {list(available)}), so the model runs on the CPU. Install onnxruntime-gpu "
                "(and not onnxruntime beside it) to use the GPU, or pass device='cpu'.")
    if CUDA in available and device != "cpu":
        return (f"CUDA was {'requested' if device == 'cuda' else 'available'} but the ONNX session is running on "
                "the CPU: onnxruntime could not start CUDAExecutionProvider (no GPU visible, or the CUDA/cuDNN "
                "libraries onnxruntime-gpu needs are missing; onnxruntime's log above says which). Inference will be "
                "much slower. Fix the CUDA installation, or pass device='cpu' to run on the CPU deliberately.")
    return None


def create_session(path: Path, device: str = "auto", *, intra_op_threads: int | None = None,
                   spin: bool = False) -> tuple[ort.InferenceSession, str | None]:
    """An InferenceSession on the best allowed provider, and a fallback warning when the GPU was not used.

    ``spin``: idle worker threads busy-wait between operators (onnxruntime's own default, and what torch's
    OpenMP threads do) instead of sleeping. That saves a thread wake-up per operator, which shows at batch 1, but
    the spinning threads take their cores away from everything else, so it is off unless the session has the
    machine to itself (the benchmark). The app trains with torch and serves other sessions in this process.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}.")
    _check_file(path)
    available = usable_providers(ort.get_available_providers(), device, nvidia_gpu_visible())
    providers = select_providers(available, device)
    if any(p in _GPU_PROVIDERS for p in providers):
        _preload_gpu_libraries()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = default_threads() if intra_op_threads is None else int(intra_op_threads)
    if threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads!r}.")
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = _open_session(path, [_provider_options(p) for p in providers], options)
    message = _fallback_message(device, available, session.get_providers()[0])
    if message:
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    return session, message


# ---------------------------------------------------------------- preprocessing


def _as_rgb(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return open_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 RGB (0-255), got dtype {image.dtype}; convert with "
                             "np.clip(x * 255, 0, 255).round().astype(np.uint8) for [0, 1] floats.")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
            return to_rgb(Image.fromarray(image))
        raise ValueError(f"image arrays must be HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA), got shape {image.shape}.")
    raise TypeError(f"expected a PIL image, a file path or a uint8 numpy array, got {type(image).__name__}.")


def prepare_image(image: ImageInput, info: ModelInfo) -> np.ndarray:
    """Decode if needed, then resize + centre-crop exactly as in training: uint8 ``[S, S, 3]``."""
    cropped = resize_and_crop(_as_rgb(image), info.image_size, info.resize_size, info.interpolation)
    return np.asarray(cropped, dtype=np.uint8)


def _check_batch(images: np.ndarray, size: int) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"expected prepared uint8 images of shape [N, {size}, {size}, 3], got {images.dtype} {images.shape}. "
            "Use Predictor.predict() for raw images, or core.preprocess.to_array() to prepare them."
        )
    return np.ascontiguousarray(images)


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
        self._on_gpu = self.provider in _GPU_PROVIDERS
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
            raise _bad(path, f"this is a {self.info.kind!r} model (a feature extractor), not a classifier; "
                             "load it with OnnxFeatureExtractor.")
        _check_signature(self._session, self.info)
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
        return self._run(_check_batch(images, self.image_size))

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
    """Pretrained backbone features via onnxruntime: uint8 ``[N, S, S, 3]`` -> float32 ``[N, feature_dim]``."""

    output_name = FEATURES_OUTPUT

    def __init__(self, backbone_name: str, image_size: int, device: str = "auto", *,
                 intra_op_threads: int | None = None, batch_size: int = 64):
        from export.onnx_export import cached_backbone_onnx  # needs torch only when the file is (re)built

        path = cached_backbone_onnx(backbone_name, image_size)
        super().__init__(path, device, intra_op_threads, None, batch_size)
        self.info = parse_metadata(self._session.get_modelmeta().custom_metadata_map, path)
        _check_signature(self._session, self.info)
        self.backbone = backbone_name
        self.image_size = image_size
        self.engine = f"onnxruntime-{self.provider}"  # the name core.features.FeatureExtractor reports
        self._warm_up(image_size)

    def extract(self, images: np.ndarray) -> np.ndarray:
        """Float32 features for prepared uint8 images ``[N, S, S, 3]``."""
        return self._run(_check_batch(images, self.image_size)).astype(np.float32, copy=False)


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
from core.inference import ModelFormatError, Predictor
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
    root = str(Path(__file__).resolve().parents[1])
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
