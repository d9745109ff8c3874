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
from core.data import SPLITS, Dataset, DatasetError, load_dataset
from core.safezip import UnsafeArchiveError
from core.samples import SAMPLES

# Errors caused by user input: printed as "error: <message>" with exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (DatasetError, UnsafeArchiveError)
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


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_datasets_parser]


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
