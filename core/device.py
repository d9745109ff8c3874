"""Resolve ``auto|cpu|cuda`` once; everything downstream receives a concrete ``torch.device``."""

from __future__ import annotations

import torch

from core.runtime.devices import DEVICES
from core.runtime.errors import UserError


class DeviceError(UserError, ValueError):
    """The requested device does not exist or is not usable here."""


def resolve_device(requested: str = "auto", *, cuda_available: bool | None = None) -> torch.device:
    if requested not in DEVICES:
        raise DeviceError(f"Unknown device {requested!r}: use one of {', '.join(DEVICES)}.")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "cuda" and not available:
        raise DeviceError(
            "device 'cuda' was requested but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False). "
            "Use --device auto or cpu, or install a CUDA build of PyTorch with a working driver."
        )
    if requested == "cpu" or not available:
        return torch.device("cpu")
    return torch.device("cuda")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
