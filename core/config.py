"""``TrainConfig``: every training setting, its reason, and what it accepts. Torch-free, so the CLI can build its
parser (flags, help text, defaults) without importing torch.

Each field carries one ``Rule`` (its type and valid range) in its metadata; ``TrainConfig.from_dict`` is the one route
from outside values (CLI flags, a ``--config`` file, the app's form) to a config, and ``ConfigError`` names the key,
the value and what it accepts: "epochs must be an integer from 1 to 1000, got 'ten'".
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runtime.devices import DEVICES
from .runtime.errors import UserError

if TYPE_CHECKING:
    import torch

FEATURE_ENGINES = ("auto", "torch", "onnxruntime")


class ConfigError(UserError, ValueError):
    """A training setting is unknown or out of range; the message names the key, the value and the valid range."""


@dataclass(frozen=True)
class Rule:
    """What one setting accepts: a type (int, float, str, bool), optional bounds or choices, and whether None is
    allowed (``none`` says what None means)."""

    kind: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple = ()
    none: str = ""
    text: str = ""  # replaces the generated description

    def describe(self, *, with_none: bool = True) -> str:
        """The phrase after "must be" in errors (and, without the None case, in ``--help``)."""
        if self.text:
            phrase = self.text
        elif self.choices:
            phrase = "one of " + ", ".join(map(repr, self.choices))
        elif self.kind is bool:
            phrase = "true or false"
        elif self.kind is str:
            phrase = "a string"
        else:
            noun = "an integer" if self.kind is int else "a number"
            if self.ge is not None and self.le is not None:
                phrase = f"{noun} from {_num(self.ge)} to {_num(self.le)}"
            else:
                bounds = [f"{word} {_num(bound)}" for word, bound in (("above", self.gt), ("at least", self.ge),
                                                                       ("below", self.lt), ("at most", self.le))
                          if bound is not None]
                phrase = f"{noun} {' and '.join(bounds)}" if bounds else noun
        return f"{phrase}, or null ({self.none})" if self.none and with_none else phrase

    def check(self, name: str, value: Any) -> Any:
        """``value`` in its normal form (15.0 -> 15 for an integer, 1 -> 1.0 for a number), or ConfigError."""
        if value is None and self.none:
            return None
        normal = self._convert(value)
        if normal is None or (self.choices and normal not in self.choices) or not self._in_range(normal):
            raise ConfigError(f"{name} must be {self.describe()}, got {value!r}.")
        return normal

    def _convert(self, value: Any) -> Any:
        if self.kind is bool or isinstance(value, bool):  # True is an int in Python, never a valid number here
            return value if self.kind is bool and isinstance(value, bool) else None
        if self.kind is str:
            return value if isinstance(value, str) else None
        if isinstance(value, float) and self.kind is int:
            return int(value) if value.is_integer() else None  # JSON/TOML may write 15 as 15.0
        if self.kind is int:
            return int(value) if isinstance(value, numbers.Integral) else None
        if isinstance(value, numbers.Real) and math.isfinite(value):
            return float(value)
        return None

    def _in_range(self, v: Any) -> bool:
        if self.kind not in (int, float):
            return True
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _setting(default: Any, rule: Rule, *, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def _int(default: int | None, lo: int, hi: int | None = None, *, none: str = "") -> Any:
    return _setting(default, Rule(int, ge=lo, le=hi, none=none))


def _number(default: float | None, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None, none: str = "") -> Any:
    return _setting(default, Rule(float, gt=gt, ge=ge, lt=lt, le=le, none=none))


def _choice(default: Any, choices: tuple) -> Any:
    return _setting(default, Rule(type(default), choices=tuple(choices)))


def _default_backbone() -> str:
    import models  # torch: only when a config is built, never when the CLI builds its parser

    return models.DEFAULT_BACKBONE


@dataclass
class TrainConfig:
    # Any registered backbone (``python -m core backbones``); the registry's default is small and fast on CPU.
    backbone: str = _setting(None, Rule(str, text="a registered backbone name (`python -m core backbones` lists "
                                                   "them)"), factory=_default_backbone)
    # One cap for both arms, so the comparison is at equal epochs. Head epochs on cached features cost
    # milliseconds; scratch epochs cost a full forward/backward pass over the training images.
    epochs: int = _int(15, 1, 1000)
    # Optional wall-clock cap per arm (seconds, feature extraction included); checked after every epoch.
    budget_seconds: float | None = _number(None, gt=0, none="no time cap")
    # Side of the square crop both arms see. None: the backbone's native size on CUDA, and 160 on CPU,
    # where scratch training at 224 is ~2x slower and the pretrained arm loses only a little accuracy.
    image_size: int | None = _int(None, 32, 512, none="the backbone's size on CUDA, 160 on CPU")
    # "Good enough" on a small balanced dataset; time-to-target measures how soon each arm gets there.
    target_accuracy: float = _number(0.85, gt=0, le=1)
    # Seeds the split and both arms' training: the same seed gives the same run.
    seed: int = _int(0, 0, 2**32 - 1)
    # Share of each class's training images held out to choose the epoch that is kept (and exported), so the
    # validation split that is reported never chooses anything. 0.15 leaves 85% to train on and still gives 6+
    # images per class at 40 per class; a class with fewer than 3 training images means no hold-out, and the
    # last epoch is kept. 0: always the last epoch.
    selection_fraction: float = _number(0.15, ge=0, lt=0.5)
    # Train both arms this many times (seeds seed, seed+1, ...; a random split is redrawn each time) and report
    # the mean and spread: one run on a few dozen validation images can be lucky. Repeats after the first reuse
    # the decoded images and cached features, so the pretrained arm costs a head fit each; the scratch arm costs a
    # full training (its budget applies to each repeat).
    repeats: int = _int(1, 1, 20)
    # "auto": CUDA when usable, else CPU; resolved once per run and reported.
    device: str = _choice("auto", DEVICES)
    # Small enough for a 2-core CPU and few hundred images; large enough for stable BatchNorm statistics.
    batch_size: int = _int(32, 1, 4096)
    # The head is a single linear layer on good features: a high rate converges in a few epochs.
    head_lr: float = _number(3e-3, gt=0, le=1)
    head_weight_decay: float = _number(1e-4, ge=0, le=1)
    # AdamW with cosine decay and label smoothing: a standard from-scratch recipe for small data.
    scratch_lr: float = _number(3e-3, gt=0, le=1)
    scratch_weight_decay: float = _number(0.05, ge=0, le=1)
    label_smoothing: float = _number(0.1, ge=0, lt=1)
    # "auto": onnxruntime on CPU (several times faster than torch eager), torch (+AMP) on CUDA.
    feature_engine: str = _choice("auto", FEATURE_ENGINES)
    # 2 adds horizontally flipped copies of the training images as extra cached views (augmentation for
    # the head at the cost of a second feature pass over the training images).
    views: int = _choice(1, (1, 2))
    # Run the second arm. The app's "also train from scratch" switch.
    train_scratch: bool = _setting(True, Rule(bool))
    # 0: the pretrained backbone stays frozen and its features are computed once (seconds on CPU). N > 0: its
    # last N blocks train too, on augmented images and without a feature cache, like the scratch arm (minutes
    # on CPU): try it when the frozen backbone's accuracy disappoints. The upper bound is the backbone's block count.
    unfreeze_blocks: int = _int(0, 0)
    # Unfrozen pretrained blocks take small steps (a tenth of the head's rate) so they keep what ImageNet taught.
    backbone_lr: float = _number(3e-4, gt=0, le=1)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The one route from outside values (CLI flags, a config file, the app's form) to a validated config.
        Missing keys keep their defaults; unknown keys, wrong types and out-of-range values raise ConfigError."""
        return cls(**check_values(values)).validated()

    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-ready; ``from_dict`` accepts it back (``config.json`` in a run folder)."""
        return dataclasses.asdict(self)

    def validated(self) -> TrainConfig:
        """Check every field against its rule (normalising 15.0 to 15), then the checks that need the registry."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.metadata["rule"].check(f.name, getattr(self, f.name)))
        import models

        models.get_backbone_spec(self.backbone)  # raises with the valid names and a suggestion
        if self.unfreeze_blocks:
            blocks = models.block_count(self.backbone)
            if not 0 <= self.unfreeze_blocks <= blocks:
                raise ConfigError(f"unfreeze_blocks must be between 0 (frozen backbone, cached features) and "
                                  f"{blocks} ({self.backbone} has {blocks} blocks), got {self.unfreeze_blocks}.")
        return self

    def resolved_image_size(self, device: torch.device) -> int:
        if self.image_size is not None:
            return self.image_size
        import models

        spec = models.get_backbone_spec(self.backbone)
        return spec.input_size if device.type == "cuda" else 160


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}


def rule(name: str) -> Rule:
    return FIELDS[name].metadata["rule"]


def check_values(values: dict[str, Any]) -> dict[str, Any]:
    """Each value checked against its field's rule (no cross-field checks); unknown keys name the valid ones."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config is a mapping of setting names to values, got {type(values).__name__}.")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        hints = [m for k in unknown for m in difflib.get_close_matches(str(k), FIELDS, n=1)]
        hint = f" Did you mean {', '.join(map(repr, hints))}?" if hints else ""
        raise ConfigError(f"Unknown config key(s): {', '.join(map(str, unknown))}.{hint} "
                          f"Valid keys: {', '.join(FIELDS)}.")
    return {k: rule(k).check(k, v) for k, v in values.items()}


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings in a JSON (or, by its ``.toml`` suffix, TOML) file of TrainConfig keys, each checked; to be
    used as defaults under command-line flags. A run folder's ``config.json`` is such a file."""
    path = Path(path)
    toml = path.suffix.lower() == ".toml"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}.") from None
    try:
        values = tomllib.loads(data.decode("utf-8")) if toml else json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {'TOML' if toml else 'JSON'}: {exc}.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a {'table' if toml else 'JSON object'} of TrainConfig "
                          f"keys ({', '.join(FIELDS)}), got {type(values).__name__}.")
    try:
        return check_values(values)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
