"""Helpers shared by the app tests: a running ``python app.py``, and a small two-colour dataset zip."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(tmp: Path, cache: Path, timeout: float = 120.0, args: tuple[str, ...] = ()
              ) -> tuple[subprocess.Popen, str, Path]:
    """``python app.py [args]`` on a free localhost port; returns (process, url, session root)."""
    port = free_port()
    root = tmp / "sessions"
    log = open(tmp / "app.log", "w")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "TRANSFER_LAB_CACHE": str(cache), "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1"}
    env.pop("SPACE_ID", None)
    command = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--session-root", str(root), *args]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_file = log
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}:\n{(tmp / 'app.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return proc, url, root
        except OSError:
            time.sleep(0.5)
    stop_app(proc)
    raise RuntimeError(f"app did not answer on {url} within {timeout:.0f} s:\n{(tmp / 'app.log').read_text()[-3000:]}")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log_file.close()


def colour_zip(path: Path, per_class: int = 8, size: int = 32, *, folder: str = "", seed: int = 0,
               with_non_image: bool = False) -> Path:
    """A zip with class folders ``red`` and ``blue`` of noisy reddish / bluish PNGs (optionally a text file)."""
    rng = np.random.default_rng(seed)
    prefix = f"{folder}/" if folder else ""
    with zipfile.ZipFile(path, "w") as zf:
        for cls, channel in (("red", 0), ("blue", 2)):
            for i in range(per_class):
                arr = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                arr[..., channel] = rng.integers(150, 256, (size, size), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                zf.writestr(f"{prefix}{cls}/{cls}_{i:02d}.png", buf.getvalue())
        if with_non_image:
            zf.writestr(f"{prefix}red/notes.txt", "not an image")
    return path
