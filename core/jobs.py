"""A training run (``run_compare`` + ``write_run``) in a worker thread, seen as a stream of events.

A front end iterates ``TrainingJob.events()`` and turns each event into its own updates:

- ``Progress``: where the run is, as one overall fraction (the stages weighted by ``STAGES``), at most about
  once per ``progress_interval`` seconds;
- ``Epoch``: one arm finished an epoch (``record`` as ``core.train`` logs it, ``history`` every epoch so far);
- then exactly one of ``Finished`` (result and written files), ``Failed`` (the exception) or ``Cancelled``;
- after a ``Finished`` whose ``variants_pending`` is true, one ``VariantsReady``: the run was written and offered
  with its verified FP32 model first, and its smaller variants were built and checked after it
  (``core.report.add_run_variants``).

Cancel with ``job.cancel()`` (or the ``threading.Event`` passed in): the worker stops between batches. Closing the
generator early (the visitor left) cancels too. A run that fails or is cancelled leaves no run folder.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.config import TrainConfig
from core.data import Dataset

log = logging.getLogger(__name__)

# (scratch arm?, backbone blocks fine-tuned?) -> stage -> (start, end) on the overall progress bar. Measured on
# CPU: frozen features are cheap next to a scratch arm; fine-tuning blocks costs about as much as scratch.
STAGES: dict[tuple[bool, bool], dict[str, tuple[float, float]]] = {
    (True, False): {"decode": (0.0, 0.1), "features": (0.1, 0.3), "pretrained": (0.3, 0.4), "scratch": (0.4, 0.9),
                    "done": (0.9, 0.9), "export": (0.9, 1.0)},
    (False, False): {"decode": (0.0, 0.2), "features": (0.2, 0.6), "pretrained": (0.6, 0.8), "done": (0.8, 0.8),
                     "export": (0.8, 1.0)},
    (True, True): {"decode": (0.0, 0.05), "pretrained": (0.05, 0.45), "scratch": (0.45, 0.9), "done": (0.9, 0.9),
                   "export": (0.9, 1.0)},
    (False, True): {"decode": (0.0, 0.1), "pretrained": (0.1, 0.85), "done": (0.85, 0.85), "export": (0.85, 1.0)},
}


# A resumed scratch arm (``TrainingJob(resume=...)``): its more time is the whole bar; the export is kept.
RESUMED = {"scratch": (0.0, 0.95), "done": (0.95, 0.95), "export": (0.95, 1.0)}


@dataclass(frozen=True)
class Progress:
    overall: float  # 0..1 over the whole job
    stage: str
    message: str
    elapsed: float  # seconds since the job started
    left: float | None = None  # estimated seconds left in this stage (None: too early to tell)
    stage_done: float | None = None  # 0..1 of this stage: its own fraction, or of its time budget if further


STAGE_WORDS = {"decode": "Reading the images", "features": "Pretrained arm: computing features",
               "pretrained": "Pretrained arm: training", "scratch": "Scratch arm: training",
               "done": "Training finished", "export": "Exporting and checking the model"}


def stage_time_left(fraction: float, stage_elapsed: float, budget_left: float | None = None) -> float | None:
    """Seconds left in a stage at its current pace (None until 5% and three seconds in: earlier paces jump), never
    more than what is left of the arm's time budget."""
    pace = stage_elapsed * (1 - fraction) / fraction if fraction >= 0.05 and stage_elapsed >= 3 else None
    if budget_left is None:
        return pace
    return max(0.0, budget_left if pace is None else min(pace, budget_left))


def status_line(event: Progress, width: int = 20) -> str:
    """The status while a job runs, the page's only progress display: the stage in words and, once known, the time
    left in it; below, one bar for this stage with its percentage, and the time since the button was pressed (the
    stage's counts stay in the per-epoch log)."""
    share = event.overall if event.stage_done is None else event.stage_done
    left = ("" if event.left is None or share >= 0.995 else " · finishing the current batch" if event.left < 1
            else f" · about {event.left:.0f} s left in this step")  # a step at 100% waits for the next one: no time
    filled = min(width, max(0, round(share * width)))
    bar = "▰" * filled + "▱" * (width - filled)
    return (f"⏳ **{STAGE_WORDS.get(event.stage, event.stage)}**{left}\n\n"
            f"`{bar}` {share:.0%} of this step · {event.elapsed:.0f} s since you pressed the button")


@dataclass(frozen=True)
class Epoch:
    arm: str
    record: dict
    history: dict[str, list[dict]]  # arm -> every epoch record so far (this one included)


@dataclass(frozen=True)
class Finished:
    result: Any  # core.train.CompareResult
    run_dir: Path
    elapsed: float
    variants_pending: bool = False  # a VariantsReady follows


@dataclass(frozen=True)
class VariantsReady:
    export: dict  # the run's export section with its variants (empty if building them failed)
    error: str | None = None  # why they could not be built, in words


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass(frozen=True)
class Cancelled:
    pass


Event = Progress | Epoch | Finished | VariantsReady | Failed | Cancelled


def overall_fraction(stage: str, fraction: float, *, scratch: bool = True, unfreeze: bool = False,
                     stages: dict[str, tuple[float, float]] | None = None) -> float:
    """A stage's own fraction as a fraction of the whole job (unknown stages span the whole bar); ``stages``
    replaces the table ``STAGES`` picks by ``scratch`` and ``unfreeze``."""
    lo, hi = (stages or STAGES[bool(scratch), bool(unfreeze)]).get(stage, (0.0, 1.0))
    return lo + (hi - lo) * fraction


def live_runs(history: dict[str, list[dict]], target: float) -> dict[str, dict]:
    """``{arm: {"history", "time_to_target_seconds"}}`` for ``core.plots.learning_curves`` while training runs."""
    from core.train import time_to_target

    return {arm: {"history": h, "time_to_target_seconds": time_to_target(h, target)}
            for arm, h in history.items() if h}


def epoch_line(arm: str, record: dict, epochs: int) -> str:
    """One line of the per-epoch log."""
    return (f"{arm:10s} epoch {record['epoch']:>3}/{epochs}  {record['seconds']:7.1f}s  "
            f"train acc {record['train_accuracy']:6.1%}  val acc {record['val_accuracy']:6.1%}  "
            f"val loss {record['val_loss']:.3f}")


@dataclass
class TrainingJob:
    """Train and compare on ``dataset`` with ``cfg``, then write the run (with its ONNX export) into ``run_dir``.

    With ``resume`` (a ``CompareResult`` written into ``run_dir``), give its scratch arm ``more_seconds`` instead
    (``core.train.continue_arm``) and rewrite the run, keeping its export (the pretrained arm did not change). A
    resumed job that fails or is cancelled leaves the run as it was."""

    dataset: Dataset
    cfg: TrainConfig
    run_dir: Path
    cancel_event: threading.Event = field(default_factory=threading.Event)
    progress_interval: float = 1.0
    resume: Any = None  # core.train.CompareResult
    more_seconds: float = 0.0
    _queue: queue.Queue = field(default_factory=queue.Queue, init=False, repr=False)

    def cancel(self) -> None:
        self.cancel_event.set()

    def _work(self) -> None:
        from core.report import add_run_variants, write_run
        from core.train import Callbacks, TrainingCancelled, continue_arm, run_compare

        put = self._queue.put
        callbacks = Callbacks(progress=lambda stage, frac, msg: put(("progress", stage, frac, msg)),
                              epoch=lambda arm, rec: put(("epoch", arm, dict(rec))), cancel=self.cancel_event)
        on_step = lambda fraction, words: put(("progress", "export", fraction, words))  # noqa: E731
        try:
            if self.resume is None:
                result = run_compare(self.dataset, self.cfg, callbacks)
                write_run(result, self.run_dir, export=True, on_step=on_step, explain=True, defer_variants=True)
            else:
                result = continue_arm(self.resume, self.more_seconds, callbacks)
                write_run(result, self.run_dir, export=True, on_step=on_step, keep_export_of=self.resume.report,
                          explain=True)
            pending = "variants_pending" in (result.report.get("export") or {})
            put(("finished", result, pending))  # said here: building the variants changes the report meanwhile
        except TrainingCancelled:
            if self.resume is None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            put(("cancelled",))
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer as Failed
            if self.resume is None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            put(("failed", exc))
            return
        if pending:
            try:  # the model is offered already: a variant that cannot be built is reported, never a failed run
                put(("variants", add_run_variants(result, self.run_dir), None))
            except Exception as exc:  # noqa: BLE001 - shown as words beside the FP32 model
                log.warning("building the variants failed", exc_info=True)
                words = f"{type(exc).__name__}: {exc}"
                section = {k: v for k, v in result.report["export"].items() if k != "variants_pending"}
                result.report["export"] = {**section, "variants_error": words}  # what the page shows from now on
                put(("variants", {}, words))

    def history(self) -> dict[str, list[dict]]:
        """Every epoch record so far by arm: the resumed run's, or none."""
        runs = self.resume.report["runs"] if self.resume is not None else {}
        return {arm: [dict(h) for h in run["history"]] for arm, run in runs.items()}

    def events(self) -> Iterator[Event]:
        """Start the worker and yield its events until it ends (see the module docstring)."""
        scratch, unfreeze = bool(self.cfg.train_scratch), bool(self.cfg.unfreeze_blocks)
        history = self.history()
        worker = threading.Thread(target=self._work, name=f"train-{self.run_dir.name}", daemon=True)
        start = time.perf_counter()
        pending: Progress | None = None  # progress is coalesced: the latest one, at most once per interval
        last = 0.0
        began: dict[str, tuple[float, float]] = {}  # when each stage first reported, and its fraction then
        budget = self.more_seconds if self.resume is not None else self.cfg.budget_seconds
        current: tuple | None = None  # the latest (stage, fraction, message) the worker reported

        def progress_at(now: float, stage: str, frac: float, msg: str) -> Progress:
            stage_start, frac0 = began[stage]
            # an arm's budget clock starts with its first stage (the pretrained arm's with its features)
            arm_start = began.get("features", began[stage])[0] if stage == "pretrained" else stage_start
            budget_left = (budget - (now - arm_start)
                           if budget and stage in ("features", "pretrained", "scratch") else None)
            done = (frac - frac0) / (1 - frac0) if frac0 < 1 else 1.0  # a resumed arm starts partway
            overall = (overall_fraction(stage, done, stages=RESUMED) if self.resume is not None
                       else overall_fraction(stage, frac, scratch=scratch, unfreeze=unfreeze))
            # a budget usually stops scratch long before its epochs: the bar moves with the clock then
            spent = 1 - budget_left / budget if budget_left is not None else 0.0
            return Progress(overall, stage, msg or stage, now - start,
                            stage_time_left(done, now - stage_start, budget_left), min(1.0, max(done, spent)))

        worker.start()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.25)
                except queue.Empty:
                    item = None
                now = time.perf_counter()
                kind = item[0] if item else None
                if kind == "progress":
                    current = item[1:]
                    began.setdefault(current[0], (now, current[1]))
                    pending = progress_at(now, *current)
                elif kind is None and current is not None and now - last >= max(self.progress_interval, 1.0):
                    pending = progress_at(now, *current)  # a slow batch: the clock and the budget still move
                elif kind == "epoch":
                    _, arm, record = item
                    history.setdefault(arm, []).append(record)
                    if pending is not None:
                        yield pending
                        pending = None
                    yield Epoch(arm, record, {a: list(h) for a, h in history.items()})
                    last = now
                elif kind == "finished":
                    pending, current = None, None  # progress from before the results is out of date now
                    yield Finished(item[1], self.run_dir, now - start, item[2])
                    if not item[2]:
                        return
                elif kind == "variants":
                    yield VariantsReady(item[1], item[2])
                    return
                elif kind == "failed":
                    yield Failed(item[1])
                    return
                elif kind == "cancelled":
                    yield Cancelled()
                    return
                if pending is not None and now - last >= self.progress_interval:
                    yield pending
                    pending, last = None, now
        finally:
            if worker.is_alive():  # the consumer stopped early (visitor left): stop the worker
                self.cancel_event.set()


class KeptRuns:
    """Each session's latest finished run, kept in memory so its scratch arm can be given more time
    (``TrainingJob(resume=...)``): at most ``capacity`` runs and ``max_bytes`` (``footprint``) in all, the least
    recently used dropped first. A kept run holds its decoded images, both models and the scratch arm's optimizer,
    so only runs that can go on are kept."""

    def __init__(self, capacity: int = 2, max_bytes: int = 2 * 1024**3):
        self.capacity, self.max_bytes = capacity, max_bytes
        self._runs: OrderedDict[str, tuple[str, Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def footprint(result: Any) -> int:
        """Bytes a kept run holds, roughly: its decoded images and crops, its models, and the scratch optimizer's
        two moments per weight."""
        def held(images: Any) -> int:  # a memory-mapped file, or core.decoded's images (nbytes 0): on disk
            return 0 if isinstance(images, np.memmap) else int(images.nbytes)

        images = sum(held(a) for part in (result.train, result.val, result.test) if part is not None
                     for a in (part.resized, part.crops))
        weights = sum(p.numel() * p.element_size() for run in result.runs.values() for p in run.model.parameters())
        trainer = result.runs["scratch"].trainer
        moments = 3 * sum(p.numel() * p.element_size() for p in trainer.model.parameters()) if trainer else 0
        return int(images + weights + moments)

    @staticmethod
    def why_not(result: Any) -> str | None:
        """Why ``result``'s scratch arm cannot be given more time, in plain words; None when it can."""
        run = result.runs.get("scratch")
        if run is None or run.trainer is None:
            return "it trained no scratch arm"
        if result.cfg is None or result.cfg.repeats > 1:
            return "it ran repeats"
        if not run.trainer.can_continue:
            return f"its scratch arm finished all its {result.cfg.epochs} epochs (raise the epochs to train it longer)"
        return None

    def keep(self, key: str, run_dir: Path | str, result: Any) -> bool:
        """Keep ``result`` (written into ``run_dir``) for ``key`` when its scratch arm can go on; returns whether it
        was kept. An earlier run of the same key is dropped either way."""
        with self._lock:
            self._runs.pop(key, None)
            if self.capacity < 1 or self.why_not(result) is not None:
                return False
            size = self.footprint(result)
            if size > self.max_bytes:
                return False
            self._runs[key] = (str(run_dir), result, size)
            while len(self._runs) > self.capacity or sum(r[2] for r in self._runs.values()) > self.max_bytes:
                self._runs.popitem(last=False)
            return True

    def get(self, key: str, run_dir: Path | str | None) -> Any:
        """The run kept for ``key`` if it is the one in ``run_dir`` (else None: dropped, or another run since)."""
        with self._lock:
            kept = self._runs.get(key)
            if kept is None or kept[0] != str(run_dir):
                return None
            self._runs.move_to_end(key)
            return kept[1]

    def drop(self, key: str | None) -> None:
        with self._lock:
            self._runs.pop(key, None)
