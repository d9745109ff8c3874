"""From Train to a verified model.onnx, and how fast the tools start: times measured in one run.

    python scripts/bench_export.py                    # the dev photos, then the start-up times
    python scripts/bench_export.py --data DIR [DIR ...] --rounds 2 --startup-repo ../old-checkout

Export, per image folder (pretrained arm, frozen backbone, 160 px, the app's explain outputs): the pretrained arm is
trained once, then its run is written twice per round, alternating:

- ``traced``: the network traced again with torch.onnx, checked against PyTorch, and the variants built and checked
  before the run is written (what a run did before the export was composed);
- ``composed``: the trained head appended to the cached backbone graph, checked against the torch head on the
  training's features, the run written with it, and the variants built afterwards (``add_run_variants``).

It prints, per way, the seconds from the start of the pretrained arm to a verified ``model.onnx`` on disk (training +
writing the run), the export's own share, and the variants' time, with the parity each reached. The decoded images
and the backbone graph are cached by a first, untimed run.

Start-up, per checkout (this one, and ``--startup-repo`` for another, e.g. a worktree of an earlier commit): the
seconds of ``python -m core --help``, ``python -m export --help``, ``python -c "import app"`` and of ``python app.py``
until its first page answers, each the median of ``--startup-rounds`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEV = ROOT.parent / "shared" / "dev-photos"


def export_rounds(data: Path, rounds: int, out: Path) -> None:
    from core.config import TrainConfig
    from core.data import load_dataset
    from core.report import add_run_variants, write_run
    from core.train import calibrate_unfamiliar, run_compare

    cfg = TrainConfig(train_scratch=False, image_size=160)
    dataset = load_dataset(str(data))
    run_compare(dataset, cfg)  # untimed: decodes into the cache and builds the backbone graph once
    times: dict[str, list[tuple[float, float, float, float]]] = {"traced": [], "composed": []}
    parity: dict[str, dict] = {}
    for r in range(rounds):
        for way in ("traced", "composed") if r % 2 == 0 else ("composed", "traced"):
            start = time.perf_counter()
            result = run_compare(dataset, cfg)
            calibrate_unfamiliar(result.runs, result.train, result.val, len(dataset.classes))
            trained = time.perf_counter()
            if way == "traced":  # without the training's features the export traces (core.report._export)
                arm = result.runs["pretrained"]
                extra = {k: v for k, v in arm.extra.items() if k != "features"}
                result.runs["pretrained"] = dataclasses.replace(arm, extra=extra)
            folder = out / f"{data.name}-{way}-{r}"
            # the run folder, model.onnx in it, appears when write_run returns: traced, with its variants inside
            write_run(result, folder, explain=True, defer_variants=way == "composed")
            written = time.perf_counter()
            if way == "composed":
                add_run_variants(result, folder)
            done = time.perf_counter()
            times[way].append((written - start, trained - start, written - trained, done - written))
            parity[way] = result.report["export"]["parity"]
            accepted = [v["variant"] for v in result.report["export"]["variants"] if v["accepted"]]
            print(f"  {data.name} round {r + 1} {way}: model.onnx verified {written - start:.1f} s after the arm "
                  f"started (training {trained - start:.1f} s); variants done at {done - start:.1f} s "
                  f"(accepted: {accepted or 'none'})", flush=True)
    print(f"\n{data.name} ({len(dataset.items)} images), median of {rounds}:")
    print(f"  {'way':9s} {'to model.onnx':>14s} {'training':>9s} {'writing run':>12s} {'variants after':>15s}  parity")
    for way, rows in times.items():
        med = [statistics.median(col) for col in zip(*rows)]
        p = parity[way]
        words = (f"max |dp| {p['max_abs_diff_probabilities']:.1e}, top-1 {p['top1_agreement']:.0%} on "
                 f"{p['n_images']} images ({p.get('method', 'traced')})")
        print(f"  {way:9s} {med[0]:13.1f}s {med[1]:8.1f}s {med[2]:11.1f}s {med[3]:14.1f}s  {words}")
    composed, traced = (statistics.median(r[0] for r in times[w]) for w in ("composed", "traced"))
    print(f"  composed / traced, to a verified model.onnx: {composed / traced:.2f}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def first_page(cwd: Path, env: dict, timeout: float = 120.0) -> float:
    """Seconds from ``python app.py`` to its first page answering 200."""
    port = _free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    if response.status == 200 and response.read(100):
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"no page from {cwd}/app.py in {timeout:.0f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def startup(repos: list[Path], rounds: int) -> None:
    checks = {"python -m core --help": [sys.executable, "-m", "core", "--help"],
              "python -m export --help": [sys.executable, "-m", "export", "--help"],
              "python -c 'import app'": [sys.executable, "-c", "import app"]}
    print(f"\nstart-up, median of {rounds} runs (seconds):")
    print(f"  {'':28s}" + "".join(f"{r.name[:18]:>20s}" for r in repos))
    results: dict[str, list[float]] = {}
    for name, cmd in checks.items():
        results[name] = []
        for repo in repos:
            env = {**os.environ, "PYTHONPATH": str(repo)}
            results[name].append(statistics.median(_timed(cmd, repo, env) for _ in range(rounds)))
    results["python app.py: first page"] = [
        statistics.median(first_page(repo, {**os.environ, "PYTHONPATH": str(repo)}) for _ in range(rounds))
        for repo in repos]
    for name, values in results.items():
        print(f"  {name:28s}" + "".join(f"{v:20.2f}" for v in values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="*", type=Path, default=[DEV / "cats-vs-dogs", DEV / "textures"],
                        help="image folders (class folders, or train/ and val/); none: skip the export rounds")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each way per folder")
    parser.add_argument("--startup-repo", type=Path, action="append", default=[],
                        help="another checkout to time the start-up of beside this one (repeatable)")
    parser.add_argument("--startup-rounds", type=int, default=3)
    parser.add_argument("--no-startup", action="store_true")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        for data in args.data:
            export_rounds(data, args.rounds, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if not args.no_startup:
        startup([ROOT, *args.startup_repo], args.startup_rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
