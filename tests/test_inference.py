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
from core.runtime.devices import CPU, CUDA, TENSORRT
from core.runtime.images import resize_and_crop
from core.runtime.predictor import OnnxFeatureExtractor, Predictor
from core.runtime.providers import default_threads
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


@pytest.fixture
def gpu_machine(monkeypatch) -> list[list]:
    """What create_session sees on a machine with a GPU and onnxruntime-gpu built with TensorRT. The providers it
    asks onnxruntime for are recorded; the session itself opens on the CPU (this build cannot run CUDA here), so
    each test also sees what Predictor reports when the GPU did not start."""
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    monkeypatch.setattr(providers, "nvidia_gpu_visible", lambda: True)
    monkeypatch.setattr(providers, "preload_gpu_libraries", lambda: None)
    monkeypatch.delenv("TRANSFER_LAB_TENSORRT", raising=False)
    requested: list[list] = []
    open_session = providers.open_session

    def recording_open(path, provider_list, options=None):
        requested.append(list(provider_list))
        return open_session(path, [CPU], options)

    monkeypatch.setattr(providers, "open_session", recording_open)
    return requested


def test_cpu_device_never_asks_for_a_gpu_provider(model, gpu_machine, monkeypatch):
    monkeypatch.setenv("TRANSFER_LAB_TENSORRT", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # running on the CPU is what was asked for: no fallback warning
        predictor = Predictor(model[0], device="cpu")
    assert gpu_machine == [[CPU]]
    assert predictor.provider == CPU and predictor.fallback_warning is None


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_gpu_machine_asks_for_cuda_then_cpu_and_says_when_the_cpu_runs(model, gpu_machine, device):
    with pytest.warns(RuntimeWarning, match="running on the CPU"):
        predictor = Predictor(model[0], device=device)
    assert gpu_machine == [[CUDA, CPU]]  # TensorRT is not tried without the opt-in (engines take minutes)
    assert predictor.provider == CPU and "running on the CPU" in predictor.fallback_warning
    assert predictor.predict([photo(0)])[0]["provider"] == CPU


def test_tensorrt_is_tried_first_only_when_opted_in_with_its_engines_in_the_lab_cache(model, gpu_machine,
                                                                                       monkeypatch, lab_cache):
    for value, with_tensorrt in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("TRANSFER_LAB_TENSORRT", value)
        gpu_machine.clear()
        with pytest.warns(RuntimeWarning, match="running on the CPU"):
            Predictor(model[0], device="auto")
        (asked,) = gpu_machine
        if not with_tensorrt:
            assert asked == [CUDA, CPU], value
            continue
        (name, options), *rest = asked
        assert name == TENSORRT and rest == [CUDA, CPU], value
        assert options["trt_engine_cache_enable"] and Path(options["trt_engine_cache_path"]).parent == lab_cache


def test_providers_this_project_does_not_use_are_not_asked_for(model, monkeypatch):
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: ["CoreMLExecutionProvider", CPU])
    requested = []
    open_session = providers.open_session
    monkeypatch.setattr(providers, "open_session",
                        lambda path, provider_list, options=None: requested.append(list(provider_list))
                        or open_session(path, provider_list, options))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CUDA here, so running on the CPU is no fallback
        predictor = Predictor(model[0], device="auto")
    assert requested == [[CPU]] and predictor.provider == CPU


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


def cpuinfo(sockets: int, cores: int, threads: int) -> str:
    """/proc/cpuinfo as x86 Linux writes it: one block per logical CPU (hyperthreads are listed after all cores)."""
    blocks, n = [], 0
    for _ in range(threads):
        for socket in range(sockets):
            for core in range(cores):
                blocks.append(f"processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\n"
                              f"physical id\t: {socket}\nsiblings\t: {cores * threads}\ncore id\t\t: {core}\n"
                              f"cpu cores\t: {cores}\nflags\t\t: fpu sse avx2\n")
                n += 1
    return "\n".join(blocks)


ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
CPU implementer\t: 0x41
CPU part\t: 0xd0c

processor\t: 1
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


def test_physical_cores_counts_cores_not_hyperthreads():
    two_by_two = cpuinfo(sockets=2, cores=2, threads=2)
    assert two_by_two.count("processor") == 8
    assert providers.physical_cores(two_by_two, 8) == 4  # core ids repeat per socket: (socket, core) pairs
    assert providers.physical_cores(two_by_two, 3) == 3  # an affinity smaller than the cores
    assert providers.physical_cores(cpuinfo(sockets=1, cores=6, threads=1), 6) == 6
    assert providers.physical_cores(ARM_CPUINFO, 2) == 2  # no core ids: every logical CPU counts
    assert providers.physical_cores("", 5) == 5


@pytest.mark.parametrize(("affinity", "text", "expected"), [
    (range(8), cpuinfo(2, 2, 2), 4),  # 2 sockets x 2 cores with hyperthreading: the 4 cores
    (range(2), cpuinfo(2, 2, 2), 2),  # taskset / a container limited to 2 CPUs
    (range(64), cpuinfo(2, 16, 2), 8),  # 32 cores: capped, more threads rarely help a small CNN
    (range(2), ARM_CPUINFO, 2),
    (range(3), None, 3),  # no /proc/cpuinfo: the CPUs this process may use
])
def test_default_threads_uses_the_allowed_physical_cores(tmp_path, monkeypatch, affinity, text, expected):
    path = tmp_path / "cpuinfo"
    if text is not None:
        path.write_text(text)
    monkeypatch.setattr(providers, "CPUINFO", str(path))
    monkeypatch.setattr(providers.os, "sched_getaffinity", lambda pid: set(affinity), raising=False)
    assert default_threads() == expected


def test_default_threads_without_sched_getaffinity(tmp_path, monkeypatch):
    monkeypatch.setattr(providers, "CPUINFO", str(tmp_path / "missing"))
    monkeypatch.delattr(providers.os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(providers.os, "cpu_count", lambda: 6)
    assert default_threads() == 6
    monkeypatch.setattr(providers.os, "cpu_count", lambda: None)  # unknown
    assert default_threads() == 1


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
