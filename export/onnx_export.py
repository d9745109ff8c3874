"""Export classifiers (and pretrained backbones) to self-describing ONNX files, atomically and verified.

The graph takes uint8 RGB ``[N, H, W, 3]`` (input ``image``) and holds the normalisation, so a consumer only
decodes, resizes the shorter side and centre-crops (the rule is written into the metadata).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

import models
from core.atomic import atomic_write, write_json_atomic  # noqa: F401  (re-exported)
from core.data import cache_dir
from core.inference import FEATURES_OUTPUT, FORMAT, INPUT_NAME, OUTPUT_NAMES, ModelFormatError, read_model_info
from export.verify import ParityError, check_parity, compare_outputs, cpu_session, run_onnx, torch_outputs
from models.preprocess import ImageClassifier, ImagePreprocess

TRAINING_MODES = ("pretrained", "scratch")
DEFAULT_OPSET = 18
PARITY_RANDOM_IMAGES = 4
PARITY_MAX_IMAGES = 1000  # the whole validation split of any dataset this tool is meant for


class ExportError(RuntimeError):
    """The model could not be exported; nothing at the target path was changed."""


def project_version() -> str:
    try:
        from core import __version__
    except ImportError:
        return "0.1.0"
    return str(__version__)


def resize_rule(image_size: int, resize_size: int, interpolation: str) -> str:
    return (f"resize shorter side to {resize_size} with {interpolation}, centre-crop {image_size}, "
            "RGB uint8 NHWC")


def model_metadata(spec: models.BackboneSpec, *, image_size: int, kind: str, classes: list[str] | None = None,
                   training_mode: str | None = None, metrics: dict | None = None) -> dict[str, str]:
    """The ``metadata_props`` every transfer-lab ONNX file carries (all values are strings)."""
    resize_size = spec.resize_for(image_size)
    meta = {
        "format": FORMAT,
        "kind": kind,
        "image_size": str(image_size),
        "resize_size": str(resize_size),
        "interpolation": spec.interpolation,
        "resize_rule": resize_rule(image_size, resize_size, spec.interpolation),
        "backbone": spec.name,
        "variant": "fp32",
        "project_version": project_version(),
    }
    if kind == "classifier":
        meta["classes"] = json.dumps(list(classes or []))
        meta["training_mode"] = str(training_mode)
        meta["metrics"] = json.dumps(metrics or {}, default=float)
    else:
        meta["feature_dim"] = str(spec.feature_dim)
    return meta


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Replace ``metadata_props`` entries with ``meta`` (other entries are kept)."""
    kept = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """All ``metadata_props`` of an ONNX file (no validation)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


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
    set_metadata(proto, meta)
    proto.producer_name = "transfer-lab"
    proto.producer_version = meta["project_version"]
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _parity_images(image_size: int, extra: np.ndarray | None) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (PARITY_RANDOM_IMAGES, image_size, image_size, 3), dtype=np.uint8)
    if extra is not None and len(extra):
        extra = np.asarray(extra)
        if extra.dtype != np.uint8 or extra.shape[1:] != (image_size, image_size, 3):
            raise ValueError(f"parity images must be uint8 [N, {image_size}, {image_size}, 3], got "
                             f"{extra.dtype} {extra.shape}.")
        images = np.concatenate([extra[:PARITY_MAX_IMAGES], images])
    return images


def _cpu_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to("cpu", torch.float32).eval()


def export_classifier_report(classifier: models.Classifier, path: str | os.PathLike[str], *, image_size: int,
                             classes: list[str], training_mode: str, metrics: dict | None = None,
                             opset: int = DEFAULT_OPSET, parity_images: np.ndarray | None = None,
                             atol: float = 1e-4) -> dict[str, Any]:
    """``export_classifier`` that also returns the parity report: {"path", "parity", "metadata"}."""
    if training_mode not in TRAINING_MODES:
        raise ValueError(f"training_mode must be one of {TRAINING_MODES}, got {training_mode!r}.")
    classes = [str(c) for c in classes]
    num_classes = classifier.head[-1].out_features
    if len(classes) != num_classes:
        raise ValueError(f"got {len(classes)} class names for a classifier with {num_classes} outputs; "
                         "pass the class names in the training order.")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}.")
    reference = _cpu_copy(classifier)
    module = ImageClassifier(reference).eval()
    meta = model_metadata(classifier.spec, image_size=image_size, kind="classifier", classes=classes,
                          training_mode=training_mode, metrics=metrics)
    images = _parity_images(image_size, parity_images)

    def produce(tmp: Path) -> dict[str, Any]:
        _save_and_check(_export_proto(module, image_size, list(OUTPUT_NAMES), opset), meta, tmp)
        parity = check_parity(tmp, module, images, atol=atol)
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


def export_classifier(classifier: models.Classifier, path: str | os.PathLike[str], *, image_size: int,
                      classes: list[str], training_mode: str, metrics: dict | None = None,
                      opset: int = DEFAULT_OPSET) -> Path:
    """Export ``classifier`` as uint8 ``image`` [N, S, S, 3] -> ``logits``, ``probabilities``; return the path.

    The file is written atomically after ``onnx.checker`` (full check) and a parity check against PyTorch;
    on any failure (``ExportError``, ``ParityError``, checker errors) an existing file at ``path`` is untouched.
    """
    return export_classifier_report(classifier, path, image_size=image_size, classes=classes,
                                    training_mode=training_mode, metrics=metrics, opset=opset)["path"]


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
        report = compare_outputs(expected, actual, atol=atol * scale, provider="CPUExecutionProvider",
                                 classify=False)
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


# ---------------------------------------------------------------- training runs


def model_filename(training_mode: str) -> str:
    """``model.onnx`` for the pretrained arm (the one to deploy), ``model-scratch.onnx`` for scratch."""
    if training_mode not in TRAINING_MODES:
        raise ValueError(f"training_mode must be one of {TRAINING_MODES}, got {training_mode!r}.")
    return "model.onnx" if training_mode == "pretrained" else "model-scratch.onnx"


def report_key(training_mode: str) -> str:
    """Where a run's ``report.json`` keeps this arm's export section: ``export`` or ``export_scratch``."""
    model_filename(training_mode)
    return "export" if training_mode == "pretrained" else "export_scratch"


def export_run(run_dir: str | os.PathLike[str], classifier: models.Classifier, *, classes: list[str], backbone: str,
               image_size: int, training_mode: str, metrics: dict | None, val_images_uint8: np.ndarray | None,
               val_labels: np.ndarray | list[int] | None, calib_images_uint8: np.ndarray | None,
               tolerance: float = 0.01, variants: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Export one arm of a run to ``run_dir`` (FP32 + accepted variants); return its ``report.json`` section.

    Store the result under ``report[report_key(training_mode)]``. Paths in it are relative to ``run_dir``.
    """
    from export.quantize import build_variants

    if classifier.spec.name != backbone:
        raise ValueError(f"backbone {backbone!r} does not match the classifier's backbone {classifier.spec.name!r}.")
    run_dir = Path(run_dir)
    path = run_dir / model_filename(training_mode)
    result = export_classifier_report(classifier, path, image_size=image_size, classes=classes,
                                      training_mode=training_mode, metrics=metrics, parity_images=val_images_uint8)
    if val_images_uint8 is None:
        val_images_uint8, val_labels = np.zeros((0, image_size, image_size, 3), np.uint8), []
    built = build_variants(path, calib_images_uint8, val_images_uint8, val_labels if val_labels is not None else [],
                           tolerance=tolerance, variants=variants)
    for record in built:
        if record["path"]:
            record["path"] = os.path.relpath(record["path"], run_dir)
    return {
        "training_mode": training_mode,
        "model": path.name,
        "format": FORMAT,
        "opset": DEFAULT_OPSET,
        "backbone": backbone,
        "image_size": image_size,
        "size_bytes": path.stat().st_size,
        "parity": result["parity"],
        "tolerance": tolerance,
        "variants": built,
    }


def load_run_classifier(run_dir: str | os.PathLike[str], training_mode: str = "pretrained"
                        ) -> tuple[models.Classifier, dict[str, Any]]:
    """Rebuild a trained arm of a run from ``report.json`` and ``<arm>.pt``; returns (classifier, report)."""
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found; pass the folder written by `python -m core compare`.")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    weights = run_dir / f"{training_mode}.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: this run has no trained {training_mode!r} arm; "
                                f"pick one of {[m for m in TRAINING_MODES if (run_dir / f'{m}.pt').is_file()]}.")
    try:
        classes = report["dataset"]["classes"]
        backbone = report["backbone"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{report_path} lacks {exc}; it was not written by `python -m core compare`.") from None
    classifier = models.build_classifier(backbone, len(classes), pretrained=False)
    classifier.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return classifier.eval(), report


