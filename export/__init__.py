"""Export to ONNX, verify against PyTorch, build faster variants, write Triton repositories, benchmark.

Names are imported on first use, so ``import export`` stays cheap (torch loads only when exporting).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExportError": "export.onnx_export",
    "cached_backbone_onnx": "export.onnx_export",
    "export_backbone": "export.onnx_export",
    "export_classifier": "export.onnx_export",
    "export_classifier_report": "export.onnx_export",
    "export_run": "export.onnx_export",
    "load_run_classifier": "export.onnx_export",
    "model_filename": "export.onnx_export",
    "report_key": "export.onnx_export",
    "ParityError": "export.verify",
    "check_parity": "export.verify",
    "evaluate_onnx": "export.verify",
    "ImageCalibrationReader": "export.quantize",
    "build_variants": "export.quantize",
    "convert_fp16": "export.quantize",
    "optimize_model": "export.quantize",
    "quantize_int8": "export.quantize",
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
