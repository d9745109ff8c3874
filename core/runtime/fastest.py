"""Which of a model's accepted variants to serve on this machine: each is timed here, and the fastest is served.

Whether INT8 is faster than FP32 depends on the CPU (with VNNI or AMX it often runs 2x faster; on AVX2 alone it can
be slower), so nothing is assumed: ``choose_variant`` times the FP32 model and every variant file beside it that
can run on the provider in use (INT8 on the CPU only, FP16 on a GPU only) for a few seconds, in alternating rounds,
and says which it serves and why, in words ("INT8: 2.1x faster here, 0.2 points lost on the validation images").
A variant must be at least ``MIN_SPEEDUP`` faster than FP32 to be served instead of it: FP32 gives the trained
answers exactly. The answer is kept in the cache (per model files, CPU, threads and provider) so a restart does not
time again. Torch-free, like the rest of ``core.runtime``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.runtime.contract import ModelFormatError
from core.runtime.devices import CPU, GPU_PROVIDERS, VARIANT_CHOICES
from core.runtime.errors import UserError
from core.runtime.files import atomic_write, cache_dir
from core.runtime.providers import cpu_features, default_threads

log = logging.getLogger(__name__)


class VariantMissingError(UserError, ValueError):
    """A variant was asked for by name and its file is not beside the model."""


MIN_SPEEDUP = 1.10  # a variant must beat FP32 by 10% (more than run-to-run noise) to be served instead
TIME_S = 2.0  # seconds of timing in all, shared by the candidates
SERVES_ON = {"int8": (CPU,), "fp16": GPU_PROVIDERS}  # where a variant is worth serving; FP32 runs everywhere
LABELS = {"fp32": "FP32", "int8": "INT8", "fp16": "FP16"}


@dataclass(frozen=True)
class VariantChoice:
    variant: str  # "fp32", "int8", "fp16"
    path: Path
    reason: str  # one line of plain words
    speedups: dict[str, float] = field(default_factory=dict)  # variant -> FP32's time / its time, batch 1
    forced: bool = False  # asked for by name, not timed
    provider: str = CPU
    cpu: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def variant_files(fp32_path: str | os.PathLike[str]) -> dict[str, Path]:
    """The FP32 model and the accepted variants beside it (``model.int8.onnx``...), by their metadata 'variant'."""
    from core.runtime.predictor import read_model_info

    path = Path(fp32_path)
    found = {"fp32": path}
    for sibling in sorted(path.parent.glob(f"{path.stem}.*{path.suffix}")):
        try:
            variant = read_model_info(sibling).variant
        except (ModelFormatError, OSError) as exc:
            log.warning("%s is not a usable variant: %s", sibling.name, exc)
            continue
        if variant in LABELS and variant not in found:
            found[variant] = sibling
    return found


def _lost(check: dict) -> str:
    drop = check.get("accuracy_drop")
    if not isinstance(drop, int | float):
        return "its accuracy was not checked"
    points = abs(drop) * 100
    images = check.get("images")
    where = f" on {images} validation images" if isinstance(images, int) else ""
    if drop > 0:
        return f"{points:.1f} points lost{where}"
    return f"no accuracy lost{where}" if drop == 0 else f"{points:.1f} points gained{where}"


def _timed(predictors: dict[str, object], image_size: int, seconds: float) -> dict[str, float]:
    """Median batch-1 latency (s) of each predictor, in alternating rounds of 3 calls until ``seconds`` are spent."""
    batch = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for p in predictors.values():
        p.predict_arrays(batch)  # warm-up
    end = time.perf_counter() + seconds
    rounds = 0
    while rounds < 3 or (time.perf_counter() < end and rounds < 200):
        for name, p in predictors.items():
            for _ in range(3):
                start = time.perf_counter()
                p.predict_arrays(batch)
                times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}


def _cache_key(files: dict[str, Path], provider: str, threads: int) -> str:
    parts = [provider, str(threads), cpu_features().describe()]
    for name, path in sorted(files.items()):
        stat = path.stat()
        parts.append(f"{name}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def choose_variant(fp32_path: str | os.PathLike[str], *, device: str = "auto", want: str = "auto",
                   seconds: float = TIME_S, threads: int | None = None, use_cache: bool = True) -> VariantChoice:
    """The variant to serve ``fp32_path``'s model with on this machine (see the module's docstring).

    ``want``: "auto" times them; a variant's name serves that one (an error names the ones there are)."""
    from core.runtime.predictor import Predictor

    if want not in VARIANT_CHOICES:
        raise ValueError(f"variant must be one of {list(VARIANT_CHOICES)}, got {want!r}.")
    from core.runtime.predictor import read_model_info

    cpu = cpu_features()
    given = read_model_info(fp32_path).variant
    if given != "fp32":  # a variant file itself (model.int8.onnx): served as given, there is nothing to choose from
        if want not in ("auto", given):
            raise VariantMissingError(f"{Path(fp32_path).name} is the {LABELS.get(given, given)} variant, not "
                                      f"{LABELS[want]}; pass the FP32 model.onnx to choose among its variants.")
        return VariantChoice(given, Path(fp32_path), f"{LABELS.get(given, given)}: the file given", forced=True,
                             cpu=cpu.describe())
    files = variant_files(fp32_path)
    threads = threads or default_threads()
    if want != "auto":
        if want not in files:
            raise VariantMissingError(f"{Path(fp32_path).name} has no {LABELS[want]} variant beside it; there are "
                                      f"{[LABELS[v] for v in files]}. Pick one of those, or export again with "
                                      "`python -m export onnx --run RUN` (FP16 is built where a CUDA GPU is usable; "
                                      "INT8 is kept only if it passes the accuracy check).")
        return VariantChoice(want, files[want], f"{LABELS[want]}: asked for by name", forced=True, cpu=cpu.describe())
    fp32 = Predictor(files["fp32"], device=device, intra_op_threads=threads)
    provider = fp32.provider
    candidates = {v: p for v, p in files.items() if v != "fp32" and provider in SERVES_ON.get(v, ())}
    skipped = [LABELS[v] for v in files if v != "fp32" and v not in candidates]
    if not candidates:
        reason = "FP32: no faster variant was accepted for this model"
        if skipped:
            reason = f"FP32: {' and '.join(skipped)} {'is' if len(skipped) == 1 else 'are'} not served on {provider}"
        return VariantChoice("fp32", files["fp32"], reason, provider=provider, cpu=cpu.describe())
    key = _cache_key(files, provider, threads)
    cached = cache_dir() / "variant-choice" / f"{key}.json"
    if use_cache and cached.is_file():
        try:
            saved = json.loads(cached.read_text(encoding="utf-8"))
            return VariantChoice(saved["variant"], files[saved["variant"]], saved["reason"], saved["speedups"],
                                 provider=provider, cpu=cpu.describe())
        except (OSError, ValueError, KeyError, TypeError):
            pass  # timed again below
    predictors = {"fp32": fp32, **{v: Predictor(p, device=device, intra_op_threads=threads)
                                   for v, p in candidates.items()}}
    latency = _timed(predictors, fp32.image_size, seconds)
    speedups = {v: latency["fp32"] / latency[v] for v in candidates}
    best = max(speedups, key=speedups.get)
    check = predictors[best].info.check
    if speedups[best] >= MIN_SPEEDUP:
        variant = best
        reason = f"{LABELS[best]}: {speedups[best]:.1f}x faster than FP32 here, {_lost(check)}"
    else:
        variant = "fp32"
        why = "" if cpu.int8_dot or best != "int8" or not cpu.known else " (no VNNI/AMX)"
        reason = (f"FP32: {LABELS[best]} is {'slower' if speedups[best] < 1 else 'not faster'} on this "
                  f"{'CPU' if provider == CPU else 'GPU'}{why} ({speedups[best]:.2f}x FP32's speed)")
    choice = VariantChoice(variant, files[variant], reason, speedups, provider=provider, cpu=cpu.describe())
    if use_cache:
        try:
            atomic_write(cached, lambda tmp: tmp.write_text(json.dumps(choice.to_dict()), encoding="utf-8"))
        except OSError as exc:  # a read-only cache only costs the timing next time
            log.warning("could not keep the variant choice in %s: %s", cached, exc)
    return choice
