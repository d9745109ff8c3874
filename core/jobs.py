"""A training run (``run_compare`` + ``write_run``) in a worker thread, seen as a stream of events.

A front end iterates ``TrainingJob.events()`` and turns each event into its own updates:

- ``Progress``: where the run is, as one overall fraction (the stages weighted by ``STAGES``), at most about
  once per ``progress_interval`` seconds;
- ``Epoch``: one arm finished an epoch (``record`` as ``core.train`` logs it, ``history`` every epoch so far);
- then exactly one of ``Finished`` (result and written files), ``Failed`` (the exception) or ``Cancelled``.

Cancel with ``job.cancel()`` (or the ``threading.Event`` passed in): the worker stops between batches. Closing the
generator early (the visitor left) cancels too. A run that fails or is cancelled leaves no run folder.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import TrainConfig
from core.data import Dataset

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


@dataclass(frozen=True)
class Progress:
    overall: float  # 0..1 over the whole job
    stage: str
    message: str
    elapsed: float  # seconds since the job started
    left: float | None = None  # estimated seconds left in this stage (None: too early to tell)


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


def status_line(event: Progress) -> str:
    """The status above the bar: the stage in words, time so far and, once known, time left in this stage (the
    counts stay in the bar's own text, so the page shows one counter)."""
    left = f", about {event.left:.0f} s left in this step" if event.left is not None else ""
    return f"⏳ {STAGE_WORDS.get(event.stage, event.stage)} ({event.elapsed:.0f} s since you pressed Train{left})."


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


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass(frozen=True)
class Cancelled:
    pass


Event = Progress | Epoch | Finished | Failed | Cancelled


def overall_fraction(stage: str, fraction: float, *, scratch: bool, unfreeze: bool) -> float:
    """A stage's own fraction as a fraction of the whole job (unknown stages span the whole bar)."""
    lo, hi = STAGES[bool(scratch), bool(unfreeze)].get(stage, (0.0, 1.0))
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
    """Train and compare on ``dataset`` with ``cfg``, then write the run (with its ONNX export) into ``run_dir``."""

    dataset: Dataset
    cfg: TrainConfig
    run_dir: Path
    cancel_event: threading.Event = field(default_factory=threading.Event)
    progress_interval: float = 1.0
    _queue: queue.Queue = field(default_factory=queue.Queue, init=False, repr=False)

    def cancel(self) -> None:
        self.cancel_event.set()

    def _work(self) -> None:
        from core.report import write_run
        from core.train import Callbacks, TrainingCancelled, run_compare

        put = self._queue.put
        callbacks = Callbacks(progress=lambda stage, frac, msg: put(("progress", stage, frac, msg)),
                              epoch=lambda arm, rec: put(("epoch", arm, dict(rec))), cancel=self.cancel_event)
        try:
            result = run_compare(self.dataset, self.cfg, callbacks)
            write_run(result, self.run_dir, export=True,
                      on_step=lambda fraction, words: put(("progress", "export", fraction, words)))
            put(("finished", result))
        except TrainingCancelled:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            put(("cancelled",))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer as Failed
            shutil.rmtree(self.run_dir, ignore_errors=True)
            put(("failed", exc))

    def events(self) -> Iterator[Event]:
        """Start the worker and yield its events until it ends (see the module docstring)."""
        scratch, unfreeze = bool(self.cfg.train_scratch), bool(self.cfg.unfreeze_blocks)
        history: dict[str, list[dict]] = {}
        worker = threading.Thread(target=self._work, name=f"train-{self.run_dir.name}", daemon=True)
        start = time.perf_counter()
        pending: Progress | None = None  # progress is coalesced: the latest one, at most once per interval
        last = 0.0
        began: dict[str, float] = {}  # when each stage first reported
        budget = self.cfg.budget_seconds
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
                    _, stage, frac, msg = item
                    began.setdefault(stage, now)
                    # an arm's budget clock starts with its first stage (the pretrained arm's with its features)
                    arm_start = began.get("features", began[stage]) if stage == "pretrained" else began[stage]
                    budget_left = (budget - (now - arm_start)
                                   if budget and stage in ("features", "pretrained", "scratch") else None)
                    pending = Progress(overall_fraction(stage, frac, scratch=scratch, unfreeze=unfreeze), stage,
                                       msg or stage, now - start,
                                       stage_time_left(frac, now - began[stage], budget_left))
                elif kind == "epoch":
                    _, arm, record = item
                    history.setdefault(arm, []).append(record)
                    if pending is not None:
                        yield pending
                        pending = None
                    yield Epoch(arm, record, {a: list(h) for a, h in history.items()})
                    last = now
                elif kind == "finished":
                    yield Finished(item[1], self.run_dir, now - start)
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
