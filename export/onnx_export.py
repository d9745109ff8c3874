"""Export classifiers (and pretrained backbones) to self-describing ONNX files, atomically and verified.

The graph takes uint8 RGB ``[N, H, W, 3]`` (input ``image``) and holds the normalisation, so a consumer only
decodes, resizes the shorter side and centre-crops (the rule is written into the metadata).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

import models
from core.runtime.contract import (
    CAM_OUTPUT,
    EXPLAIN_OUTPUTS,
    FEATURES_OUTPUT,
    INPUT_NAME,
    OOD_OUTPUT,
    OUTPUT_NAMES,
    ModelFormatError,
    model_metadata,
    set_metadata,
)
from core.runtime.devices import CPU
from core.runtime.files import atomic_write, cache_dir
from core.runtime.images import check_batch
from core.runtime.predictor import read_model_info
from export.errors import ExportError, ParityError
from export.flops import count_flops
from export.verify import (
    check_explain_parity,
    check_parity,
    compare_outputs,
    cpu_session,
    run_onnx,
    run_onnx_outputs,
    torch_outputs,
)
from models.explain import ExplainedClassifier, OodCalibration
from models.preprocess import ImageClassifier, ImagePreprocess

TRAINING_MODES = ("pretrained", "scratch")
DEFAULT_OPSET = 18
PARITY_RANDOM_IMAGES = 4
PARITY_MAX_IMAGES = 1000  # the whole validation split of any dataset this tool is meant for


def _export_proto(module: nn.Module, image_size: int, output_names: list[str], opset: int) -> onnx.ModelProto:
    example = torch.randint(0, 256, (2, image_size, image_size, 3), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(
            module, (example,), dynamo=True, external_data=False, opset_version=opset, verbose=False,
            input_names=[INPUT_NAME], output_names=output_names, dynamic_shapes=({0: batch},),
        )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {type(module).__name__}: {exc}") from exc
    return program.model_proto


def _save_and_check(proto: onnx.ModelProto, meta: dict[str, str], path: Path) -> None:
    meta["flops"] = str(count_flops(proto))  # per image, for the benchmark's GFLOP/s (export.flops)
    set_metadata(proto, meta)
    proto.producer_name = "transfer-lab"
    proto.producer_version = meta["project_version"]
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _parity_images(image_size: int, extra: np.ndarray | None) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (PARITY_RANDOM_IMAGES, image_size, image_size, 3), dtype=np.uint8)
    if extra is not None and len(extra):
        extra = check_batch(extra[:PARITY_MAX_IMAGES], image_size, what="parity images")  # slice first: no copy of all
        images = np.concatenate([extra, images])
    return images


def _cpu_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to("cpu", torch.float32).eval()


def _classifier_metadata(classifier: models.Classifier, image_size: int, classes: list[str], training_mode: str,
                         metrics: dict | None, explain: OodCalibration | None) -> dict[str, str]:
    """An exported classifier's metadata (``core.runtime.contract.model_metadata``), once its class names are checked
    against its outputs."""
    classes = [str(c) for c in classes]
    num_classes = classifier.head[-1].out_features
    if len(classes) != num_classes:
        raise ValueError(f"got {len(classes)} class names for a classifier with {num_classes} outputs; "
                         "pass the class names in the training order.")
    return model_metadata(classifier.spec, image_size=image_size, kind="classifier", classes=classes,
                          training_mode=training_mode, metrics=metrics,
                          ood_threshold=explain.threshold if explain is not None else None,
                          ood_quantile=explain.quantile if explain is not None else None)


def export_classifier(classifier: models.Classifier, path: str | os.PathLike[str], *, image_size: int,
                      classes: list[str], training_mode: str, metrics: dict | None = None,
                      opset: int = DEFAULT_OPSET, parity_images: np.ndarray | None = None,
                      atol: float = 1e-4, explain: OodCalibration | None = None) -> dict[str, Any]:
    """Export ``classifier`` as uint8 ``image`` [N, S, S, 3] -> ``logits``, ``probabilities``; with ``explain``
    (the centroids and threshold of ``models.explain.calibrate_ood``) also ``cam`` and ``ood_score``
    (``core.runtime.contract``). Without it the graph is the plain classifier's.

    The file is written atomically after ``onnx.checker`` (full check) and a parity check against PyTorch on
    ``parity_images`` (and a few random images), of every output; on any failure (``ExportError``, ``ParityError``,
    checker errors) an existing file at ``path`` is untouched. Returns ``{"path", "parity", "metadata"}``.
    """
    if training_mode not in TRAINING_MODES:
        raise ValueError(f"training_mode must be one of {TRAINING_MODES}, got {training_mode!r}.")
    meta = _classifier_metadata(classifier, image_size, classes, training_mode, metrics, explain)
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}.")
    reference = _cpu_copy(classifier)
    module = (ImageClassifier(reference) if explain is None else ExplainedClassifier(reference, explain)).eval()
    outputs = [*OUTPUT_NAMES, *(EXPLAIN_OUTPUTS if explain is not None else ())]
    images = _parity_images(image_size, parity_images)

    def produce(tmp: Path) -> dict[str, Any]:
        _save_and_check(_export_proto(module, image_size, outputs, opset), meta, tmp)
        parity = check_parity(tmp, module, images, atol=atol)
        if explain is not None and parity["passed"]:
            parity["explain"] = check_explain_parity(tmp, module, images)
            parity["passed"] = parity["explain"]["passed"]
        if not parity["passed"] and "explain" in parity:
            e = parity["explain"]
            raise ParityError(
                f"the exported class activation maps or out-of-distribution scores disagree with PyTorch: max "
                f"|map difference| {e['max_abs_diff_cam']:.3g} (maps up to {e['max_abs_cam']:.3g}), max |score "
                f"difference| {e['max_abs_diff_ood_score']:.3g} on {e['n_images']} images. The file was not written; "
                "report this with the backbone name and torch/onnxruntime versions.", parity)
        if not parity["passed"]:
            raise ParityError(
                f"the exported graph disagrees with PyTorch: max |probability difference| "
                f"{parity['max_abs_diff_probabilities']:.3g} (allowed {atol:g}), top-1 agreement "
                f"{parity['top1_agreement']:.3f} on {parity['n_images']} images. The file was not written; "
                "report this with the backbone name and torch/onnxruntime versions.", parity)
        read_model_info(tmp)  # the file must load the way Predictor loads it
        return parity

    parity = atomic_write(path, produce)
    return {"path": Path(path), "parity": parity, "metadata": meta}


def compose_classifier(classifier: models.Classifier, path: str | os.PathLike[str], *, image_size: int,
                       classes: list[str], features: np.ndarray, images: np.ndarray, metrics: dict | None = None,
                       atol: float = 1e-4, explain: OodCalibration | None = None) -> dict[str, Any]:
    """``export_classifier``'s file for a frozen-backbone classifier, composed instead of traced: the cached backbone
    graph (``cached_backbone_onnx``) with ``classifier``'s head appended (``export.compose``). Same inputs, outputs,
    metadata and opset; written atomically only once it passed its checks.

    Parity is checked on ``images`` (prepared uint8, at most ``PARITY_MAX_IMAGES`` are used) against the torch head
    applied to ``features``, the pooled features the training computed for those images with the same backbone graph:
    the probabilities within ``atol`` and the same top-1 class, and with ``explain``, ``ood_score`` against
    ``models.explain.ood_scores`` and each class map's spatial mean against its logit less the bias (the identity
    that makes it the class's activation map). The backbone graph itself was checked against PyTorch when it was
    cached. Returns ``{"path", "parity", "metadata"}``; ``parity["method"]`` is ``"composed"``.
    """
    from export.compose import compose_classifier_proto
    from models.explain import ood_scores

    if classifier.trainable_blocks != 0:
        raise ValueError("only a classifier whose backbone is frozen (trained on the cached features) can be composed "
                         "from the cached backbone graph; export it with export_classifier.")
    meta = _classifier_metadata(classifier, image_size, classes, "pretrained", metrics, explain)
    n = min(len(images), PARITY_MAX_IMAGES)
    if n == 0 or len(features) < n:
        raise ValueError(f"composing needs the validation images and their features (got {len(images)} images and "
                         f"{len(features)} feature rows).")
    images = check_batch(images[:n], image_size, what="parity images")
    linear = classifier.head[-1]
    weight = linear.weight.detach().cpu().float().numpy()
    bias = linear.bias.detach().cpu().float().numpy()
    centroids = explain.centroids.cpu().numpy() if explain is not None else None
    with torch.inference_mode():  # the reference: the torch head (dropout off) on the training's features
        feats = torch.as_tensor(np.asarray(features[:n]), dtype=torch.float32)
        expected = torch.softmax(_cpu_copy(classifier.head)(feats), dim=1).numpy()
        expected_ood = ood_scores(feats, explain.centroids.cpu().float()).numpy() if explain is not None else None
    backbone = cached_backbone_onnx(classifier.spec.name, image_size)

    def produce(tmp: Path) -> dict[str, Any]:
        proto = compose_classifier_proto(backbone, weight, bias, centroids=centroids)
        _save_and_check(proto, meta, tmp)
        session = cpu_session(tmp)
        got = run_onnx_outputs(session, images, [*OUTPUT_NAMES, *(EXPLAIN_OUTPUTS if explain is not None else ())])
        parity = compare_outputs(expected, got[OUTPUT_NAMES[1]], atol=atol, provider=session.get_providers()[0])
        parity["method"] = "composed"
        parity["reference"] = "the torch head on the features the training computed with the cached backbone graph"
        if not parity["passed"]:
            raise ParityError(
                f"the composed graph disagrees with the torch head on the cached features: max |probability "
                f"difference| {parity['max_abs_diff_probabilities']:.3g} (allowed {atol:g}), top-1 agreement "
                f"{parity['top1_agreement']:.3f} on {n} images. The file was not written.", parity)
        if explain is not None:
            cam_means = got[CAM_OUTPUT].mean(axis=(2, 3)) + bias
            scale = max(1.0, float(np.abs(got[OUTPUT_NAMES[0]]).max()))
            cam_diff = float(np.max(np.abs(cam_means - got[OUTPUT_NAMES[0]])))
            ood_diff = float(np.max(np.abs(got[OOD_OUTPUT] - expected_ood)))
            parity["explain"] = {"max_abs_diff_cam_mean_logit": cam_diff, "max_abs_logit": scale,
                                 "max_abs_diff_ood_score": ood_diff, "n_images": n,
                                 "passed": cam_diff <= atol * scale and ood_diff <= atol * 10}
            if not parity["explain"]["passed"]:
                raise ParityError(
                    f"the composed class activation maps or out-of-distribution scores are off: max |map mean - "
                    f"logit| {cam_diff:.3g} (logits up to {scale:.3g}), max |score difference| {ood_diff:.3g} on {n} "
                    "images. The file was not written.", parity)
        read_model_info(tmp)  # the file must load the way Predictor loads it
        return parity

    parity = atomic_write(path, produce)
    return {"path": Path(path), "parity": parity, "metadata": meta}


def export_backbone(backbone_name: str, image_size: int, path: str | os.PathLike[str], *,
                    opset: int = DEFAULT_OPSET, atol: float = 1e-3) -> Path:
    """Export a pretrained backbone as uint8 ``image`` [N, S, S, 3] -> ``features`` [N, feature_dim]."""
    backbone = models.get_backbone(backbone_name, pretrained=True)
    spec = backbone.spec
    module = nn.Sequential(ImagePreprocess(spec.mean, spec.std), backbone).eval()
    meta = model_metadata(spec, image_size=image_size, kind="features")
    images = _parity_images(image_size, None)

    def produce(tmp: Path) -> None:
        _save_and_check(_export_proto(module, image_size, [FEATURES_OUTPUT], opset), meta, tmp)
        expected = torch_outputs(module, images)
        actual = run_onnx(cpu_session(tmp), images, output=FEATURES_OUTPUT)
        scale = max(1.0, float(np.abs(expected).max()))
        report = compare_outputs(expected, actual, atol=atol * scale, provider=CPU, classify=False)
        if not report["passed"]:
            raise ParityError(f"exported {backbone_name} features differ from PyTorch by {report['max_abs_diff']:.3g} "
                              f"(allowed {atol * scale:.3g}).", report)

    atomic_write(path, produce)
    return Path(path)


def cached_backbone_onnx(backbone_name: str, image_size: int) -> Path:
    """The backbone's feature graph under ``<cache>/onnx/<backbone>-<size>.onnx``, exported on first use."""
    models.get_backbone_spec(backbone_name)  # unknown names fail here, with suggestions
    path = cache_dir() / "onnx" / f"{backbone_name}-{image_size}.onnx"
    if path.exists():
        try:
            info = read_model_info(path)
            if info.kind == "features" and info.backbone == backbone_name and info.image_size == image_size:
                return path
        except (ModelFormatError, OSError):
            pass  # a stale or damaged cache entry is rebuilt below
    return export_backbone(backbone_name, image_size, path)
