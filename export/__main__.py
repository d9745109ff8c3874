"""Command line: ``python -m export onnx|triton|bench``. Errors print ``error: <message>`` and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.cli import positive_int
from core.runtime.devices import DEVICES
from core.runtime.errors import USER_ERRORS
from export.errors import ExportError


def cmd_onnx(args: argparse.Namespace) -> int:
    from core.report import present_run_files
    from core.runtime.files import write_json_atomic
    from export.quantize import MAX_CALIBRATION_IMAGES
    from export.runs import export_run, load_run_classifier, load_run_images, report_key

    run_dir = Path(args.run)
    classifier, report = load_run_classifier(run_dir, args.arm)
    data = Path(args.data) if args.data else None
    val_images, val_labels = load_run_images(run_dir, report, ("val", "test"), data_root=data)
    calib, _ = load_run_images(run_dir, report, ("train", "val"), data_root=data, limit=MAX_CALIBRATION_IMAGES)
    variants = () if args.no_variants else None
    explain = None
    if args.explain:
        from models.explain import calibrate_ood, pooled_features

        train_images, train_labels = load_run_images(run_dir, report, ("train",), data_root=data)
        explain = calibrate_ood(pooled_features(classifier, train_images), train_labels,
                                pooled_features(classifier, val_images), len(report["dataset"]["classes"]))
    section = export_run(
        run_dir, classifier, classes=report["dataset"]["classes"], backbone=report["backbone"],
        image_size=int(report["image_size"]), training_mode=args.arm,
        metrics=report.get("runs", {}).get(args.arm), val_images_uint8=val_images, val_labels=val_labels,
        calib_images_uint8=calib, tolerance=args.tolerance, variants=variants, explain=explain,
    )
    report[report_key(args.arm)] = section
    # report.json lists exactly the run's files in the folder: the new model files in, rejected variants out.
    report.setdefault("artifacts", {})["files"] = present_run_files(run_dir)
    write_json_atomic(run_dir / "report.json", report)
    parity = section["parity"]
    print(f"wrote {run_dir / section['model']}: parity max |dp| {parity['max_abs_diff_probabilities']:.2e}, "
          f"top-1 agreement {parity['top1_agreement']:.3f} on {parity['n_images']} images ({parity['provider']})")
    for v in section["variants"]:
        print(f"  {v['variant']}: {'kept ' + v['path'] if v['accepted'] else 'rejected'} ({v['reason']})")
    if "triton" in section:
        triton = section["triton"]
        print(f"  Triton repository: {triton['file'] or 'not built: ' + triton['error']}")
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from export.triton import write_triton_repository, write_triton_zip

    if args.out.endswith(".zip"):
        path = write_triton_zip(args.model, args.out, model_name=args.name, max_batch_size=args.max_batch_size)
        print(f"wrote {path} (unzip it into a model repository and serve with: tritonserver --model-repository DIR)")
        return 0
    path = write_triton_repository(args.model, args.out, model_name=args.name, max_batch_size=args.max_batch_size)
    print(f"wrote Triton model {path} (serve with: tritonserver --model-repository {Path(args.out)})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from export.bench import benchmark

    results = benchmark(args.model, batch_sizes=tuple(args.batch), repeats=args.repeats, run_dir=args.run,
                        threads=args.threads, tuned_malloc=not args.glibc_malloc, device=args.device,
                        tensorrt=args.tensorrt)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description="Export, serve and benchmark trained models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("onnx", help="export a trained run to RUN/model.onnx (+ model.int8.onnx when accurate)")
    p.add_argument("--run", required=True, help="run folder written by `python -m core compare`")
    p.add_argument("--arm", choices=("pretrained", "scratch"), default="pretrained",
                   help="which trained model to export (scratch goes to model-scratch.onnx)")
    p.add_argument("--data", help="dataset folder, if it moved since training")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="largest accuracy drop (fraction) for an INT8/FP16 variant to be kept (default 0.01)")
    p.add_argument("--no-variants", action="store_true", help="export FP32 only")
    p.add_argument("--explain", action="store_true",
                   help="also output class activation maps ('cam') and the 'fits no class' score ('ood_score', its "
                        "threshold calibrated on the validation images and kept in the metadata)")
    p.set_defaults(func=cmd_onnx)

    p = sub.add_parser("triton", help="write a Triton model repository for an exported model")
    p.add_argument("--model", required=True, help="exported .onnx file")
    p.add_argument("--out", required=True, help="model repository folder, or a .zip file to write it into")
    p.add_argument("--name", help="Triton model name (default: the file name without .onnx)")
    p.add_argument("--max-batch-size", type=positive_int, default=32)
    p.set_defaults(func=cmd_triton)

    p = sub.add_parser("bench", help="latency of torch eager vs onnxruntime FP32 vs INT8")
    p.add_argument("--model", required=True, help="exported .onnx file (INT8 sibling used when present)")
    p.add_argument("--run", help="run folder, to rebuild the PyTorch model for comparison")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    p.add_argument("--repeats", type=positive_int, default=20)
    p.add_argument("--threads", type=positive_int, help="intra-op threads for every engine (default: physical cores)")
    p.add_argument("--glibc-malloc", action="store_true",
                   help="leave glibc malloc as it starts. By default the benchmark keeps freed memory in the process "
                        "(mallopt) so torch eager does not page-fault its buffers in on every call, the like-for-like "
                        "torch baseline, and times torch with glibc's start-up settings as a second row")
    p.add_argument("--tuned-malloc", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="cpu (default), or cuda/auto: onnxruntime on its CUDA provider and torch eager on the GPU")
    p.add_argument("--tensorrt", action="store_true",
                   help="also time onnxruntime's TensorRT provider (builds and caches an engine; minutes)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (*USER_ERRORS, ExportError) as exc:  # ExportError: the message says what failed and what to report
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
