"""Latency of PyTorch eager vs onnxruntime FP32 vs its variants on the same inputs, in one process and one run."""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import resource  # Unix
except ImportError:  # pragma: no cover - Windows
    resource = None

from core.runtime.devices import CPU, GPU_PROVIDERS, TENSORRT
from core.runtime.predictor import Predictor, read_model_info
from core.runtime.providers import cpu_features, default_threads, tensorrt_problem
from export.variants import OPTIONAL, VARIANTS, variant_path

PAUSE_S = 0.2  # between engine blocks; see _time_rounds


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process: no ``mmap`` for large blocks and no trimming, as
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` would at start-up. Without it torch eager page-faults its
    large activation buffers in again on every call. Process-wide and permanent: for benchmark processes only.
    Returns False where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt parameters, from glibc's malloc.h


def _glibc_defaults(on: bool) -> None:
    """Switch glibc malloc between its start-up settings (large blocks from mmap, freed memory trimmed: 128 KiB
    thresholds, ``on``) and ``keep_freed_memory``'s (``on=False``), for the one engine timed with the default."""
    mallopt = ctypes.CDLL(None).mallopt
    if on:
        mallopt(M_MMAP_MAX, 65536)
        mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    else:
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def sgemm_peak(threads: int, *, n: int = 2048, seconds: float = 1.5) -> float:
    """GFLOP/s of onnxruntime's own float32 matrix multiply (MLAS, the kernels its Conv and Gemm use) on an
    ``n``x``n`` by ``n``x``n`` product with ``threads`` threads: the most a float32 model can hope for on these
    cores. The best of the timed calls (a peak, not a typical rate)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[CPU])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), np.float32), "b": rng.standard_normal((n, n), np.float32)}
    session.run(None, feeds)
    best, end = float("inf"), time.perf_counter() + seconds
    for _ in range(50):
        start = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > end:
            break
    return 2 * n**3 / best / 1e9


def _openvino_runner(model_path: Path, threads: int) -> tuple[Callable[[np.ndarray], object] | None, str | None]:
    """OpenVINO on the CPU with the same model file and threads, float32 throughout (no bf16/fp16 hint), or why
    not: it is an optional extra (``pip install openvino``), not in requirements.txt."""
    try:
        import openvino as ov
    except ImportError:
        return None, "not installed (pip install openvino to add it)"
    try:
        compiled = ov.Core().compile_model(str(model_path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        output = next(o for o in compiled.outputs if "probabilities" in o.get_names())
    except Exception as exc:  # noqa: BLE001 - an optional peer: its failure is a row's note, never the benchmark's
        return None, f"could not compile the model: {type(exc).__name__}: {exc}"

    def run(batch: np.ndarray) -> object:
        return request.infer([batch])[output]

    return run, None


def _cpu_usage() -> tuple[float, float, int]:
    """(user s, kernel s, minor page faults) of this process so far; zeros where ``resource`` is missing."""
    if resource is None:
        return 0.0, 0.0, 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def _time_rounds(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                 rounds: int) -> tuple[dict[str, list[list[float]]], dict[str, dict[str, float]]]:
    """Wall times (ms) per engine and round, and per engine its share of CPU time spent in the kernel and its
    minor page faults per call. Engines run in blocks, alternating over ``rounds`` so slow drifts in background
    load hit all of them alike, with a pause between blocks so one engine's idle worker threads do not steal
    cores from the next (onnxruntime's spinning workers stay busy for up to about 60 ms after a run, measured
    with ``time.process_time`` across a sleep)."""
    samples: dict[str, list[list[float]]] = {name: [] for name in fns}
    cpu = {name: [0.0, 0.0, 0] for name in fns}  # user s, kernel s, page faults over the timed calls
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    for count in per_round:
        for name, fn in fns.items():
            time.sleep(PAUSE_S)
            for _ in range(warmup):
                fn()
            times = []
            before = _cpu_usage()
            for _ in range(count):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1000.0)
            after = _cpu_usage()
            cpu[name] = [total + a - b for total, a, b in zip(cpu[name], after, before)]
            samples[name].append(times)
    stats = {name: {"kernel_share": kernel / (user + kernel) if user + kernel > 0 else 0.0,
                    "page_faults_per_call": faults / max(repeats, 1)}
             for name, (user, kernel, faults) in cpu.items()}
    return samples, stats


def _ratio(samples: dict[str, list[list[float]]], slow: str, fast: str) -> dict[str, float]:
    """``slow``'s time over ``fast``'s: the ratio of the medians of all runs, and its lowest and highest value
    over the rounds (each round's medians), which shows how much the machine's load moved the answer."""
    overall = statistics.median(sum(samples[slow], [])) / statistics.median(sum(samples[fast], []))
    per_round = [statistics.median(a) / statistics.median(b)
                 for a, b in zip(samples[slow], samples[fast]) if a and b]
    return {"ratio": overall, "low": min(per_round), "high": max(per_round)}


# One onnxruntime engine per model variant (export.variants): onnx_fp32, onnx_int8, onnx_fp16.
ENGINES = ("torch", "torch_glibc", "torch_nchw", *(f"onnx_{name}" for name in VARIANTS), "openvino_fp32",
           "onnx_tensorrt")
RATIOS = (  # name, slower engine, faster engine
    ("onnx_fp32_vs_torch", "torch", "onnx_fp32"),
    ("onnx_fp32_vs_torch_glibc", "torch_glibc", "onnx_fp32"),
    ("onnx_fp32_vs_openvino", "openvino_fp32", "onnx_fp32"),
    ("onnx_fp32_vs_torch_nchw", "torch_nchw", "onnx_fp32"),
    *((f"onnx_{name}_vs_fp32", "onnx_fp32", f"onnx_{name}") for name in OPTIONAL),
    *((f"onnx_{name}_vs_torch", "torch", f"onnx_{name}") for name in OPTIONAL),
    ("onnx_tensorrt_vs_fp32", "onnx_fp32", "onnx_tensorrt"),
    ("onnx_tensorrt_vs_torch", "torch", "onnx_tensorrt"),
)


def _torch_runner(torch_model: Any, threads: int, device: str = "cpu"
                  ) -> tuple[Callable[[np.ndarray], object], Callable[[np.ndarray], object], Callable[[], None]]:
    """Eager calls of the exported network on ``device`` ("cpu" or "cuda"): numpy uint8 in, probabilities back in
    host memory, as onnxruntime's ``predict_arrays`` returns them (so a GPU call includes both copies)."""
    import torch

    from export.verify import torch_reference

    module = torch_reference(torch_model).to(device).eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)

    def run(batch: np.ndarray) -> object:
        with torch.inference_mode():
            out = module(torch.from_numpy(batch).to(device))
            return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()

    def run_nchw(batch: np.ndarray) -> object:
        # The conventional eager call: a contiguous NCHW float batch. The uint8 NHWC path above hands the
        # network channels-last strides (from the permute), which torch's CPU kernels run markedly faster.
        with torch.inference_mode():
            x = module.preprocess(torch.from_numpy(batch).to(device)).contiguous()
            return torch.softmax(module.classifier(x), 1).cpu()

    return run, run_nchw, lambda: torch.set_num_threads(previous)


def benchmark(model_path: str | os.PathLike[str], *, batch_sizes: Sequence[int] = (1, 16), repeats: int = 20,
              warmup: int = 3, rounds: int = 5, torch_model: Any = None, run_dir: str | os.PathLike[str] | None = None,
              threads: int | None = None, device: str = "cpu", tuned_malloc: bool = False,
              tensorrt: bool = False, print_table: bool = True) -> dict[str, Any]:
    """Median latency (ms) and throughput (images/s) per engine and batch size, and the speed-up ratios.

    Engines: ``torch`` (eager, CPU, the exported classifier's uint8 NHWC input; from ``torch_model`` or rebuilt
    from ``run_dir``), ``torch_nchw`` (the same network called on a contiguous NCHW float batch), ``onnx_fp32``,
    and ``onnx_<variant>`` for each variant file beside the model (``model.int8.onnx``; FP16 only on a GPU). All
    get the same uint8 inputs and thread count. Without ``run_dir``, the model's own folder is used when it is a
    run folder (it holds ``report.json``). Each ratio comes with its range over ``rounds`` alternating rounds.
    ``tuned_malloc`` calls ``keep_freed_memory`` first, for a like-for-like torch baseline (see ``allocator_note``).
    ``device="cuda"``: torch eager runs on the GPU too, and onnxruntime on its CUDA provider (IO binding, outputs
    copied back to the host). ``tensorrt``: adds ``onnx_tensorrt`` (FP32 model, TensorRT provider, engines cached
    in the lab cache) when it starts, else says why in ``tensorrt_skipped``.
    """
    model_path = Path(model_path)
    tuned = keep_freed_memory() if tuned_malloc else False
    if torch_model is None and run_dir is None and (model_path.parent / "report.json").is_file():
        run_dir = model_path.parent
    info = read_model_info(model_path)
    threads = threads or default_threads()
    torch_note = None if torch_model is not None else "no PyTorch model given (pass --run RUN_DIR)"
    if torch_model is None and run_dir is not None:
        from export.runs import load_run_classifier

        try:
            torch_model, _ = load_run_classifier(run_dir, info.training_mode or "pretrained")
        except (OSError, ValueError) as exc:  # e.g. an uploaded model without its run folder
            torch_note = f"PyTorch model not rebuilt: {exc}"
    engines: dict[str, Callable[[np.ndarray], object]] = {}
    restore = None
    # onnxruntime with its default busy-waiting worker threads, as torch's OpenMP threads do (see create_session).
    fp32 = Predictor(model_path, device=device, intra_op_threads=threads, spin=True)
    torch_device = "cuda" if fp32.provider in GPU_PROVIDERS else "cpu"  # torch where onnxruntime runs
    if torch_model is not None:
        engines["torch"], engines["torch_nchw"], restore = _torch_runner(torch_model, threads, torch_device)
        if tuned and torch_device == "cpu":  # the same calls with glibc's start-up settings, as a second row
            torch_run = engines["torch"]

            def torch_glibc(batch: np.ndarray) -> object:
                _glibc_defaults(True)
                try:
                    return torch_run(batch)
                finally:
                    _glibc_defaults(False)

            engines["torch_glibc"] = torch_glibc
    engines["onnx_fp32"] = fp32.predict_arrays
    for name in OPTIONAL:  # the variants built beside the model; GPU-only ones only where the model runs on a GPU
        path = variant_path(model_path, name)
        if path.exists() and (fp32.provider != CPU or not VARIANTS[name].needs_cuda):
            engines[f"onnx_{name}"] = Predictor(path, device=device, intra_op_threads=threads,
                                                spin=True).predict_arrays
    openvino_note = None
    if fp32.provider == CPU:
        engines["openvino_fp32"], openvino_note = _openvino_runner(model_path, threads)
        if engines["openvino_fp32"] is None:
            del engines["openvino_fp32"]
    trt_note = None
    if tensorrt:
        trt = Predictor(model_path, device=device, intra_op_threads=threads, spin=True, tensorrt=True)
        if trt.provider == TENSORRT:
            engines["onnx_tensorrt"] = trt.predict_arrays
        else:
            trt_note = trt.fallback_warning or tensorrt_problem() or f"the session ran on {trt.provider}"
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"model": str(model_path), "image_size": info.image_size, "threads": threads,
                               "provider": fp32.provider, "repeats": repeats, "batches": {},
                               "timing": f"engines alternate in blocks over {max(1, min(rounds, repeats))} rounds; "
                                         "median per engine; each ratio's range is over the rounds",
                               "malloc_env": {k: os.environ[k] for k in MALLOC_ENV if k in os.environ},
                               "tuned_malloc": tuned}
    if torch_model is None:
        results["torch_skipped"] = torch_note
    else:
        results["torch_device"] = torch_device
    if trt_note:
        results["tensorrt_skipped"] = trt_note
    if openvino_note:
        results["openvino_skipped"] = openvino_note
    flops = info.flops
    if flops is None:  # a model exported before the count was written into its metadata
        from export.flops import count_flops

        flops = count_flops(model_path)
    results["flops_per_image"] = flops
    if fp32.provider == CPU:
        results["sgemm_gflops"] = sgemm_peak(threads)
        results["cpu"] = cpu_features().describe()
    try:
        for batch_size in batch_sizes:
            batch = rng.integers(0, 256, (batch_size, info.image_size, info.image_size, 3), dtype=np.uint8)
            calls = {name: (lambda run=run, batch=batch: run(batch)) for name, run in engines.items()}
            samples, stats = _time_rounds(calls, warmup=warmup, repeats=repeats,
                                          rounds=max(1, min(rounds, repeats)))
            row: dict[str, Any] = {}
            for name, times in samples.items():
                ms = statistics.median(sum(times, []))
                gflops = flops * batch_size / ms / 1e6
                row[name] = {"ms": ms, "images_per_s": batch_size * 1000.0 / ms, "gflops": gflops,
                             **({"of_peak": gflops / results["sgemm_gflops"]} if "sgemm_gflops" in results else {}),
                             **stats[name]}
            ratios = {name: _ratio(samples, slow, fast) for name, slow, fast in RATIOS
                      if slow in samples and fast in samples}
            row["ratios"] = {name: value["ratio"] for name, value in ratios.items()}
            row["ratio_ranges"] = {name: [value["low"], value["high"]] for name, value in ratios.items()}
            results["batches"][batch_size] = row
    finally:
        if restore:
            restore()
    if print_table:
        print(format_table(results))
    return results


MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
MALLOC_HINT = ("`python -m export bench --tuned-malloc` keeps freed memory in the process (as do "
               "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=10000000000, or preloading jemalloc/tcmalloc)")


def allocator_note(results: dict[str, Any]) -> str | None:
    """A warning when torch eager spent much of its time in the kernel: glibc malloc returns the large activation
    buffers to the operating system after every call and torch page-faults them back in on the next one, which
    makes it look slower than it is with a tuned allocator."""
    worst = max((row[name].get("kernel_share", 0.0) for row in results["batches"].values()
                 for name in ("torch", "torch_nchw") if name in row), default=0.0)
    if worst < 0.2:
        return None
    return (f"torch eager spent up to {worst:.0%} of its CPU time in the kernel (page faults: glibc malloc gives its "
            f"large buffers back to the OS after each call). {MALLOC_HINT}; rerun with that for a like-for-like "
            "torch baseline.")


PEER_TITLES = {"torch": "PyTorch", "torch_glibc": "PyTorch with glibc's default allocator",
               "openvino_fp32": "OpenVINO"}


def headline(results: dict[str, Any]) -> str | None:
    """The benchmark in one plain sentence, at its largest batch: "onnxruntime FP32 runs at 80% of what this CPU can
    do (SGEMM 66.6 GFLOP/s on 2 threads); 2.0x PyTorch, 1.1x OpenVINO"."""
    if not results.get("batches"):
        return None
    batch_size = max(results["batches"], key=int)
    row = results["batches"][batch_size]
    fp32 = row.get("onnx_fp32")
    if not fp32 or "gflops" not in fp32:
        return None
    if "of_peak" in fp32:
        text = (f"onnxruntime FP32 runs at {fp32['of_peak']:.0%} of what this CPU can do at batch {batch_size} "
                f"({fp32['gflops']:.1f} GFLOP/s against a measured SGEMM peak of {results['sgemm_gflops']:.1f} "
                f"on {results['threads']} threads)")
    else:
        text = f"onnxruntime FP32 runs at {fp32['gflops']:.1f} GFLOP/s at batch {batch_size}"
    peers = [f"{row[name]['ms'] / fp32['ms']:.1f}x {title}" for name, title in PEER_TITLES.items() if name in row]
    return text + ("; " + ", ".join(peers) if peers else "")


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{results['model']}  size {results['image_size']}  threads {results['threads']}  "
             f"onnxruntime on {results['provider']}  (median of {results['repeats']})",
             f"{'batch':>5}  {'engine':<13} {'ms':>9} {'images/s':>10} {'GFLOP/s':>8} {'of peak':>8} {'kernel %':>9} "
             f"{'faults/call':>12}"]
    if results.get("cpu"):
        lines.insert(1, f"CPU: {results['cpu']}; {results['flops_per_image'] / 1e9:.3f} GFLOP per image; "
                        f"SGEMM peak {results['sgemm_gflops']:.1f} GFLOP/s (onnxruntime MatMul 2048, same threads; "
                        "'of peak' is of this float32 rate, which INT8 can pass)")
    if results.get("torch_skipped"):
        lines.insert(1, f"torch eager skipped: {results['torch_skipped']}")
    elif results.get("torch_device", "cpu") != "cpu":
        lines.insert(1, f"torch eager on {results['torch_device']}")
    if results.get("openvino_skipped"):
        lines.insert(1, f"OpenVINO: {results['openvino_skipped']}")
    if results.get("tensorrt_skipped"):
        lines.insert(1, f"TensorRT skipped: {results['tensorrt_skipped']}")
    if results.get("malloc_env") or results.get("tuned_malloc"):
        settings = [f"{k}={v}" for k, v in results.get("malloc_env", {}).items()]
        settings += ["mallopt: no mmap, no trim (torch_glibc: glibc's start-up settings)"] \
            if results.get("tuned_malloc") else []
        lines.insert(1, "allocator settings: " + " ".join(settings))
    for batch_size, row in results["batches"].items():
        for name in ENGINES:
            if name in row:
                e = row[name]
                peak = f"{e['of_peak']:>8.0%}" if "of_peak" in e else f"{'-':>8}"
                gflops = f"{e['gflops']:>8.1f}" if "gflops" in e else f"{'-':>8}"
                lines.append(f"{batch_size:>5}  {name:<13} {e['ms']:>9.2f} {e['images_per_s']:>10.1f} "
                             f"{gflops} {peak} {e['kernel_share']:>9.0%} {e['page_faults_per_call']:>12.0f}")
        for name, ratio in row["ratios"].items():
            low, high = row["ratio_ranges"][name]
            lines.append(f"{batch_size:>5}  {name} = {ratio:.2f}x  (per round {low:.2f}-{high:.2f}x)")
    note = allocator_note(results)
    if note:
        lines.append("note: " + note)
    line = headline(results)
    if line:
        lines.append(line)
    return "\n".join(lines)
