"""The CUDA path on a real GPU: training, feature extraction, onnxruntime's CUDA (and opt-in TensorRT) provider,
the FP16 variant and IO binding. Marked ``cuda`` and skipped where PyTorch sees no GPU; ``scripts/gpu_check.sh``
runs them (``pytest -m cuda``) and records what it saw.

Set ``TRANSFER_LAB_CUDA_RUN`` to a run folder that ``python -m core compare --device cuda`` wrote, and these tests
check that run instead of training their own (the GPU check trains once and times the same run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from core.runtime.devices import CUDA, TENSORRT
from core.runtime.predictor import Predictor
from core.runtime.providers import tensorrt_problem

REPO = Path(__file__).resolve().parents[1]
RUN_ENV = "TRANSFER_LAB_CUDA_RUN"

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU that PyTorch can use")]


@pytest.fixture(scope="module")
def cuda_run(_session_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compare run on ``sample:shapes`` trained with ``--device cuda`` (exported, variants included)."""
    given = os.environ.get(RUN_ENV)
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("cuda-run")
    env = {**os.environ, "TRANSFER_LAB_CACHE": str(_session_cache), "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "core", "compare", "--data", "sample:shapes", "--device", "cuda",
                    "--epochs", "4", "--out", str(out)], cwd=REPO, env=env, check=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def val_batch(cuda_run: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation images as the model's uint8 input, and their labels (from its manifest)."""
    from core.data import load_dataset

    report = json.loads((cuda_run / "report.json").read_text())
    dataset = load_dataset(report["dataset"]["source"], seed=report["seed"])
    predictor = Predictor(cuda_run / "model.onnx", device="cpu")
    items = dataset.split("val")
    images = np.stack([predictor.prepare(item.path) for item in items])
    classes = list(predictor.classes)
    return images, np.array([classes.index(dataset.classes[item.label]) for item in items])


def _quiet_predictor(path: Path, **kwargs) -> Predictor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tests below assert on fallback_warning themselves
        return Predictor(path, **kwargs)


def test_compare_trains_both_arms_on_cuda(cuda_run):
    report = json.loads((cuda_run / "report.json").read_text())
    assert report["device"] == "cuda"
    pretrained, scratch = report["runs"]["pretrained"], report["runs"]["scratch"]
    assert pretrained["device"] == "cuda" and pretrained["feature_engine"] == "torch-cuda", pretrained
    assert scratch["device"] == "cuda" and scratch["amp"] in ("bfloat16", "float16"), scratch
    assert pretrained["val_accuracy"] >= 0.8  # a frozen ImageNet backbone separates the sample's shapes easily


def test_cuda_features_agree_with_cpu_features():
    from core.features import make_feature_extractor
    from models import DEFAULT_BACKBONE

    images = np.random.default_rng(0).integers(0, 256, (16, 160, 160, 3), dtype=np.uint8)
    cpu = make_feature_extractor(DEFAULT_BACKBONE, 160, torch.device("cpu"), engine="torch").extract(images)
    gpu_engine = make_feature_extractor(DEFAULT_BACKBONE, 160, torch.device("cuda"), engine="torch")
    assert gpu_engine.engine == "torch-cuda"
    gpu = gpu_engine.extract(images)
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    cosine = (cpu * gpu).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
    assert cosine.min() > 0.999, cosine  # FP16 autocast on the GPU, FP32 on the CPU
    assert np.abs(gpu - cpu).max() <= 0.05 * np.abs(cpu).max()


def test_exported_model_runs_on_the_cuda_provider_and_matches_cpu(cuda_run, val_batch):
    images, _ = val_batch
    gpu = _quiet_predictor(cuda_run / "model.onnx", device="cuda")
    assert gpu.provider == CUDA, gpu.fallback_warning
    assert gpu.fallback_warning is None
    cpu = Predictor(cuda_run / "model.onnx", device="cpu")
    on_gpu, on_cpu = gpu.predict_arrays(images), cpu.predict_arrays(images)
    # onnxruntime's CUDA provider runs FP32 convolutions and matrix products in TF32 on Ampere and later (its
    # default, use_tf32=1): probabilities differ from the CPU's in the third decimal, the predicted class does not.
    np.testing.assert_allclose(on_gpu, on_cpu, atol=5e-3)
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).all()
    assert gpu.predict([images[0]])[0]["provider"] == CUDA


def test_io_binding_returns_the_same_probabilities(cuda_run, val_batch):
    images, _ = val_batch
    bound = _quiet_predictor(cuda_run / "model.onnx", device="cuda", io_binding=True)
    plain = _quiet_predictor(cuda_run / "model.onnx", device="cuda", io_binding=False)
    assert bound.provider == plain.provider == CUDA
    np.testing.assert_allclose(bound.predict_arrays(images), plain.predict_arrays(images), atol=1e-5)


def test_fp16_variant_is_built_checked_on_cuda_and_judged(cuda_run, val_batch, tmp_path):
    from export.variants import build_variants, cuda_usable

    assert cuda_usable()
    images, labels = val_batch
    model = tmp_path / "model.onnx"
    model.write_bytes((cuda_run / "model.onnx").read_bytes())
    (record,) = build_variants(model, None, images, labels, variants=["fp16"])
    assert not record["reason"].startswith("not built"), record["reason"]  # built and run, then judged
    assert record["accuracy"] is not None and "drop" in record["reason"]
    if record["accepted"]:
        fp16 = _quiet_predictor(Path(record["path"]), device="cuda")
        assert fp16.provider == CUDA
        fp32 = Predictor(model, device="cpu")
        agreement = np.mean(fp16.predict_arrays(images).argmax(1) == fp32.predict_arrays(images).argmax(1))
        assert agreement >= 0.95
    else:
        assert record["path"] is None and "allowed; deleted" in record["reason"]


def test_tensorrt_builds_and_caches_an_engine_or_says_why(cuda_run, val_batch, lab_cache):
    images, _ = val_batch
    problem = tensorrt_problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trt = Predictor(cuda_run / "model.onnx", device="cuda", tensorrt=True)
    if problem is not None:
        assert trt.provider == CUDA  # it falls back to CUDA, and says why
        assert problem in trt.fallback_warning and any(problem in str(w.message) for w in caught)
        pytest.skip(f"TensorRT cannot run here: {problem}")
    assert trt.provider == TENSORRT, trt.fallback_warning
    cpu = Predictor(cuda_run / "model.onnx", device="cpu")
    np.testing.assert_allclose(trt.predict_arrays(images), cpu.predict_arrays(images), atol=1e-2)
    assert any((lab_cache / "tensorrt").iterdir()), "no TensorRT engine was cached"
