"""End to end in a real headless Chromium: sample -> train both arms -> predict -> download model.onnx.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install -y chromium``; ``.ci/run`` installs it).
With ``SCREENSHOT_DIR`` set, a screenshot of every tab is also written there, from a somewhat longer run on the
default sample so that the comparison is meaningful (``SCREENSHOT_DIR=docs/screenshots pytest -m browser``
refreshes the README's docs/screenshots/compare.png).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import start_app, stop_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[1]
TINY = "sample:shapes?per_class=8&size=32"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"{CHROMIUM} not found: install Debian's Chromium with `apt-get install -y chromium` "
                              "(.ci/run does this); Playwright's own browser download is not used"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, _session_cache):
    tmp = tmp_path_factory.mktemp("browser-app")
    proc, url, root = start_app(tmp, _session_cache)
    yield url, root
    stop_app(proc)


def test_sample_train_predict_export_in_chromium(server, tmp_path):
    import onnxruntime as ort
    from playwright.sync_api import expect, sync_playwright

    from core.samples import make_shape_image

    url, _ = server
    shots_dir = os.environ.get("SCREENSHOT_DIR")
    docs_mode = bool(shots_dir)  # a longer run on the default sample, so the screenshots mean something
    if shots_dir:
        Path(shots_dir).mkdir(parents=True, exist_ok=True)

    def shot(page, name: str, clip_to: str | None = None, keep: bool = True) -> None:
        kwargs = {"full_page": True}
        if clip_to:
            box = page.locator(clip_to).bounding_box()
            kwargs["clip"] = {"x": 0, "y": 0, "width": page.viewport_size["width"],
                              "height": box["y"] + box["height"] + 16}
        page.screenshot(path=str(tmp_path / f"{name}.png"), **kwargs)
        if shots_dir and keep:
            shutil.copyfile(tmp_path / f"{name}.png", Path(shots_dir) / f"{name}.png")

    def in_viewport(page, selector: str) -> bool:
        box = page.locator(selector).bounding_box()
        size = page.viewport_size
        return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= size["height"] \
            and box["x"] + box["width"] <= size["width"]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # The first screen, on a phone and on a laptop: the active dataset and the Train button, no scrolling.
            for name, viewport in (("first_screen_phone", {"width": 390, "height": 844}),
                                   ("first_screen", {"width": 1400, "height": 900})):
                first = browser.new_context(viewport=viewport).new_page()
                first.goto(url)
                expect(first.locator("#active-dataset")).to_contain_text("shapes (balanced)", timeout=90_000)
                expect(first.locator("#train-btn")).to_be_visible()
                assert in_viewport(first, "#train-btn"), f"{name}: the Train button is below the fold"
                assert in_viewport(first, "#active-dataset"), f"{name}: the dataset line is below the fold"
                for tab in ("Train", "Data", "Predict", "Export", "Benchmark"):  # none hidden in an overflow menu
                    expect(first.get_by_role("tab", name=tab, exact=True)).to_be_visible()
                first.screenshot(path=str(tmp_path / f"{name}.png"))
                if shots_dir:
                    shutil.copyfile(tmp_path / f"{name}.png", Path(shots_dir) / f"{name}.png")
                first.context.close()

            context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)

            # Data: the default sample is loaded on page open; pick the tiny one by typing its spec.
            expect(page.locator("#active-dataset")).to_contain_text("shapes (balanced)", timeout=90_000)
            page.get_by_role("tab", name="Data").click()
            expect(page.locator("#data-summary")).to_contain_text("shapes (balanced)", timeout=90_000)
            if not docs_mode:
                box = page.locator("#preset input")
                box.click()
                box.fill(TINY)
                box.press("Enter")
                expect(page.locator("#data-summary")).to_contain_text("24 images")
            expect(page.locator("#data-warnings")).to_contain_text("balanced")
            expect(page.locator("#data-gallery img").first).to_be_visible()
            shot(page, "data")

            # Train: tiny settings, both arms.
            page.get_by_role("tab", name="Train", exact=True).click()
            if not docs_mode:
                expect(page.locator("#active-dataset")).to_contain_text("18 training / 6 validation")
            # Docs mode keeps the app's defaults (what a newcomer sees); the test itself uses tiny settings.
            # A 1 s budget stops scratch long before its 50 epochs, so "give scratch more time" is offered.
            settings = {} if docs_mode else {"#epochs": "50", "#image-size": "32"}
            for selector, value in settings.items():
                field = page.locator(f"{selector} input[type=number]")
                field.fill(value)
                field.press("Enter")
            if not docs_mode:
                budget = page.locator("#budget input")
                budget.fill("1")
                budget.press("Tab")
            expect(page.locator("#scratch input[type=checkbox]")).to_be_checked()
            for _ in range(2 if docs_mode else 1):  # docs: a second run, so one-time caches do not skew timings
                clicked = time.perf_counter()
                page.click("#train-btn")
                expect(page.locator("#train-status")).not_to_contain_text("Done", timeout=30_000)
                expect(page.locator("#train-log textarea")).to_have_value(re.compile("pretrained epoch"),
                                                                          timeout=120_000)
                expect(page.locator("#train-status")).to_contain_text("Done", timeout=240_000)
                print(f"click to results: {time.perf_counter() - clicked:.1f} s")  # shown with pytest -s
            table = page.locator("#results-table")
            expect(table).to_contain_text("validation accuracy")
            expect(table).to_contain_text("pretrained backbone + new head")
            expect(table).to_contain_text("head only (backbone frozen)")
            expect(table).to_contain_text("from scratch (same network)")
            expect(page.locator("#curves [data-testid=matplotlib] img")).to_be_visible()
            expect(page.locator("#confusion [data-testid=matplotlib] img")).to_be_visible()
            expect(page.locator("#verdicts")).to_contain_text("Verdicts")
            expect(page.locator("#speedup")).to_contain_text(re.compile(r"Pretrained: [\d.]+% correct"))
            expect(page.locator("#speedup")).to_contain_text(re.compile(r"From scratch: [\d.]+% correct"))
            expect(page.locator("#train-btn")).to_be_enabled()
            if not docs_mode:  # scratch goes on from where its budget stopped it: more epochs, the same run
                stopped = re.compile(r"From scratch: .* stopped it after ([\d.]+) of 50 epochs")
                expect(page.locator("#speedup")).to_contain_text(stopped)
                before = float(stopped.search(page.locator("#speedup").inner_text()).group(1))
                expect(page.locator("#more-md")).to_contain_text("Give it 1 s more")
                page.click("#more-btn")
                expect(page.locator("#speedup")).to_contain_text("you gave it 1 s more", timeout=120_000)
                expect(page.locator("#train-status")).to_contain_text("Done")
                after = float(stopped.search(page.locator("#speedup").inner_text()).group(1))
                assert after > before, (before, after)
            page.mouse.move(0, 0)
            time.sleep(0.5)
            shot(page, "compare", clip_to="#confusion")
            shot(page, "train_full", keep=False)

            # Predict: upload an image, see a label from the exported ONNX model.
            page.get_by_role("tab", name="Predict").click()
            image = tmp_path / "square.png"
            make_shape_image("square", seed=123, index=0, image_size=64).save(image)
            page.locator("#predict-image input[type=file]").set_input_files(str(image))
            expect(page.locator("#predict-info")).to_contain_text("ExecutionProvider")
            label_text = page.locator("#predict-label").inner_text()
            assert any(c in label_text for c in ("circle", "square", "triangle")), label_text
            expect(page.locator("#predict-info")).to_contain_text(" ms")
            # ...or click one of the dataset's validation images
            page.locator("#predict-examples .thumbnail-item").first.click()
            expect(page.locator("#predict-info")).to_contain_text("True class")
            shot(page, "predict")

            # Export: download model.onnx and run it with onnxruntime.
            page.get_by_role("tab", name="Export").click()
            expect(page.locator("#dl-onnx")).to_be_visible()
            expect(page.locator("#parity")).to_contain_text("passed")
            with page.expect_download() as download_info:
                page.click("#dl-onnx")
            downloaded = tmp_path / "downloaded.onnx"
            download_info.value.save_as(downloaded)
            shot(page, "export")

            # Benchmark tab (only rendered; timing it is covered by the unit tests).
            page.get_by_role("tab", name="Benchmark").click()
            expect(page.locator("#bench-btn")).to_be_visible()
            if docs_mode:
                page.click("#bench-btn")
                # A row label (the progress message inside the table also names onnxruntime FP32).
                expect(page.locator("#bench-table")).to_contain_text("PyTorch eager (NCHW", timeout=180_000)
            shot(page, "benchmark")
        finally:
            browser.close()

    session = ort.InferenceSession(str(downloaded), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["classes"] == '["circle", "square", "triangle"]'
    size = int(meta["image_size"])
    batch = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    probs = session.run(["probabilities"], {"image": batch})[0]
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-4)
    for name in ("data", "compare", "predict", "export", "benchmark"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
