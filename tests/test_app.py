"""The Gradio app's callbacks, called directly with tiny data (no server, no browser)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import app
import models
from core import sessions
from core.summary import ARM_TITLES, results_table, speedup_text
from tests.helpers import colour_zip

TINY = "sample:shapes?per_class=8&size=32"
FAST = dict(backbone="efficientnet_lite0", epochs=1, budget=None, image_size=32, target=0.85, device="cpu",
            scratch=True, seed=0)
REPO = Path(__file__).resolve().parents[1]


class _NoProgress:
    def __call__(self, *args, **kwargs):
        return None


def run_train(state, **overrides):
    """Drive the ``train`` generator to the end; returns (final outputs by name, every update)."""
    settings = {**FAST, **overrides}
    updates = [dict(zip(app.TRAIN_OUTPUTS, u)) for u in app.train(state, **settings)]
    final = {}
    for u in updates:
        final.update({k: v for k, v in u.items() if not (isinstance(v, dict) and v == {"__type__": "update"})})
    return final, updates


def data_out(values):
    return dict(zip(app.DATA_OUTPUTS, values))


@pytest.fixture(scope="module")
def app_root(tmp_path_factory, _session_cache):
    """A private session root for this module (and the shared test cache for samples and backbone graphs)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRANSFER_LAB_CACHE", str(_session_cache))
    root = tmp_path_factory.mktemp("app-sessions")
    app.configure(root)
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def trained(app_root):
    """One session with the tiny shapes sample trained for one epoch (both arms) and exported."""
    state = app.new_session()
    loaded = data_out(app.load_sample(TINY, state))
    final, updates = run_train(loaded["state"])
    return {"state": final["state"], "final": final, "updates": updates, "loaded": loaded}


# ------------------------------------------------------------------------------------------------ building


def test_import_makes_no_network_calls_and_build_does_not_launch(tmp_path):
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError(f'network call during import/build: {a[1:] or k}')\n"
        "socket.socket.connect = refuse\n"
        "socket.socket.connect_ex = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "import app, gradio as gr\n"
        f"demo = app.build_app({str(tmp_path)!r})\n"
        "assert isinstance(demo, gr.Blocks)\n"
        "assert not demo.is_running and getattr(demo, 'local_url', None) is None\n"
        "print('built', len(demo.fns))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built" in proc.stdout


def test_build_app_wires_named_events_with_concurrency_limits(app_root):
    demo = app.build_app(app_root, concurrency=1)
    assert isinstance(demo, gr.Blocks) and not demo.is_running
    fns = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    public = {name for name, fn in fns.items() if fn.api_visibility == "public"}
    # The app's API as clients call it: these names, each on its own handler (none renamed to name_1 by a clash).
    assert public == {"load_sample", "load_zip", "train", "cancel", "threshold", "predict", "upload_model",
                      "benchmark", "new_session", "efficiency", "more_time", "drop_copies"}
    assert fns["load_sample"].fn is app.load_sample and fns["load_zip"].fn is app.load_zip
    assert fns["train"].concurrency_limit == 1 and fns["train"].concurrency_id == "train"
    assert {fns[name].concurrency_id for name in ("benchmark", "efficiency", "more_time")} == {"train"}
    assert fns["predict"].concurrency_limit > 1
    assert isinstance(app.demo, gr.Blocks)  # built lazily on first access (what `gradio app.py` looks for)


def test_help_documents_the_launch_options(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--host", "--port", "--share", "--max-file-size", "--concurrency"):
        assert option in text
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.max_file_size, args.concurrency) == (
        "127.0.0.1", 7860, False, "200mb", 1)
    monkeypatch.setenv("SPACE_ID", "someone/transfer-lab")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app.parse_args([])
    assert args.host == "0.0.0.0" and args.port == 7999


# ------------------------------------------------------------------------------------------------ data


def test_load_sample_shows_counts_gallery_and_warnings(trained):
    out = trained["loaded"]
    assert "3 classes" in out["summary"] and "circle" in out["summary"]
    assert out["counts_plot"] is not None
    captions = [caption for _, caption in out["gallery"]]
    assert {c.split()[0] for c in captions} == {"circle", "square", "triangle"}
    assert "Classes are reasonably balanced" in out["warnings"]
    assert out["skipped"].empty


@pytest.mark.parametrize(("preset", "expected"), [
    ("shapes (imbalanced 10:1)", "Classes are imbalanced"),
    ("shapes (with train/val duplicates)", "10 pair(s) join a training image to a copy among the validation/test"),
])
def test_presets_show_the_pitfall_warnings(app_root, preset, expected):
    out = data_out(app.load_sample(preset, app.new_session()))
    assert "⚠️" in out["warnings"] and expected in _unescaped(out["warnings"])


def _unescaped(markdown: str) -> str:
    return markdown.replace("\\", "")


def test_near_duplicates_are_shown_in_pairs_and_dropped_from_training_on_request(app_root):
    out = data_out(app.load_sample("shapes (with train/val duplicates)", app.new_session()))
    assert out["dup_box"]["visible"] and out["drop_btn"]["visible"] and "10 training copies" in out["drop_btn"]["value"]
    image, caption = out["dup_gallery"][0]
    assert image.width > 2 * image.height and re.fullmatch(r"leakage: \S+\.png ↔ \S+\.png", caption)
    before = out["state"]["dataset"].counts()["train"]

    dropped = data_out(app.drop_copies(out["state"]))
    ds = dropped["state"]["dataset"]
    assert sum(ds.counts()["train"].values()) == sum(before.values()) - 10 and len(ds.dropped) == 10
    assert ds.counts()["val"] == out["state"]["dataset"].counts()["val"]  # what is scored stays the same
    assert "No near-duplicate images found" in _unescaped(dropped["warnings"]) and not dropped["dup_box"]["visible"]
    assert "(10 copies dropped)" in dropped["active"]
    with pytest.raises(gr.Error, match="no copies to drop"):
        app.drop_copies(dropped["state"])


def test_after_training_the_data_tab_shows_the_pairs_found_with_the_features(app_root, tmp_path):
    from core.config import TrainConfig
    from core.train import run_compare

    out = data_out(app.load_sample("shapes (with train/val duplicates)", app.new_session()))
    state = out["state"]
    assert not state["duplicates"]["used_features"]  # at load: the hashes alone
    result = run_compare(state["dataset"], TrainConfig(image_size=32, epochs=1, train_scratch=False, device="cpu"))
    views = app.results_views(result.report, result, tmp_path, state)
    assert state["duplicates"] is result.duplicates and result.duplicates["used_features"]
    assert views["dup_box"]["visible"] and "10 training copies" in views["drop_btn"]["value"]
    assert len(views["dup_gallery"]) == min(12, sum(result.duplicates["counts"].values()))
    assert "The pairs are shown in the Data tab" in views["diagnostics"]
    out = data_out(app.load_sample("shapes (balanced)", state))  # another dataset since: its own pairs stay
    app.results_views(result.report, result, tmp_path, state)
    assert state["duplicates"] is not result.duplicates


def test_the_clean_built_in_samples_show_no_near_duplicates(app_root):
    for preset in ("shapes (balanced)", "shapes (imbalanced 10:1)", "digits"):
        out = data_out(app.load_sample(preset, app.new_session()))
        assert "No near-duplicate images found" in _unescaped(out["warnings"]), preset


@pytest.mark.parametrize("choice", ["/etc/passwd", "../../secret", "sample:shapes?per_class=100000",
                                    "sample:nosuch", "sample:shapes?size=9999"])
def test_only_presets_and_bounded_sample_specs_are_accepted(app_root, choice):
    with pytest.raises(gr.Error) as err:
        app.load_sample(choice, app.new_session())
    assert err.value.title == "Unknown sample" and "sample" in err.value.message


def _zip_error(tmp_path: Path, make) -> str:
    path = tmp_path / "upload.zip"
    make(path)
    with pytest.raises(gr.Error) as err:
        app.load_zip(str(path), app.new_session())
    message = err.value.message
    assert str(app.SESSIONS.root) not in message  # no server folders shown to visitors
    return message


def test_bad_uploads_raise_clear_errors(app_root, tmp_path):
    msg = _zip_error(tmp_path, lambda p: p.write_bytes(b"this is not a zip at all"))
    assert "not a .zip" in msg and "class" in msg

    def one_class(p):
        with zipfile.ZipFile(p, "w") as zf:
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, format="PNG")
            for i in range(3):
                zf.writestr(f"cats/{i}.png", buf.getvalue())
    msg = _zip_error(tmp_path, one_class)
    assert "at least two class folders" in msg

    def traversal(p):
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr("../evil/x.png", b"x")
    msg = _zip_error(tmp_path, traversal)
    assert "refused" in msg and ".." in msg

    def corrupt(p):
        data = bytearray(colour_zip(tmp_path / "good.zip", folder="colours", with_non_image=True).read_bytes())
        p.write_bytes(bytes(data[: len(data) // 2]))
    msg = _zip_error(tmp_path, corrupt)
    assert "zip" in msg.lower()


def test_a_broken_upload_keeps_the_dataset_loaded_before_it(app_root, tmp_path):
    state = data_out(app.load_zip(str(colour_zip(tmp_path / "first.zip")), app.new_session()))["state"]
    first = state["dataset"]
    broken = tmp_path / "broken.zip"
    broken.write_bytes(colour_zip(tmp_path / "whole.zip", seed=1).read_bytes()[:300])
    with pytest.raises(gr.Error):
        app.load_zip(str(broken), state)
    assert state["dataset"] is first and all(item.path.is_file() for item in first.items)
    uploads = app.SESSIONS.folder(state) / "data"
    assert len(list(uploads.iterdir())) == 1  # the broken upload's folder is gone
    second = data_out(app.load_zip(str(colour_zip(tmp_path / "second.zip", seed=2)), state))["state"]["dataset"]
    assert second is not first and all(item.path.is_file() for item in second.items)
    assert not any(item.path.exists() for item in first.items)  # the replaced upload was deleted
    assert len(list(uploads.iterdir())) == 1


# ------------------------------------------------------------------------------------------------ training


def test_training_streams_progress_and_fills_every_result(trained):
    final, updates = trained["final"], trained["updates"]
    assert len(updates) >= 3  # started, per-epoch updates, results
    assert any("pretrained epoch" in (u["log"] if isinstance(u["log"], str) else "") for u in updates)
    assert final["status"].startswith("✅")
    table = final["results"]
    assert list(table.columns) == ["metric", ARM_TITLES["pretrained"], ARM_TITLES["scratch"]]
    metrics = list(table["metric"])
    for row in ("validation accuracy", "balanced accuracy", "precision (macro)", "recall (macro)", "F1 (macro)",
                "training time", "time to 85%", "speed-up to target", "verdict"):
        assert row in metrics
    assert final["speedup"]
    assert "pretrained" in final["verdicts"] and "from scratch" in final["verdicts"]
    assert "Class imbalance" in final["diagnostics"]
    assert re.search(r"(Overfitting|Not learned yet) \(scratch\)", final["diagnostics"])
    assert set(final["per_class"]["class"]) == {"circle", "square", "triangle"}
    mistakes = final["mistakes"]
    assert mistakes, "one epoch on 18 images leaves misclassified validation images"
    image, caption = mistakes[0]
    assert image.shape == (32, 32, 3) and "→" in caption
    assert final["dl_onnx"]["visible"] and Path(final["dl_onnx"]["value"]).name == "model.onnx"
    assert final["dl_report"]["visible"]
    assert final["model_choice"]["value"] == "run:auto"  # the variant timed fastest here
    assert final["train_btn"]["interactive"] and not final["cancel_btn"]["interactive"]
    # every file offered for download lives inside this session's folder
    folder = app.SESSIONS.folder(final["state"])
    offered = [final[key]["value"] for key in ("dl_onnx", "dl_int8", "dl_fp16", "dl_triton", "dl_report")
               if final[key].get("visible")]
    assert len(offered) >= 3  # model.onnx, the Triton zip and report.json at least
    assert all(Path(value).resolve().is_relative_to(folder.resolve()) for value in offered)


def test_train_without_data_or_with_bad_settings_is_a_clear_error(app_root, trained):
    with pytest.raises(gr.Error, match="Load a dataset first"):
        next(app.train(app.new_session(), **FAST))
    with pytest.raises(gr.Error, match="epochs must be .*1.*got 0"):
        next(app.train(trained["state"], **{**FAST, "epochs": 0}))
    with pytest.raises(gr.Error, match="Unknown backbone"):
        next(app.train(trained["state"], **{**FAST, "backbone": "resnet9000"}))
    with pytest.raises(gr.Error, match="unfreeze_blocks must be between 0 .* and 18"):
        next(app.train(trained["state"], **{**FAST, "unfreeze": 19}))


def test_fine_tuning_the_last_blocks_from_the_app(app_root):
    assert app.unfreeze_range("resnet18")["maximum"] == 9 == models.block_count("resnet18")
    state = data_out(app.load_sample(TINY, app.new_session()))["state"]
    final, _ = run_train(state, scratch=False, unfreeze=2)
    assert final["status"].startswith("✅")
    layers = final["results"].set_index("metric").loc["layers trained"].iloc[0]
    assert layers == "head + last 2 of 18 backbone blocks"
    assert Path(final["dl_onnx"]["value"]).is_file()


def test_repeats_from_the_advanced_panel_show_mean_and_spread(app_root):
    state = data_out(app.load_sample(TINY, app.new_session()))["state"]
    final, _ = run_train(state, scratch=False, repeats=2)
    assert final["status"].startswith("✅")
    rows = final["results"].set_index("metric")
    assert "validation accuracy over 2 repeats" in rows.index and "met the 85% target" in rows.index
    assert rows.loc["met the 85% target"].iloc[0] in ("0 of 2", "1 of 2", "2 of 2")


def test_the_data_efficiency_curve_from_the_train_tab(app_root):
    state = data_out(app.load_sample(TINY, app.new_session()))["state"]
    state, *_ = app.arm_training(state)
    started, *_, last = app.data_efficiency(state, **{**FAST, "scratch": False}, progress=_NoProgress())
    assert dict(zip(app.EFFICIENCY_OUTPUTS, started))["status"].startswith("⏳ Drawing the curve")
    out = dict(zip(app.EFFICIENCY_OUTPUTS, last))
    assert out["status"].startswith("✅") and out["eff_plot"] is not None
    table = out["eff_table"]
    assert list(table.columns) == ["per class", "training images", "pretrained"]
    assert table["per class"].iloc[0] == "1" and table["per class"].iloc[-1] == "all"
    assert "validation images" in out["eff_md"]


def test_predict_offers_validation_examples_that_classify_on_click(trained):
    examples = trained["loaded"]["examples"]
    assert 3 <= len(examples) <= 8
    captions = [caption for _, caption in examples]
    assert {c.removeprefix("true: ") for c in captions} == {"circle", "square", "triangle"}  # classes in turn
    state = trained["state"]
    event = SimpleNamespace(index=1)
    label, info, table, looked, shown = app.predict_example(state, "run:fp32", event)
    assert set(label) <= {"circle", "square", "triangle"} and len(table) == 1
    size = _run_report(trained)["image_size"]
    assert looked.shape == (size, size, 3) and "pushed it most towards" in info  # where it looked
    clicked = Image.open(state["examples"][1])  # the clicked image fills the input box, re-encoded
    assert isinstance(shown, Image.Image) and shown.size == clicked.size and shown is not clicked
    assert info.startswith(f"True class: **{captions[1].removeprefix('true: ')}**")
    with pytest.raises(gr.Error, match="example is gone"):
        app.predict_example(state, "run:fp32", SimpleNamespace(index=99))


def test_more_time_goes_on_with_the_scratch_arm_and_keeps_the_export(app_root):
    state = data_out(app.load_sample(TINY, app.new_session()))["state"]
    final, _ = run_train(state, epochs=3, budget=0.001)  # one batch is an epoch here: it stops after it
    assert final["more_box"]["visible"] and "stopped after 1 of 3 epochs" in final["more_md"]
    run_dir = Path(final["state"]["run_dir"])
    before = json.loads((run_dir / "report.json").read_text())
    model = (run_dir / "model.onnx").stat()

    state, *_ = app.arm_training(final["state"])
    updates = [dict(zip(app.TRAIN_OUTPUTS, u)) for u in app.more_time(state)]
    after = json.loads((run_dir / "report.json").read_text())
    scratch = after["runs"]["scratch"]
    assert scratch["epochs_done"] > before["runs"]["scratch"]["epochs_done"]
    assert len(scratch["history"]) == len(before["runs"]["scratch"]["history"]) + 1  # the curve goes on
    assert after["runs"]["pretrained"]["history"] == before["runs"]["pretrained"]["history"]
    assert after["export"] == before["export"] and (run_dir / "model.onnx").stat().st_ino == model.st_ino
    last = updates[-1]
    assert last["status"].startswith("✅") and "you gave it 0.001 s more" in last["speedup"]

    app.KEPT.drop(state["sid"])  # the server let the run go (memory): a clear refusal, the results stay
    state, *_ = app.arm_training(state)
    with pytest.raises(gr.Error, match="can no longer go on: the server keeps only the latest few runs"):
        next(app.more_time(state))
    assert json.loads((run_dir / "report.json").read_text()) == after


def test_more_time_says_why_a_run_cannot_go_on_and_a_cancelled_one_stops_there(app_root, trained):
    with pytest.raises(gr.Error, match="Train first"):
        next(app.more_time(app.new_session()))
    with pytest.raises(gr.Error, match="finished all its 1 epochs"):  # budget None: it trained every epoch
        next(app.more_time(trained["state"]))

    state = data_out(app.load_sample(TINY, app.new_session()))["state"]
    final, _ = run_train(state, epochs=50, budget=0.001)
    state, *_ = app.arm_training(final["state"])
    app.cancel_training(state)  # cancelled while waiting: nothing trained, the run can still go on
    assert "Cancelled before" in dict(zip(app.TRAIN_OUTPUTS, next(app.more_time(state))))["status"]
    state, *_ = app.arm_training(state)
    run = app.more_time(state)
    next(run)
    app.cancel_training(state)  # cancelled partway: its scratch arm moved past the results shown
    last = [dict(zip(app.TRAIN_OUTPUTS, u)) for u in run][-1]
    assert "results below are as they were" in last["status"] and not last["more_box"]["visible"]
    state, *_ = app.arm_training(state)
    with pytest.raises(gr.Error, match="its more time was cancelled partway"):
        next(app.more_time(state))


def test_kept_runs_are_bounded_and_only_runs_that_can_go_on_are_kept(tmp_path):
    from core.decoded import DecodedImages
    from core.jobs import KeptRuns

    def result(can_go_on=True, repeats=1, images=1000):
        weights = torch.nn.Linear(10, 1)  # 11 float32 weights: 44 bytes, and 3x that in the trainer
        trainer = SimpleNamespace(can_continue=can_go_on, model=weights)
        part = SimpleNamespace(resized=np.zeros(images, np.uint8), crops=np.zeros(0, np.uint8))
        return SimpleNamespace(runs={"scratch": SimpleNamespace(trainer=trainer, model=weights)},
                               cfg=SimpleNamespace(repeats=repeats, epochs=3), train=part, val=part, test=None)

    assert KeptRuns.footprint(result()) == 2 * 1000 + 44 + 3 * 44
    on_disk = result()
    on_disk.train = on_disk.val = SimpleNamespace(resized=DecodedImages([Path("a.npy")]),
                                                  crops=np.memmap(tmp_path / "crops", np.uint8, "w+", shape=(9,)))
    assert KeptRuns.footprint(on_disk) == 44 + 3 * 44  # images that live on disk (core.decoded) hold no memory
    kept = KeptRuns(capacity=2, max_bytes=5000)
    assert not kept.keep("huge", "run-h", result(images=3000))  # alone over the memory cap
    assert kept.keep("a", "run-a", result(images=1000)) and kept.keep("b", "run-b", result(images=1000))
    assert kept.keep("c", "run-c", result(images=1200))  # a, b and c: 6.9 kB > 5 kB, so the oldest (a) goes
    assert kept.get("a", "run-a") is None and kept.get("b", "run-b") is not None
    kept = KeptRuns(capacity=2)
    assert kept.keep("a", "run-a", result()) and kept.keep("b", "run-b", result())
    assert kept.get("a", "run-a") is not None  # a is now the most recently used
    assert kept.keep("c", "run-c", result())
    assert kept.get("b", "run-b") is None and kept.get("a", "run-a") is not None  # b went first
    assert kept.get("a", "run-other") is None  # another run of that session since
    assert not kept.keep("a", "run-a2", result(can_go_on=False)) and kept.get("a", "run-a") is None
    assert not kept.keep("d", "run-d", result(repeats=2))


def test_cancel_stops_training(app_root, trained):
    state = app.new_session()
    state = data_out(app.load_sample(TINY, state))["state"]
    state, *_ = app.arm_training(state)
    app.cancel_training(state)  # cancelled while still waiting in the queue
    final, _ = run_train(state)
    assert "Cancelled before training started" in final["status"]

    state, *_ = app.arm_training(state)
    gen = app.train(state, **{**FAST, "epochs": 20, "image_size": 32})
    first = dict(zip(app.TRAIN_OUTPUTS, next(gen)))
    assert "started" in first["status"]
    app.cancel_training(state)
    rest = [dict(zip(app.TRAIN_OUTPUTS, u)) for u in gen]
    assert "cancelled" in rest[-1]["status"]
    assert not list((app.SESSIONS.folder(state) / "runs").glob("run-*"))


# ------------------------------------------------------------------------------------------------ two classes


@pytest.fixture(scope="module")
def two_class(app_root, tmp_path_factory):
    path = colour_zip(tmp_path_factory.mktemp("zip") / "colours.zip", folder="colours", with_non_image=True)
    loaded = data_out(app.load_zip(str(path), app.new_session()))
    final, _ = run_train(loaded["state"], scratch=False)
    return loaded, final


def test_zip_upload_lists_skipped_files(two_class):
    loaded, _ = two_class
    assert "2 classes" in loaded["summary"] and "blue" in loaded["summary"]
    assert list(loaded["skipped"]["file"]) == ["red/notes.txt"]
    assert "not an image" in loaded["skipped"]["reason"][0]


def test_threshold_slider_changes_precision_and_recall(two_class):
    _, final = two_class
    assert final["threshold_group"]["visible"] is True
    assert list(final["results"].columns) == ["metric", ARM_TITLES["pretrained"]]
    state = final["state"]
    low_md, low_cm = app.update_threshold(state, "red", 0.01)
    high_md, high_cm = app.update_threshold(state, "red", 0.99)
    assert low_md != high_md
    assert "recall **100.0%**" in low_md  # everything is predicted positive at a tiny threshold
    assert "recall **0.0%**" in high_md
    assert low_cm.shape == (2, 3) and not low_cm.equals(high_cm)
    assert int(low_cm["predicted red"].sum()) == int(low_cm.iloc[:, 1:].to_numpy().sum())


def test_three_class_run_hides_the_threshold(trained):
    assert trained["final"]["threshold_group"]["visible"] is False


# ------------------------------------------------------------------------------------------------ predict


def _run_report(trained) -> dict:
    return json.loads(Path(trained["final"]["dl_report"]["value"]).read_text(encoding="utf-8"))


def _val_image(trained, cls="circle") -> Path:
    ds = trained["loaded"]["state"]["dataset"]
    return next(it.path for it in ds.items if it.split == "val" and ds.classes[it.label] == cls)


def test_predict_returns_a_label_dict_with_provider_and_latency(trained):
    state = trained["state"]
    label, info, table, looked = app.predict(state, "run:fp32", Image.open(_val_image(trained)), None)
    assert set(label) <= {"circle", "square", "triangle"} and len(label) == 3
    assert looked is not None and table["fits a class?"].tolist() == ["yes"]  # the app exports the explain outputs
    assert abs(sum(label.values()) - 1.0) < 1e-3
    assert "ExecutionProvider" in info and " ms" in info
    assert len(table) == 1
    # several files at once, with every model the run offers: FP32 and each variant whose export was accepted
    files = [str(_val_image(trained, c)) for c in ("circle", "square", "triangle")]
    accepted = [v["variant"] for v in _run_report(trained)["export"]["variants"] if v["accepted"]]
    offered = [key for _, key in trained["final"]["model_choice"]["choices"]]
    assert offered == ["run:auto", "run:fp32", *(f"run:{v}" for v in accepted)]
    for choice in offered:
        label, info, table, _looked = app.predict(state, choice, None, files)
        assert len(table) == 3 and set(table["prediction"]) <= {"circle", "square", "triangle"}


def test_predict_needs_a_model_and_an_image(app_root, trained):
    with pytest.raises(gr.Error, match="Train a model first"):
        app.predict(app.new_session(), "run:fp32", Image.new("RGB", (32, 32)), None)
    with pytest.raises(gr.Error, match="Upload an image"):
        app.predict(trained["state"], "run:fp32", None, None)
    with pytest.raises(gr.Error, match="Unknown model choice"):
        app.predict(trained["state"], "/etc/passwd", Image.new("RGB", (32, 32)), None)


def test_predictors_are_shared_per_model_file(trained):
    path = Path(trained["final"]["dl_onnx"]["value"])
    first = app.PREDICTORS.get(path)
    assert app.PREDICTORS.get(path) is first
    results = []

    def hit():
        results.append(app.PREDICTORS.get(path))

    threads = [threading.Thread(target=hit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is first for r in results)


def test_uploaded_onnx_model_is_used_and_bad_files_are_refused(trained, tmp_path):
    upload = tmp_path / "earlier.onnx"
    shutil.copyfile(trained["final"]["dl_onnx"]["value"], upload)
    state = app.new_session()
    state, choice, desc = app.upload_model(str(upload), state)
    assert choice["value"] == app.UPLOADED_MODEL and "3 classes" in desc
    stored = Path(state["uploaded_model"])
    assert stored.is_relative_to(app.SESSIONS.folder(state)) and stored != upload
    label, info, *_ = app.predict(state, app.UPLOADED_MODEL, Image.open(_val_image(trained)), None)
    assert set(label) <= {"circle", "square", "triangle"}

    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(os.urandom(256))
    with pytest.raises(gr.Error) as err:
        app.upload_model(str(bogus), app.new_session())
    assert "ONNX" in err.value.message and str(app.SESSIONS.root) not in err.value.message


# ------------------------------------------------------------------------------------------------ export & bench


def test_export_views_offer_files_parity_and_snippet(trained):
    final = trained["final"]
    assert "model.onnx" in final["export_md"]
    assert "parity" in set(final["parity"]["check"])
    assert final["parity"]["result"].iloc[0].endswith("passed")
    assert final["dl_triton"]["visible"], final["export_md"]  # built from model.onnx beside it
    with zipfile.ZipFile(final["dl_triton"]["value"]) as zf:
        names = zf.namelist()
    assert any(n.endswith("config.pbtxt") for n in names) and any(n.endswith("1/model.onnx") for n in names)
    snippet = app.example_snippet()
    assert snippet == (REPO / "export" / "example_predict.py").read_text(encoding="utf-8")
    assert "onnxruntime" in snippet and "import torch" not in snippet


def test_a_triton_repository_that_cannot_be_built_is_reported(trained, monkeypatch, tmp_path):
    import export.triton
    from export.runs import write_triton

    state = trained["state"]
    run_dir = Path(state["run_dir"])
    report = _run_report(trained)
    assert report["export"]["triton"] == {"file": "triton_repository.zip", "error": None}
    assert "triton_repository.zip" in report["artifacts"]["files"]

    def disk_full(model_path, zip_path, **options):
        raise OSError(f"[Errno 28] No space left on device: '{Path(zip_path).parent / '.triton-x' / 'config.pbtxt'}'")

    monkeypatch.setattr(export.triton, "write_triton_zip", disk_full)
    staged = tmp_path / "run"  # as export_run sees it: the run's staging folder
    staged.mkdir()
    shutil.copyfile(run_dir / "model.onnx", staged / "model.onnx")
    recorded = write_triton(staged / "model.onnx", staged)
    assert recorded["file"] is None and "No space left on device" in recorded["error"]
    assert str(staged) not in recorded["error"] and "OSError" in recorded["error"]

    # The app shows it (cleaned of server folders), hides the Triton download and still offers the model.
    leaky = {**recorded, "error": recorded["error"] + f" under {run_dir}"}
    views = app.export_views({**report, "export": {**report["export"], "triton": leaky}}, run_dir, state)
    assert "Triton repository could not be built" in views["export_md"]
    assert "No space left on device" in views["export_md"]
    assert str(app.SESSIONS.root) not in views["export_md"]
    assert views["dl_triton"]["visible"] is False and views["dl_triton"]["value"] is None
    assert views["dl_onnx"]["visible"]


def test_benchmark_compares_torch_and_onnxruntime(trained, monkeypatch):
    monkeypatch.setattr(app, "BENCH_REPEATS", 2)
    monkeypatch.setattr(app, "BENCH_WARMUP", 1)
    md, fig, table = app.benchmark(trained["state"], progress=_NoProgress())
    assert "CPUExecutionProvider" in md or "ExecutionProvider" in md
    assert set(table["batch size"]) == {1, 16}
    assert {"PyTorch eager", "onnxruntime FP32"} <= set(table["engine"])
    assert all(cell.endswith("%") for cell in table["CPU time in kernel"])
    assert fig is not None


# ------------------------------------------------------------------------------------------------ sessions


def test_sessions_have_private_folders_that_are_cleaned(tmp_path):
    store = sessions.SessionStore(tmp_path)
    a, b = sessions.new_state(), sessions.new_state()
    fa, fb = store.folder(a), store.folder(b)
    assert fa != fb and fa.parent == fb.parent == store.root
    store.delete(a)
    assert not fa.exists() and fb.exists()
    # an idle folder is swept, a busy one is kept (and cannot be deleted while busy)
    c = sessions.new_state()
    fc = store.folder(c)
    old = time.time() - sessions.SESSION_MAX_IDLE_S - 10
    os.utime(fb, (old, old))
    os.utime(fc, (old, old))
    with store.busy(c["sid"]):
        deleted = store.sweep(min_interval_s=0)
        store.delete(c)
    assert b["sid"] in deleted and not fb.exists()
    assert fc.exists()
    # a closed tab is deleted after the grace period, not before
    store.ensure_state(c, session_hash="browser-tab-1")
    store.closed("browser-tab-1")
    closed = fc / ".closed"
    assert closed.exists() and store.sweep(min_interval_s=0) == []
    os.utime(closed, (old, old))
    assert store.sweep(min_interval_s=0) == [c["sid"]] and not fc.exists()


def test_session_ids_are_never_taken_from_outside(tmp_path):
    store = sessions.SessionStore(tmp_path)
    with pytest.raises(sessions.SessionError):
        store.folder({"sid": "../../etc"})
    state = store.ensure_state({"sid": "../../etc"})
    assert sessions.SID_RE.match(state["sid"]) and state["sid"] != "../../etc"


def test_server_folders_are_hidden_in_messages(tmp_path):
    store = sessions.SessionStore(tmp_path)
    state = sessions.new_state()
    mine, other = store.folder(state), store.root / "0123456789abcdef"
    text = store.clean(f"cannot read {mine / 'data' / 'x.png'} (also {mine}) or {other / 'y.png'}", state)
    assert str(tmp_path) not in text
    assert "cannot read data/x.png" in text and "(also your upload)" in text and "<server>" in text


def test_runs_beyond_the_kept_number_are_deleted_oldest_first(tmp_path):
    store = sessions.SessionStore(tmp_path)
    state = sessions.new_state()
    made = []
    for i in range(5):
        run = store.new_run_dir(state)
        assert not run.exists() and run not in made
        run.mkdir(parents=True)
        os.utime(run, (1000 + i, 1000 + i))
        made.append(run)
    store.prune_runs(made[0].parent, keep=2)
    assert [p.exists() for p in made] == [False, False, False, True, True]


def test_a_busy_session_refuses_a_new_upload(tmp_path):
    store = sessions.SessionStore(tmp_path)
    state = store.ensure_state(None)
    zip_path = colour_zip(tmp_path / "colours.zip")
    with store.busy(state["sid"]), pytest.raises(sessions.SessionError, match="training run of this session"):
        store.load_zip(state, zip_path, "colours.zip")
    assert len(store.load_zip(state, zip_path, "colours.zip").classes) == 2


def _report(t_pre, t_scr, sp):
    run = {"val_accuracy": 0.9, "balanced_accuracy": 0.9, "precision_macro": 0.9, "recall_macro": 0.9,
           "f1_macro": 0.9, "train_seconds": 12.0, "best_epoch": 2, "epochs_run": 3,
           "verdict": {"label": "good", "reasons": ["ok"]}}
    return {"target_accuracy": 0.85, "speedup_time_to_target": sp,
            "runs": {"pretrained": {**run, "time_to_target_seconds": t_pre},
                     "scratch": {**run, "time_to_target_seconds": t_scr}}}


@pytest.mark.parametrize(("t_pre", "t_scr", "sp", "text", "cell"), [
    (1.0, 8.0, 8.0, "8.0× sooner", "8.0× sooner"),
    (1.0, None, {"lower_bound": 12.0}, "at least 12.0×", "≥ 12.0× sooner"),
    (None, 5.0, None, "the pretrained head did not", "–"),
    (None, None, None, "Neither arm reached", "–"),
])
def test_speedup_is_explained_in_words_and_in_the_table(t_pre, t_scr, sp, text, cell):
    report = _report(t_pre, t_scr, sp)
    assert text in speedup_text(report)
    table = results_table(report).set_index("metric")
    assert table.loc["speed-up to target", ARM_TITLES["pretrained"]] == cell
    one_arm = {**report, "runs": {"pretrained": report["runs"]["pretrained"]}}
    assert "speed-up to target" not in list(results_table(one_arm)["metric"])  # nothing to compare with
