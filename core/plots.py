"""Figures for reports and the app (matplotlib, headless)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from .summary import ARM_TITLES  # noqa: E402

ARM_STYLE = {arm: (color, ARM_TITLES[arm]) for arm, color in (("pretrained", "#1f77b4"), ("scratch", "#d62728"))}


def learning_curves(runs: dict[str, dict], target: float | None = None) -> Figure:
    """Validation accuracy against wall-clock seconds for each arm, with the target line."""
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for arm, run in runs.items():
        hist = run["history"]
        color, label = ARM_STYLE.get(arm, (None, arm))
        ax.plot([0.0] + [h["seconds"] for h in hist], [np.nan] + [h["val_accuracy"] for h in hist], "o-",
                color=color, label=label, markersize=3)
        if run.get("time_to_target_seconds") is not None:
            ax.axvline(run["time_to_target_seconds"], color=color, ls=":", lw=1)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.0%}")
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the arm started training")
    ax.set_ylabel("validation images right")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Learning curves")
    return fig


def efficiency(curve: dict) -> Figure:
    """Validation accuracy against labelled training images per class (log scale), one line per arm: the mean
    of each point's draws, its 95% interval as error bars, and each draw as a faint dot."""
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for arm in dict.fromkeys(p["arm"] for p in curve["points"]):
        points = [p for p in curve["points"] if p["arm"] == arm]
        color, label = ARM_STYLE.get(arm, (None, arm))
        x = np.array([p["per_class_n"] for p in points], dtype=float)
        y = np.array([p["val_accuracy"] for p in points])
        err = np.array([[p["val_accuracy"] - p["ci"][0], p["ci"][1] - p["val_accuracy"]] for p in points]).T
        ax.errorbar(x, y, yerr=err, fmt="o-", color=color, label=label, markersize=4, capsize=3, lw=1.5)
        for p in points:
            if len(p["draws"]) > 1:
                ax.plot([p["per_class_n"]] * len(p["draws"]), p["draws"], ".", color=color, alpha=0.35)
    if curve.get("target_accuracy"):
        ax.axhline(curve["target_accuracy"], color="grey", ls="--", lw=1,
                   label=f"target {curve['target_accuracy']:.0%}")
    ax.set_xscale("log")
    ticks = {p["per_class_n"]: p["per_class"].removesuffix(" per class") for p in curve["points"]}
    ax.set_xticks(list(ticks), [f"all\n({n:g})" if label == "all" else label for n, label in ticks.items()])
    ax.minorticks_off()
    ax.set_xlabel("labelled training images per class (log scale)")
    ax.set_ylabel(f"right on the {curve['val_images']} validation images")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("How many images do you need?")
    return fig


def confusion_matrices(runs: dict[str, dict], classes: list[str]) -> Figure:
    """The confusion matrices (counts) of the arms, side by side."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs) + 0.6, 4.2), layout="constrained", squeeze=False)
    for ax, (arm, run) in zip(axes[0], runs.items()):
        disp = ConfusionMatrixDisplay(np.asarray(run["confusion_matrix"]), display_labels=classes)
        disp.plot(ax=ax, colorbar=False, cmap="Blues", xticks_rotation=45 if len(classes) > 3 else "horizontal")
        ax.set_title(f"{arm}: accuracy {run['val_accuracy']:.1%}")
    return fig


def grouped_bars(groups: list[str], series: dict[str, list[float]], *, title: str, ylabel: str,
                 figsize: tuple[float, float], colors: list[str] | None = None, value_labels: str | None = None,
                 rotate: bool = False, grid: bool = False) -> Figure:
    """One group of bars per entry of ``groups`` and one bar (and legend entry) per series in each group.

    ``value_labels``: a format such as ``"%.0f"`` writes each bar's value above it."""
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        color = colors[i % len(colors)] if colors else None
        bars = ax.bar(x + i * width, values, width, label=name, color=color)
        if value_labels:
            ax.bar_label(bars, fmt=value_labels, fontsize=7)
    ax.set_xticks(x + width * (len(series) - 1) / 2, groups, rotation=45 if rotate else 0)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    if grid:
        ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    return fig


def class_counts(counts: dict[str, dict[str, int]]) -> Figure:
    """Images per class, one bar group per split."""
    classes = sorted({c for split in counts.values() for c in split})
    return grouped_bars(classes, {split: [per_class.get(c, 0) for c in classes] for split, per_class in counts.items()},
                        title="Images per class", ylabel="images", figsize=(max(4.0, 0.6 * len(classes) + 2), 3.2),
                        rotate=len(classes) > 4)


_PYPLOT_LOCK = threading.Lock()  # pyplot's figure registry is global state


def detached(make: Callable[..., Figure], *args: Any, **kwargs: Any) -> Figure:
    """A figure from one of the functions here, detached from pyplot (no leak; safe from several threads), for
    front ends that keep figure objects (the app's ``gr.Plot``)."""
    with _PYPLOT_LOCK:
        fig = make(*args, **kwargs)
        plt.close(fig)
    return fig


def save(fig: Figure, path, format: str | None = None) -> None:  # noqa: A002 - matplotlib's name
    fig.savefig(path, dpi=110, format=format)
    plt.close(fig)
