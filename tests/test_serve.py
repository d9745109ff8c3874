"""The serving app (``python app.py --model``) as the ``Spacefile`` deploys it: only the files it ships, torch
unimportable, listening on ``$PORT``; classifying through its API."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from core.runtime.predictor import Predictor
from core.serve_view import default_port, serving_model
from tests.helpers import free_port, stop_app

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "onnx", "models", "export", "sklearn", "matplotlib")

# Put where the deployment's packages go (PYTHONPATH=vendor): Python imports it at start-up, before app.py.
BLOCKER = f"""
import os, sys

BLOCKED = {BLOCKED!r}
LOG = os.environ["BLOCKED_LOG"]


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(LOG, "a") as f:
                f.write("attempt " + name + "\\n")
            raise ImportError(name + " is not installed on this host")
        return None


sys.meta_path.insert(0, _Blocker())
with open(LOG, "a") as f:
    f.write("blocker active\\n")
"""


def spacefile() -> dict:
    return yaml.safe_load((REPO / "Spacefile").read_text(encoding="utf-8"))


def test_spacefile_is_a_v0_spacefile_for_the_serving_app():
    doc = spacefile()
    assert doc["v"] == 0
    (micro,) = doc["micros"]
    assert {"name", "src", "engine", "run"} <= set(micro)
    assert micro["name"].replace("-", "").isalnum() and micro["name"][0].isalnum()  # the platform's naming rule
    assert micro["engine"] == "custom" and micro["primary"] is True
    assert (REPO / micro["src"]).is_dir()
    for path in micro["include"]:  # everything it ships exists, except what its build commands make
        assert (REPO / path).exists() or path.rstrip("/") == "vendor", path
    assert any("requirements-serve.txt" in c for c in micro["commands"])
    env = {e["name"]: e["default"] for e in micro["presets"]["env"]}
    assert (REPO / env["TRANSFER_LAB_MODEL"]).is_file() and (REPO / env["TRANSFER_LAB_EXAMPLES"]).is_dir()


def test_serving_requirements_leave_out_torch():
    names = {line.split("==")[0].strip().lower() for line in (REPO / "requirements-serve.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert {"gradio", "onnxruntime", "numpy", "pillow"} <= names
    assert not names & {"torch", "torchvision", "onnx", "scikit-learn", "matplotlib"}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory):
    """The Spacefile's micro, run locally: its ``include`` copied to a folder, a torch blocker where its packages
    go, its ``run`` command with the presets' environment and a ``$PORT``."""
    micro = spacefile()["micros"][0]
    app_dir = tmp_path_factory.mktemp("micro")
    for path in micro["include"]:
        source = REPO / path
        if path.rstrip("/") == "vendor":
            (app_dir / "vendor").mkdir()
        elif source.is_dir():
            shutil.copytree(source, app_dir / path, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (app_dir / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, app_dir / path)
    (app_dir / "vendor" / "sitecustomize.py").write_text(BLOCKER)
    log = app_dir / "blocked.log"
    port = free_port()
    env = {**os.environ, "PORT": str(port), "BLOCKED_LOG": str(log), "GRADIO_ANALYTICS_ENABLED": "False",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3: this interpreter
    env.pop("GRADIO_SERVER_PORT", None)
    env.pop("SPACE_ID", None)
    env.update({e["name"]: str(e["default"]) for e in micro["presets"]["env"]})
    out = open(app_dir / "app.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(shlex.split(micro["run"]), cwd=app_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the micro did not start:\n{(app_dir / 'app.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield url, app_dir, log
    finally:
        proc.log_file = out
        stop_app(proc)  # and closes the log


def test_deployed_micro_classifies_through_its_api_without_torch(deployed):
    from gradio_client import Client, handle_file

    url, app_dir, log = deployed
    image = app_dir / "export" / "examples" / "shapes" / "triangle.png"
    label, info, table, _looked = Client(url, verbose=False).predict(handle_file(str(image)), [], 3,
                                                                     api_name="/predict")
    lines = log.read_text().splitlines()
    assert lines[0] == "blocker active" and not any(line.startswith("attempt torch") for line in lines), lines
    assert label["label"] == "triangle"
    expected = Predictor(REPO / "export" / "examples" / "shapes.int8.onnx", device="cpu").predict(
        [image], top_k=3)[0]
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert got == pytest.approx({t["label"]: t["probability"] for t in expected["top_k"]}, abs=1e-5)
    assert "CPUExecutionProvider" in info and "ms" in info  # says which provider ran, and how long it took
    assert table["headers"] == ["image", "answer", "sure", "fits a class?"]
    assert table["data"][0][:2] == ["triangle.png", "triangle"]


def test_deployed_micro_classifies_a_batch_of_files(deployed):
    from gradio_client import Client, handle_file

    url, app_dir, _log = deployed
    files = [app_dir / "export" / "examples" / "shapes" / f"{s}.png" for s in ("square", "circle", "triangle")]
    label, info, table, _ = Client(url, verbose=False).predict(None, [handle_file(str(f)) for f in files], 2,
                                                               api_name="/predict")
    assert [row[:2] for row in table["data"]] == [["square.png", "square"], ["circle.png", "circle"],
                                                  ["triangle.png", "triangle"]]
    assert label["label"] == "square" and len(label["confidences"]) == 2 and "3 image(s)" in info


def test_deployed_micro_refuses_a_broken_image_in_plain_words(deployed, tmp_path):
    from gradio_client import Client, handle_file

    url, _app_dir, _log = deployed
    fake = tmp_path / "holiday.png"
    fake.write_bytes(b"this is not a picture")
    client = Client(url, verbose=False)
    with pytest.raises(Exception) as caught:  # the client raises its AppError with the page's message
        client.predict(None, [handle_file(str(fake))], 3, api_name="/predict")
    message = str(caught.value)
    assert "holiday.png cannot be read as an image: not an image" in message
    with pytest.raises(Exception) as caught:  # the image slot says the same (Gradio's own check does not stop it)
        client.predict(handle_file(str(fake)), [], 3, api_name="/predict")
    assert "holiday.png cannot be read as an image: not an image" in str(caught.value)
    for said in (message, str(caught.value)):
        assert "Traceback" not in said and "/tmp" not in said and "PIL" not in said


def test_serving_app_says_what_to_do_with_a_missing_model(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "app.py"), "--model", str(tmp_path / "gone.onnx")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "no such file" in proc.stderr and "python -m core train" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_mode_and_port_come_from_flags_or_the_environment(monkeypatch):
    monkeypatch.delenv("TRANSFER_LAB_MODEL", raising=False)
    assert serving_model(["--port", "80"]) is None  # the lab
    assert serving_model(["--model", "m.onnx", "--port", "80"]) == "m.onnx"
    monkeypatch.setenv("TRANSFER_LAB_MODEL", "env.onnx")
    assert serving_model([]) == "env.onnx"
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    monkeypatch.setenv("PORT", "8080")
    assert default_port() == 8080
    monkeypatch.setenv("PORT", "http")
    with pytest.raises(SystemExit, match="not a port number"):
        default_port()
