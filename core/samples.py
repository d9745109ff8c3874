"""Built-in offline sample datasets: real handwritten digits and generated coloured shapes."""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image, ImageDraw

from core.runtime.errors import UserError
from core.runtime.files import release_locals

SAMPLE_PREFIX = "sample:"
COMPLETE_MARKER = ".complete"
SHAPE_CLASSES = ("circle", "square", "triangle")
GENERATOR_VERSION = 1

SAMPLES: dict[str, str] = {
    "digits": "Real handwritten digits 0-9 (scikit-learn, 1797 images, 8x8 upscaled to 32x32).",
    "shapes": "Generated circles, squares and triangles on noisy backgrounds, with predefined "
    "train/val splits and knobs for size, imbalance, label noise and train/val duplicates.",
}


class SampleError(UserError, ValueError):
    """A sample spec or sample parameter is invalid."""

    title = "Unknown sample"  # a short heading for a front end's error box


# knob name in the spec -> (keyword argument of make_shapes, type, check, description)
_SHAPES_KNOBS: dict[str, tuple[str, type, Callable[[Any], bool], str]] = {
    "per_class": ("per_class", int, lambda v: 2 <= v <= 100_000, "an integer from 2 to 100000"),
    "imbalance": ("imbalance", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "noise": ("label_noise", float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "duplicates": ("duplicates", int, lambda v: v >= 0, "an integer >= 0"),
    "seed": ("seed", int, lambda v: v >= 0, "an integer >= 0"),
    "size": ("image_size", int, lambda v: 16 <= v <= 1024, "an integer from 16 to 1024"),
    "val": ("val_fraction", float, lambda v: 0 < v < 1, "a number in (0, 1)"),
}
_KNOBS: dict[str, dict[str, tuple[str, type, Callable[[Any], bool], str]]] = {
    "digits": {},
    "shapes": _SHAPES_KNOBS,
}


def is_sample_spec(src: object) -> bool:
    """True for strings such as ``sample:shapes?per_class=40``."""
    return isinstance(src, str) and src.strip().lower().startswith(SAMPLE_PREFIX)


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def parse_sample_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``sample:NAME?knob=value&...`` into the sample name and keyword arguments for its maker."""
    if not is_sample_spec(spec):
        raise SampleError(f"{spec!r} is not a sample spec; write it like 'sample:shapes' or 'sample:digits'")
    body = spec.strip()[len(SAMPLE_PREFIX) :]
    name, _, query = body.partition("?")
    name = name.strip().lower()
    if name not in SAMPLES:
        valid = ", ".join(f"sample:{n}" for n in SAMPLES)
        raise SampleError(f"unknown sample {name!r} in {spec!r}.{_suggest(name, list(SAMPLES))} Valid samples: {valid}")
    knobs = _KNOBS[name]
    kwargs: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise SampleError(f"cannot read the options {query!r} in {spec!r}: write them as key=value&key=value") from exc
    for key, raw in pairs:
        key = key.strip().lower()
        if key not in knobs:
            if not knobs:
                raise SampleError(f"sample:{name} takes no options, but {key!r} was given in {spec!r}")
            valid = ", ".join(knobs)
            raise SampleError(
                f"unknown option {key!r} for sample:{name}.{_suggest(key, list(knobs))} Valid options: {valid}"
            )
        kwarg, kind, check, expected = knobs[key]
        try:
            value = kind(raw)
            if kind is float and not math.isfinite(value):
                raise ValueError(raw)
        except ValueError:
            raise SampleError(f"option {key}={raw!r} of sample:{name} must be {expected}") from None
        if not check(value):
            raise SampleError(f"option {key}={raw!r} of sample:{name} must be {expected}")
        kwargs[kwarg] = value
    return name, kwargs


def _write_atomically(out_dir: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Run ``build(tmp)`` in a temporary folder beside ``out_dir`` and rename it into place."""
    if (out_dir / COMPLETE_MARKER).is_file():
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a finished sample; delete it or pick another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        meta = build(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / COMPLETE_MARKER).is_file():  # not a concurrent writer finishing first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as exc:
        release_locals(exc)  # an image writer of the failed build may still hold a file open (a full disk)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def sample_metadata(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata a finished sample folder recorded (parameters, counts, planted problems)."""
    return json.loads((Path(out_dir) / COMPLETE_MARKER).read_text())


def make_digits(out_dir: str | os.PathLike[str]) -> Path:
    """Write scikit-learn's handwritten digits as 32x32 PNGs in class folders ``0``..``9``."""
    from sklearn.datasets import load_digits

    def build(tmp: Path) -> dict[str, Any]:
        digits = load_digits()
        counts = {str(c): 0 for c in range(10)}
        for i, (img, target) in enumerate(zip(digits.images, digits.target, strict=True)):
            cls = str(int(target))
            grey = np.rint(255.0 - img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # dark ink on white
            pic = Image.fromarray(grey, mode="L").resize((32, 32), Image.Resampling.NEAREST)
            (tmp / cls).mkdir(exist_ok=True)
            pic.save(tmp / cls / f"{cls}_{i:04d}.png", format="PNG")
            counts[cls] += 1
        return {"sample": "digits", "version": GENERATOR_VERSION, "counts": counts}

    return _write_atomically(Path(out_dir), build)


def shapes_class_counts(per_class: int, imbalance: float = 1.0, n_classes: int = len(SHAPE_CLASSES)) -> list[int]:
    """Images per class: a geometric ramp from ``per_class`` down to ``per_class * imbalance``."""
    if n_classes == 1:
        return [per_class]
    return [max(1, round(per_class * imbalance ** (i / (n_classes - 1)))) for i in range(n_classes)]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random textured background: colour gradient, stripes or blobs, plus pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    freq = rng.uniform(2, 8)
    texture = np.sin(2 * np.pi * freq * (xx * np.cos(angle * 3) + yy * np.sin(angle * 3)) + rng.uniform(0, 6.3))
    img += texture[..., None] * rng.uniform(5, 35) * rng.choice([-1, 1], 3)
    img += rng.normal(0, rng.uniform(4, 20), img.shape)
    return img


def _draw_shape(rng: np.random.Generator, img: np.ndarray, shape: str, size: int) -> Image.Image:
    scale = 4  # supersample for smooth edges
    big = size * scale
    bg_mean = img.reshape(-1, 3).mean(axis=0)
    for _ in range(20):  # a colour that stands out from the background
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - bg_mean) > 120:
            break
    # Same area for every class (that of a circle of this radius), so size is no clue.
    radius = rng.uniform(0.15, 0.28) * big
    sides = {"circle": 0, "square": 4, "triangle": 3}[shape]
    r = radius * (1.0 if not sides else math.sqrt(2 * math.pi / (sides * math.sin(2 * math.pi / sides))))
    cx = rng.uniform(r, big - r)
    cy = rng.uniform(r, big - r)
    rot = rng.uniform(0, 2 * np.pi)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if not sides:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        pts = [
            (cx + r * np.cos(rot + 2 * np.pi * k / sides), cy + r * np.sin(rot + 2 * np.pi * k / sides))
            for k in range(sides)
        ]
        draw.polygon(pts, fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255.0
    shaded = colour + rng.normal(0, 6, img.shape)
    out = img * (1 - alpha) + shaded * alpha
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")


def make_shape_image(shape: str, seed: int, index: int, image_size: int = 64) -> Image.Image:
    """One deterministic shapes image (``shape`` in SHAPE_CLASSES)."""
    rng = np.random.default_rng([seed, SHAPE_CLASSES.index(shape), index, GENERATOR_VERSION])
    return _draw_shape(rng, _background(rng, image_size), shape, image_size)


def make_shapes(
    out_dir: str | os.PathLike[str],
    *,
    per_class: int = 60,
    image_size: int = 64,
    imbalance: float = 1.0,
    label_noise: float = 0.0,
    duplicates: int = 0,
    val_fraction: float = 0.25,
    seed: int = 0,
) -> Path:
    """Generate the shapes dataset with predefined ``train/`` and ``val/`` class folders.

    File names keep the true class (``circle_0007.png``), so mislabelled files can be found.
    The hidden ``.complete`` file records the parameters, counts, mislabelled files and duplicates.
    """
    counts = shapes_class_counts(per_class, imbalance)
    if per_class < 2 or min(counts) < 2:
        raise SampleError(
            f"sample:shapes needs at least 2 images in every class, but per_class={per_class} with "
            f"imbalance={imbalance} gives {counts}; raise per_class or imbalance"
        )
    if not 0 < val_fraction < 1:
        raise SampleError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    if not 0 <= label_noise < 1:
        raise SampleError(f"label_noise={label_noise} must be in [0, 1)")
    if not 16 <= image_size <= 1024:
        raise SampleError(f"image_size={image_size} must be from 16 to 1024")
    n_val = [min(n - 1, max(1, round(n * val_fraction))) for n in counts]
    n_train = [n - v for n, v in zip(counts, n_val, strict=True)]
    n_noisy = round(label_noise * sum(n_train))
    if duplicates < 0 or duplicates > sum(n_train) - n_noisy:
        raise SampleError(
            f"duplicates={duplicates} must be from 0 to {sum(n_train) - n_noisy} "
            "(the number of correctly labelled training images)"
        )
    params = {
        "per_class": per_class,
        "image_size": image_size,
        "imbalance": imbalance,
        "label_noise": label_noise,
        "duplicates": duplicates,
        "val_fraction": val_fraction,
        "seed": seed,
    }

    def build(tmp: Path) -> dict[str, Any]:
        rng = np.random.default_rng([seed, 7919])
        train = [(ci, i) for ci, n in enumerate(n_train) for i in range(n)]
        noisy = set(rng.choice(len(train), size=n_noisy, replace=False).tolist()) if n_noisy else set()
        clean = [k for k in range(len(train)) if k not in noisy]
        dup_src = sorted(rng.choice(clean, size=duplicates, replace=False).tolist()) if duplicates else []
        for split in ("train", "val"):
            for cls in SHAPE_CLASSES:
                (tmp / split / cls).mkdir(parents=True)
        mislabelled: list[dict[str, str]] = []
        train_files: list[Path] = []
        for k, (ci, i) in enumerate(train):
            cls = SHAPE_CLASSES[ci]
            folder = cls
            if k in noisy:
                others = [c for c in SHAPE_CLASSES if c != cls]
                folder = others[int(rng.integers(len(others)))]
            path = tmp / "train" / folder / f"{cls}_{i:04d}.png"
            make_shape_image(cls, seed, i, image_size).save(path, format="PNG")
            train_files.append(path)
            if k in noisy:
                mislabelled.append({"file": path.relative_to(tmp).as_posix(), "true_class": cls})
        for ci, cls in enumerate(SHAPE_CLASSES):
            for i in range(n_train[ci], counts[ci]):
                make_shape_image(cls, seed, i, image_size).save(tmp / "val" / cls / f"{cls}_{i:04d}.png", format="PNG")
        next_index = list(counts)
        dup_pairs: list[dict[str, str]] = []
        for k in dup_src:
            ci, _ = train[k]
            cls = SHAPE_CLASSES[ci]
            dst = tmp / "val" / cls / f"{cls}_{next_index[ci]:04d}.png"
            next_index[ci] += 1
            shutil.copyfile(train_files[k], dst)
            rel = {"train": train_files[k], "val": dst}
            dup_pairs.append({split: p.relative_to(tmp).as_posix() for split, p in rel.items()})
        return {
            "sample": "shapes",
            "version": GENERATOR_VERSION,
            "params": params,
            "counts": {
                "train": {c: sum(1 for p in train_files if p.parent.name == c) for c in SHAPE_CLASSES},
                "val": {
                    c: n_val[ci] + sum(1 for d in dup_pairs if d["val"].split("/")[1] == c)
                    for ci, c in enumerate(SHAPE_CLASSES)
                },
            },
            "mislabelled": mislabelled,
            "duplicates": dup_pairs,
        }

    return _write_atomically(Path(out_dir), build)


MAKERS: dict[str, Callable[..., Path]] = {"digits": make_digits, "shapes": make_shapes}


def sample_cache_key(name: str, kwargs: dict[str, Any]) -> str:
    """Folder name for one sample parameter set, e.g. ``shapes-3f2a9c1b7d04``."""
    defaults = {
        k: v.default
        for k, v in inspect.signature(MAKERS[name]).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    blob = json.dumps({"name": name, "kwargs": {**defaults, **kwargs}, "version": GENERATOR_VERSION}, sort_keys=True)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def sample_key(spec: str) -> str:
    """``sample_cache_key`` of a spec: the folder name ``make_sample`` writes it to."""
    name, kwargs = parse_sample_spec(spec)
    return sample_cache_key(name, kwargs)


def estimate_sample_bytes(spec: str) -> int:
    """An upper bound of the disk space a sample takes, before generating it (uncompressed RGB pixels)."""
    name, kwargs = parse_sample_spec(spec)
    if name == "digits":
        return 1797 * 32 * 32 * 3
    maker = inspect.signature(make_shapes).parameters
    per_class = kwargs.get("per_class", maker["per_class"].default)
    size = kwargs.get("image_size", maker["image_size"].default)
    images = len(SHAPE_CLASSES) * per_class + kwargs.get("duplicates", 0)
    return images * (size * size * 3 + 1024)  # + a file-system block's share per file


def make_sample(spec: str, cache_root: str | os.PathLike[str]) -> Path:
    """Generate (or reuse) the sample described by ``spec`` under ``cache_root`` and return its folder."""
    name, kwargs = parse_sample_spec(spec)
    out = Path(cache_root) / sample_cache_key(name, kwargs)
    return MAKERS[name](out, **kwargs)


# ---------------------------------------------------------------- choices a web visitor may make

PRESETS: dict[str, str] = {  # name shown in the app -> sample spec
    "shapes (balanced)": "sample:shapes?per_class=60&size=64",
    "shapes (imbalanced 10:1)": "sample:shapes?per_class=60&imbalance=0.1&size=64",
    "shapes (with train/val duplicates)": "sample:shapes?per_class=60&duplicates=10&size=64",
    "digits": "sample:digits",
}
DEFAULT_PRESET = "shapes (balanced)"
# Limits on sample specs typed by a visitor (sample generation costs CPU and disk on a shared server).
MAX_SPEC_PER_CLASS = 300
MAX_SPEC_IMAGE_SIZE = 256


def preset_spec(choice: str) -> tuple[str, str, bool]:
    """``(label, sample spec, shared)`` for a preset name or a bounded ``sample:`` spec; never a path.

    ``shared`` is True for presets (generated once for every visitor). Raises ``SampleError`` naming the problem.
    """
    choice = (choice or "").strip()
    if choice in PRESETS:
        return choice, PRESETS[choice], True
    if is_sample_spec(choice):
        _name, kwargs = parse_sample_spec(choice)  # SampleError names the bad option
        if kwargs.get("per_class", 0) > MAX_SPEC_PER_CLASS:
            raise SampleError(f"per_class={kwargs['per_class']} is more than this app allows ({MAX_SPEC_PER_CLASS}); "
                              "run `python -m core compare` locally for bigger samples")
        if kwargs.get("image_size", 0) > MAX_SPEC_IMAGE_SIZE:
            raise SampleError(f"size={kwargs['image_size']} is more than this app allows ({MAX_SPEC_IMAGE_SIZE})")
        return choice, choice, False
    raise SampleError(f"{choice!r} is not one of the built-in samples ({', '.join(PRESETS)}) or a sample spec "
                      "such as 'sample:shapes?per_class=20&noise=0.1'. To use your own images, upload a .zip.")
