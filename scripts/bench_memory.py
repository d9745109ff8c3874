"""Peak memory and wall time of training against the number of images: does memory grow with the dataset?

Generates N images (400x300 JPEGs of four shape classes, the first N of one set, so sizes share files) and runs,
each in a fresh child process with its own empty cache (a first run: every image is decoded):

- the pretrained arm: ``python -m core train --mode pretrained --data DIR`` (decode, features, head, export);
- one epoch of the scratch arm: ``python -m core train --mode scratch --epochs 1`` (for ``--scratch-sizes``).

It prints each child's peak resident memory (``ru_maxrss``) and wall time, and the largest anonymous and
file-backed parts of it seen (``/proc/self/status``, sampled every 0.1 s). ``--repo`` runs another checkout's code
on the same images (to compare before and after a change).

    python scripts/bench_memory.py --sizes 1000 5000 20000 --scratch-sizes 1000 5000 [--dev-photos] [--repo DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = ("circle", "square", "triangle", "blank")


def make_images(root: Path, n: int) -> Path:
    """``root/all`` holds the images once; ``root/n<N>`` links the first N of them into class folders."""
    from PIL import Image

    from core.samples import SHAPE_CLASSES, make_shape_image

    every = root / "all"
    every.mkdir(parents=True, exist_ok=True)
    have = len(list(every.glob("*.jpg")))
    for i in range(have, n):
        cls = CLASSES[i % len(CLASSES)]
        if cls == "blank":
            image = make_shape_image(SHAPE_CLASSES[0], 1, i, 300).convert("L").convert("RGB")
        else:
            image = make_shape_image(cls, 1, i, 300)
        image.resize((400, 300), Image.Resampling.BILINEAR).save(every / f"{cls}_{i:06d}.jpg", quality=85)
    folder = root / f"n{n}"
    if not folder.is_dir():
        for cls in CLASSES:
            (folder / cls).mkdir(parents=True)
        for path in sorted(every.glob("*.jpg"))[:n]:
            os.link(path, folder / path.name.split("_")[0] / path.name)
    return folder


CHILD = """
import atexit, resource, runpy, sys, threading, time
peak_file = sys.argv[1]
peaks = {"RssAnon": 0, "RssFile": 0}

def sample():  # the largest anonymous and file-backed resident sizes seen, every 0.1 s
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]))
        time.sleep(0.1)

threading.Thread(target=sample, daemon=True).start()
atexit.register(lambda: open(peak_file, "w").write(" ".join(str(v) for v in (
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, peaks["RssAnon"], peaks["RssFile"]))))
sys.argv = ["core", *sys.argv[2:]]
runpy.run_module("core", run_name="__main__")
"""


def measure(repo: Path, args: list[str]) -> tuple[float, float, float, float]:
    """(peak RSS in GB, wall seconds, peak anonymous and peak file-backed resident GB) of ``python -m core ARGS`` run
    in ``repo``, with a fresh cache. File-backed pages (the memory-mapped crops, the libraries) count in RSS but the
    kernel drops them under memory pressure; anonymous memory (arrays, tensors) it cannot."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "TRANSFER_LAB_CACHE": cache}
        peak = Path(out) / "peak"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(peak), *args, "--out", str(Path(out) / "run")],
                              cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"`python -m core {' '.join(args)}` failed:\n{proc.stderr[-2000:]}")
        rss, anon, file = (int(v) / 1024**2 for v in peak.read_text().split())  # all in KB on Linux
        return rss, seconds, anon, file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    p.add_argument("--scratch-sizes", type=int, nargs="*", default=[1000])
    p.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "bench-memory-images")
    p.add_argument("--repo", type=Path, default=REPO, help="checkout whose code runs (default: this one)")
    p.add_argument("--dev-photos", action="store_true", help="also the pretrained arm on ../shared/dev-photos")
    args = p.parse_args()
    print(f"code: {args.repo}; peak RSS of each run's process, wall time; fresh cache each run")
    rows = []
    if args.dev_photos:
        for name in ("cats-vs-dogs", "textures"):
            data = REPO.parent / "shared" / "dev-photos" / name
            gb, s, anon, file = measure(args.repo, ["train", "--mode", "pretrained", "--data", str(data)])
            rows.append((f"dev {name}", "pretrained", gb, s))
            print(f"{rows[-1][0]:>12}  {'pretrained':<10}  peak {gb:5.2f} GB  {s:6.1f} s  (anonymous {anon:.2f} GB, "
                  f"file-backed {file:.2f} GB)", flush=True)
    for n in args.sizes:
        data = make_images(args.images, n)
        runs = [("pretrained", ["train", "--mode", "pretrained", "--data", str(data)])]
        if n in args.scratch_sizes:
            runs.append(("scratch x1", ["train", "--mode", "scratch", "--epochs", "1", "--data", str(data)]))
        for arm, command in runs:
            gb, s, anon, file = measure(args.repo, command)
            rows.append((f"{n} images", arm, gb, s))
            print(f"{rows[-1][0]:>12}  {arm:<10}  peak {gb:5.2f} GB  {s:6.1f} s  (anonymous {anon:.2f} GB, "
                  f"file-backed {file:.2f} GB)", flush=True)


if __name__ == "__main__":
    main()
