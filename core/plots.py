"""Figures for reports and the app (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
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
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("wall-clock seconds since the run started (log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Learning curves")
    return fig


def confusion_matrices(runs: dict[str, dict], classes: list[str]) -> Figure:
    """The confusion matrices (counts) of the arms, side by side."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs) + 0.6, 4.2), layout="constrained", squeeze=False)
    for ax, (arm, run) in zip(axes[0], runs.items()):
        disp = ConfusionMatrixDisplay(np.asarray(run["confusion_matrix"]), display_labels=classes)
        disp.plot(ax=ax, colorbar=False, cmap="Blues", xticks_rotation=45 if len(classes) > 3 else "horizontal")
        ax.set_title(f"{arm}: accuracy {run['val_accuracy']:.1%}")
    return fig


def class_counts(counts: dict[str, dict[str, int]]) -> Figure:
    """Images per class, one bar group per split."""
    classes = sorted({c for split in counts.values() for c in split})
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(classes) + 2), 3.2), layout="constrained")
    width = 0.8 / max(len(counts), 1)
    x = np.arange(len(classes))
    for i, (split, per_class) in enumerate(counts.items()):
        ax.bar(x + i * width, [per_class.get(c, 0) for c in classes], width, label=split)
    ax.set_xticks(x + width * (len(counts) - 1) / 2, classes, rotation=45 if len(classes) > 4 else 0)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title("Images per class")
    return fig


def save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
