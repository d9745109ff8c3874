"""A running ``python app.py`` against hostile visitors, over HTTP (gradio_client and raw requests, like the load test).

What a public Space must hold: nothing under the session root is served except what the app returned to that
visitor (and never inline as HTML/SVG), only images are unpacked from a zip, markup in names stays text, one
session cannot flood the queues, and hostile uploads are refused with a clear message.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import colour_zip, start_app, stop_app

TINY = "sample:shapes?per_class=8&size=32"
# backbone, epochs, budget (0 = the server's limit), image size, target, device, also from scratch, seed
QUICK = ("efficientnet_lite0", 1, 0, 32, 0.85, "cpu", False, 0)
LONG = ("efficientnet_lite0", 6, 0, 32, 0.85, "cpu", True, 0)  # long enough to still run while we flood
MARKUP_CLASS = "<img src=x onerror=alert(1)>"
LINK_CLASS = "[click](javascript:alert(1))"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, _session_cache):
    """``python app.py`` on a free localhost port: (process, url, session root)."""
    proc, url, root = start_app(tmp_path_factory.mktemp("security-app"), _session_cache)
    try:
        yield proc, url, root
    finally:
        stop_app(proc)


@pytest.fixture(scope="module")
def app_server(server):
    """(url, session root) of the running app."""
    return server[1], server[2]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakRSS:
    """The server's resident memory sampled every 20 ms while the block runs: ``growth`` in MB over the start."""

    def __init__(self, pid: int) -> None:
        self.pid, self.start, self.peak = pid, rss_mb(pid), 0.0

    def __enter__(self) -> PeakRSS:
        import threading

        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, rss_mb(self.pid))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))

    @property
    def growth(self) -> float:
        return self.peak - self.start


def handle_file(path: str):
    from gradio_client import handle_file

    return handle_file(path)


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def fetch(url: str, path: str | Path) -> tuple[int, dict[str, str], bytes]:
    """GET ``/gradio_api/file=<path>``: (status, headers, body)."""
    target = f"{url}gradio_api/file={urllib.parse.quote(str(path))}"
    try:
        with urllib.request.urlopen(target, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), b""


def png_bytes(colour: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def hostile_zip(path: Path) -> Path:
    """Two classes of images, plus an HTML page, an SVG with a script and a JS file beside them."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for cls, channel in (("red", 0), ("blue", 2)):
            for i in range(6):
                arr = rng.integers(0, 90, (24, 24, 3), dtype=np.uint8)
                arr[..., channel] = 220
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                zf.writestr(f"{cls}/{i}.png", buf.getvalue())
        zf.writestr("red/evil.html", "<script>alert(document.cookie)</script>")
        zf.writestr("blue/evil.svg", '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
        zf.writestr("blue/evil.js", "alert(1)")
        zf.writestr("red/evil.svg.png", '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    return path


def test_zip_members_that_are_not_images_are_neither_unpacked_nor_served(app_server, tmp_path):
    url, root = app_server
    visitor = client(url)
    out = visitor.predict(handle_file(str(hostile_zip(tmp_path / "hostile.zip"))), api_name="/load_zip")
    summary, skipped = out[0], out[3]  # the API leaves the state out: summary, plot, gallery, skipped, warnings
    assert "2 classes" in summary, summary
    unpacked = {p.name for p in root.rglob("evil.*")}
    assert not unpacked, f"non-image members were written under the session root: {unpacked}"
    listed = {Path(row[0]).name for row in skipped["data"]}
    assert {"evil.html", "evil.svg", "evil.js", "evil.svg.png"} <= listed, skipped
    # Nothing under the session root is served by its path, not even the visitor's own images.
    image = next(root.rglob("*.png"))
    for path in (image, str(image).replace("/", "%2F"), f"{root}/../{image.relative_to(root.parent)}"):
        status, _, _ = fetch(url, path)
        assert status in (403, 404), (path, status)


def test_outputs_are_served_from_the_cache_never_inline_as_html(app_server, tmp_path):
    url, root = app_server
    visitor = client(url)
    visitor.predict(TINY, api_name="/load_sample")
    out = visitor.predict(*QUICK, api_name="/train")
    assert "Done" in out[0], out[0]
    downloads = [o for o in out if isinstance(o, dict) and isinstance(o.get("value"), dict)
                 and str(o["value"].get("path", "")).endswith(".json")]
    assert downloads, "the train endpoint returned no report.json download"
    served = downloads[0]["value"]
    assert not str(served["path"]).startswith(str(root)), "an output was handed out by its session-root path"
    status, headers, body = fetch(url, served["path"])
    assert status == 200
    report = json.loads(body)
    assert str(root) not in json.dumps(report), "report.json holds a server path"
    headers = {k.lower(): v for k, v in headers.items()}
    kind = headers["content-type"]
    assert not any(active in kind for active in ("html", "svg", "javascript", "xml")), headers


def test_another_sessions_files_are_not_served(app_server, tmp_path):
    url, root = app_server
    victim = client(url)
    victim.predict(handle_file(str(colour_zip(tmp_path / "victim.zip", seed=3))), api_name="/load_zip")
    victims_files = [p for p in root.rglob("*") if p.is_file()]
    assert victims_files
    for path in victims_files[:5]:
        status, _, _ = fetch(url, path)
        assert status in (403, 404), (path, status)


def test_markup_in_class_names_stays_text(app_server, tmp_path):
    url, _ = app_server
    zip_path = tmp_path / "markup.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for cls, colour in ((MARKUP_CLASS, (220, 20, 20)), (LINK_CLASS, (20, 20, 220))):
            for i in range(6):
                zf.writestr(f"{cls}/{i}.png", png_bytes(colour))
    out = client(url).predict(handle_file(str(zip_path)), api_name="/load_zip")
    summary = out[0]
    assert "<img" not in summary and "&lt;img" in summary, summary
    assert "\\[click\\]\\(javascript:alert\\(1\\)\\)" in summary, summary


def test_one_session_cannot_fill_the_queues(app_server):
    from httpx import HTTPStatusError

    url, _ = app_server
    flooder, other = client(url), client(url)
    flooder.predict(TINY, api_name="/load_sample")
    other.predict("sample:shapes?per_class=6&size=32", api_name="/load_sample")
    first = flooder.submit(*LONG, api_name="/train")
    deadline = time.monotonic() + 60  # submit() returns before the request has joined the queue
    while first.status().code.name not in ("IN_QUEUE", "PROCESSING", "ITERATING", "PROGRESS", "LOG"):
        assert time.monotonic() < deadline, f"the first training never joined the queue: {first.status()}"
        time.sleep(0.1)
    refused = 0
    for _ in range(5):
        try:
            flooder.submit(*QUICK, api_name="/train").result(timeout=30)
        except HTTPStatusError as exc:
            assert exc.response.status_code == 400
            assert "already have a training waiting" in exc.response.json()["detail"], exc.response.text
            refused += 1
    assert refused == 5, "a session queued a second training while its first was waiting or running"
    # Another visitor is still served at once, and may queue their own training behind the flooder's one.
    start = time.monotonic()
    out = other.predict(TINY, api_name="/load_sample")
    assert "3 classes" in out[0]
    assert time.monotonic() - start < 20
    theirs = other.submit(*QUICK, api_name="/train")
    assert "Done" in first.result(timeout=300)[0]
    assert "Done" in theirs.result(timeout=300)[0]


def big_png(path: Path, side: int) -> Path:
    """A ``side`` x ``side`` RGB PNG that compresses well (a small upload that decodes to side*side*3 bytes)."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    Image.fromarray(np.stack([np.broadcast_to(ramp, (side, side))] * 3, axis=-1)).save(path, compress_level=1)
    return path


def test_predict_memory_is_bounded_for_many_large_images(server, tmp_path):
    from gradio_client.exceptions import AppError

    proc, url, _ = server
    visitor = client(url)
    visitor.predict(TINY, api_name="/load_sample")
    assert "Done" in visitor.predict(*QUICK, api_name="/train")[0]
    near_limit = big_png(tmp_path / "near-limit.png", 6000)  # 36 MP: under the 40 MP cap per image
    files = [handle_file(str(near_limit)) for _ in range(8)]
    with PeakRSS(proc.pid) as rss:
        label, _info, table, _looked = visitor.predict("run:fp32", None, files, api_name="/predict")
    assert len(table["data"]) == 8 and label["label"]
    # Decoded at full size, eight of these held ~2.6 GB at once; reduced while decoding, one at a time, far less.
    assert rss.growth < 600, f"the server grew by {rss.growth:.0f} MB for 8 images of 36 MP"
    over = big_png(tmp_path / "over.png", 7000)  # 49 MP: refused from its header, never decoded
    with PeakRSS(proc.pid) as rss, pytest.raises(AppError, match="too large"):
        visitor.predict("run:fp32", handle_file(str(over)), None, api_name="/predict")
    assert rss.growth < 100, f"the server grew by {rss.growth:.0f} MB refusing one image"


@pytest.mark.parametrize("make, problem", [("constant_of_shape_bomb", "ConstantOfShape"),
                                           ("pixel_sized_range", "size of tensor"),
                                           ("external_weights", "external")])
def test_hostile_models_are_refused_before_they_run(server, tmp_path, make, problem):
    from gradio_client.exceptions import AppError

    from tests import hostile_models

    proc, url, _ = server
    model = getattr(hostile_models, make)(tmp_path / f"{make}.onnx")
    with PeakRSS(proc.pid) as rss, pytest.raises(AppError) as refused:
        client(url).predict(handle_file(str(model)), api_name="/upload_model")
    assert "not a usable model" in str(refused.value) and problem.lower() in str(refused.value).lower(), refused.value
    assert str(tmp_path) not in str(refused.value)
    assert rss.growth < 100, f"the server grew by {rss.growth:.0f} MB checking {make}"


@pytest.fixture(scope="module")
def small_quota_server(tmp_path_factory, _session_cache):
    """The app with a 1 MB disk quota per session."""
    proc, url, root = start_app(tmp_path_factory.mktemp("quota-app"), _session_cache, args=("--session-quota", "1"))
    try:
        yield url, root
    finally:
        stop_app(proc)


def test_a_session_over_its_disk_quota_is_refused_clearly(small_quota_server, tmp_path):
    from gradio_client.exceptions import AppError

    url, root = small_quota_server
    visitor = client(url)
    small = colour_zip(tmp_path / "small.zip", per_class=6, size=24)
    out = visitor.predict(handle_file(str(small)), api_name="/load_zip")
    assert "2 classes" in out[0]
    big = colour_zip(tmp_path / "big.zip", per_class=40, size=128)  # ~4 MB of noisy PNGs
    assert big.stat().st_size > 1024**2
    time.sleep(1.0)  # past the queue limit's 0.5 s window, so the refusal below can only be the quota's
    with pytest.raises(AppError, match="1 MB a session may store") as refused:
        visitor.predict(handle_file(str(big)), api_name="/load_zip")
    assert str(root) not in str(refused.value)
    # The earlier dataset is still the session's: training uses it (and is refused only for lack of room).
    sizes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert sizes < 2 * 1024**2, f"{sizes} bytes written under the root by a refused upload"


def test_a_full_disk_keeps_the_earlier_dataset_and_says_so(tmp_path, monkeypatch):
    import errno

    import app
    from core import sessions

    app.configure(tmp_path / "sessions")
    state = app.new_session()
    first = app.load_zip(str(colour_zip(tmp_path / "first.zip")), state)
    state = first[0]
    before = state["dataset"]

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "sessions" / "x"))

    monkeypatch.setattr(sessions.shutil, "copyfile", full)
    with pytest.raises(app.gr.Error) as refused:
        app.load_zip(str(colour_zip(tmp_path / "second.zip", seed=5)), state)
    assert "disk is full" in refused.value.message
    assert str(tmp_path) not in refused.value.message
    assert state["dataset"] is before
    leftovers = [p for p in (tmp_path / "sessions").rglob("upload-*") if p.is_dir()]
    assert len(leftovers) == 1, leftovers  # the first upload only


def test_requests_sent_together_cannot_beat_the_per_session_limit(app_server):
    from httpx import HTTPStatusError

    url, _ = app_server
    burst = client(url)
    burst.predict(TINY, api_name="/load_sample")
    jobs = [burst.submit(*QUICK, api_name="/train") for _ in range(6)]  # each joins from its own thread at once
    accepted = 0
    for job in jobs:
        try:
            assert "Done" in job.result(timeout=300)[0]
            accepted += 1
        except HTTPStatusError as exc:
            assert exc.response.status_code == 400
    assert accepted == 1, f"{accepted} trainings of one session were let into the queue together"


def test_the_sample_menu_never_replaces_an_upload_or_reloads_itself(tmp_path):
    import app

    app.configure(tmp_path / "sessions")
    state = app.load_zip(str(colour_zip(tmp_path / "mine.zip")), app.new_session())[0]
    uploaded = state["dataset"]
    outputs = dict(zip(app.DATA_OUTPUTS, app.load_zip(str(colour_zip(tmp_path / "mine2.zip", seed=4)), state)))
    assert outputs["preset"] == {"__type__": "update", "value": None}  # the menu no longer names a sample
    uploaded = state["dataset"]
    for menu_value in (None, ""):  # the menu opened and closed after an upload
        assert app.load_sample(menu_value, state)[0]["dataset"] is uploaded
    state = app.load_sample(TINY, state)[0]
    sample = state["dataset"]
    assert sample is not uploaded
    assert app.load_sample(TINY, state)[0]["dataset"] is sample  # the same sample again: not reloaded
