"""The in-graph half of preprocessing: uint8 RGB ``[N, H, W, 3]`` -> normalised float ``[N, 3, H, W]``.

Decoding, resizing and cropping happen outside the network (``core.runtime.images``); everything after that
lives in this module, so training, the exported ONNX graph and any app that embeds the graph share it.
"""

from __future__ import annotations

import torch
from torch import nn


class ImagePreprocess(nn.Module):
    """Cast, scale to [0, 1], normalise with the backbone's mean/std, and move channels first."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        # Folded into one multiply-add: (x / 255 - mean) / std == x * scale + shift.
        std_t = torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(self.scale.dtype)
        return x * self.scale + self.shift


class ImageClassifier(nn.Module):
    """A classifier that takes uint8 ``[N, H, W, 3]`` images and returns ``(logits, probabilities)``."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        spec = classifier.spec
        self.preprocess = ImagePreprocess(spec.mean, spec.std)
        self.classifier = classifier
        self.spec = spec

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(self.preprocess(images))
        return logits, torch.softmax(logits, dim=1)
