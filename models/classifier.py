"""A classifier = a registered backbone + a new linear head."""

from __future__ import annotations

import functools

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
        self.trainable_blocks: int | None = None  # None: every layer trains; N: only the last N backbone blocks

    def blocks(self) -> list[nn.Module]:
        """The backbone's blocks, input to output (see ``BackboneSpec.blocks``)."""
        return self.spec.blocks(self.backbone)

    @property
    def num_classes(self) -> int:
        return self.head[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def freeze_backbone(self) -> None:
        """Freeze every backbone parameter; its BatchNorm statistics stay fixed too (see ``train``)."""
        self.unfreeze_last_blocks(0)

    def unfreeze_last_blocks(self, n: int) -> list[nn.Module]:
        """Freeze the backbone except its last ``n`` blocks, and return those; the head always trains.

        Frozen blocks stay in eval mode when the classifier is put in training mode, so their BatchNorm running
        statistics and stochastic depth behave as at inference.
        """
        blocks = self.blocks()
        if not 0 <= n <= len(blocks):
            raise ValueError(f"{self.spec.name} has {len(blocks)} blocks; the number to unfreeze must be between "
                             f"0 (train the head only) and {len(blocks)} (fine-tune everything), got {n}.")
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        trainable = blocks[len(blocks) - n:]
        for block in trainable:
            for p in block.parameters():
                p.requires_grad_(True)
        self.trainable_blocks = n
        self.train(self.training)
        return trainable

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode and self.trainable_blocks is not None:
            self.backbone.eval()
            blocks = self.blocks()
            for block in blocks[len(blocks) - self.trainable_blocks:]:
                block.train()
        return self


@functools.cache
def block_count(backbone: str) -> int:
    """How many blocks ``backbone`` has (the most ``Classifier.unfreeze_last_blocks`` accepts)."""
    module = get_backbone(backbone, pretrained=False)
    return len(module.spec.blocks(module))


def build_classifier(backbone: str, num_classes: int, *, pretrained: bool, dropout: float = 0.2) -> Classifier:
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    return Classifier(get_backbone(backbone, pretrained=pretrained), num_classes, dropout=dropout)
