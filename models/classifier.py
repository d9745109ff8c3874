"""A classifier = a registered backbone + a new linear head."""

from __future__ import annotations

import torch
from torch import nn

from ._registry import get_backbone


def make_head(feature_dim: int, num_classes: int, dropout: float = 0.2) -> nn.Sequential:
    """The new head trained on top of a backbone: dropout + linear."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))


class Classifier(nn.Module):
    """``backbone`` (features) followed by ``head`` (dropout + linear). ``spec`` describes the preprocessing."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.spec = backbone.spec
        self.head = make_head(self.spec.feature_dim, num_classes, dropout)

    @property
    def num_classes(self) -> int:
        return self.head[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def freeze_backbone(self) -> None:
        """Freeze every backbone parameter. Call ``backbone.eval()`` during training too (BatchNorm)."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)


def build_classifier(backbone: str, num_classes: int, *, pretrained: bool, dropout: float = 0.2) -> Classifier:
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    return Classifier(get_backbone(backbone, pretrained=pretrained), num_classes, dropout=dropout)
