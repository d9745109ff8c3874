"""ONNX export: parity, metadata, atomic writes, variants, Triton layout, the run CLI and the benchmark."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import export.onnx_export as onnx_export
import export.runs as runs
import export.variants as variants
import models
from core.runtime.contract import FORMAT, read_metadata
from core.runtime.predictor import Predictor, read_model_info
from export.__main__ import main as cli_main
from export.bench import allocator_note, benchmark, format_table
from export.errors import ParityError
from export.onnx_export import export_classifier
from export.triton import write_triton_repository, write_triton_zip
from export.variants import build_variants, evaluate_onnx, variant_path
from export.verify import check_parity
from models.preprocess import ImagePreprocess

SIZE = 64
CLASSES = ["cat", "dog", "fox"]
BACKBONE = "efficientnet_lite0"


def make_classifier(num_classes: int = 3, seed: int = 0) -> models.Classifier:
    """Pretrained (bundled, offline) backbone and a random head scaled so the probabilities differ per image."""
    torch.manual_seed(seed)
    classifier = models.build_classifier(BACKBONE, num_classes, pretrained=True)
    with torch.no_grad():
        classifier.head[-1].weight.mul_(10)
    return classifier.eval()


def make_images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Blocky colour images (more natural activations than white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, size // 4, axis=1), size // 4, axis=2)


def pattern_images(n_per_class: int, seed: int, shape: tuple[int, int] = (SIZE, SIZE)) -> tuple[np.ndarray, np.ndarray]:
    """Classes anyone can tell apart: class 0 red horizontal stripes, 1 green vertical stripes, 2 a blue
    checkerboard; brightness, stripe width, phase and pixel noise vary per image. Returns (images, labels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    images, labels = [], []
    for ci in range(len(CLASSES)):
        for _ in range(n_per_class):
            colour = rng.uniform(20, 50, 3)
            colour[ci] = rng.uniform(180, 240)
            half = rng.integers(3, 6)
            rows, cols = (yy + rng.integers(0, 2 * half)) // half % 2, (xx + rng.integers(0, 2 * half)) // half % 2
            pattern = (rows, cols, (rows + cols) % 2)[ci]
            pixels = colour * (0.45 + 0.55 * pattern[..., None]) + rng.normal(0, 12, (*shape, 3))
            images.append(np.clip(pixels, 0, 255).astype(np.uint8))
            labels.append(ci)
    return np.stack(images), np.asarray(labels)


def train_head(classifier: models.Classifier, images: np.ndarray, labels: np.ndarray,
               steps: int = 300) -> models.Classifier:
    """Logistic regression on the frozen backbone's features of ``images``: the head really learns the classes."""
    torch.manual_seed(0)
    with torch.inference_mode():
        features = classifier.backbone(ImagePreprocess(classifier.spec.mean, classifier.spec.std)(
            torch.from_numpy(images))).clone()
    optimizer = torch.optim.AdamW(classifier.head.parameters(), lr=0.01, weight_decay=0.01)
    targets = torch.from_numpy(labels)
    classifier.head.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(classifier.head(features), targets).backward()
        optimizer.step()
    return classifier.eval()


TRAIN_SEED, VAL_SEED = 1, 2  # pattern_images seeds: the training (and calibration) images, the held-out ones


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, models.Classifier, dict]:
    """A classifier trained on ``pattern_images`` (pretrained backbone, head fitted), exported to ONNX."""
    classifier = train_head(make_classifier(), *pattern_images(16, TRAIN_SEED))
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    result = export_classifier(classifier, path, image_size=SIZE, classes=CLASSES, training_mode="pretrained",
                                      metrics={"val_accuracy": 0.75}, parity_images=make_images(8))
    return path, classifier, result


def test_parity_passes(exported):
    path, classifier, result = exported
    parity = result["parity"]
    assert parity["passed"] is True
    assert parity["max_abs_diff_probabilities"] <= 1e-4
    assert parity["top1_agreement"] == 1.0
    assert parity["n_images"] == 8 + onnx_export.PARITY_RANDOM_IMAGES
    again = check_parity(path, classifier, make_images(5, seed=3))
    assert again["passed"] and again["provider"] == "CPUExecutionProvider"


def test_metadata_and_signature_read_back(exported):
    path, classifier, _ = exported
    meta = read_metadata(path)
    spec = models.get_backbone_spec(BACKBONE)
    assert meta["format"] == FORMAT
    assert json.loads(meta["classes"]) == CLASSES
    # The preprocessing the backbone was trained with (its spec) is what the file tells consumers to do.
    assert meta["image_size"] == str(SIZE) and meta["resize_size"] == str(spec.resize_for(SIZE))
    assert meta["interpolation"] == spec.interpolation
    # The human-readable rule names the same numbers, and a consumer who follows it (here with Pillow alone)
    # prepares exactly the pixels the Predictor prepares.
    rule, resize, interpolation = meta["resize_rule"], int(meta["resize_size"]), meta["interpolation"]
    assert f"shorter side to {resize} with {interpolation}" in rule and f"centre-crop {SIZE}" in rule
    photo = Image.fromarray(pattern_images(1, seed=7, shape=(97, 131))[0][0])
    scale = resize / min(photo.size)
    width, height = max(resize, round(photo.width * scale)), max(resize, round(photo.height * scale))
    resized = photo.resize((width, height), {"bilinear": Image.Resampling.BILINEAR,
                                             "bicubic": Image.Resampling.BICUBIC}[interpolation])
    left, top = (width - SIZE) // 2, (height - SIZE) // 2
    by_the_rule = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)))
    np.testing.assert_array_equal(Predictor(path, device="cpu").prepare(photo), by_the_rule)
    assert meta["backbone"] == BACKBONE and meta["training_mode"] == "pretrained"
    assert json.loads(meta["metrics"]) == {"val_accuracy": 0.75}
    assert meta["project_version"]
    model = onnx.load(str(path))
    (inp,) = model.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [SIZE, SIZE, 3]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    assert not list(path.parent.glob(".*.tmp"))
    info = read_model_info(path)
    assert info.classes == tuple(CLASSES) and info.resize_size == resize and info.kind == "classifier"


def test_batch_axis_is_dynamic(exported):
    path, classifier, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        logits, probs = session.run(None, {"image": make_images(n, seed=n)})
        assert logits.shape == probs.shape == (n, len(CLASSES))
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_parity_detects_a_different_model(exported):
    path, _, _ = exported
    other = make_classifier(seed=1)
    report = check_parity(path, other, make_images(6))
    assert report["passed"] is False and report["max_abs_diff_probabilities"] > 1e-3


def test_failed_parity_keeps_the_previous_file(exported, tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    shutil.copyfile(exported[0], target)
    before = target.read_bytes()

    def failing(*args, **kwargs):
        return {"max_abs_diff_probabilities": 0.5, "top1_agreement": 0.5, "n_images": 4,
                "provider": "CPUExecutionProvider", "atol": 1e-4, "passed": False}

    monkeypatch.setattr(onnx_export, "check_parity", failing)
    proto = onnx.load(str(exported[0]))  # skip the slow trace: the failure under test comes after it
    monkeypatch.setattr(onnx_export, "_export_proto", lambda *args, **kwargs: proto)
    with pytest.raises(ParityError, match="disagrees with PyTorch"):
        export_classifier(make_classifier(seed=2), target, image_size=SIZE, classes=CLASSES, training_mode="scratch")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_failed_checker_keeps_the_previous_file(exported, tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    shutil.copyfile(exported[0], target)
    before = target.read_bytes()
    broken = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["missing"], ["y"])], "broken", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    monkeypatch.setattr(onnx_export, "_export_proto", lambda *args, **kwargs: broken)
    with pytest.raises(onnx.checker.ValidationError):
        export_classifier(make_classifier(), target, image_size=SIZE, classes=CLASSES, training_mode="pretrained")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_export_rejects_bad_arguments(exported):
    classifier = exported[1]
    with pytest.raises(ValueError, match="training_mode"):
        export_classifier(classifier, "x.onnx", image_size=SIZE, classes=CLASSES, training_mode="finetuned")
    with pytest.raises(ValueError, match="2 class names"):
        export_classifier(classifier, "x.onnx", image_size=SIZE, classes=CLASSES[:2], training_mode="scratch")


def test_triton_repository(exported, tmp_path):
    path = exported[0]
    model_dir = write_triton_repository(path, tmp_path / "repo", model_name="pets", max_batch_size=8)
    assert model_dir == tmp_path / "repo" / "pets"
    assert (model_dir / "1" / "model.onnx").read_bytes() == path.read_bytes()
    assert (model_dir / "labels.txt").read_text().splitlines() == CLASSES
    config = (model_dir / "config.pbtxt").read_text()
    assert 'name: "pets"' in config and 'platform: "onnxruntime_onnx"' in config
    assert "max_batch_size: 8" in config and "dynamic_batching" in config and "instance_group" in config
    assert "kind:" not in config  # an FP32 file: Triton picks the instance kind (KIND_AUTO)
    blocks = re.findall(r"\{\s*name: \"(\w+)\"\s*data_type: (\w+)\s*dims: \[ ([\d, ]+) \]([^}]*)\}", config)
    parsed = {name: (dtype, [int(d) for d in dims.split(",")], rest) for name, dtype, dims, rest in blocks}
    assert parsed["image"][:2] == ("TYPE_UINT8", [SIZE, SIZE, 3])
    assert parsed["logits"][:2] == ("TYPE_FP32", [3]) and "label_filename" not in parsed["logits"][2]
    assert parsed["probabilities"][:2] == ("TYPE_FP32", [3])
    assert 'label_filename: "labels.txt"' in parsed["probabilities"][2]
    with pytest.raises(ValueError, match="not a valid Triton model name"):
        write_triton_repository(path, tmp_path / "repo", model_name="bad name")


def test_triton_zip_holds_the_repository_and_a_failure_keeps_the_old_zip(exported, tmp_path):
    target = tmp_path / "triton.zip"
    assert cli_main(["triton", "--model", str(exported[0]), "--out", str(target), "--name", "pets"]) == 0
    with zipfile.ZipFile(target) as archive:
        names = set(archive.namelist())
        assert {"pets/config.pbtxt", "pets/labels.txt", "pets/1/model.onnx"} <= names
        assert archive.read("pets/labels.txt").decode().splitlines() == CLASSES
    before = target.read_bytes()
    with pytest.raises(ValueError, match="not a valid Triton model name"):
        write_triton_zip(exported[0], target, model_name="bad name")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["triton.zip"]  # no temporary folder left behind


def test_int8_is_kept_at_the_default_tolerance_on_true_labels(exported, tmp_path):
    """The README's claim: INT8 costs at most one accuracy point, measured against the images' true classes."""
    path = tmp_path / "run" / "model.onnx"
    path.parent.mkdir()
    shutil.copyfile(exported[0], path)
    calibration, _ = pattern_images(16, TRAIN_SEED)  # the training images calibrate, as `export onnx` does
    val, labels = pattern_images(20, VAL_SEED)  # held out, with the classes they were drawn from
    fp32 = Predictor(path, device="cpu").predict_arrays(val)
    assert np.mean(fp32.argmax(1) == labels) == 1.0  # the trained FP32 model is right on every held-out image
    (record,) = build_variants(path, calibration, val, labels, variants=("int8",))  # default tolerance
    int8 = variant_path(path, "int8")
    assert record["accepted"], record["reason"]
    assert record["path"] == str(int8) and int8.exists() and "1.00 allowed" in record["reason"]
    int8_probs = Predictor(int8, device="cpu").predict_arrays(val)
    assert int8_probs.shape == (60, 3) and np.abs(int8_probs.sum(1) - 1).max() < 1e-4
    assert record["baseline_accuracy"] == 1.0
    assert record["accuracy"] == float(np.mean(int8_probs.argmax(1) == labels)) == 1.0
    assert record["accuracy_drop"] == 0.0
    info = read_model_info(int8)
    assert info.variant == "int8" and info.classes == tuple(CLASSES)
    # EfficientNet-Lite0 normalises every channel alike: those constants become scalars (fast in NHWC INT8 graphs).
    initializers = onnx.load(str(int8)).graph.initializer
    constants = {i.name: list(i.dims) for i in initializers if i.name.startswith("preprocess")}
    assert constants and all(dims == [] for dims in constants.values())
    # Triton serves the INT8 file on CPU instances (the FP32 file gets no kind: test_triton_repository).
    config = (write_triton_repository(int8, tmp_path / "repo", model_name="pets") / "config.pbtxt").read_text()
    assert re.search(r"instance_group \[\s*\{\s*count: 1\s*kind: KIND_CPU\s*\}", config)
    # A tolerance no variant can meet: rejected, and the earlier accepted file is removed too.
    (rejected,) = build_variants(path, calibration, val, labels, tolerance=-1.0, variants=("int8",))
    assert not rejected["accepted"] and rejected["path"] is None and "deleted" in rejected["reason"]
    assert rejected["accuracy"] == 1.0 and rejected["accuracy_drop"] == 0.0
    assert not int8.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize(("variant_right", "tolerance", "accepted"),
                         [(177, 0.01, False), (177, 0.02, True), (178, 0.01, True), (190, 0.0, True)])
def test_tolerance_rule(exported, tmp_path, monkeypatch, variant_right, tolerance, accepted):
    path = tmp_path / "model.onnx"
    shutil.copyfile(exported[0], path)
    labels = np.zeros(200, dtype=np.int64)
    answers = {path: np.r_[np.zeros(180), np.ones(20)].astype(int),  # FP32: 180 of 200 right (0.90)
               "variant": np.r_[np.zeros(variant_right), np.ones(200 - variant_right)].astype(int)}
    monkeypatch.setattr(variants, "_build", lambda variant, src, tmp, calib: shutil.copyfile(src, tmp))
    monkeypatch.setattr(variants, "top1", lambda p, images, **kw: answers.get(Path(p), answers["variant"]))
    (record,) = build_variants(path, None, np.zeros((200, SIZE, SIZE, 3), np.uint8), labels, tolerance=tolerance,
                               variants=("int8",))
    assert record["accepted"] is accepted
    assert record["accuracy_drop"] == pytest.approx(0.90 - variant_right / 200)
    assert variant_path(path, "int8").exists() is accepted
    # the check says how often the variant gave FP32's answer, with intervals around both numbers
    check = record["check"]
    assert check["agreement"] == pytest.approx(1 - abs(variant_right - 180) / 200)
    low, high = check["drop_interval"]
    assert low < record["accuracy_drop"] < high
    if accepted:  # and the kept file carries it, for a server to read without the report
        assert read_model_info(variant_path(path, "int8")).check == check


def test_variant_without_validation_images_is_rejected(exported, tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copyfile(exported[0], path)
    empty = np.zeros((0, SIZE, SIZE, 3), np.uint8)
    (record,) = build_variants(path, make_images(4), empty, [], variants=("int8",))
    assert not record["accepted"] and "no validation images" in record["reason"]


def test_evaluate_onnx(exported):
    path = exported[0]
    images = make_images(6, seed=9)
    labels = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"image": images})[0].argmax(1)
    assert evaluate_onnx(path, images, labels) == 1.0
    assert evaluate_onnx(path, images, (labels + 1) % 3) == 0.0


def _write_run(tmp_path: Path, classifier: models.Classifier, per_class: int = 6) -> Path:
    """A run folder as `python -m core compare` writes it, over a tiny dataset of generated photos
    (``pattern_images`` at 70x90; half of each class in train, half in val)."""
    root = tmp_path / "data"
    run = tmp_path / "run"
    run.mkdir()
    rows = []
    images, labels = pattern_images(per_class, seed=3, shape=(70, 90))
    for n, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        cls, i = CLASSES[label], n % per_class
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / cls / f"{i}.png")
        rows.append([f"{cls}/{i}.png", cls, "train" if i < per_class // 2 else "val", "0" * 64])
    with open(run / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "class", "split", "sha256"])
        writer.writerows(rows)
    torch.save(classifier.state_dict(), run / "pretrained.pt")
    report = {"backbone": BACKBONE, "image_size": SIZE, "dataset": {"classes": CLASSES, "root": str(root)},
              "runs": {"pretrained": {"val_accuracy": 0.5, "f1_macro": 0.4}}, "other": {"kept": True}}
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_cli_onnx_exports_a_run_and_records_it(exported, tmp_path, capsys):
    run = _write_run(tmp_path, exported[1])
    assert cli_main(["onnx", "--run", str(run)]) == 0  # the default tolerance: one accuracy point
    report = json.loads((run / "report.json").read_text())
    assert report["other"] == {"kept": True} and report["runs"]["pretrained"]["val_accuracy"] == 0.5
    section = report["export"]
    assert section["model"] == "model.onnx" and section["parity"]["passed"] and section["tolerance"] == 0.01
    assert section["parity"]["n_images"] == 9 + onnx_export.PARITY_RANDOM_IMAGES  # the val photos, and random ones
    int8 = next(v for v in section["variants"] if v["variant"] == "int8")
    assert int8["accepted"], int8["reason"]
    # Accuracy against the photos' true classes, recomputed here from the files the manifest lists as val.
    rows = csv.reader((run / "manifest.csv").read_text().splitlines())
    val = [(file, cls) for file, cls, split, _ in rows if split == "val"]
    data = Path(report["dataset"]["root"])
    for name, key in (("model.onnx", "baseline_accuracy"), (int8["path"], "accuracy")):
        predicted = Predictor(run / name, device="cpu").predict([data / f for f, _ in val])
        assert int8[key] == np.mean([p["label"] == cls for p, (_, cls) in zip(predicted, val, strict=True)]) == 1.0
    assert int8["accuracy_drop"] == 0.0
    info = read_model_info(run / "model.onnx")
    assert info.classes == tuple(CLASSES)
    assert json.loads(read_metadata(run / "model.onnx")["metrics"])["f1_macro"] == 0.4
    assert section["triton"] == {"file": "triton_repository.zip", "error": None}
    with zipfile.ZipFile(run / "triton_repository.zip") as archive:
        assert "classifier/1/model.onnx" in archive.namelist()
    # report.json now lists the run's files as they are: manifest and weights, plus what the export wrote.
    assert report["artifacts"]["files"] == sorted(p.name for p in run.iterdir())
    assert "wrote" in capsys.readouterr().out

    assert cli_main(["onnx", "--run", str(run), "--arm", "scratch"]) == 2
    assert "scratch.pt not found" in capsys.readouterr().err
    assert cli_main(["triton", "--model", str(run / "model.onnx"), "--out", str(tmp_path / "repo")]) == 0
    assert (tmp_path / "repo" / "model" / "config.pbtxt").exists()


def test_cli_errors_exit_2(tmp_path, capsys):
    assert cli_main(["onnx", "--run", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert cli_main(["triton", "--model", str(tmp_path / "junk.onnx"), "--out", str(tmp_path / "r")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_cli_user_mistakes_are_one_line_errors_not_tracebacks(exported, tmp_path, capsys):
    """Each a mistake in what the user typed or pointed at: ``error: ...`` and exit code 2."""
    assert cli_main(["triton", "--model", str(exported[0]), "--out", str(tmp_path / "r"), "--name", "bad name"]) == 2
    assert "not a valid Triton model name" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text("{not json", encoding="utf-8")
    assert cli_main(["onnx", "--run", str(tmp_path / "run")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    for argv in (["bench", "--model", str(exported[0]), "--threads", "0"],
                 ["triton", "--model", str(exported[0]), "--out", str(tmp_path / "r"), "--max-batch-size", "0"]):
        with pytest.raises(SystemExit) as exit_info:  # argparse refuses it before anything runs
            cli_main(argv)
        assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_benchmark_reports_ratios(exported, tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copyfile(exported[0], path)
    results = benchmark(path, batch_sizes=(1, 2), repeats=2, warmup=1, torch_model=exported[1], threads=1,
                        print_table=False)
    for batch in (1, 2):
        row = results["batches"][batch]
        assert row["torch"]["ms"] > 0 and row["onnx_fp32"]["images_per_s"] > 0
        assert row["ratios"]["onnx_fp32_vs_torch"] > 0 and row["ratios"]["onnx_fp32_vs_torch_nchw"] > 0
        assert row["torch_nchw"]["ms"] > 0
        assert "onnx_int8" not in row
        for name in row["ratios"]:
            low, high = row["ratio_ranges"][name]
            assert 0 < low <= high
        for engine in ("torch", "torch_nchw", "onnx_fp32"):
            assert 0.0 <= row[engine]["kernel_share"] <= 1.0 and row[engine]["page_faults_per_call"] >= 0
    table = format_table(results)
    assert "onnx_fp32_vs_torch_nchw = " in table and "faults/call" in table
    skipped = benchmark(path, batch_sizes=(1,), repeats=1, warmup=0, run_dir=tmp_path, threads=1, print_table=False)
    assert "report.json not found" in skipped["torch_skipped"] and "torch" not in skipped["batches"][1]
    alone = benchmark(path, batch_sizes=(1,), repeats=1, warmup=0, threads=1, print_table=False)
    assert "pass --run" in alone["torch_skipped"]


def test_allocator_note_names_the_fix_only_when_torch_page_faults():
    def results(share):
        engine = {"ms": 10.0, "images_per_s": 100.0, "kernel_share": share, "page_faults_per_call": 0}
        return {"model": "m.onnx", "image_size": 32, "threads": 1, "provider": "CPU", "repeats": 1,
                "batches": {16: {"torch": engine, "onnx_fp32": {**engine, "kernel_share": 0.0},
                                 "ratios": {}, "ratio_ranges": {}}}}

    assert allocator_note(results(0.05)) is None and "note:" not in format_table(results(0.05))
    note = allocator_note(results(0.4))
    assert "40%" in note and "MALLOC_MMAP_MAX_=0" in note and "note: " + note in format_table(results(0.4))


def test_tuned_malloc_stops_page_faults_on_reallocation():
    """A freed 64 MB buffer comes back without page faults once ``keep_freed_memory`` ran (glibc only)."""
    code = (  # plain malloc/free of 64 MB, as torch's CPU allocator does (numpy would use huge pages)
        "import ctypes, resource, sys\n"
        "from export.bench import keep_freed_memory\n"
        "tuned = sys.argv[1] == 'tuned' and keep_freed_memory()\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]\n"
        "def touch():\n"
        "    p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(p)\n"
        "touch()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "touch()\n"
        "print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {}
    for mode in ("default", "tuned"):
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1])
        ok, count = proc.stdout.split()
        faults[mode] = int(count)
        if mode == "tuned" and ok != "1":
            pytest.skip("this C library has no mallopt (not glibc)")
    assert faults["default"] > 1_000  # 64 MB of fresh pages, faulted in again
    assert faults["tuned"] < faults["default"] // 10


def test_benchmark_finds_the_torch_model_in_the_run_folder(exported, tmp_path, monkeypatch):
    run = _write_run(tmp_path, exported[1])  # report.json and pretrained.pt of the exported classifier
    shutil.copyfile(exported[0], run / "model.onnx")
    rebuilt = []
    load = runs.load_run_classifier

    def recording_load(run_dir, mode):  # the real loader, watched: which folder and arm it rebuilt
        classifier, report = load(run_dir, mode)
        rebuilt.append((Path(run_dir), mode, classifier))
        return classifier, report

    monkeypatch.setattr(runs, "load_run_classifier", recording_load)
    results = benchmark(run / "model.onnx", batch_sizes=(1,), repeats=1, warmup=0, threads=1, print_table=False)
    assert "torch_skipped" not in results
    row = results["batches"][1]
    assert row["torch"]["ms"] > 0 and row["torch_nchw"]["ms"] > 0 and row["onnx_fp32"]["ms"] > 0
    assert row["ratios"]["onnx_fp32_vs_torch"] > 0
    ((where, mode, classifier),) = rebuilt
    assert where == run and mode == "pretrained"
    # What it timed is the network behind model.onnx: the rebuilt weights give the file's probabilities.
    assert check_parity(run / "model.onnx", classifier, make_images(4))["passed"]


def test_both_torch_baselines_compute_the_same_probabilities(exported):
    from export.bench import _torch_runner

    run, run_nchw, restore = _torch_runner(exported[1], 1)
    try:
        batch = make_images(2)
        _, probabilities = run(batch)
        torch.testing.assert_close(run_nchw(batch), probabilities, atol=1e-5, rtol=1e-5)
    finally:
        restore()


# ---------------------------------------------------------------- INT8 recipe, FLOPs, the variant served, peers

def test_count_flops_counts_conv_and_gemm_multiply_adds():
    from onnx import TensorProto, helper

    from export.flops import count_flops

    conv_w = onnx.numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")  # 3 -> 8 channels, 3x3
    dw_w = onnx.numpy_helper.from_array(np.zeros((8, 1, 3, 3), np.float32), "dw")  # depthwise: 8 groups
    fc_w = onnx.numpy_helper.from_array(np.zeros((8, 4), np.float32), "fc")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["c", "dw"], ["d"], pads=[1, 1, 1, 1], group=8),
         helper.make_node("GlobalAveragePool", ["d"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "fc"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [conv_w, dw_w, fc_w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    # per image: conv 2*(8*10*10)*(3*3*3), depthwise 2*(8*10*10)*(1*3*3), gemm 2*4*8
    assert count_flops(model) == 2 * 800 * 27 + 2 * 800 * 9 + 2 * 4 * 8
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # the caller's model untouched


def test_export_records_flops_in_the_metadata(exported):
    info = read_model_info(exported[0])
    # efficientnet_lite0 at 224 px is 0.39-0.40 GMAC by its paper's count; at 64 px about (64/224)^2 of that, x 2
    assert 0.04e9 < info.flops < 0.08e9


def test_float_nodes_follow_the_recipe(exported):
    from export.quantize import _float_only_nodes

    graph = onnx.load(str(exported[0])).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    plain = set(_float_only_nodes(exported[0]))
    assert not plain & {n.name for n in convs}  # every convolution quantized by default
    first = set(_float_only_nodes(exported[0], first_conv=True)) - plain
    last = set(_float_only_nodes(exported[0], last_conv=True)) - plain
    depthwise = set(_float_only_nodes(exported[0], depthwise=True)) - plain
    assert first == {convs[0].name} and last == {convs[-1].name}
    assert depthwise == {n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)}
    assert len(depthwise) > 10


def test_head_refit_moves_the_int8_logits_towards_fp32(exported, tmp_path):
    from export.quantize import DEFAULT_RECIPE, _session_outputs, quantize_int8, refit_head

    images = pattern_images(12, seed=5)[0]
    int8 = quantize_int8(exported[0], tmp_path / "model.int8.onnx", images, recipe=DEFAULT_RECIPE)
    fp32_logits = _session_outputs(onnx.load(str(exported[0])), ["logits"], images)[0]

    def error() -> float:
        return float(np.abs(_session_outputs(onnx.load(str(int8)), ["logits"], images)[0] - fp32_logits).mean())

    before = error()
    refit_head(int8, exported[0], images)
    assert error() < before  # least squares towards FP32's logits on these images cannot do worse on them


def _fake_int8(exported_path: Path, folder: Path, check: dict) -> tuple[Path, Path]:
    """The exported FP32 model and a copy of it labelled as its INT8 variant (same speed, same answers)."""
    from core.runtime.contract import set_metadata

    fp32 = folder / "model.onnx"
    shutil.copyfile(exported_path, fp32)
    model = onnx.load(str(fp32))
    set_metadata(model, {"variant": "int8", "check": json.dumps(check)})
    onnx.save_model(model, str(folder / "model.int8.onnx"))
    return fp32, folder / "model.int8.onnx"


def test_the_fastest_variant_is_served_and_the_reason_said(exported, tmp_path, monkeypatch):
    from core.runtime import fastest

    monkeypatch.setenv("TRANSFER_LAB_CACHE", str(tmp_path / "cache"))
    fp32, int8 = _fake_int8(exported[0], tmp_path, {"accuracy_drop": 0.005, "images": 200})
    assert fastest.variant_files(fp32) == {"fp32": fp32, "int8": int8}
    timed = []

    def timings(latency: dict):  # the real timing loop runs; the latencies it reports are set by the test
        def run(predictors, size, seconds):
            timed.append(real(predictors, size, seconds))
            return latency
        return run

    real = fastest._timed
    # INT8 only 5% faster: not worth serving an approximation, the exact FP32 model is served
    monkeypatch.setattr(fastest, "_timed", timings({"fp32": 0.0100, "int8": 0.0095}))
    same = fastest.choose_variant(fp32, seconds=0.2, use_cache=False)
    assert same.variant == "fp32" and same.path == fp32 and same.speedups["int8"] == pytest.approx(1 / 0.95)
    assert same.reason.startswith("FP32: INT8 is not faster on this CPU")
    assert set(timed[0]) == {"fp32", "int8"} and all(t > 0 for t in timed[0].values())
    # where INT8 is timed twice as fast it is served, with what it cost on the validation images
    monkeypatch.setattr(fastest, "_timed", timings({"fp32": 0.010, "int8": 0.005}))
    quick = fastest.choose_variant(fp32, seconds=0.3)
    assert quick.variant == "int8" and quick.path == int8
    assert quick.reason == "INT8: 2.0x faster than FP32 here, 0.5 points lost on 200 validation images"
    # the answer is kept: the next load does not time again
    monkeypatch.setattr(fastest, "_timed", lambda *a: pytest.fail("timed again despite the cache"))
    assert fastest.choose_variant(fp32).variant == "int8"
    forced = fastest.choose_variant(fp32, want="fp32")
    assert forced.variant == "fp32" and forced.forced
    with pytest.raises(fastest.VariantMissingError, match=r"no FP16 variant.*\['FP32', 'INT8'\]"):
        fastest.choose_variant(fp32, want="fp16")


def test_core_predict_says_which_variant_serves(exported, tmp_path, monkeypatch, capsys):
    from core.cli import main as core_main

    monkeypatch.setenv("TRANSFER_LAB_CACHE", str(tmp_path / "cache"))
    fp32, _ = _fake_int8(exported[0], tmp_path, {"accuracy_drop": 0.0, "images": 50})
    image = tmp_path / "a.png"
    Image.fromarray(make_images(1)[0]).save(image)
    assert core_main(["predict", "--model", str(fp32), "--variant", "int8", str(image)]) == 0
    out, err = capsys.readouterr()
    assert "serving model.int8.onnx: INT8: asked for by name" in err
    assert json.loads(out.splitlines()[0])["variant"] == "int8"


def test_benchmark_rows_peers_and_roofline(exported, tmp_path):
    """GFLOP/s and the share of a measured SGEMM peak per row, the torch row with glibc's start-up allocator beside
    the tuned one, OpenVINO's row or why it is missing, and the plain headline. In a child process, as a user runs
    it: the tuned allocator is process-wide and must not change this test process."""
    from export import bench

    run = _write_run(tmp_path, exported[1])
    shutil.copyfile(exported[0], run / "model.onnx")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "export", "bench", "--model", str(run / "model.onnx"), "--batch", "2",
                           "--repeats", "2", "--threads", "1", "--json", str(out)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    row = results["batches"]["2"]
    assert results["tuned_malloc"] and row["torch_glibc"]["ms"] > 0 and row["ratios"]["onnx_fp32_vs_torch_glibc"] > 0
    assert results["flops_per_image"] == read_model_info(run / "model.onnx").flops
    assert 1 < results["sgemm_gflops"] < 10_000
    fp32 = row["onnx_fp32"]
    assert fp32["gflops"] == pytest.approx(results["flops_per_image"] * 2 / fp32["ms"] / 1e6)
    assert fp32["of_peak"] == pytest.approx(fp32["gflops"] / results["sgemm_gflops"])
    if "openvino_fp32" in row:
        assert row["ratios"]["onnx_fp32_vs_openvino"] > 0
    else:
        assert results["openvino_skipped"].startswith(("not installed", "could not compile"))
    line = bench.headline(results)
    assert line.startswith(f"onnxruntime FP32 runs at {fp32['of_peak']:.0%} of what this CPU can do at batch 2")
    assert f"{row['torch']['ms'] / fp32['ms']:.1f}x PyTorch" in line and line in proc.stdout
