"""Device and execution-provider names: plain constants, no onnxruntime import, so a CLI can offer them in its
``--help`` at no start-up cost."""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")  # what a user may ask for; "auto": CUDA where usable, else the CPU

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)

# Which model file to serve: "auto" (the fastest accepted variant here, core.runtime.fastest) or one by name.
VARIANT_CHOICES = ("auto", "fp32", "int8", "fp16")


def where_it_runs(provider: str) -> str:
    """Plain words for an onnxruntime provider: "the CPU", "the GPU (CUDA)", "the GPU (TensorRT)"; an unknown one
    is named as it is."""
    return {CPU: "the CPU", CUDA: "the GPU (CUDA)", TENSORRT: "the GPU (TensorRT)"}.get(provider, provider)
