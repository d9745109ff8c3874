"""``export.bench.benchmark``'s result for a reader: a table, a few lines of Markdown, a throughput chart."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from core import plots
from core.text import md
from export.variants import VARIANTS

ENGINE_TITLES = {"torch": "PyTorch eager", "torch_glibc": "PyTorch eager (glibc's default allocator)",
                 "torch_nchw": "PyTorch eager (NCHW float input)",
                 **{f"onnx_{name}": f"onnxruntime {v.label}" for name, v in VARIANTS.items()},
                 "openvino_fp32": "OpenVINO FP32"}  # export.bench.ENGINES
ENGINE_COLORS = ["#7f7f7f", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
COLUMNS = ["engine", "batch size", "latency (ms)", "images/s", "speed-up vs PyTorch", "GFLOP/s", "of CPU peak",
           "CPU time in kernel"]


def benchmark_table(result: dict) -> pd.DataFrame:
    """One row per engine and batch size."""
    rows = []
    for batch_size, row in (result.get("batches") or {}).items():
        base = row.get("torch", {}).get("ms")
        for engine, title in ENGINE_TITLES.items():
            if engine not in row:
                continue
            value = row[engine]
            rows.append({"engine": title, "batch size": int(batch_size), "latency (ms)": round(value["ms"], 2),
                         "images/s": round(value["images_per_s"], 1),
                         "speed-up vs PyTorch": f"{base / value['ms']:.2f}×" if base else "–",
                         "GFLOP/s": round(value["gflops"], 1) if "gflops" in value else None,
                         "of CPU peak": f"{value['of_peak']:.0%}" if "of_peak" in value else "–",
                         "CPU time in kernel": f"{value.get('kernel_share', 0.0):.0%}"})
    return pd.DataFrame(rows, columns=COLUMNS)


def benchmark_md(result: dict[str, Any], device: str) -> str:
    """How the timings were taken, the speed-up ratios per batch size (with their range), and warnings."""
    from export.bench import allocator_note, headline

    line = headline(result)
    lines = [f"**{md(line)}**", ""] if line else []  # its own paragraph
    lines += [f"onnxruntime provider **{result.get('provider', '?')}** · device **{device}** · "
             f"{result.get('threads', '?')} threads · input {result.get('image_size', '?')} px · median of "
             f"{result.get('repeats', '?')} runs, engines interleaved; in brackets each ratio's range over the "
             "rounds, which shows how much other load on this machine moved it. onnxruntime runs with its default "
             "busy-waiting worker threads here, as on a dedicated server; the Predict tab lets them sleep, since "
             "this server also trains, which costs it some latency at batch 1."]
    batches = result.get("batches") or {}
    for batch_size, row in batches.items():
        ratios, ranges = row.get("ratios") or {}, row.get("ratio_ranges") or {}
        if ratios:
            text = ", ".join(f"{k.replace('_vs_', ' vs ').replace('onnx_', 'ORT ')} {v:.2f}×"
                             + (" ({:.2f}–{:.2f}×)".format(*ranges[k]) if k in ranges else "")
                             for k, v in ratios.items())
            lines.append(f"- batch {batch_size}: {text}")
    if result.get("cpu"):
        lines.append(f"- CPU: {md(result['cpu'])}; SGEMM peak {result['sgemm_gflops']:.1f} GFLOP/s measured with "
                     "onnxruntime's own matrix multiply on the same threads (INT8 can pass this float32 rate)")
    if result.get("openvino_skipped"):
        lines.append(f"- OpenVINO: {md(result['openvino_skipped'])}")
    note = allocator_note(result) if batches else None
    if note:
        lines.append(f"- ⚠️ {md(note)}")
    for name, variant in VARIANTS.items():
        if variant.build is not None and not variant.needs_cuda and not any(f"onnx_{name}" in row
                                                                            for row in batches.values()):
            lines.append(f"- no {variant.label} model: the variant was not built or lost too much accuracy (see the "
                         "Export tab).")
    return "\n".join(lines)


def throughput_figure(table: pd.DataFrame) -> Figure:
    """Images per second of every engine, grouped by batch size."""
    engines = list(dict.fromkeys(table["engine"]))
    batches = sorted(set(table["batch size"]))
    series = {}
    for engine in engines:
        sub = table[table["engine"] == engine].set_index("batch size")
        series[engine] = [float(sub["images/s"].get(b, 0.0)) for b in batches]
    return plots.grouped_bars([f"batch {b}" for b in batches], series, title="Throughput on this server",
                              ylabel="images per second (higher is better)", figsize=(7, 3.4), colors=ENGINE_COLORS,
                              value_labels="%.0f", grid=True)
