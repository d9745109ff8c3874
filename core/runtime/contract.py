"""The ONNX contract: what every exported ``.onnx`` file of this project is, and the metadata it carries.

Graph input ``image``: uint8 RGB ``[N, H, W, 3]``, already resized and centre-cropped by the rule written in the
metadata (``core.runtime.images``). Outputs: ``logits`` and ``probabilities`` for a classifier, ``features`` for a
backbone. A classifier exported with ``explain`` has two more (``EXPLAIN_OUTPUTS``): ``cam`` ``[N, K, h, w]``, a class
activation map per class whose spatial mean is that class's logit less the head's bias, and ``ood_score`` ``[N]``,
how unlike every class the image is, with the threshold above which it fits no class in ``ood_threshold``.
``metadata_props`` (all strings): ``format``, ``kind``, ``image_size``, ``resize_size``, ``interpolation``,
``resize_rule``, ``backbone``, ``variant``, ``project_version``, and ``classes``/``training_mode``/``metrics``
(+ ``outputs``, ``ood_threshold``, ``ood_rule`` when explained) or ``feature_dim``. Written by ``model_metadata`` +
``set_metadata``, read back by ``parse_metadata``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import __version__
from core.runtime.errors import UserError

FORMAT = "transfer-lab/1"
FORMAT_PREFIX = "transfer-lab/"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")
FEATURES_OUTPUT = "features"
CAM_OUTPUT = "cam"
OOD_OUTPUT = "ood_score"
EXPLAIN_OUTPUTS = (CAM_OUTPUT, OOD_OUTPUT)
OOD_RULE = ("1 - the largest cosine similarity between the image's pooled features and the class centroids of the "
            "training images; above ood_threshold (the {quantile:g} quantile of the validation images' scores) the "
            "image looks unlike anything the model was trained on")
INTERPOLATIONS = ("bilinear", "bicubic")

EXPORT_HINT = "Export a trained run with `python -m export onnx --run RUN_DIR`."
_REQUIRED_KEYS = ("format", "image_size", "resize_size", "interpolation")


class ModelFormatError(UserError, ValueError):
    """The file is not a usable transfer-lab ONNX model; the message says what was expected."""


@dataclass(frozen=True)
class ModelInfo:
    """What an exported model's metadata says about itself."""

    path: Path
    kind: str  # "classifier" | "features"
    image_size: int
    resize_size: int
    interpolation: str
    classes: tuple[str, ...] = ()
    backbone: str = ""
    training_mode: str = ""
    variant: str = "fp32"
    metrics: dict[str, Any] = field(default_factory=dict)
    project_version: str = ""
    format: str = FORMAT
    resize_rule: str = ""
    feature_dim: int | None = None
    outputs: tuple[str, ...] = OUTPUT_NAMES  # the classifier's outputs; EXPLAIN_OUTPUTS too when exported with them
    ood_threshold: float | None = None
    flops: int | None = None  # per image (export.flops); None in files exported before it was recorded
    check: dict[str, Any] = field(default_factory=dict)  # a variant's accuracy check against FP32 (export.variants)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def explains(self) -> bool:
        """The model also outputs class activation maps and an out-of-distribution score (with its threshold)."""
        return all(name in self.outputs for name in EXPLAIN_OUTPUTS) and self.ood_threshold is not None


# ---------------------------------------------------------------- metadata


def bad_model(path: Path, problem: str) -> ModelFormatError:
    return ModelFormatError(f"{path}: {problem}")


def _int_key(meta: Mapping[str, str], key: str, path: Path) -> int:
    try:
        value = int(meta[key])
    except (KeyError, ValueError):
        got = meta.get(key)
        raise bad_model(path, f"metadata {key!r} must be a positive integer, got {got!r}. {EXPORT_HINT}") from None
    if value <= 0:
        raise bad_model(path, f"metadata {key!r} must be a positive integer, got {value}. {EXPORT_HINT}")
    return value


def parse_metadata(meta: Mapping[str, str], path: str | os.PathLike[str]) -> ModelInfo:
    """Validate an exported model's ``metadata_props`` and return them typed; raise ``ModelFormatError``."""
    path = Path(path)
    fmt = meta.get("format")
    if fmt is None:
        raise bad_model(
            path,
            "this ONNX model was not exported by transfer-lab: its metadata has no 'format' entry "
            f"(expected {FORMAT!r} with 'classes', 'image_size', 'resize_size' and 'interpolation'). {EXPORT_HINT}",
        )
    if not fmt.startswith(FORMAT_PREFIX):
        raise bad_model(path, f"metadata 'format' is {fmt!r}, expected {FORMAT!r}. {EXPORT_HINT}")
    if fmt != FORMAT:
        raise bad_model(path, f"model format {fmt!r} is not supported by this version (reads {FORMAT!r}); "
                         "upgrade transfer-lab or re-export the model with this version.")
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise bad_model(path, f"metadata is missing {', '.join(map(repr, missing))}. {EXPORT_HINT}")
    image_size = _int_key(meta, "image_size", path)
    resize_size = _int_key(meta, "resize_size", path)
    if resize_size < image_size:
        raise bad_model(path, f"metadata 'resize_size' ({resize_size}) is smaller than 'image_size' ({image_size}).")
    interpolation = meta["interpolation"]
    if interpolation not in INTERPOLATIONS:
        raise bad_model(path, f"metadata 'interpolation' must be one of {INTERPOLATIONS}, got {interpolation!r}.")
    kind = meta.get("kind", "classifier")
    classes: tuple[str, ...] = ()
    if kind == "classifier":
        try:
            parsed = json.loads(meta["classes"])
        except (KeyError, ValueError, RecursionError):  # RecursionError: JSON nested thousands of levels deep
            raise bad_model(path, "metadata 'classes' must be a JSON list of class names, got "
                                  f"{meta.get('classes')!r}. {EXPORT_HINT}") from None
        if not isinstance(parsed, list) or len(parsed) < 2 or not all(isinstance(c, str) for c in parsed):
            raise bad_model(path, f"metadata 'classes' must list at least two class names, got {parsed!r}.")
        classes = tuple(parsed)
    elif kind != "features":
        raise bad_model(path, f"metadata 'kind' must be 'classifier' or 'features', got {kind!r}.")
    try:
        metrics = json.loads(meta.get("metrics") or "{}")
    except (ValueError, RecursionError):
        metrics = {}
    feature_dim = int(meta["feature_dim"]) if meta.get("feature_dim", "").isdigit() else None
    flops = int(meta["flops"]) if meta.get("flops", "").isdigit() else None
    try:
        check = json.loads(meta.get("check") or "{}")
    except (ValueError, RecursionError):
        check = {}
    outputs, ood_threshold = OUTPUT_NAMES, None
    if kind == "classifier" and "outputs" in meta:
        try:
            listed = json.loads(meta["outputs"])
            outputs = tuple(listed)
            if not set(OUTPUT_NAMES) <= set(outputs) or not all(isinstance(o, str) for o in outputs):
                raise ValueError
        except (ValueError, TypeError, RecursionError):
            raise bad_model(path, f"metadata 'outputs' must be a JSON list of output names including "
                                  f"{list(OUTPUT_NAMES)}, got {meta['outputs']!r}. {EXPORT_HINT}") from None
    if OOD_OUTPUT in outputs:
        try:
            ood_threshold = float(meta["ood_threshold"])
            if not math.isfinite(ood_threshold):
                raise ValueError
        except (KeyError, ValueError):
            raise bad_model(path, "a model with an 'ood_score' output needs a finite number in metadata "
                                  f"'ood_threshold', got {meta.get('ood_threshold')!r}. {EXPORT_HINT}") from None
    return ModelInfo(
        path=path,
        kind=kind,
        image_size=image_size,
        resize_size=resize_size,
        interpolation=interpolation,
        classes=classes,
        backbone=meta.get("backbone", ""),
        training_mode=meta.get("training_mode", ""),
        variant=meta.get("variant", "fp32"),
        metrics=metrics if isinstance(metrics, dict) else {},
        project_version=meta.get("project_version", ""),
        format=fmt,
        resize_rule=meta.get("resize_rule", ""),
        feature_dim=feature_dim,
        outputs=outputs,
        ood_threshold=ood_threshold,
        flops=flops,
        check=check if isinstance(check, dict) else {},
    )




def resize_rule(image_size: int, resize_size: int, interpolation: str) -> str:
    return (f"resize shorter side to {resize_size} with {interpolation}, centre-crop {image_size}, "
            "RGB uint8 NHWC")


def model_metadata(spec: Any, *, image_size: int, kind: str, classes: list[str] | None = None,
                   training_mode: str | None = None, metrics: dict | None = None, variant: str = "fp32",
                   ood_threshold: float | None = None, ood_quantile: float | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an exported file. ``spec`` is the backbone's ``models.BackboneSpec`` (its name,
    interpolation, feature width and ``resize_for``). ``ood_threshold`` (with the validation ``ood_quantile`` it was
    taken at): the classifier also has the ``EXPLAIN_OUTPUTS``."""
    resize_size = spec.resize_for(image_size)
    meta = {
        "format": FORMAT,
        "kind": kind,
        "image_size": str(image_size),
        "resize_size": str(resize_size),
        "interpolation": spec.interpolation,
        "resize_rule": resize_rule(image_size, resize_size, spec.interpolation),
        "backbone": spec.name,
        "variant": variant,
        "project_version": __version__,
    }
    if kind == "classifier":
        meta["classes"] = json.dumps(list(classes or []))
        meta["training_mode"] = str(training_mode)
        meta["metrics"] = json.dumps(metrics or {}, default=float)
        if ood_threshold is not None:
            meta["outputs"] = json.dumps([*OUTPUT_NAMES, *EXPLAIN_OUTPUTS])
            meta["ood_threshold"] = repr(float(ood_threshold))
            meta["ood_rule"] = OOD_RULE.format(quantile=ood_quantile if ood_quantile is not None else float("nan"))
    else:
        meta["feature_dim"] = str(spec.feature_dim)
    return meta


def set_metadata(model: Any, meta: Mapping[str, str]) -> None:
    """Replace ``metadata_props`` entries of an ``onnx.ModelProto`` with ``meta`` (other entries are kept)."""
    kept = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """All ``metadata_props`` of an ONNX file, unvalidated (``parse_metadata`` validates them)."""
    import onnx  # only export and its checks need the onnx package; serving needs onnxruntime alone

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}
