"""The backbone registry: one entry per backbone, with its preprocessing and weights kept beside it."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from core.runtime.errors import UserError


@dataclass(frozen=True)
class BackboneSpec:
    """Everything training, export, the app and the tests need to know about a backbone.

    ``build(pretrained)`` returns an ``nn.Module`` mapping a normalised ``[N, 3, H, W]`` float batch to
    pooled features ``[N, feature_dim]``. ``blocks(module)`` lists that module's blocks from input to output
    (stem, each residual / inverted-residual block, final conv); together they hold every parameter, and
    fine-tuning unfreezes the last N of them.
    """

    name: str
    build: Callable[[bool], nn.Module] = field(repr=False)
    blocks: Callable[[nn.Module], list[nn.Module]] = field(repr=False)
    input_size: int  # side of the square crop the ImageNet weights were trained at
    resize_size: int  # shorter side is resized to this, then centre-cropped to input_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    interpolation: str  # "bilinear" | "bicubic", as used when the weights were trained
    weights: str  # "bundled": ships in a pip package, works offline; "download": fetched on first use
    weights_source: str  # where the ImageNet weights come from
    license: str
    description: str
    weights_file: str | None = None  # cache file name for downloaded weights (under $TORCH_HOME/hub/checkpoints)

    @property
    def offline(self) -> bool:
        return self.weights == "bundled"

    @property
    def crop_fraction(self) -> float:
        return self.input_size / self.resize_size

    def resize_for(self, image_size: int) -> int:
        """Shorter-side resize for a crop of ``image_size`` that keeps the weights' crop fraction."""
        return max(image_size, round(image_size / self.crop_fraction))

    def metadata(self) -> dict:
        """A JSON-friendly description (for reports, the app and ONNX metadata)."""
        return {
            "name": self.name,
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "feature_dim": self.feature_dim,
            "interpolation": self.interpolation,
            "weights": self.weights,
            "weights_source": self.weights_source,
            "license": self.license,
            "description": self.description,
        }


class UnknownBackboneError(UserError, ValueError):
    """No backbone of that name is registered; the message lists the valid names."""


class BackboneWeightsError(UserError, RuntimeError):
    """Pretrained weights could not be obtained (typically: offline and not cached)."""


_REGISTRY: dict[str, BackboneSpec] = {}
DEFAULT_BACKBONE = "efficientnet_lite0"


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"Backbone {spec.name!r} is already registered; backbone names must be unique.")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones(*, offline_only: bool = False) -> list[str]:
    """Registered backbone names, the default first, then alphabetical."""
    names = sorted(_REGISTRY, key=lambda n: (n != DEFAULT_BACKBONE, n))
    return [n for n in names if _REGISTRY[n].offline or not offline_only]


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownBackboneError(
            f"Unknown backbone {name!r}.{hint} Valid backbones: {', '.join(list_backbones())}."
        ) from None


def get_backbone(name: str = DEFAULT_BACKBONE, *, pretrained: bool = True) -> nn.Module:
    """Feature extractor ``[N, 3, H, W] -> [N, feature_dim]``; ``pretrained=False`` is the same net, random init.

    The returned module carries its spec as ``module.spec``.
    """
    spec = get_backbone_spec(name)
    module = spec.build(pretrained)
    module.spec = spec
    return module
