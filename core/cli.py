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
from pathlib import Path

from core import __version__
from core.config import FIELDS, ConfigError, TrainConfig, read_config_file, rule
from core.data import SPLITS, Dataset, load_dataset
from core.runtime.devices import DEVICES, VARIANT_CHOICES
from core.runtime.errors import USER_ERRORS, UserError
from core.samples import SAMPLES

ENGINES = ("local", "ray")  # where core.batch runs a batch job: this process, or Ray Data

# Errors caused by user input (core.runtime.errors) are printed as "error: <message>" with this exit code and no
# traceback; anything else is a bug and keeps its traceback.
EXIT_USER_ERROR = 2


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (shared by both CLIs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; use e.g. 3") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use e.g. 0.2") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 0 and below 1, e.g. 0.2")
    return value


def split_args_parser() -> argparse.ArgumentParser:
    """``--val-fraction``, ``--test-fraction`` and ``--seed``: how every command that loads a dataset splits it (an
    argparse parent). ``--seed`` has no default here: ``datasets`` sets 0, training commands take TrainConfig's."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("dataset split")
    g.add_argument("--val-fraction", type=_fraction, default=0.2, metavar="F", help="validation share (default 0.2)")
    g.add_argument("--test-fraction", type=_fraction, default=0.0, metavar="F", help="test share (default 0)")
    g.add_argument("--seed", type=_setting_type("seed"), default=argparse.SUPPRESS, metavar="K",
                   help="seed of the random split and, for training commands, of training (default 0) [seed]")
    return p


def _source_help() -> str:
    samples = ", ".join(f"sample:{n}" for n in SAMPLES)
    return (f"folder of class folders (or train/ val/ folders), a .zip of one, or a sample spec ({samples}; "
            "e.g. 'sample:shapes?per_class=40&imbalance=0.2&noise=0.1&duplicates=5&seed=1&size=64')")


def load_from_args(args: argparse.Namespace, seed: int | None = None) -> Dataset:
    """Load the dataset described by ``split_args_parser`` options (``args.src`` or ``args.data``)."""
    src = getattr(args, "src", None) or args.data
    return load_dataset(src, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                        seed=args.seed if seed is None else seed)


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
        parents=[split_args_parser()],
    )
    p.add_argument("src", help=_source_help())
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_datasets, seed=0)


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


def _setting_type(name: str) -> Callable[[str], object]:
    """An argparse ``type`` for TrainConfig field ``name``: parses the text as the field's kind and checks it against
    the field's rule, so a bad flag fails with the same message as a bad config file value."""
    r = rule(name)

    def parse(text: str) -> object:
        try:
            value = r.kind(text) if r.kind in (int, float) else text
        except ValueError:
            value = text
        try:
            return r.check(name, value)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _setting(group: argparse._ArgumentGroup, flag: str, name: str, text: str, *, metavar: str | None = None,
             default: str | None = None) -> None:
    """A flag whose ``dest`` is TrainConfig field ``name``. It has no argparse default: a flag left out keeps the
    value from ``--config FILE``, else TrainConfig's default (shown in the help)."""
    r = rule(name)
    default = str(FIELDS[name].default) if default is None else default
    valid = "" if r.choices or r.kind is str else f"{r.describe(with_none=False)}, "  # argparse lists choices
    note = f" ({valid}default {default})" if default else ""
    group.add_argument(flag, dest=name, type=_setting_type(name), default=argparse.SUPPRESS, metavar=metavar,
                       choices=r.choices or None, help=f"{text}{note} [{name}]")


def training_args_parser(*, omit: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The dataset and training flags of ``compare``, ``train`` and ``bench``, as an argparse parent (torchvision's
    ``get_args_parser(add_help=False)``). Every training flag's ``dest`` is a TrainConfig field; ``omit`` leaves out
    the fields a command does not use, so no command has a flag that does nothing."""
    p = argparse.ArgumentParser(add_help=False, parents=[split_args_parser()])
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="SRC", help=_source_help())
    g = p.add_argument_group(
        "training", "Each flag sets the TrainConfig key in brackets. --config FILE supplies defaults for any "
        "TrainConfig key; flags given on the command line win over it.")
    g.add_argument("--config", metavar="FILE",
                   help="JSON (or .toml) file of TrainConfig keys, e.g. an earlier run's config.json; valid keys: "
                        f"{', '.join(FIELDS)}")
    flags = [
        ("--backbone", "backbone", "registered backbone (`python -m core backbones` lists them and marks the "
         "default)", "NAME", ""),
        ("--epochs", "epochs", "epoch cap for each arm", "N", None),
        ("--budget-seconds", "budget_seconds", "wall-clock cap per arm, checked after each epoch", "S", "none"),
        ("--image-size", "image_size", "crop side in pixels", "PX", "224 on CUDA, 160 on CPU"),
        ("--target", "target_accuracy", "target validation accuracy for time-to-target", "ACC", None),
        ("--device", "device", "auto (CUDA when present), cpu or cuda", None, None),
        ("--selection-fraction", "selection_fraction", "share of each class's training images held out to choose "
         "the epoch kept (never the reported split)", "F", None),
        ("--repeats", "repeats", "train both arms K times (seeds, and random splits, vary) and report the mean and "
         "spread", "K", None),
        ("--views", "views", "2 adds horizontally flipped training views for the pretrained head", None, None),
        ("--unfreeze", "unfreeze_blocks", "also fine-tune the last N blocks of the pretrained backbone, on augmented "
         "images (0: frozen backbone, features cached once; N > 0 trains like the scratch arm)", "N", None),
    ]
    for flag, name, text, metavar, default in flags:
        if name not in omit:
            _setting(g, flag, name, text, metavar=metavar, default=default)
    return p


def output_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="run folder for report.json, config.json, manifest.csv, "
                   "plots and models (files of an earlier run there are replaced; other files are left alone)")
    g.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    g.add_argument("--explain", action="store_true",
                   help="the exported model also outputs class activation maps ('cam': where it looked) and an "
                        "'ood_score' with its threshold in the metadata (the image fits no class); off by default, "
                        "so model.onnx keeps its two outputs")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from ``--config FILE`` (defaults) and the training flags given (which win), via ``from_dict``."""
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k in FIELDS})
    return TrainConfig.from_dict(values)


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train a head on the frozen pretrained backbone and the same net from "
                       "scratch, side by side", description="Pretrained (frozen backbone + new head) vs from "
                       "scratch on the same split; writes report.json, config.json, manifest.csv, plots and models.",
                       parents=[training_args_parser(), output_args_parser()])
    p.set_defaults(func=cmd_compare)


def add_efficiency_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("efficiency", help="how many images do you need? accuracy against training images per class",
                       description="Validation accuracy of both arms against labelled training images per class "
                       "(1, 2, 5, 10, 25, 50, all), on the same validation images; writes efficiency.json and "
                       "efficiency.png.", parents=[training_args_parser(omit=("repeats",))])
    p.add_argument("--out", required=True, metavar="DIR", help="folder for efficiency.json and efficiency.png")
    p.add_argument("--sizes", type=positive_int, nargs="+", default=None, metavar="N",
                   help="training images per class to try, besides all of them (default: 1 2 5 10 25 50)")
    p.add_argument("--draws", type=positive_int, default=None, metavar="K",
                   help="random draws of the training images at each size up to 10 (default 3)")
    p.add_argument("--scratch-budget", type=float, default=None, metavar="S",
                   help="seconds for all scratch points together; the rest are skipped (default 300; 0: no scratch)")
    p.set_defaults(func=cmd_efficiency)


def cmd_efficiency(args: argparse.Namespace) -> int:
    from pathlib import Path

    from core import efficiency as eff
    from core import plots
    from core.runtime.files import atomic_write, write_json_atomic
    from core.text import columns

    cfg = config_from_args(args)
    ds = load_from_args(args, seed=cfg.seed)
    budget = eff.DEFAULT_SCRATCH_BUDGET if args.scratch_budget is None else args.scratch_budget
    arms = ("pretrained",) if budget <= 0 or not cfg.train_scratch else ("pretrained", "scratch")
    start = time.perf_counter()
    from core.train import Callbacks

    def progress(stage: str, fraction: float, message: str) -> None:
        if message.endswith("decoding images"):  # once per point and draw: "scratch, 5 per class, draw 2/3: ..."
            print(f"[{time.perf_counter() - start:6.0f} s] {message.removesuffix(': decoding images')}", flush=True)

    curve = eff.efficiency_curve(ds, cfg, sizes=args.sizes or eff.SIZES, draws=args.draws or eff.DEFAULT_DRAWS,
                                 scratch_budget=budget, arms=arms, callbacks=Callbacks(progress=progress))
    curve["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "efficiency.json", curve)
    figure = plots.efficiency(curve)
    atomic_write(out / "efficiency.png", lambda tmp: plots.save(figure, tmp, format="png"))
    print(columns(eff.efficiency_table(curve)))
    for skip in curve["skipped"]:
        print(f"skipped: {skip['arm']} at {skip['per_class']} ({skip['reason']})")
    print(f"accuracy on {curve['val_images']} validation images; {curve['interval']}; {curve['seconds']:.1f} s in all")
    print(f"wrote {out / 'efficiency.json'} and {out / 'efficiency.png'}")
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one arm (pretrained or scratch)",
                       parents=[training_args_parser(), output_args_parser()])
    p.add_argument("--mode", choices=("pretrained", "scratch"), default="pretrained", help="which arm to train")
    p.set_defaults(func=cmd_compare)


def add_backbones_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbones", help="list the registered backbones")
    p.set_defaults(func=cmd_backbones)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    # The benchmark times the frozen-backbone arm and reports no time-to-target: no --unfreeze, no --target.
    p = sub.add_parser("bench", help="benchmark: pretrained arm wall time vs one inference pass (target <= 1.5x)",
                       parents=[training_args_parser(omit=("target_accuracy", "unfreeze_blocks"))])
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from core.overhead import pretrained_overhead

    cfg = config_from_args(args)
    ds = load_from_args(args, seed=cfg.seed)
    r = pretrained_overhead(ds, cfg)
    print(f"{r['images']} images at {r['image_size']}px on {r['device']} ({r['feature_engine']}), {r['epochs']} epochs")
    print(f"one inference pass (decode + features): {r['inference_pass_seconds']:.2f}s")
    print(f"pretrained arm (decode + features + head training): {r['pretrained_arm_seconds']:.2f}s")
    print(f"ratio: {r['ratio']:.2f}x (target <= 1.5x); val accuracy {r['val_accuracy']:.1%}")
    return 0


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images with an exported .onnx model (one JSON line per image, or "
                                       "a CSV of any number of images with --out)")
    p.add_argument("--model", required=True, metavar="M.onnx", help="a model.onnx exported by this project")
    p.add_argument("images", nargs="*", metavar="IMG", help="image files")
    p.add_argument("--input", action="append", default=[], metavar="DIR",
                   help="a folder of images, searched recursively (repeatable); with --out")
    p.add_argument("--out", metavar="PREDS.csv",
                   help="write one CSV row per image (path, label, probability, top_k as JSON, error) with a "
                        "progress bar, instead of JSON lines; unreadable files get a row with the reason")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="with --out: local (this process, default) or ray (Ray Data, one onnxruntime session per "
                        "actor; a cluster when RAY_ADDRESS is set, else Ray on this machine)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images decoded and classified together (default 64)")
    p.add_argument("--top-k", type=positive_int, default=3, help="labels per image (default 3)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: CUDA provider when usable, else CPU")
    p.add_argument("--variant", choices=VARIANT_CHOICES, default="auto",
                   help="auto (default): time the model and the accepted variants beside it (model.int8.onnx...) on "
                        "this machine and serve the fastest (the answer is cached); or force one")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from core.runtime.fastest import choose_variant
    from core.runtime.images import ImageDecodeError, open_rgb
    from core.runtime.predictor import Predictor

    if not args.images and not args.input:
        raise UserError("name image files, or --input DIR with --out PREDS.csv")
    if (args.input or args.engine != "local") and not args.out:
        raise UserError("--input and --engine write a CSV: add --out PREDS.csv")
    choice = choose_variant(args.model, device=args.device, want=args.variant)
    print(f"serving {choice.path.name}: {choice.reason}", file=sys.stderr)
    if args.out:
        return _predict_to_csv(args, choice.path)
    predictor = Predictor(choice.path, device=args.device)
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
                          "top_k": result["top_k"], "provider": result["provider"], "variant": choice.variant}))
    return 1 if failed else 0


def _predict_to_csv(args: argparse.Namespace, model: Path) -> int:
    from core.batch import find_images, predict_local, predict_ray, write_csv

    try:
        paths = find_images([*args.images, *args.input])
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    if not paths:
        raise UserError(f"no image files in {', '.join(args.input or args.images)}")
    run = predict_ray if args.engine == "ray" else predict_local
    start = time.perf_counter()
    summary = write_csv(run(model, paths, top_k=args.top_k, device=args.device, batch_size=args.batch_size), args.out,
                        total=len(paths))
    seconds = time.perf_counter() - start
    print(f"wrote {summary.rows} rows to {summary.out} in {seconds:.1f} s ({summary.rows / seconds:.1f} images/s, "
          f"engine {args.engine}); {summary.errors} file(s) could not be read (see the error column)",
          file=sys.stderr)
    return 1 if summary.errors else 0


def add_features_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="a pretrained backbone's features for any number of images (.npy + .csv), "
                                        "here or on Ray: the input of a head trained on a very large set")
    p.add_argument("--input", action="append", required=True, metavar="DIR",
                   help="a folder of images (searched recursively) or an image file; repeatable")
    p.add_argument("--out", required=True, metavar="FEATURES.npy",
                   help="float32 [images, features] (NaN rows for unreadable files); FEATURES.csv beside it lists "
                        "each row's path and, for an unreadable file, why")
    p.add_argument("--backbone", default=None, help="a registered backbone (`python -m core backbones`; default: "
                                                    "the default backbone)")
    p.add_argument("--image-size", type=positive_int, default=160, metavar="PX",
                   help="the crop the backbone sees (default 160, what training uses on a CPU)")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local (this process, default) or ray (Ray Data actors; a cluster when RAY_ADDRESS is set)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default 64)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA provider when usable, else CPU")
    p.set_defaults(func=cmd_features)


def cmd_features(args: argparse.Namespace) -> int:
    import models
    from core.batch import BatchFeatures, find_images, run_local, run_ray, write_features
    from export.onnx_export import cached_backbone_onnx  # builds the backbone's ONNX graph once (needs torch)

    backbone = args.backbone or models.DEFAULT_BACKBONE
    spec = models.get_backbone_spec(backbone)
    size = args.image_size
    try:
        paths = find_images(args.input)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    if not paths:
        raise UserError(f"no image files in {', '.join(args.input)}")
    model = cached_backbone_onnx(backbone, size)
    if args.engine == "ray":
        rows = run_ray(BatchFeatures, model, paths, device=args.device, batch_size=args.batch_size)
    else:
        rows = run_local(BatchFeatures(model, device=args.device), paths, batch_size=args.batch_size)
    start = time.perf_counter()
    summary = write_features(rows, args.out, total=len(paths), dim=spec.feature_dim)
    seconds = time.perf_counter() - start
    print(f"wrote {summary.rows} x {spec.feature_dim} features ({backbone}, {size} px) to {summary.out} and its .csv "
          f"in {seconds:.1f} s ({summary.rows / seconds:.1f} images/s, engine {args.engine}); {summary.errors} "
          "file(s) could not be read", file=sys.stderr)
    return 1 if summary.errors else 0


def cmd_backbones(args: argparse.Namespace) -> int:
    import models

    for name in models.list_backbones():
        spec = models.get_backbone_spec(name)
        where = "offline" if spec.offline else "downloads on first use"
        where += ", the default" if name == models.DEFAULT_BACKBONE else ""
        print(f"{name:20s} {spec.feature_dim:5d}-d features, {spec.input_size}px, {where}: {spec.description}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.jobs import epoch_line
    from core.report import write_run
    from core.summary import summary_text
    from core.train import Callbacks, run_compare

    cfg = config_from_args(args)
    ds = load_from_args(args, seed=cfg.seed)
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
        tqdm.write(epoch_line(arm, rec, cfg.epochs))

    result = run_compare(ds, cfg, Callbacks(progress=progress, epoch=epoch), arms=arms)
    for bar in bars.values():
        bar.close()
    # A local run keeps the data folder's absolute path, for `python -m export RUN` to find the images; the app's
    # report.json (visitors download it) carries the folder's name only (Dataset.to_dict).
    result.report["dataset"]["root"] = str(ds.root)
    paths = write_run(result, args.out, export=not args.no_export, explain=args.explain)
    print(summary_text(result.report))
    print(f"\nwrote {len(paths)} files to {args.out}: {', '.join(sorted(p.name for p in paths.values()))}")
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_datasets_parser, add_backbones_parser, add_compare_parser, add_train_parser, add_efficiency_parser,
    add_bench_parser,
    add_predict_parser, add_features_parser,
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
