"""The side-by-side comparison of the arms as rows of text, shared by the CLI and the app."""

from __future__ import annotations

ARM_TITLES = {"pretrained": "pretrained backbone + new head", "scratch": "from scratch (same network)"}


def pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def sec(v: float | None, never: str = "never") -> str:
    if v is None:
        return never
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def speedup_cell(report: dict, arm: str) -> str:
    sp = report.get("speedup_time_to_target")
    if "scratch" not in report["runs"] or sp is None:
        return "–"
    if arm == "scratch":
        return "1× (reference)"
    return f"≥ {sp['lower_bound']:.1f}× sooner" if isinstance(sp, dict) else f"{sp:.1f}× sooner"


def trained_layers(arm: str, run: dict) -> str:
    """Which layers an arm trained: the head only, the head and the last N backbone blocks, or everything."""
    if arm == "scratch":
        return "every layer (random init)"
    if run.get("unfrozen_blocks"):
        return f"head + last {run['unfrozen_blocks']} of {run.get('backbone_blocks', '?')} backbone blocks"
    return "head only (backbone frozen)"


def comparison_rows(report: dict) -> list[tuple[str, dict[str, str]]]:
    """``[(metric label, {arm: formatted value})]`` for every headline metric of every arm."""
    runs = report["runs"]
    metrics = [
        ("validation accuracy", "val_accuracy", pct),
        ("balanced accuracy", "balanced_accuracy", pct),
        ("precision (macro)", "precision_macro", pct),
        ("recall (macro)", "recall_macro", pct),
        ("F1 (macro)", "f1_macro", pct),
        ("training time", "train_seconds", sec),
        (f"time to {report['target_accuracy']:.0%}", "time_to_target_seconds", sec),
    ]
    rows = [("layers trained", {arm: trained_layers(arm, run) for arm, run in runs.items()})]
    rows += [(label, {arm: fmt(run.get(key)) for arm, run in runs.items()}) for label, key, fmt in metrics]
    rows.append(("speed-up to target", {arm: speedup_cell(report, arm) for arm in runs}))
    rows.append(("best epoch / epochs run",
                 {arm: f"{r.get('best_epoch')} / {r.get('epochs_run', len(r.get('history', [])))}"
                  for arm, r in runs.items()}))
    rows.append(("verdict", {arm: r["verdict"]["label"] for arm, r in runs.items()}))
    return rows
