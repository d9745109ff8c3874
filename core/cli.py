"""Command line interface: ``python -m core <command> ...``.

Each subcommand has an ``add_<name>_parser(subparsers)`` function that registers it and a
``cmd_<name>(args) -> int`` function that runs it; add new ones to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

from core import __version__
from core.data import SPLITS, Dataset, load_dataset
from core.runtime.errors import USER_ERRORS
from core.runtime.providers import DEVICES
from core.samples import SAMPLES

# Errors caused by user input (core.runtime.errors) are printed as "error: <message>" with this exit code and no
# traceback; anything else is a bug and keeps its traceback.
EXIT_USER_ERROR = 2


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use e.g. 0.2") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 0 and below 1, e.g. 0.2")
    return value


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Source and split options shared by every command that loads a dataset."""
    samples = ", ".join(f"sample:{n}" for n in SAMPLES)
    parser.add_argument(
        "src",
        help=f"folder of class folders (or train/ val/ folders), a .zip of one, or a sample spec ({samples}; "
        "e.g. 'sample:shapes?per_class=40&imbalance=0.2&noise=0.1&duplicates=5&seed=1&size=64')",
    )
    parser.add_argument("--val-fraction", type=_fraction, default=0.2, help="validation share (default 0.2)")
    parser.add_argument("--test-fraction", type=_fraction, default=0.0, help="test share (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")


def load_from_args(args: argparse.Namespace) -> Dataset:
    """Load the dataset described by ``add_dataset_arguments`` options."""
    return load_dataset(args.src, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)


def format_counts(ds: Dataset) -> str:
    """A small text table: one row per class, one column per split, plus totals."""
    counts = ds.counts()
    splits = [s for s in SPLITS if s in counts]
    header = ["class", *splits, "total"]
    rows = [[c, *(str(counts[s][c]) for s in splits), str(sum(counts[s][c] for s in splits))] for c in ds.classes]
    totals = [sum(counts[s].values()) for s in splits]
    rows.append(["total", *(str(t) for t in totals), str(sum(totals))])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0]), *(v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True))])

    return "\n".join([fmt(header), *(fmt(r) for r in rows)])


def add_datasets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "datasets",
        help="load a dataset, validate every image and show classes, split counts and skipped files",
        description="Load a dataset source and report classes, per-split counts and skipped files.",
    )
    add_dataset_arguments(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_datasets)


def cmd_datasets(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    ds = load_from_args(args)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({**ds.to_dict(), "load_seconds": round(seconds, 3)}, indent=2))
        return 0
    if ds.predefined_split:
        how = "predefined (train/ val/ folders respected)"
    else:
        shares = f"val {args.val_fraction:g}" + (f", test {args.test_fraction:g}" if args.test_fraction else "")
        how = f"random stratified ({shares}, seed {args.seed})"
    print(f"source:  {ds.source}")
    print(f"root:    {ds.root}")
    print(f"classes: {len(ds.classes)} ({', '.join(ds.classes)})")
    print(f"split:   {how}")
    print()
    print(format_counts(ds))
    print()
    if ds.skipped:
        print(f"skipped: {len(ds.skipped)} file(s)")
        for s in ds.skipped:
            print(f"  {s.file}: {s.reason}")
    else:
        print("skipped: none")
    print(f"loaded {len(ds.items)} images in {seconds:.2f} s")
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _add_training_arguments(p: argparse.ArgumentParser) -> None:
    from core.train import TrainConfig

    d = TrainConfig()
    p.add_argument("--data", required=True, metavar="SRC", help="dataset source (folder, .zip or sample:NAME)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.json, plots, models")
    p.add_argument("--backbone", default=d.backbone, help=f"registered backbone (default {d.backbone}; "
                   "see `python -m core backbones`)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epoch cap for each arm (default {d.epochs})")
    p.add_argument("--budget-seconds", type=_positive_float, default=None,
                   help="optional wall-clock cap per arm, checked after each epoch")
    p.add_argument("--image-size", type=int, default=None,
                   help="crop side in pixels (default: the backbone's 224 on CUDA, 160 on CPU)")
    p.add_argument("--target", type=_fraction, default=d.target_accuracy,
                   help=f"target validation accuracy for time-to-target (default {d.target_accuracy})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the split and training (default 0)")
    p.add_argument("--device", choices=DEVICES, default=d.device, help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--val-fraction", type=_fraction, default=0.2, help="validation share (default 0.2)")
    p.add_argument("--test-fraction", type=_fraction, default=0.0, help="test share (default 0)")
    p.add_argument("--views", type=int, choices=(1, 2), default=d.views,
                   help="2 adds horizontally flipped training views for the pretrained head")
    p.add_argument("--unfreeze", type=int, default=d.unfreeze_blocks, metavar="N",
                   help="also fine-tune the last N blocks of the pretrained backbone, on augmented images "
                        "(default 0: frozen backbone, features cached once; N > 0 trains like the scratch arm)")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export")


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train a head on the frozen pretrained backbone and the same net from "
                       "scratch, side by side", description="Pretrained (frozen backbone + new head) vs from "
                       "scratch on the same split; writes report.json, manifest.csv, plots and models.")
    _add_training_arguments(p)
    p.set_defaults(func=cmd_compare)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one arm (pretrained or scratch)")
    _add_training_arguments(p)
    p.add_argument("--mode", choices=("pretrained", "scratch"), default="pretrained", help="which arm to train")
    p.set_defaults(func=cmd_compare)


def add_backbones_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbones", help="list the registered backbones")
    p.set_defaults(func=cmd_backbones)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark: pretrained arm wall time vs one inference pass (target <= 1.5x)")
    _add_training_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from core.overhead import pretrained_overhead

    ds = load_dataset(args.data, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    r = pretrained_overhead(ds, _config_from_args(args))
    print(f"{r['images']} images at {r['image_size']}px on {r['device']} ({r['feature_engine']}), {r['epochs']} epochs")
    print(f"one inference pass (decode + features): {r['inference_pass_seconds']:.2f}s")
    print(f"pretrained arm (decode + features + head training): {r['pretrained_arm_seconds']:.2f}s")
    print(f"ratio: {r['ratio']:.2f}x (target <= 1.5x); val accuracy {r['val_accuracy']:.1%}")
    return 0


def _config_from_args(args: argparse.Namespace):
    from core.train import TrainConfig

    return TrainConfig(backbone=args.backbone, epochs=args.epochs, budget_seconds=args.budget_seconds,
                       image_size=args.image_size, target_accuracy=args.target, seed=args.seed, device=args.device,
                       views=args.views, unfreeze_blocks=args.unfreeze).validated()


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images with an exported .onnx model (one JSON line per image)")
    p.add_argument("--model", required=True, metavar="M.onnx", help="a model.onnx exported by this project")
    p.add_argument("images", nargs="+", metavar="IMG", help="image files")
    p.add_argument("--top-k", type=int, default=3, help="labels per image (default 3)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: CUDA provider when usable, else CPU")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from core.runtime.images import ImageDecodeError, open_rgb
    from core.runtime.predictor import Predictor

    predictor = Predictor(args.model, device=args.device)
    if predictor.fallback_warning:
        print(f"warning: {predictor.fallback_warning}", file=sys.stderr)
    failed = 0
    for path in args.images:
        try:
            image = open_rgb(path)
        except (ImageDecodeError, OSError) as exc:
            print(json.dumps({"file": path, "error": str(getattr(exc, "reason", exc))}))
            failed += 1
            continue
        result = predictor.predict([image], top_k=args.top_k)[0]
        print(json.dumps({"file": path, "label": result["label"], "probability": result["probability"],
                          "top_k": result["top_k"], "provider": result["provider"]}))
    return 1 if failed else 0


def cmd_backbones(args: argparse.Namespace) -> int:
    import models

    for name in models.list_backbones():
        spec = models.get_backbone_spec(name)
        where = "offline" if spec.offline else "downloads on first use"
        print(f"{name:20s} {spec.feature_dim:5d}-d features, {spec.input_size}px, {where}: {spec.description}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.report import write_run
    from core.train import Callbacks, run_compare

    cfg = _config_from_args(args)
    ds = load_dataset(args.data, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    arms = (args.mode,) if getattr(args, "mode", None) else None
    bars: dict[str, tqdm] = {}

    def progress(stage: str, fraction: float, message: str) -> None:
        if stage == "done":
            return
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=1000, desc=f"{stage:10s}", unit="‰", leave=True,
                                     bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} {postfix}")
        bar.update(round(fraction * 1000) - bar.n)
        bar.set_postfix_str(message, refresh=False)

    def epoch(arm: str, rec: dict) -> None:
        tqdm.write(f"{arm:10s} epoch {rec['epoch']:3d}  {rec['seconds']:7.1f}s  train acc {rec['train_accuracy']:.3f}"
                   f"  val acc {rec['val_accuracy']:.3f}  val loss {rec['val_loss']:.3f}")

    result = run_compare(ds, cfg, Callbacks(progress=progress, epoch=epoch), arms=arms)
    for bar in bars.values():
        bar.close()
    paths = write_run(result, args.out, export=not args.no_export)
    print(summary_text(result.report))
    print(f"\nwrote {len(paths)} files to {args.out}: {', '.join(sorted(p.name for p in paths.values()))}")
    return 0


def summary_text(report: dict) -> str:
    """The comparison as a short text table plus verdicts and flagged diagnostics."""
    from core.summary import comparison_rows

    runs = report["runs"]
    rows = [("", *runs)] + [(label, *values.values()) for label, values in comparison_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    sp = report.get("speedup_time_to_target")
    if isinstance(sp, dict):
        lines.append(f"speedup to target: more than {sp['lower_bound']:.1f}x (scratch never reached it)")
    elif sp is not None:
        lines.append(f"speedup to target: {sp:.1f}x")
    for arm, r in runs.items():
        lines.append(f"{arm} verdict: {r['verdict']['label']} ({'; '.join(r['verdict']['reasons'])})")
    diag = report["diagnostics"]
    for name in ("imbalance", "leakage"):
        if diag[name]["flagged"]:
            lines.append(f"WARNING {name}: {diag[name]['message']}")
    for arm, d in diag["overfitting"].items():
        if d["flagged"]:
            lines.append(f"WARNING overfitting ({arm}): {d['message']}")
    exp = report.get("export") or {}
    if exp.get("error"):
        lines.append(f"export failed: {exp['error']}")
    return "\n".join(lines)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_datasets_parser, add_backbones_parser, add_compare_parser, add_train_parser, add_bench_parser,
    add_predict_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core",
        description="Transfer-learning lab: datasets, training and comparison of image classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
