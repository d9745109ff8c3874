"""A training job as a stream of events: export steps, time left, one counter in the status line."""

from __future__ import annotations

import json

import pytest

from core.config import TrainConfig
from core.data import load_dataset
from core.jobs import Cancelled, Epoch, Finished, Progress, TrainingJob, VariantsReady, stage_time_left, status_line


def test_time_left_follows_the_pace_and_never_exceeds_the_budget():
    assert stage_time_left(0.25, 10.0) == pytest.approx(30.0)  # a quarter done in 10 s: 30 s to go
    assert stage_time_left(0.01, 10.0) is None and stage_time_left(0.5, 2.0) is None  # too early to tell
    assert stage_time_left(0.25, 10.0, budget_left=12.0) == pytest.approx(12.0)  # the budget stops it sooner
    assert stage_time_left(0.01, 0.5, budget_left=40.0) == pytest.approx(40.0)  # early: the budget alone
    assert stage_time_left(0.5, 10.0, budget_left=-3.0) == 0.0


def test_status_line_names_the_stage_and_time_once():
    line = status_line(Progress(0.5, "scratch", "scratch epoch 3/10, batch 2/5", 42.4, 17.6, 0.7), width=10)
    assert line == ("⏳ **Scratch arm: training** · about 18 s left in this step\n\n"
                    "`▰▰▰▰▰▰▰▱▱▱` 70% of this step · 42 s since you pressed the button")
    assert "3/10" not in line  # one counter: the epoch and batch counts stay in the per-epoch log
    early = status_line(Progress(0.04, "decode", "decoded 16/400 images", 1.0, None, 0.04), width=10)
    assert "left" not in early and "`▱▱▱▱▱▱▱▱▱▱` 4% of this step" in early


def test_a_stage_bar_follows_the_budget_when_the_budget_will_stop_the_arm_first(tmp_path, lab_cache):
    ds = load_dataset("sample:shapes?per_class=8&size=32")
    cfg = TrainConfig(image_size=32, epochs=500, device="cpu", batch_size=8, budget_seconds=3,
                      feature_engine="torch", train_scratch=True)
    events = list(TrainingJob(ds, cfg, tmp_path / "run", progress_interval=0.0).events())
    scratch = [e for e in events if isinstance(e, Progress) and e.stage == "scratch"]
    last = scratch[-1]
    assert last.overall < 0.45  # 500 epochs: the run's own fraction hardly moves...
    assert last.stage_done > 0.8  # ...while the 3 s budget, which stops it, is nearly spent


def test_the_model_is_offered_verified_before_its_variants_are_built(tmp_path, lab_cache):
    ds = load_dataset("sample:shapes?per_class=8&size=32")
    cfg = TrainConfig(image_size=32, epochs=1, device="cpu", batch_size=16, train_scratch=False, budget_seconds=30)
    job = TrainingJob(ds, cfg, tmp_path / "run", progress_interval=0.0)
    run = tmp_path / "run"
    events, at_finish = [], None
    for event in job.events():
        events.append(event)
        if isinstance(event, Finished):  # what a visitor can download when the results show
            report = json.loads((run / "report.json").read_text())
            at_finish = (event.variants_pending, report["export"], sorted(p.name for p in run.glob("model*.onnx")))
    pending, section, files = at_finish
    assert pending and section["variants_pending"] == ["int8"] and section["variants"] == []
    assert files == ["model.onnx"] and section["parity"]["passed"]
    assert section["parity"]["method"] == "composed"  # the frozen backbone's features came from its cached graph
    ready = events[-1]
    assert isinstance(ready, VariantsReady) and ready.error is None
    (int8,) = ready.export["variants"]
    report = json.loads((run / "report.json").read_text())
    assert "variants_pending" not in report["export"] and report["export"]["variants"] == [int8]
    assert (run / "model.int8.onnx").is_file() == int8["accepted"]
    assert ("model.int8.onnx" in report["artifacts"]["files"]) == int8["accepted"]
    steps = [e.message for e in events if isinstance(e, Progress) and e.stage == "export"]
    assert any("adding the trained head" in m for m in steps) and not any("variants" in m for m in steps)
    assert any(e.left is not None for e in events if isinstance(e, Progress) and e.stage == "pretrained")


def test_a_resumed_job_continues_the_curve_and_a_cancelled_one_leaves_the_run_as_it_was(tmp_path, lab_cache):
    ds = load_dataset("sample:shapes?per_class=8&size=32")
    cfg = TrainConfig(image_size=32, epochs=3, device="cpu", batch_size=8, budget_seconds=1e-3,
                      feature_engine="torch")
    initial = list(TrainingJob(ds, cfg, tmp_path / "run", progress_interval=0.0).events())
    first = next(e for e in initial if isinstance(e, Finished))  # then its variants: the run is complete
    before = first.result.report["runs"]["scratch"]["history"]

    events = list(TrainingJob(ds, cfg, tmp_path / "run", progress_interval=0.0, resume=first.result,
                              more_seconds=1e-3).events())
    done = events[-1]
    assert isinstance(done, Finished)
    bar = [e.overall for e in events if isinstance(e, Progress) and e.stage == "scratch"]
    assert bar[0] < 0.5 and bar == sorted(bar)  # the more time is the whole bar, not the tail of the first run's
    (epoch,) = [e for e in events if isinstance(e, Epoch)]  # one more batch: one more point on the same curve
    assert epoch.history["scratch"][:-1] == before and len(epoch.history["pretrained"]) >= 1
    kept = (tmp_path / "run" / "report.json").read_text()

    job = TrainingJob(ds, cfg, tmp_path / "run", progress_interval=0.0, resume=done.result, more_seconds=600)
    job.cancel()
    assert isinstance(list(job.events())[-1], Cancelled)
    assert (tmp_path / "run" / "report.json").read_text() == kept  # nothing lost, nothing half-written


def test_variants_that_cannot_be_built_leave_the_offered_model_and_say_why(tmp_path, lab_cache, monkeypatch):
    import core.report
    from core import summary

    def full_disk(result, out_dir, on_step=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(core.report, "add_run_variants", full_disk)
    ds = load_dataset("sample:shapes?per_class=8&size=32")
    cfg = TrainConfig(image_size=32, epochs=1, device="cpu", batch_size=16, train_scratch=False, budget_seconds=30)
    events = list(TrainingJob(ds, cfg, tmp_path / "run", progress_interval=0.0).events())
    finished, ready = events[-2], events[-1]
    assert isinstance(finished, Finished) and isinstance(ready, VariantsReady)
    assert ready.error is not None and "No space left" in ready.error
    section = finished.result.report["export"]
    assert "variants_pending" not in section and "No space left" in section["variants_error"]
    shown = summary.export_summary(finished.result.report, tmp_path / "run")
    assert "could not be built" in shown.markdown and shown.downloads["fp32"] is not None
    assert "being built" not in shown.markdown and "being built" not in shown.checks.to_string()


def test_a_finished_step_promises_no_time_left():
    done = status_line(Progress(0.6, "features", "pretrained features 400/400 images", 1.0, 59.0, 1.0), width=10)
    assert "left" not in done and "100% of this step" in done
    going = status_line(Progress(0.4, "features", "pretrained features 200/400 images", 1.0, 59.0, 0.5), width=10)
    assert "about 59 s left" in going
