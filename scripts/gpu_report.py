"""What the GPU check saw, for people: ``--environment`` prints versions and providers; ``OUT_DIR`` writes
``OUT_DIR/summary.md`` (steps, tests, compare run per arm, latency table) from the files scripts/gpu_check.sh left
there. Used by scripts/gpu_check.sh; reads only what exists, so a failed step leaves a gap, not a crash."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ENGINE_NAMES = {"torch": "torch eager (uint8 NHWC in)", "torch_nchw": "torch eager (NCHW float in)",
                "onnx_fp32": "onnxruntime FP32", "onnx_int8": "onnxruntime INT8", "onnx_fp16": "onnxruntime FP16",
                "onnx_tensorrt": "onnxruntime TensorRT FP32"}


def environment() -> None:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    print(f"python {platform.python_version()} ({sys.executable})")
    for name in ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "numpy"):
        print(f"{name} {version(name)}")
    import torch

    print(f"torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU {props.name}, compute capability {props.major}.{props.minor}, "
              f"{props.total_memory / 2**30:.0f} GiB, bf16: {torch.cuda.is_bf16_supported()}")
    import onnxruntime as ort

    from core.runtime.providers import tensorrt_problem
    from export.variants import cuda_usable

    print(f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent}")
    print(f"onnxruntime build: {getattr(ort, 'get_build_info', lambda: '?')()}")
    print(f"onnxruntime providers: {ort.get_available_providers()}")
    print(f"onnxruntime CUDA usable: {cuda_usable()}")
    print(f"TensorRT: {tensorrt_problem() or 'usable'}")


def _tests(path: Path) -> list[str]:
    if not path.is_file():
        return ["no junit.xml: the test step did not run to the end (check.log says why)"]
    lines = ["| test | result | note |", "| --- | --- | --- |"]
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, note = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind]
                note = (found.get("message") or found.text or "").strip().splitlines()[0][:300] if (
                    found.get("message") or found.text) else ""
        lines.append(f"| {case.get('classname', '').split('.')[-1]}::{case.get('name')} | {outcome} "
                     f"| {note.replace('|', '/')} |")
    return lines


def _compare(path: Path) -> list[str]:
    if not path.is_file():
        return ["no report.json: the compare step failed (check.log says why)"]
    report = json.loads(path.read_text())
    lines = [f"`python -m core compare --data sample:shapes --device cuda` ({report['device']}, "
             f"{report['image_size']} px, {report['dataset'].get('counts', {})}):", "",
             "| arm | computed on | train s | feature s | engine setup s | epochs | val accuracy | AMP |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for arm, run in report["runs"].items():
        def seconds(key: str, run=run) -> str:
            return f"{run[key]:.2f}" if isinstance(run.get(key), (int, float)) else "-"

        lines.append(f"| {arm} | {run.get('device', '?')} ({run.get('feature_engine', 'torch')}) "
                     f"| {seconds('train_seconds')} | {seconds('feature_seconds')} "
                     f"| {seconds('feature_engine_setup_seconds')} | {run['epochs_run']} | {run['val_accuracy']:.3f} "
                     f"| {run.get('amp') or '-'} |")
    return lines


def _bench(path: Path) -> list[str]:
    if not path.is_file():
        return [f"no {path.name}"]
    results = json.loads(path.read_text())
    lines = [f"onnxruntime on {results['provider']}, torch eager on {results.get('torch_device', '-')}, "
             f"{results['image_size']} px, median of {results['repeats']} calls (host uint8 in, host "
             "probabilities out):", "", "| batch | engine | ms | images/s |", "| ---: | --- | ---: | ---: |"]
    for batch, row in results["batches"].items():
        for name, label in ENGINE_NAMES.items():
            if name in row:
                lines.append(f"| {batch} | {label} | {row[name]['ms']:.2f} | {row[name]['images_per_s']:.0f} |")
        for name, ratio in row["ratios"].items():
            low, high = row["ratio_ranges"][name]
            lines.append(f"| {batch} | ratio {name} | {ratio:.2f}x | rounds {low:.2f}-{high:.2f}x |")
    for key in ("torch_skipped", "tensorrt_skipped"):
        if results.get(key):
            lines += ["", f"{key.replace('_', ' ')}: {results[key]}"]
    return lines


def summary(out: Path, steps: Path | None) -> str:
    parts = ["# GPU check", ""]
    env = out / "env.txt"
    if env.is_file():
        parts += ["## Environment", "", "```", env.read_text().strip(), "```", ""]
    if steps is not None and steps.is_file():
        parts += ["## Steps", "", "```", steps.read_text().strip(), "```", ""]
    parts += ["## CUDA tests", "", *_tests(out / "junit.xml"), "", "## Compare run on CUDA", "",
              *_compare(out / "report.json"), "", "## Latency", "", *_bench(out / "bench.json"), ""]
    if (out / "bench-trt.json").is_file():
        parts += ["## Latency with TensorRT", "", *_bench(out / "bench-trt.json"), ""]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", type=Path, help="the GPU check's output folder")
    parser.add_argument("--steps", type=Path, help="the check's step log (name, exit status, seconds)")
    parser.add_argument("--environment", action="store_true", help="print versions, GPU and providers")
    args = parser.parse_args()
    if args.environment:
        environment()
        return 0
    if args.out is None:
        parser.error("give the output folder, or --environment")
    text = summary(args.out, args.steps)
    (args.out / "summary.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
