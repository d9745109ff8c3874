"""The onnxruntime Predictor: metadata-only loading, parity with PyTorch, providers, errors, threads, the example."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import core.runtime.predictor as predictor_module
import core.runtime.providers as providers
import models
from core.runtime.contract import ModelFormatError
from core.runtime.images import resize_and_crop
from core.runtime.predictor import OnnxFeatureExtractor, Predictor
from core.runtime.providers import CPU, CUDA, TENSORRT, default_threads, select_providers
from export.onnx_export import cached_backbone_onnx, export_classifier
from models.preprocess import ImageClassifier, ImagePreprocess

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
CLASSES = ["apple", "banana", "cherry"]
BACKBONE = "efficientnet_lite0"


def photo(seed: int, size: tuple[int, int] = (131, 97)) -> Image.Image:
    """A smooth synthetic photo with an aspect ratio that exercises resize + crop."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, models.Classifier]:
    torch.manual_seed(0)
    classifier = models.build_classifier(BACKBONE, len(CLASSES), pretrained=True)
    with torch.no_grad():
        classifier.head[-1].weight.mul_(10)  # spread the probabilities so top-1 is well defined
    classifier.eval()
    path = tmp_path_factory.mktemp("inference") / "model.onnx"
    export_classifier(classifier, path, image_size=SIZE, classes=CLASSES, training_mode="pretrained")
    return path, classifier


@pytest.fixture(scope="module")
def predictor(model) -> Predictor:
    return Predictor(model[0], device="cpu")


def torch_probabilities(classifier: models.Classifier, images: list[Image.Image]) -> np.ndarray:
    spec = classifier.spec
    arrays = np.stack([np.asarray(resize_and_crop(im, SIZE, spec.resize_for(SIZE), spec.interpolation))
                       for im in images])
    with torch.inference_mode():
        return ImageClassifier(classifier).eval()(torch.from_numpy(arrays))[1].numpy()


def test_predictor_reads_everything_from_metadata(predictor):
    assert predictor.classes == tuple(CLASSES)
    assert predictor.image_size == SIZE
    spec = models.get_backbone_spec(BACKBONE)
    assert predictor.info.resize_size == spec.resize_for(SIZE)
    assert predictor.info.interpolation == spec.interpolation
    assert predictor.info.backbone == BACKBONE and predictor.info.training_mode == "pretrained"
    assert predictor.provider == CPU and predictor.fallback_warning is None


def test_predictions_match_torch(model, predictor):
    path, classifier = model
    images = [photo(i) for i in range(4)] + [photo(9, (64, 200))]
    expected = torch_probabilities(classifier, images)
    results = predictor.predict(images, top_k=2)
    got = np.array([[next(t["probability"] for t in r["top_k"] if t["label"] == c) if c in
                     [t["label"] for t in r["top_k"]] else None for c in CLASSES] for r in results], dtype=object)
    for row, exp, result in zip(got, expected, results, strict=True):
        assert result["label"] == CLASSES[int(exp.argmax())]
        assert result["probability"] == pytest.approx(float(exp.max()), abs=1e-4)
        assert len(result["top_k"]) == 2 and result["provider"] == CPU
        assert result["top_k"][0]["probability"] >= result["top_k"][1]["probability"]
        for value, reference in zip(row, exp, strict=True):
            if value is not None:
                assert value == pytest.approx(float(reference), abs=1e-4)
    prepared = np.stack([predictor.prepare(im) for im in images])
    np.testing.assert_allclose(predictor.predict_arrays(prepared), expected, atol=1e-4)


def test_paths_arrays_and_pil_images_agree(predictor, tmp_path):
    image = photo(3)
    file = tmp_path / "photo.png"
    image.save(file)
    by_pil, by_path, by_array = predictor.predict([image, file, np.asarray(image)], top_k=5)
    assert len(by_pil["top_k"]) == 3  # top_k is capped at the number of classes
    assert by_pil == by_path == by_array
    assert predictor.predict(str(file))[0] == by_pil
    assert predictor.predict([]) == []


def test_bad_inputs_name_the_problem(predictor):
    with pytest.raises(ValueError, match=r"\[N, 64, 64, 3\].*float32 \(2, 64, 64, 3\)"):
        predictor.predict_arrays(np.zeros((2, SIZE, SIZE, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict([np.zeros((10, 10, 3), np.float64)])
    with pytest.raises(TypeError, match="PIL image"):
        predictor.predict([42])
    with pytest.raises(ValueError, match="top_k"):
        predictor.predict([photo(0)], top_k=0)


def test_io_binding_path_gives_the_same_result(model, predictor):
    bound = Predictor(model[0], device="cpu", io_binding=True, batch_size=2)
    images = np.stack([predictor.prepare(photo(i)) for i in range(5)])
    np.testing.assert_allclose(bound.predict_arrays(images), predictor.predict_arrays(images), atol=1e-6)


def test_one_predictor_shared_by_threads(predictor):
    images = [photo(i) for i in range(8)]
    sequential = [predictor.predict([im])[0] for im in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda im: predictor.predict([im])[0], images * 2))
    assert parallel == sequential * 2


def test_corrupt_and_foreign_files_raise_model_format_error(model, tmp_path):
    good = model[0].read_bytes()
    cases = {
        "random.onnx": os.urandom(4096),
        "truncated.onnx": good[: len(good) // 3],
        "empty.onnx": b"",
        "photo.onnx": b"\xff\xd8\xff\xe0" + os.urandom(512),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelFormatError, match="ONNX model|empty") as err:
            Predictor(tmp_path / name, device="cpu")
        assert "python -m export onnx" in str(err.value), name
    with zipfile.ZipFile(tmp_path / "model.pt", "w") as z:
        z.writestr("archive/data.pkl", b"x")
    with pytest.raises(ModelFormatError, match="PyTorch"):
        Predictor(tmp_path / "model.pt", device="cpu")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])])
    foreign = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=9)
    onnx.save_model(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(ModelFormatError, match="not exported by transfer-lab.*'format'.*transfer-lab/1"):
        Predictor(tmp_path / "foreign.onnx", device="cpu")
    with pytest.raises(ModelFormatError, match="is a folder"):
        Predictor(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Predictor(tmp_path / "missing.onnx", device="cpu")


def test_wrong_metadata_values_are_named(model, tmp_path):
    proto = onnx.load(str(model[0]))
    for prop in proto.metadata_props:
        if prop.key == "interpolation":
            prop.value = "nearest"
    onnx.save_model(proto, tmp_path / "m.onnx")
    with pytest.raises(ModelFormatError, match="'interpolation'.*'nearest'"):
        Predictor(tmp_path / "m.onnx", device="cpu")


@pytest.mark.parametrize(("available", "device", "tensorrt", "expected"), [
    ([TENSORRT, CUDA, CPU], "auto", False, [CUDA, CPU]),
    ([TENSORRT, CUDA, CPU], "auto", True, [TENSORRT, CUDA, CPU]),
    ([TENSORRT, CUDA, CPU], "cuda", True, [TENSORRT, CUDA, CPU]),
    ([TENSORRT, CUDA, CPU], "cpu", True, [CPU]),
    ([CUDA, CPU], "auto", True, [CUDA, CPU]),
    ([CUDA, CPU], "cpu", False, [CPU]),
    ([CPU], "cuda", False, [CPU]),
    ([CPU], "auto", True, [CPU]),
    (["CoreMLExecutionProvider", CPU], "auto", False, [CPU]),
])
def test_select_providers(available, device, tensorrt, expected):
    assert select_providers(available, device, tensorrt=tensorrt) == expected


def test_tensorrt_needs_the_env_opt_in(monkeypatch):
    available = [TENSORRT, CUDA, CPU]
    monkeypatch.delenv("TRANSFER_LAB_TENSORRT", raising=False)
    assert select_providers(available, "auto") == [CUDA, CPU]
    monkeypatch.setenv("TRANSFER_LAB_TENSORRT", "1")
    assert select_providers(available, "auto") == [TENSORRT, CUDA, CPU]
    with pytest.raises(ValueError, match="device must be one of"):
        select_providers(available, "gpu")


def test_cuda_requested_without_cuda_warns_and_runs_on_cpu(model, monkeypatch):
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [CPU])
    with pytest.warns(RuntimeWarning, match="CUDA was requested.*onnxruntime-gpu"):
        predictor = Predictor(model[0], device="cuda")
    assert predictor.provider == CPU
    assert "device='cpu'" in predictor.fallback_warning
    assert predictor.predict([photo(0)])[0]["provider"] == CPU


def test_auto_warns_only_when_available_cuda_could_not_start(model):
    available = ort.get_available_providers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = Predictor(model[0])
    from core.runtime.providers import nvidia_gpu_visible

    fell_back = CUDA in available and nvidia_gpu_visible() and predictor.provider == CPU
    assert (predictor.fallback_warning is not None) == fell_back
    assert any("running on the CPU" in str(w.message) for w in caught) == fell_back


def test_device_cpu_never_warns(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Predictor(model[0], device="cpu").fallback_warning is None
    with pytest.raises(ValueError, match="device must be one of"):
        Predictor(model[0], device="gpu")


@pytest.mark.parametrize("spin", [False, True])
def test_thread_settings_reach_the_session(model, spin):
    session, _ = providers.create_session(model[0], "cpu", intra_op_threads=1, spin=spin)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
    with pytest.raises(ValueError, match="intra_op_threads must be >= 1"):
        providers.create_session(model[0], "cpu", intra_op_threads=0)


def test_predictor_cache_shares_reloads_and_evicts(model, tmp_path):
    path = tmp_path / "served" / "model.onnx"
    path.parent.mkdir()
    shutil.copyfile(model[0], path)
    cache = predictor_module.PredictorCache(capacity=2)
    first = cache.get(path, "cpu")
    assert cache.get(path, "cpu") is first and cache.loads == 1
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the file was replaced
    second = cache.get(path, "cpu")
    assert second is not first and cache.loads == 2 and len(cache) == 1
    cache.evict_under(tmp_path / "served")
    assert len(cache) == 0


def test_check_model_file_runs_the_model_in_a_child_process(model, tmp_path):
    good = predictor_module.check_model_file(model[0])
    assert good["ok"] and good["classes"] == list(Predictor(model[0], device="cpu").classes)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01garbage")
    bad = predictor_module.check_model_file(junk)
    assert not bad["ok"] and bad["error"]


def test_default_threads_is_sane():
    assert 1 <= default_threads() <= 8


@pytest.mark.cuda
def test_cuda_predictions_match_cpu(model, predictor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU fallback warning is what tells us to skip
        gpu = Predictor(model[0], device="cuda")
    if gpu.provider == CPU:
        pytest.skip("no usable CUDA GPU")
    images = np.stack([predictor.prepare(photo(i)) for i in range(4)])
    np.testing.assert_allclose(gpu.predict_arrays(images), predictor.predict_arrays(images), atol=1e-3)


def test_import_does_not_load_torch_or_gradio():
    code = ("import sys, core.runtime.predictor; bad = [m for m in ('torch', 'gradio', 'models', 'export') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_standalone_example_runs_without_torch_or_the_project(model, predictor, tmp_path):
    blocker = tmp_path / "blocked"
    for name in ("torch", "models", "core", "export"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} must not be imported here')\n")
    image_file = tmp_path / "photo.jpg"
    photo(7, (150, 110)).save(image_file, quality=95)
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    out = subprocess.run([sys.executable, str(REPO / "export" / "example_predict.py"), str(model[0]),
                          str(image_file)], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    lines = [line.split("\t") for line in out.stdout.strip().splitlines()]
    assert len(lines) == 3
    expected = predictor.predict([image_file])[0]
    assert lines[0][0] == expected["label"]
    assert float(lines[0][1]) == pytest.approx(expected["probability"], abs=1e-4)


def test_onnx_feature_extractor_matches_torch_and_is_cached(lab_cache):
    size = 32
    extractor = OnnxFeatureExtractor(cached_backbone_onnx(BACKBONE, size), device="cpu")
    path = lab_cache / "onnx" / f"{BACKBONE}-{size}.onnx"
    assert extractor.model_path == path and path.exists() and extractor.provider == CPU
    mtime = path.stat().st_mtime_ns
    images = np.stack([np.asarray(resize_and_crop(photo(i), size, 37, "bilinear")) for i in range(3)])
    features = extractor.extract(images)
    backbone = models.get_backbone(BACKBONE, pretrained=True).eval()
    spec = backbone.spec
    with torch.inference_mode():
        expected = backbone(ImagePreprocess(spec.mean, spec.std)(torch.from_numpy(images))).numpy()
    assert features.shape == (3, spec.feature_dim) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, atol=1e-3 * max(1.0, float(np.abs(expected).max())))
    again = OnnxFeatureExtractor(cached_backbone_onnx(BACKBONE, size), device="cpu")
    assert again.model_path == path and path.stat().st_mtime_ns == mtime
    with pytest.raises(ModelFormatError, match="feature extractor"):
        Predictor(path, device="cpu")


def test_auto_skips_gpu_providers_when_no_gpu_is_visible():
    from core.runtime.providers import usable_providers

    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert usable_providers(listed, "auto", gpu_visible=False) == ["CPUExecutionProvider"]
    assert usable_providers(listed, "auto", gpu_visible=True) == listed
    # An explicit request still tries CUDA, so its failure is reported loudly.
    assert usable_providers(listed, "cuda", gpu_visible=False) == listed
