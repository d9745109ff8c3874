"""Export failures (not the user's input: the message says what failed and what to report)."""

from __future__ import annotations

from typing import Any


class ExportError(RuntimeError):
    """The model could not be exported; nothing at the target path was changed."""


class ParityError(ExportError):
    """onnxruntime and PyTorch disagree on an exported model; ``report`` holds the measurements."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report
