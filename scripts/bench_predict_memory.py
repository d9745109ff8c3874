"""How much the server's memory grows when visitors send large images to Predict.

Starts ``python app.py`` on a free port, trains a tiny model in one session, then sends near-limit PNGs (36 MP
each, under the 40 MP cap per image) in one request (8, then 64) and in three requests at once, sampling the
server's resident memory every 20 ms. Prints the growth over the idle server for each case, with the target.

    python scripts/bench_predict_memory.py            # about two minutes on a 2-core CPU
    python scripts/bench_predict_memory.py --side 4000

A 64-image request of 36 MP PNGs holds 2.3 gigapixels, over the 1 GP cap per request: it is refused from the
headers (the growth printed is what refusing costs).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TARGET_MB = 300


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def peak_growth(pid: int, work) -> tuple[float, object]:
    """(peak RSS during ``work()`` minus RSS before, in MB; what ``work`` returned or raised)."""
    start, peak, stop = rss_mb(pid), [0.0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss_mb(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - a refusal is a result too
        result = exc
    stop.set()
    thread.join()
    return max(peak[0], rss_mb(pid)) - start, result


def start_app(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--session-root", str(root)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the app did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=6000, help="side of the square test PNG in pixels (default 6000)")
    args = p.parse_args()
    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        ramp = np.linspace(0, 255, args.side, dtype=np.uint8)
        png = tmp / "large.png"
        Image.fromarray(np.stack([np.broadcast_to(ramp, (args.side, args.side))] * 3, axis=-1)).save(
            png, compress_level=1)
        mp = args.side**2 / 1e6
        proc, url = start_app(tmp / "sessions")
        try:
            visitors = [Client(url, verbose=False, download_files=False) for _ in range(3)]
            for v in visitors:
                v.predict("sample:shapes?per_class=8&size=32", api_name="/load_sample")
                v.predict("efficientnet_lite0", 1, 0, 32, 0.85, "cpu", False, 0, api_name="/train")
            v0 = visitors[0]
            for v in visitors:  # warm: each session's predictor loaded and its arena grown for a batch of 8
                v.predict("run:fp32", None, [handle_file(str(png))] * 8, api_name="/predict")
            print(f"server idle: {rss_mb(proc.pid):.0f} MB RSS; image {args.side}x{args.side} = {mp:.0f} MP PNG "
                  f"({png.stat().st_size / 1e6:.1f} MB file); target: growth under {TARGET_MB} MB")

            def one(visitor: Client, n: int):
                return visitor.predict("run:fp32", None, [handle_file(str(png)) for _ in range(n)],
                                       api_name="/predict")

            for n in (8, 64):
                growth, result = peak_growth(proc.pid, lambda n=n: one(v0, n))
                outcome = "refused: " + str(result)[:90] if isinstance(result, Exception) else "classified"
                print(f"{n:>3} images in one request: +{growth:6.0f} MB  ({outcome})")

            def three_at_once():
                with ThreadPoolExecutor(3) as pool:
                    return list(pool.map(lambda v: one(v, 8), visitors))

            growth, result = peak_growth(proc.pid, three_at_once)
            outcome = "refused: " + str(result)[:90] if isinstance(result, Exception) else "classified"
            print(f"3 requests of 8 at once:   +{growth:6.0f} MB  ({outcome})")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
