"""Lay out an exported model as a Triton Inference Server model repository (onnxruntime backend)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from core.runtime.contract import INPUT_NAME, OUTPUT_NAMES
from core.runtime.errors import UserError
from core.runtime.predictor import read_model_info
from export.variants import VARIANTS


class TritonError(UserError, ValueError):
    """The model or the requested repository settings cannot make a Triton repository; the message says why."""


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
INSTANCE_KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU")


def triton_config(name: str, *, image_size: int, num_classes: int, max_batch_size: int = 32,
                  instance_count: int = 1, instance_kind: str = "KIND_AUTO") -> str:
    """``config.pbtxt`` text. The batch dimension is implicit (``max_batch_size`` > 0), so dims omit it."""
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, got {instance_kind!r}.")
    kind = "" if instance_kind == "KIND_AUTO" else f"\n    kind: {instance_kind}"
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_UINT8
    dims: [ {image_size}, {image_size}, 3 ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAMES[0]}"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
  }},
  {{
    name: "{OUTPUT_NAMES[1]}"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{ }}
instance_group [
  {{
    count: {instance_count}{kind}
  }}
]
"""


def write_triton_repository(model_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                            model_name: str | None = None, max_batch_size: int = 32, instance_count: int = 1,
                            instance_kind: str | None = None) -> Path:
    """Write ``<out>/<name>/{config.pbtxt, labels.txt, 1/model.onnx}``; return ``<out>/<name>``.

    ``instance_kind`` defaults to the model variant's (``export.variants``): INT8 on CPU, FP16 on GPU, FP32 either.

    Clients send uint8 RGB images already resized + centre-cropped as the model's ``resize_rule`` says.
    """
    info = read_model_info(model_path)
    if info.kind != "classifier":
        raise TritonError(f"{model_path} is a {info.kind!r} model; Triton export expects a classifier.")
    name = model_name or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(model_path).stem)
    if not _NAME.match(name):
        raise TritonError(f"model_name {name!r} is not a valid Triton model name; use letters, digits, '_', '-', '.'.")
    if max_batch_size < 1:
        raise TritonError(f"max_batch_size must be >= 1 (the exported batch axis is dynamic), got {max_batch_size}.")
    if instance_count < 1:
        raise TritonError(f"instance_count must be >= 1, got {instance_count}.")
    bad = [c for c in info.classes if "\n" in c or "\r" in c]
    if bad:
        raise TritonError(f"class names {bad!r} contain line breaks and cannot be written to labels.txt.")
    if instance_kind is None:
        instance_kind = VARIANTS[info.variant].triton_kind if info.variant in VARIANTS else "KIND_AUTO"
    config = triton_config(name, image_size=info.image_size, num_classes=info.num_classes,
                           max_batch_size=max_batch_size, instance_count=instance_count, instance_kind=instance_kind)
    model_dir = Path(out_dir) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, model_dir / "1" / "model.onnx")
    (model_dir / "labels.txt").write_text("".join(f"{c}\n" for c in info.classes), encoding="utf-8")
    (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
    return model_dir


def write_triton_zip(model_path: str | os.PathLike[str], zip_path: str | os.PathLike[str], **options) -> Path:
    """The repository of ``write_triton_repository`` (same ``options``) as one zip, ready to unpack into a Triton
    model store. The zip is written next to ``zip_path`` and renamed into place, so a failure keeps any earlier one.
    """
    zip_path = Path(zip_path)
    if zip_path.suffix != ".zip":
        raise TritonError(f"the Triton archive must end in .zip, got {zip_path.name!r}.")
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".triton-", dir=zip_path.parent) as tmp:
        write_triton_repository(model_path, Path(tmp) / "repository", **options)
        archive = shutil.make_archive(str(Path(tmp) / "archive"), "zip", root_dir=Path(tmp) / "repository")
        os.replace(archive, zip_path)
    return zip_path
