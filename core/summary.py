"""A finished run's report in words and tables: the side-by-side comparison (shared by the CLI and the app), the
speed-up sentence, per-class table, verdicts, diagnostics, misclassified images, decision threshold, and what
was exported (files, parity and variant checks, the Triton repository).

Text that may hold a visitor's words (class names, file names, messages from core) goes through ``md``, so it
never becomes HTML in a Markdown component.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core import duplicates
from core.stats import McNemarResult
from core.text import columns, md, plain
from export.variants import VARIANTS, variant_path

ARM_TITLES = {"pretrained": "pretrained backbone + new head", "scratch": "from scratch (same network)"}


def pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def pct_ci(run: dict, key: str) -> str:
    """``run[key]`` with its 95% interval when the report has one (``<key>_ci``): "94.8% (91.0–97.1)"."""
    v, ci = run.get(key), run.get(f"{key}_ci")
    if v is None or not ci:
        return pct(v)
    return f"{v:.1%} ({ci[0] * 100:.1f}–{ci[1] * 100:.1f})"


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


def sec_of(run: dict, key: str) -> str:
    return sec(run.get(key))


def comparison_rows(report: dict) -> list[tuple[str, dict[str, str]]]:
    """``[(metric label, {arm: formatted value})]`` for every headline metric of every arm (percentages with their
    95% interval in brackets when the report has them)."""
    runs = report["runs"]
    metrics = [
        ("validation accuracy", "val_accuracy", pct_ci),
        ("balanced accuracy", "balanced_accuracy", pct_ci),
        ("precision (macro)", "precision_macro", pct_ci),
        ("recall (macro)", "recall_macro", pct_ci),
        ("F1 (macro)", "f1_macro", pct_ci),
        ("training time", "train_seconds", sec_of),
        (f"time to {report['target_accuracy']:.0%}", "time_to_target_seconds", sec_of),
    ]
    rows = [("layers trained", {arm: trained_layers(arm, run) for arm, run in runs.items()})]
    rows += [(label, {arm: fmt(run, key) for arm, run in runs.items()}) for label, key, fmt in metrics]
    if all("test" in run for run in runs.values()):  # the test split: scored once, at the epoch kept
        rows[2:2] = [("test accuracy", {arm: pct_ci(run["test"], "val_accuracy") for arm, run in runs.items()})]
    if len(runs) > 1:  # a speed-up needs both arms
        rows.append(("speed-up to target", {arm: speedup_cell(report, arm) for arm in runs}))
    rows.append(("epoch kept / epochs run", {arm: epochs_cell(report, r) for arm, r in runs.items()}))
    rows.append(("verdict", {arm: r["verdict"]["label"] for arm, r in runs.items()}))
    return rows + repeat_rows(report)


def repeat_rows(report: dict) -> list[tuple[str, dict[str, str]]]:
    """Rows for repeated runs (``report["repeats"]``): accuracy as mean ± SD (lowest–highest), how often each arm
    met the target, and its time to target in each repeat; [] for a single run."""
    rep = report.get("repeats")
    if not rep:
        return []
    arms = rep["arms"]

    def mean_sd(key: str) -> dict[str, str]:
        return {arm: f"{a[key]['mean']:.1%} ± {a[key]['sd'] * 100:.1f} ({a[key]['min'] * 100:.1f}–"
                     f"{a[key]['max'] * 100:.1f})" for arm, a in arms.items()}

    k = rep["count"]
    return [(f"validation accuracy over {k} repeats", mean_sd("val_accuracy")),
            (f"balanced accuracy over {k} repeats", mean_sd("balanced_accuracy")),
            (f"met the {rep['target_accuracy']:.0%} target", {arm: f"{round(a['met_target'] * k)} of {k}"
                                                            for arm, a in arms.items()}),
            ("time to target, each repeat", {arm: ", ".join(sec(t) for t in a["time_to_target_seconds"])
                                             for arm, a in arms.items()})]


ARM_NAMES = {"pretrained": "Pretrained", "scratch": "From scratch"}

GLOSSARY = """
- **Pretrained (frozen backbone + new head):** a network already trained on ImageNet's 1.2 million photos turns each
  image into features; only a small new last layer (the *head*) learns your classes.
- **From scratch:** the same network starting from random weights, learning everything from your images alone.
- **Epoch:** one pass over the training images. **Time budget:** each arm stops when it is used up.
- **Validation images:** set aside and never trained on; every score is measured on them. **Selection images:** a
  few training images set aside to pick which epoch to keep. **Test images:** a second untouched set, when you
  provide one.
- **Accuracy:** the share of validation images classified right. **Balanced accuracy:** the same, averaged per class,
  so a rare class counts as much as a common one.
- **Precision** of a class: of the images called that class, the share that really are. **Recall:** of the images
  that are that class, the share found. **F1:** one number combining the two. *Macro*: averaged over classes.
- **(91.0–97.1):** the 95% interval: with this few validation images, the true accuracy is likely in this range.
- **Paired test (McNemar):** counts the images one arm gets right and the other wrong; a small *p* (below 0.05)
  means the difference is unlikely to be luck.
- **Chance / guessing:** the accuracy of always answering the most common class.
- **ONNX:** a file format for trained networks that many programs run without PyTorch; **onnxruntime** runs it, on
  the CPU or a GPU (the *provider*).
- **FP32, INT8, FP16:** how precisely the model's numbers are stored. *FP32* (`model.onnx`) is the full model;
  *INT8* is a copy with 8-bit numbers, about 4x smaller and often faster on a CPU; *FP16* is a half-size copy for
  GPUs. A copy is offered only if it lost at most one point of accuracy against FP32 on the validation images.
"""


def epochs_cell(report: dict, run: dict) -> str:
    """"7 / 15", or "0.4 / 1.4 of 10 (time limit)" when the budget stopped the arm (the epoch kept counted in
    epochs of training behind it, so a kept evaluation midway through an epoch is not called a whole one)."""
    done = run.get("epochs_done", run.get("epochs_run", len(run.get("history", []))))
    kept = run.get("kept_at_epochs", run.get("best_epoch"))
    planned = (report.get("config") or {}).get("epochs")
    if run.get("stopped_by_budget") and planned:
        return f"{kept:g} / {done:g} of {planned} (time limit)"
    return f"{kept:g} / {done:g}"


def at_chance(report: dict, arm: str) -> bool:
    return bool(((report.get("diagnostics") or {}).get("overfitting") or {}).get(arm, {}).get("at_chance"))


def headline(report: dict) -> str:
    """The result in plain words, before any table: each arm's share of validation images right, how long it
    trained and what stopped it ("From scratch: **10% correct (no better than guessing)** when the 60 s time
    limit stopped it after 1.4 of 10 epochs.")."""
    runs = report["runs"]
    config = report.get("config") or {}
    budget, planned = config.get("budget_seconds"), config.get("epochs")
    budgets = {arm: run.get("budget_seconds", budget) for arm, run in runs.items()}
    parts = []
    for arm, run in runs.items():
        guessing = " (no better than guessing)" if at_chance(report, arm) else ""
        correct = f"{run['val_accuracy']:.1%} correct{guessing}"  # as in the table
        done = run.get("epochs_done", run.get("epochs_run"))
        if run.get("stopped_by_budget") and budgets[arm]:
            how = f"when the {budgets[arm]:g} s time limit stopped it after {done:g} of {planned} epochs"
        else:
            how = f"after {sec(run['train_seconds'])} ({done:g} epochs)"
        parts.append(f"{ARM_NAMES.get(arm, arm)}: **{correct}** {how}.")
    lead = ""
    if len(runs) == 2 and budget:
        more = (report.get("continued") or {}).get("scratch")
        lead = (f"With a time budget of {budget:g} s for the pretrained arm and {budgets['scratch']:g} s for scratch "
                f"(you gave it {more['extra_seconds']:g} s more). " if more
                else f"With a time budget of {budget:g} s for each arm. ")
    return lead + " ".join(parts)


def more_time_text(report: dict, seconds: float) -> str:
    """Beside "give scratch more time": where the scratch arm stopped and what the button does."""
    run = report["runs"]["scratch"]
    planned = (report.get("config") or {}).get("epochs")
    return (f"**From scratch stopped after {run['epochs_done']:g} of {planned} epochs** when its time ran out. Give "
            f"it {seconds:g} s more: it goes on from where it stopped, on the same images, and its curve continues.")


def speedup_text(report: dict) -> str:
    """How much sooner the pretrained arm reached the target (or which arm did, or neither), then whether the
    arms' accuracies really differ (``comparison_text``) as a second paragraph."""
    paragraphs = [headline(report), _speedup_sentence(report), comparison_text(report), selection_text(report)]
    return "\n\n".join(p for p in paragraphs if p)


def selection_text(report: dict) -> str:
    """Which images chose the epoch kept and which were scored, in one plain sentence; "" for older reports."""
    sel = report.get("selection")
    if not sel:
        return ""
    scored = sel.get("scored_on", {})
    where = " and ".join(f"{int(n)} {'validation' if split == 'val' else 'test'} images" for split, n in scored.items())
    if sel.get("chosen_on") == "selection":
        return (f"Each arm keeps the epoch that scored best on {int(sel['images'])} training images held out for "
                f"that ({sel['fraction']:.0%} of each class, not trained on); the scores above are on the {where}, "
                "which chose nothing.")
    why = ("no training images were held out to choose one" if sel.get("fraction", 0) <= 0
           else "a class has too few training images to hold any out")
    return f"Each arm keeps its last epoch ({why}); the scores above are on the {where}."


def comparison_text(report: dict) -> str:
    """The paired test of the two arms in one plain sentence (no Markdown, no visitor text); "" without one."""
    comp = report.get("comparison")
    if not comp:
        return ""
    # Rebuilt from the numbers alone, so nothing but digits and this module's words reaches the page.
    statistic = comp.get("statistic")
    method = "exact binomial" if statistic is None else "chi-square with continuity correction"
    test = McNemarResult(int(comp["b"]), int(comp["c"]), int(comp["n"]), float(comp["p_value"]), method,
                         None if statistic is None else float(statistic), ("pretrained", "scratch"),
                         float(comp.get("alpha", 0.05)))
    split = {"val": "validation", "test": "test"}.get(comp.get("split"), "evaluation")
    plain = test.sentence.removesuffix(".")
    return f"Is the difference luck? On the same {test.n} {split} images, {plain} (paired McNemar test, {method})."


def _speedup_sentence(report: dict) -> str:
    target = report["target_accuracy"]
    runs = report["runs"]
    sp = report.get("speedup_time_to_target")
    pre = runs.get("pretrained", {})
    if "scratch" not in runs:
        t = pre.get("time_to_target_seconds")
        return (f"Pretrained reached the {target:.0%} target after **{sec(t)}**." if t is not None else
                f"Pretrained did not reach the {target:.0%} target; best {pct(pre.get('val_accuracy'))}.")
    if isinstance(sp, dict):
        return (f"⚡ Scratch never reached {target:.0%}: pretrained got there **at least {sp['lower_bound']:.1f}× "
                f"sooner** ({sec(pre['time_to_target_seconds'])} vs more than "
                f"{sec(runs['scratch']['train_seconds'])}).")
    if sp is not None:
        return (f"⚡ Pretrained reached {target:.0%} **{sp:.1f}× sooner** than training from scratch "
                f"({sec(pre['time_to_target_seconds'])} vs {sec(runs['scratch']['time_to_target_seconds'])}).")
    t_scratch = runs["scratch"].get("time_to_target_seconds")
    if t_scratch is not None:
        return (f"From scratch reached {target:.0%} after {sec(t_scratch)}, the pretrained head did not "
                f"(best {pct(pre.get('val_accuracy'))}): this data may be far from what the backbone was trained on.")
    return f"Neither arm reached the {target:.0%} target; compare the accuracies below or train longer."


def results_table(report: dict) -> pd.DataFrame:
    """``comparison_rows`` as a table: one row per metric, one column per arm."""
    rows = comparison_rows(report)
    table = {"metric": [label for label, _ in rows]}
    for arm in report["runs"]:
        table[ARM_TITLES.get(arm, arm)] = [values[arm] for _, values in rows]
    return pd.DataFrame(table)


def per_class_table(report: dict) -> pd.DataFrame:
    """One row per class: its support, then precision / recall / F1 of every arm."""
    rows = []
    for cls in report["dataset"]["classes"]:
        row: dict[str, Any] = {"class": cls}
        for arm, run in report["runs"].items():
            pc = run["per_class"].get(cls, {})
            row["support"] = pc.get("support")
            for k in ("precision", "recall", "f1"):
                row[f"{arm} {k}"] = f"{float(pc.get(k, 0.0)):.1%}"
        rows.append(row)
    df = pd.DataFrame(rows)
    return df[["class", "support", *[c for c in df.columns if c not in ("class", "support")]]]


def verdicts_md(report: dict) -> str:
    icons = {"good": "🟢", "fair": "🟠", "poor": "🔴"}
    parts = []
    for arm, run in report["runs"].items():
        v = run["verdict"]
        reasons = "".join(f"\n  - {md(r)}" for r in v["reasons"])
        parts.append(f"- {icons.get(v['label'], '')} **{ARM_TITLES.get(arm, arm)}: "
                     f"<span class='{v['label']}'>{v['label']}</span>**{reasons}")
    return "### Verdicts\n" + "\n".join(parts)


def diagnostic_items(report: dict) -> list[tuple[str, bool | None, str]]:
    """The pitfall checks of a run as (title, flagged, message): imbalance, leakage, then overfitting per arm; then
    what to look at (flagged None: an explanation, not a check)."""
    diag = report.get("diagnostics", {})
    items = [(title, d["flagged"], d["message"]) for key, title in (("imbalance", "Class imbalance"),
                                                                     ("leakage", "Train/validation leakage"))
             if (d := diag.get(key))]
    if dupes := diag.get("duplicates"):
        items.append(("Near-duplicate images", dupes["flagged"], duplicates.message(dupes)))
    if shortcut := diag.get("shortcuts"):
        items.append(("Shortcuts in the files", shortcut["flagged"], shortcut["message"]))
    items += [(f"{'Not learned yet' if d.get('at_chance') else 'Overfitting'} ({arm})", d["flagged"], d["message"])
              for arm, d in diag.get("overfitting", {}).items()]
    if unfamiliar := diag.get("unfamiliar"):
        items.append(("Where the model looked", None, LOOKED_TEXT))
        items.append(("Images that fit no class", None, unfamiliar_text(unfamiliar)))
    return items


LOOKED_TEXT = ("heat maps show where a model looked for the class it chose (bright = counted most): on the "
               "misclassified images below and in the Predict tab. If the bright areas sit on the background, a "
               "border, text or a watermark instead of the object, the model learned a shortcut: crop those out or "
               "add pictures where they vary, and train again.")


def unfamiliar_text(unfamiliar: dict) -> str:
    """The "fits no class" calibration (``diagnostics.unfamiliar``) in words: of the pretrained arm, the one the app
    exports and Predict uses (report.json keeps every arm's)."""
    arm = "pretrained" if "pretrained" in unfamiliar else next(iter(unfamiliar))
    d = unfamiliar[arm]
    return (f"a model always answers with one of its classes, even for a picture of something else. Predict warns "
            f"when a picture is further from every class than {d['quantile']:.0%} of the validation images are "
            f"({d['val_above']} of these {d['n_val']} are). Do not trust the answer for such a picture; if ordinary "
            "ones get the warning, train on more varied pictures.")


APP_POINTERS = {"Near-duplicate images": "The pairs are shown in the Data tab, with a button to drop the copies."}


def diagnostics_md(report: dict) -> str:
    """The pitfall checks for the app, with where in the app each flagged one is shown (``APP_POINTERS``)."""
    lines = ["### What to watch out for"]
    lines += [f"- {'ℹ️' if flagged is None else '⚠️' if flagged else '✅'} **{title}**: {md(message)}"
              + (f" {APP_POINTERS[title]}" if flagged and title in APP_POINTERS else "")
              for title, flagged, message in diagnostic_items(report)]
    return "\n".join(lines)


def summary_text(report: dict) -> str:
    """The comparison for a terminal: the side-by-side table, the speed-up sentence, verdicts and the pitfalls
    that were flagged (the app shows the same, as tables and Markdown)."""
    runs = report["runs"]
    rows = [("", *runs)] + [(label, *values.values()) for label, values in comparison_rows(report)]
    lines = [headline(report).replace("**", ""), "", columns(rows)]
    lines.append(_speedup_sentence(report).replace("**", "").removeprefix("⚡ "))
    lines += [text for text in (comparison_text(report), selection_text(report)) if text]
    lines += [f"{arm} verdict: {r['verdict']['label']} ({'; '.join(r['verdict']['reasons'])})"
              for arm, r in runs.items()]
    lines += [f"WARNING {title}: {message}" for title, flagged, message in diagnostic_items(report) if flagged]
    exp = report.get("export") or {}
    if exp.get("error"):
        lines.append(f"export failed: {exp['error']}")
    if (exp.get("triton") or {}).get("error"):
        lines.append(f"Triton repository not built: {exp['triton']['error']}")
    return "\n".join(lines)


def misclassified_gallery(result: Any, classes: list[str], limit: int = 12) -> list[tuple[np.ndarray, str]]:
    """``(validation crop, "arm: true → predicted confidence")`` for each arm's ``limit`` most confident mistakes
    (an arm at chance has dozens, which would bury the other's few). Where the arm's network is at hand, the crop
    carries its class activation map for the class it chose (``models.explain``): where it looked to get it wrong."""
    from core.metrics import misclassified
    from core.runtime.images import heatmap_overlay
    from models import Classifier
    from models.explain import explain

    items = []
    labels = np.asarray(result.val.labels)
    for arm, run in result.runs.items():
        probs = np.asarray(run.val_probabilities)
        pred = probs.argmax(1)
        wrong = misclassified(labels, probs, limit)
        crops = [np.ascontiguousarray(result.val.crops[i]) for i in wrong]
        if wrong and isinstance(run.model, Classifier):
            maps = explain(run.model, np.stack(crops))["cam"]
            crops = [heatmap_overlay(crop, maps[j, pred[i]]) for j, (i, crop) in enumerate(zip(wrong, crops))]
        for i, crop in zip(wrong, crops):
            caption = plain(f"{arm}: {classes[labels[i]]} → {classes[pred[i]]} {probs[i, pred[i]]:.0%}", 120)
            items.append((crop, caption))
    return items


# ---------------------------------------------------------------- decision threshold (two classes)

def threshold_inputs(report: dict, result: Any) -> dict[str, Any]:
    """What ``threshold_view`` needs from a finished run (kept by a front end between requests)."""
    return {"classes": report["dataset"]["classes"], "labels": np.asarray(result.val.labels),
            "probs": {arm: np.asarray(r.val_probabilities) for arm, r in result.runs.items()},
            "backbone": report["backbone"]}


def threshold_view(last: dict, positive: str | None, threshold: float) -> tuple[str, pd.DataFrame | None]:
    """Precision / recall of the pretrained arm when ``positive`` is predicted at probability >= ``threshold``,
    and the confusion matrix at that threshold."""
    from core.metrics import binary_threshold_metrics

    classes = last["classes"]
    if len(classes) != 2 or "pretrained" not in last["probs"]:
        return "The threshold applies to two-class tasks only.", None
    pos = classes.index(positive) if positive in classes else 1
    probs = last["probs"]["pretrained"][:, pos]
    m = binary_threshold_metrics(last["labels"], probs, float(threshold), classes, positive=pos)
    pc = m["per_class"][classes[pos]]
    text = (f"Predict **{md(classes[pos])}** when its probability ≥ **{threshold:.2f}** (pretrained arm, validation "
            f"set): precision **{pc['precision']:.1%}**, recall **{pc['recall']:.1%}**, F1 {pc['f1']:.1%}; "
            f"accuracy {m['val_accuracy']:.1%}, balanced accuracy {m['balanced_accuracy']:.1%}.")
    df = pd.DataFrame(np.asarray(m["confusion_matrix"]), columns=[f"predicted {c}" for c in classes])
    df.insert(0, "true class", classes)
    return text, df


# ---------------------------------------------------------------- what was exported

@dataclass
class ExportSummary:
    markdown: str
    downloads: dict[str, Path | None]  # variant name (fp32, int8, fp16), "triton", "report" -> file or None
    checks: pd.DataFrame  # parity with PyTorch and the variants' accuracy checks


def _check_rows(exp: dict, clean: Callable[[str], str] = str) -> list[dict[str, str]]:
    rows = []
    parity = exp.get("parity")
    if isinstance(parity, dict):
        diff = parity.get("max_abs_diff_probabilities", parity.get("max_abs_diff"))
        details = [f"max |Δ probability| {diff:.1e} (allowed {parity.get('atol', 0):.0e})" if diff is not None else "",
                   f"top-1 agreement {parity['top1_agreement']:.0%}" if "top1_agreement" in parity else "",
                   f"{parity.get('n_images', '?')} images on {parity.get('provider', '?')}"]
        composed = parity.get("method") == "composed"  # export.onnx_export.compose_classifier
        rows.append({"model": "model.onnx (FP32) vs PyTorch" + (" head on the backbone's features" if composed else ""),
                     "check": "parity",
                     "result": "✅ passed" if parity.get("passed") else "❌ failed",
                     "details": ", ".join(d for d in details if d)})
    for v in exp.get("variants") or []:
        if isinstance(v, dict):
            name = str(v.get("variant"))
            label = VARIANTS[name].label if name in VARIANTS else name
            rows.append({"model": f"{label} variant", "check": "accuracy vs FP32",
                         "result": "✅ accepted" if v.get("accepted") else "❌ rejected",
                         "details": clean(str(v.get("reason", "")))})  # a build error may name a server path
    for name in exp.get("variants_pending") or []:
        label = VARIANTS[name].label if name in VARIANTS else str(name)
        rows.append({"model": f"{label} variant", "check": "accuracy vs FP32", "result": "⏳ being built",
                     "details": "appears here when it is checked"})
    return rows


def export_summary(report: dict, run_dir: Path, *, clean: Callable[[str], str] = str) -> ExportSummary:
    """The exported files of a run, in words, as downloads and checks.

    ``clean`` hides server folders in error messages shown to a visitor. A Triton repository that could not be
    built (``export.runs.write_triton``) did not fail the run: the summary says why.
    """
    exp = report.get("export") or {}
    from export.runs import model_filename

    model = run_dir / model_filename("pretrained")
    downloads: dict[str, Path | None] = {name: variant_path(model, name) for name in VARIANTS}
    downloads["report"] = run_dir / "report.json"
    downloads = {k: p if p is not None and p.is_file() else None for k, p in downloads.items()}
    downloads["triton"] = None
    lines = ["### Exported files"]
    if exp.get("error"):
        lines.append(f"⚠️ The ONNX export failed: {md(clean(str(exp['error'])))}")
    elif downloads["fp32"]:
        size = report["image_size"]
        lines.append(f"✅ `model.onnx` ({model.stat().st_size / 1e6:.1f} MB): the pretrained arm, input uint8 RGB "
                     f"`[N, {size}, {size}, 3]`, outputs `logits` and `probabilities`; class names and the resize "
                     "rule are in its metadata.")
        if "ood_score" in (exp.get("outputs") or []):
            lines.append("Two more outputs give what the Predict tab shows: `cam`, where the model looked (one map per "
                         "class; bright = counted most), and `ood_score`, how unlike the training images a picture "
                         f"is: a score above {exp['ood']['threshold']:.3f} (`ood_threshold` in the metadata) means it "
                         "fits no class. The example below uses both.")
    else:
        lines.append("ℹ️ No ONNX model was exported for this run.")
    pending = [VARIANTS[n].label for n in exp.get("variants_pending") or [] if n in VARIANTS]
    if pending and downloads["fp32"]:
        lines.append(f"⏳ The {' and '.join(pending)} copy is being built and checked against it: it appears here in a "
                     "few seconds.")
    if exp.get("variants_error") and downloads["fp32"]:
        lines.append(f"⚠️ The smaller copies could not be built: {md(clean(str(exp['variants_error'])))}")
    served = exp.get("served")
    if isinstance(served, dict) and served.get("reason") and downloads["fp32"]:
        lines.append(f"⚡ Served here: {md(str(served['reason']))}. The Predict tab uses it; pick another there.")
    tried = {v.get("variant") for v in exp.get("variants") or [] if isinstance(v, dict)}
    for name, variant in VARIANTS.items():
        if variant.needs_cuda and name not in tried:
            lines.append(f"ℹ️ An {variant.label} variant is built only where a CUDA GPU is available.")
    triton = exp.get("triton") or {}
    if triton.get("file") and (run_dir / triton["file"]).is_file():
        downloads["triton"] = run_dir / triton["file"]
    elif triton.get("error"):
        lines.append(f"⚠️ The Triton repository could not be built: {md(clean(triton['error']))}")
    checks = pd.DataFrame(_check_rows(exp, clean), columns=["model", "check", "result", "details"])
    return ExportSummary("\n\n".join(lines), downloads, checks)
