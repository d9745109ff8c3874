"""Execution providers and threads: which onnxruntime provider runs a model (TensorRT opt-in, CUDA, CPU), how
many threads it uses, and the session that results, always saying which provider really runs."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from core.runtime.contract import EXPORT_HINT, bad_model
from core.runtime.devices import CPU, CUDA, DEVICES, GPU_PROVIDERS, TENSORRT
from core.runtime.files import cache_dir

log = logging.getLogger(__name__)

TENSORRT_ENV = "TRANSFER_LAB_TENSORRT"
# The TensorRT runtime onnxruntime-gpu's TensorRT provider links against (its NEEDED entries): TensorRT 10.
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvonnxparser.so.10")
MAX_DEFAULT_THREADS = 8
CPUINFO = "/proc/cpuinfo"  # read by default_threads (a module constant so tests can point it at their own text)


def check_model_path(path: Path) -> None:
    """Fail early, with the fix, for paths that cannot be an ONNX model (missing, a folder, empty, a zip)."""
    if not path.exists():
        raise FileNotFoundError(f"Model file {path} does not exist. {EXPORT_HINT}")
    if path.is_dir():
        raise bad_model(path, "is a folder; pass the .onnx file inside it (e.g. RUN_DIR/model.onnx).")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise bad_model(path, f"the file is empty, not an ONNX model. {EXPORT_HINT}")
    if head.startswith(b"PK"):
        raise bad_model(path, f"this is a zip file (a PyTorch .pt checkpoint?), not an ONNX model. {EXPORT_HINT}")


def open_session(path: Path, providers: Sequence[str | tuple[str, dict]],
                 options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, InvalidGraph, ... (pybind types)
        raise bad_model(path, f"not a readable ONNX model ({type(exc).__name__}: {str(exc).strip()[:600]}). "
                              f"Expected an .onnx file written by transfer-lab. {EXPORT_HINT}") from exc


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




def tensorrt_problem() -> str | None:
    """Why onnxruntime's TensorRT provider cannot start on this machine, in words with the fix; None when it can
    (the provider is listed and the TensorRT libraries it links against load)."""
    if TENSORRT not in ort.get_available_providers():
        return ("this onnxruntime build has no TensorrtExecutionProvider; install onnxruntime-gpu (Linux or Windows "
                "x86_64) instead of onnxruntime")
    preload_gpu_libraries()
    for name in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError:
            return (f"the TensorRT runtime is not installed ({name} cannot be loaded); install TensorRT 10 for "
                    "the CUDA version of your onnxruntime-gpu (for example `pip install tensorrt-cu13` and its "
                    f"tensorrt_libs folder on LD_LIBRARY_PATH), or leave {TENSORRT_ENV} unset to run on CUDA")
    return None


def physical_cores(cpuinfo: str, logical: int) -> int:
    """Distinct (physical id, core id) pairs in ``/proc/cpuinfo`` text, at most ``logical``; ``logical`` when the
    text names no cores (other platforms, containers that hide them)."""
    cores = set()
    phys_id = "0"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys_id = value.strip()
        elif key == "core id":
            cores.add((phys_id, value.strip()))
    return min(logical, len(cores)) if cores else logical


def default_threads() -> int:
    """Intra-op threads: physical cores this process may use, capped at 8 (more rarely helps a CNN)."""
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:
        logical = os.cpu_count() or 1
    try:
        with open(CPUINFO, encoding="utf-8") as f:
            physical = physical_cores(f.read(), logical)
    except OSError:
        physical = logical
    return max(1, min(physical, MAX_DEFAULT_THREADS))


# The instruction sets that decide how fast (and, for AVX2's u8*s8 pair sums, how exactly) INT8 runs on a CPU,
# as /proc/cpuinfo names them, in the order they are reported.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # one instruction per 4 u8*s8 products, int32 sums


@dataclass(frozen=True)
class CpuFeatures:
    model: str  # "" where the platform does not say
    flags: tuple[str, ...]  # those of SIMD_FLAGS this CPU has; empty where unknown
    known: bool  # False where the flags could not be read (not Linux)

    @property
    def int8_dot(self) -> bool:
        """Has an INT8 dot-product instruction (VNNI or AMX): where INT8 convolutions are markedly faster."""
        return any(f in self.flags for f in INT8_DOT_FLAGS)

    def describe(self) -> str:
        """"AMD EPYC: avx2, fma (no VNNI/AMX: INT8 has no dot-product instruction here)"."""
        if not self.known:
            return f"{self.model or 'CPU'}: instruction sets unknown on this platform"
        dot = "" if self.int8_dot else " (no VNNI/AMX: INT8 has no dot-product instruction here)"
        return f"{self.model or 'CPU'}: {', '.join(self.flags) or 'no AVX2'}{dot}"


def cpu_features(cpuinfo: str | None = None) -> CpuFeatures:
    """This CPU's model name and SIMD flags, from ``/proc/cpuinfo`` (or the given text)."""
    if cpuinfo is None:
        try:
            with open(CPUINFO, encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            import platform

            return CpuFeatures(platform.processor(), (), False)
    model, flags = "", None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    if flags is None:
        return CpuFeatures(model, (), False)
    return CpuFeatures(model, tuple(f for f in SIMD_FLAGS if f in flags), True)


def _provider_options(name: str) -> str | tuple[str, dict]:
    if name != TENSORRT:
        return name
    return name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir() / "tensorrt")}


def preload_gpu_libraries() -> None:
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
        return [p for p in available if p not in GPU_PROVIDERS]
    return list(available)


def _fallback_message(device: str, available: Sequence[str], provider: str, wanted: Sequence[str] = ()) -> str | None:
    if provider != CPU:
        if TENSORRT in wanted and provider != TENSORRT:
            why = tensorrt_problem() or "onnxruntime could not start TensorrtExecutionProvider (its log above says why)"
            return f"TensorRT was asked for but the ONNX session is running on {provider}: {why}."
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
                   spin: bool = False, tensorrt: bool | None = None) -> tuple[ort.InferenceSession, str | None]:
    """An InferenceSession on the best allowed provider, and a fallback warning when the GPU was not used.

    ``spin``: idle worker threads busy-wait between operators (onnxruntime's own default, and what torch's
    OpenMP threads do) instead of sleeping. That saves a thread wake-up per operator, which shows at batch 1, but
    the spinning threads take their cores away from everything else, so it is off unless the session has the
    machine to itself (the benchmark). The app trains with torch and serves other sessions in this process.
    ``tensorrt``: try TensorRT first (None: only with ``TRANSFER_LAB_TENSORRT=1``).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}.")
    check_model_path(path)
    available = usable_providers(ort.get_available_providers(), device, nvidia_gpu_visible())
    providers = select_providers(available, device, tensorrt=tensorrt)
    if any(p in GPU_PROVIDERS for p in providers):
        preload_gpu_libraries()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = default_threads() if intra_op_threads is None else int(intra_op_threads)
    if threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads!r}.")
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = open_session(path, [_provider_options(p) for p in providers], options)
    message = _fallback_message(device, available, session.get_providers()[0], providers)
    if message:
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    return session, message
