"""Device resolution: ``auto|cpu|cuda`` resolved once, with a clear error when CUDA is missing."""

import pytest
import torch

from core.device import DeviceError, describe_device, resolve_device


@pytest.mark.parametrize(
    ("requested", "available", "expected"),
    [("auto", True, "cuda"), ("auto", False, "cpu"), ("cpu", True, "cpu"), ("cuda", True, "cuda"),
     ("cpu", False, "cpu")],
)
def test_resolution(requested, available, expected):
    assert resolve_device(requested, cuda_available=available).type == expected


def test_cuda_requested_without_gpu_says_what_to_do():
    with pytest.raises(DeviceError, match="--device auto or cpu"):
        resolve_device("cuda", cuda_available=False)


def test_unknown_device_lists_the_choices():
    with pytest.raises(DeviceError, match="auto, cpu, cuda"):
        resolve_device("gpu")


def test_describe_cpu():
    assert describe_device(torch.device("cpu")).startswith("cpu (")
