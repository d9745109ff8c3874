"""Recall and false flags of the near-duplicate check (core.duplicates) on real photos.

Plants ``--copies`` transformed copies of randomly chosen photos of a folder of class folders (each copy keeps its
class, as a scraped duplicate would), then runs the check on the clean set and on the planted set:

- recall: planted copies whose pair (original, copy) is found, per transform, by the hashes alone and by hashes
  plus pretrained features;
- false flags: pairs found among the clean photos (every one is listed: look at them, some may be real copies).

Also runs the check on the built-in samples (generated images: no copies unless the sample plants them).

    python scripts/bench_duplicates.py --data ../shared/dev-photos/cats-vs-dogs --copies 60
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import duplicates  # noqa: E402
from core.data import load_dataset  # noqa: E402
from core.runtime.images import open_rgb  # noqa: E402


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def _crop(img: Image.Image, keep: float) -> Image.Image:
    w, h = img.size
    dw, dh = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return img.crop((dw, dh, w - dw, h - dh))


TRANSFORMS = {  # name -> what a scraped or re-saved copy of a photo looks like
    "resize 3/4 + JPEG 70": lambda im: _jpeg(im.resize((im.width * 3 // 4, im.height * 3 // 4)), 70),
    "centre crop 90%": lambda im: _crop(im, 0.9),
    "centre crop 80%": lambda im: _crop(im, 0.8),
    "mirror": ImageOps.mirror,
    "brightness +30%": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
    "greyscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
    "crop 90% + half size + JPEG 60": lambda im: _jpeg(_crop(im, 0.9).resize((im.width // 2, im.height // 2)), 60),
}


def features_of(paths: list[Path], backbone: str, size: int) -> np.ndarray:
    import models
    from core.device import resolve_device
    from core.features import extract_all, make_feature_extractor
    from core.runtime.images import center_crop, resize_shorter

    spec = models.get_backbone_spec(backbone)
    extractor = make_feature_extractor(backbone, size, resolve_device("cpu"))
    crops = np.stack([center_crop(np.array(resize_shorter(open_rgb(p), spec.resize_for(size), spec.interpolation)),
                                  size) for p in paths])
    return extract_all(extractor, crops)


def check(items, feats: np.ndarray | None) -> list[tuple]:
    hashes = duplicates.perceptual_hashes([i.path for i in items])
    return duplicates.near_pairs(hashes, feats)


def save_sheet(path: Path, pairs: list[tuple[Path, Path]], side: int = 96) -> None:
    cols = 4
    sheet = Image.new("RGB", (cols * (2 * side + 8), -(-len(pairs) // cols) * (side + 8)), "white")
    for n, pair in enumerate(pairs):
        x, y = (n % cols) * (2 * side + 8), (n // cols) * (side + 8)
        for k, file in enumerate(pair):
            thumb = open_rgb(file, reduce_to=side)
            thumb.thumbnail((side, side))
            sheet.paste(thumb, (x + k * side, y))
    sheet.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a folder of class folders (or train/ and val/ with class folders)")
    p.add_argument("--copies", type=int, default=60, help="copies to plant, spread over the transforms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-features", action="store_true", help="hashes only (no backbone)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--sheet", type=Path, help="save the pairs found among the clean photos side by side (PNG), to "
                                             "look at them")
    args = p.parse_args()

    clean = load_dataset(args.data)
    rng = np.random.default_rng(args.seed)
    names = list(TRANSFORMS)
    with tempfile.TemporaryDirectory() as tmp:
        planted_dir = Path(tmp) / "planted"
        originals = rng.choice(len(clean.items), size=args.copies, replace=False)
        plan = []  # (original path, copy path, transform)
        for k, idx in enumerate(originals):
            item = clean.items[idx]
            name = names[k % len(names)]
            out = planted_dir / f"copy{k:04d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            TRANSFORMS[name](open_rgb(item.path)).save(out)
            plan.append((item.path, out, name))
        paths = [i.path for i in clean.items] + [c for _, c, _ in plan]
        index = {path: n for n, path in enumerate(paths)}

        t0 = time.perf_counter()
        hashes = duplicates.perceptual_hashes(paths)
        hash_seconds = time.perf_counter() - t0
        feats = None
        feature_seconds = 0.0
        if not args.no_features:
            t0 = time.perf_counter()
            feats = features_of(paths, "efficientnet_lite0", args.image_size)
            feature_seconds = time.perf_counter() - t0
        n_clean = len(clean.items)

        print(f"{args.data}: {n_clean} photos, {args.copies} planted copies; hashing {hash_seconds:.1f} s "
              f"({1000 * hash_seconds / len(paths):.1f} ms/image)"
              + (f", features {feature_seconds:.1f} s" if feats is not None else ""))
        features_only = duplicates.Rule(min_set_bits=33)  # no hash is usable: the cosine >= 0.95 rule alone
        for label, use, rule in (("before: feature cosine >= 0.95 alone", feats, features_only),
                                 ("hashes only (when the data loads)", None, duplicates.DEFAULT),
                                 ("hashes + features (after training)", feats, duplicates.DEFAULT)):
            if use is None and label.startswith(("before", "hashes +")):
                continue
            found = {(min(i, j), max(i, j)) for i, j, _, _ in duplicates.near_pairs(hashes, use, rule)}
            per = {name: [0, 0] for name in names}
            for original, copy, name in plan:
                pair = tuple(sorted((index[original], index[copy])))
                per[name][1] += 1
                per[name][0] += pair in found
            hit = sum(v[0] for v in per.values())
            false = sorted(p for p in found if p[0] < n_clean and p[1] < n_clean)
            print(f"\n{label}: recall {hit}/{args.copies} = {hit / args.copies:.1%}; pairs among the clean photos: "
                  f"{len(false)}")
            dist = duplicates.hash_distances(hashes[:, 0, :])
            sim = duplicates.cosines(use) if use is not None else None
            for name, (h, n) in per.items():
                planted = sorted(int(dist[index[o], index[c]]) for o, c, t in plan if t == name)
                lowest = None if sim is None else min(sim[index[o], index[c]] for o, c, t in plan if t == name)
                cos = "" if lowest is None else f", lowest cosine {lowest:.3f}"
                print(f"  {name:34s} {h}/{n}   hash distances {planted}{cos}")
            ddist = duplicates.hash_distances(hashes[:, 1])
            for i, j in false[:40]:
                extra = f", cosine {sim[i, j]:.3f}" if sim is not None else ""
                print(f"  clean pair: {clean.relpath(paths[i])} ~ {clean.relpath(paths[j])} (pHash distance "
                      f"{dist[i, j]}, dHash {ddist[i, j]}{extra})")
            if args.sheet and false and label.startswith("hashes +"):
                save_sheet(args.sheet, [(paths[i], paths[j]) for i, j in false])
                print(f"  the {len(false)} clean pairs side by side: {args.sheet}")
            missed = [(name, int(dist[index[o], index[c]]),
                       None if sim is None else round(float(sim[index[o], index[c]]), 3))
                      for o, c, name in plan if tuple(sorted((index[o], index[c]))) not in found]
            for name, d, s in missed[:10]:
                print(f"  missed: {name} (hash distance {d}" + (f", cosine {s})" if s is not None else ")"))
            # how close the nearest unrelated photo comes: the margin under the thresholds
            off = dist[:n_clean, :n_clean].astype(int) + 999 * np.tri(n_clean, dtype=int)
            print(f"  smallest pHash distances among clean photo pairs: {[int(d) for d in sorted(off.ravel())[:8]]}")
            if sim is not None:
                cos = sim[:n_clean, :n_clean] - 9 * np.tri(n_clean)
                print(f"  largest cosines among clean photo pairs: {np.round(np.sort(cos.ravel())[::-1][:8], 3)}")


if __name__ == "__main__":
    main()
