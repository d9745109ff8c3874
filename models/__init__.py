"""Architectures and the backbone registry (no training code here)."""

from . import backbones as _backbones  # noqa: F401  (registers the built-in backbones)
from ._registry import (
    DEFAULT_BACKBONE,
    BackboneSpec,
    BackboneWeightsError,
    UnknownBackboneError,
    get_backbone,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)
from .backbones import torchvision_checkpoint_path
from .classifier import Classifier, block_count, build_classifier

__all__ = [
    "DEFAULT_BACKBONE",
    "BackboneSpec",
    "BackboneWeightsError",
    "Classifier",
    "UnknownBackboneError",
    "block_count",
    "build_classifier",
    "get_backbone",
    "get_backbone_spec",
    "list_backbones",
    "register_backbone",
    "torchvision_checkpoint_path",
]
