"""Export to ONNX, verify against PyTorch, build faster variants, write Triton repositories, benchmark.

Names are imported on first use, so ``import export`` stays cheap (torch loads only when exporting).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExportError": "export.errors",
    "ParityError": "export.errors",
    "cached_backbone_onnx": "export.onnx_export",
    "export_backbone": "export.onnx_export",
    "export_classifier": "export.onnx_export",
    "check_parity": "export.verify",
    "VARIANTS": "export.variants",
    "build_variants": "export.variants",
    "evaluate_onnx": "export.variants",
    "variant_path": "export.variants",
    "ImageCalibrationReader": "export.quantize",
    "convert_fp16": "export.quantize",
    "quantize_int8": "export.quantize",
    "export_run": "export.runs",
    "load_run_classifier": "export.runs",
    "model_filename": "export.runs",
    "report_key": "export.runs",
    "write_triton_repository": "export.triton",
    "write_triton_zip": "export.triton",
    "benchmark": "export.bench",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
