"""The training form of a front end (the app's Train tab), without Gradio: the choices it offers, its defaults,
and its values as a validated ``TrainConfig`` (through ``TrainConfig.from_dict``, the one route to a config)."""

from __future__ import annotations

import functools

import models
from core.config import ConfigError, TrainConfig
from core.device import describe_device, resolve_device


def backbone_choices() -> list[tuple[str, str]]:
    """``(label, name)`` for every registered backbone; the label says whether it downloads weights."""
    return [(f"{name} ({'offline' if models.get_backbone_spec(name).offline else 'downloads weights'})", name)
            for name in models.list_backbones()]


def device_choices() -> list[tuple[str, str]]:
    """``(label, device)``: auto (naming what it resolves to), cpu, and cuda where a GPU is usable."""
    auto = resolve_device("auto")
    choices = [(f"auto → {describe_device(auto)}", "auto"), ("cpu", "cpu")]
    if auto.type == "cuda":
        choices.append((f"cuda ({describe_device(auto)})", "cuda"))
    return choices


def default_image_size() -> int:
    """The training core's default: the backbone's own size on a GPU, 160 px on a CPU."""
    return TrainConfig().resolved_image_size(resolve_device("auto"))


@functools.cache  # the GPU does not come or go while the server runs: probe it once, not on every request
def inference_device() -> str:
    """"auto" where a CUDA GPU is visible; else "cpu", so a GPU build of onnxruntime does not warn on every load."""
    return "auto" if resolve_device("auto").type == "cuda" else "cpu"


def make_config(backbone: str, epochs: float, budget: float | None, image_size: float | None, target: float,
                device: str, scratch: bool, seed: float | None = 0, unfreeze: float | None = 0,
                repeats: float | None = 1, *,
                max_budget: float | None = None) -> TrainConfig:
    """A validated ``TrainConfig`` from the form's values; an image size of 0 means the default.

    A budget of 0 means none, or ``max_budget`` where the server sets one (a shared server must not let one job
    hold the training slot for hours). Raises ``ConfigError`` (a ``UserError``) naming the bad value."""
    if max_budget:
        if budget and budget > max_budget:
            raise ConfigError(f"A time budget of {budget:g} s per arm is more than this server allows "
                              f"({max_budget:g} s); choose {max_budget:g} or less.")
        budget = budget or max_budget
    return TrainConfig.from_dict({
        "backbone": backbone, "epochs": epochs, "budget_seconds": budget or None, "image_size": image_size or None,
        "target_accuracy": target, "device": device, "seed": seed or 0, "train_scratch": bool(scratch),
        "unfreeze_blocks": unfreeze or 0, "repeats": repeats or 1})


def run_estimate(budget: float | None, scratch: bool, max_budget: float | None = None) -> str:
    """A line under the Train button: how long training can take with this budget (each arm stops at it)."""
    limit = budget or max_budget
    if not limit:
        return "⏱️ No time budget: each arm trains for all its epochs (minutes on a CPU for the scratch arm)."
    total = limit * (2 if scratch else 1)
    span = f"{total:g} s" if total < 120 else f"{total / 60:.3g} minutes"
    return (f"⏱️ Each arm stops at its {limit:g} s budget, so training takes at most about {span}; then the model "
            "is exported and checked (seconds for the frozen backbone's model).")
