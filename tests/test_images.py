"""Memory-bounded decoding of hostile uploads: header pixel caps and reduced-scale decodes."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from core.runtime.images import ImageDecodeError, check_pixels, open_rgb, to_array

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6000x6000 JPEG (36 MP: 144 MB once decoded at full size), about 0.5 MB on disk."""
    yy, xx = np.mgrid[0:375, 0:375]
    tile = np.stack([xx * 255 // 374, yy * 255 // 374, (xx + yy) * 255 // 748], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    Image.fromarray(tile).resize((6000, 6000), Image.Resampling.BILINEAR).save(path, quality=80)
    return path


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` but holds a few bytes of garbage pixel data: tiny on disk, and any
    attempt to decode it fails."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def _peak_mb_while(code: str) -> float:
    """Growth of a fresh interpreter's peak RSS (MB) while running ``code`` after its imports (Linux).

    VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak (it survives fork and exec)."""
    script = (
        "import json, re\n"
        "from core.runtime.images import open_rgb, to_array\n"
        "def peak():\n"
        "    return int(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read())[1])\n"
        "before = peak()\n"
        f"{code}\n"
        "print(json.dumps((peak() - before) / 1024))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- reduced decoding


def test_large_jpeg_is_decoded_at_reduced_scale_with_draft(big_jpeg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drafts = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        drafts.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    image = open_rgb(big_jpeg, reduce_to=256)
    assert drafts == [((256, 256), (750, 750))], "libjpeg must decode at 1/8 scale"
    assert image.mode == "RGB" and 256 <= min(image.size) <= 512 and image.size == (375, 375)
    assert check_pixels(big_jpeg, reduce_to=256) == 750 * 750


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reduced_jpeg_decode_keeps_peak_memory_far_below_a_full_decode(big_jpeg: Path) -> None:
    reduced = _peak_mb_while(f"open_rgb({str(big_jpeg)!r}, reduce_to=256)")
    full = _peak_mb_while(f"open_rgb({str(big_jpeg)!r})")
    assert full > 130, f"a full decode of 36 MP must take over 130 MB (took {full:.0f} MB): the test is void"
    assert reduced < 30, f"the reduced decode grew the peak by {reduced:.0f} MB"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_sequential_reduced_png_decodes_hold_one_full_size_image_at_a_time(tmp_path: Path) -> None:
    paths = []
    for i in range(4):  # 9 MP each: 36 MB once decoded, 144 MB for all four
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (3000, 3000), (60 * i, 90, 200)).save(paths[-1], compress_level=1)
    kept = _peak_mb_while(f"images = [open_rgb(p, reduce_to=256) for p in {[str(p) for p in paths]!r}]\n"
                          "assert all(min(im.size) < 512 for im in images)")
    assert kept < 75, f"decoding four 9 MP PNGs in turn grew the peak by {kept:.0f} MB (one is 36 MB)"


def test_reduced_decode_matches_full_decode_up_to_resampling(tmp_path: Path) -> None:
    """Sides the factor does not divide (partial last boxes), a JPEG and a PNG, EXIF rotation: the model's input is
    the same up to resampling noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1203, 0:1803]
    sharp = np.stack([xx * 255 // 1802, yy * 255 // 1202, ((xx // 150 + yy // 150) % 2) * 255], -1)
    picture = Image.fromarray(np.clip(sharp + rng.integers(-8, 9, sharp.shape), 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    for name in ("p.png", "p.jpg"):
        picture.save(tmp_path / name, exif=exif.tobytes(), quality=95)
        full, small = open_rgb(tmp_path / name), open_rgb(tmp_path / name, reduce_to=256)
        assert full.size == (1203, 1803) and small.size == (301, 451), "reduced 4x (PNG) or 1/4 (JPEG), rotated"
        assert small.mode == "RGB" and not small.getexif()
        diff = np.abs(to_array(full, 112, 128).astype(int) - to_array(small, 112, 128).astype(int))
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 16, (name, diff.mean(), np.percentile(diff, 99))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "F"])
def test_reduced_decode_keeps_each_mode_rule(tmp_path: Path, mode: str) -> None:
    grad = np.tile(np.linspace(0, 255, 900), (600, 1))
    arrays = {"L": grad.astype(np.uint8), "LA": np.stack([grad, grad[:, ::-1]], -1).astype(np.uint8),
              "RGBA": np.stack([grad, grad[:, ::-1], grad, grad], -1).astype(np.uint8),
              "I;16": (grad * 257).astype(np.uint16), "F": (grad * 3.5).astype(np.float32)}
    if mode == "P":
        image = Image.fromarray(np.stack([grad] * 3, -1).astype(np.uint8)).convert("P")
    else:
        image = Image.fromarray(arrays[mode], mode="LA" if mode == "LA" else None)
    path = tmp_path / ("x.tif" if mode == "F" else "x.png")
    image.save(path)
    full, small = open_rgb(path), open_rgb(path, reduce_to=100)
    assert small.size == (150, 100) and small.mode == "RGB"
    diff = np.abs(to_array(full, 90, 100).astype(int) - to_array(small, 90, 100).astype(int))
    assert diff.mean() < 1.5, (mode, diff.mean())


def test_small_images_and_bad_arguments() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (1, 2, 3)).save(buf, format="PNG")
    assert open_rgb(io.BytesIO(buf.getvalue()), reduce_to=256).size == (300, 200)  # never enlarged
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="reduce_to must be a positive integer"):
            open_rgb(io.BytesIO(buf.getvalue()), reduce_to=bad)
        with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
            check_pixels(io.BytesIO(buf.getvalue()), bad)


# ---------------------------------------------------------------- pixel caps from the header


def test_pixel_cap_refuses_an_oversize_png_from_its_header_without_decoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self))
    path = tmp_path / "claims-9400.png"
    path.write_bytes(_png_header(9400, 9400))
    assert path.stat().st_size < 100
    expected = "image too large: 9400x9400 = 88.4 MP; the limit here is 40 MP; resize it and upload again"
    for call in (lambda: check_pixels(path, 40_000_000), lambda: open_rgb(path, max_pixels=40_000_000),
                 lambda: open_rgb(path, max_pixels=40_000_000, reduce_to=256)):
        with pytest.raises(ImageDecodeError) as e:
            call()
        assert e.value.reason == expected and e.value.path == str(path)
    assert not loads, "the refused image was decoded"
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):  # what decoding it would have given
        open_rgb(path)


def test_pixel_cap_refuses_a_20000_square_png_header(tmp_path: Path) -> None:
    path = tmp_path / "claims-20000.png"
    path.write_bytes(_png_header(20000, 20000))
    with pytest.raises(ImageDecodeError, match=r"^.*image too large: 400 MP; the limit here is 40 MP; resize it"):
        open_rgb(path, max_pixels=40_000_000)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        open_rgb(path)


def test_pixel_cap_counts_a_jpeg_at_the_scale_it_is_decoded(big_jpeg: Path) -> None:
    with pytest.raises(ImageDecodeError, match="6000x6000 = 36 MP; the limit here is 20 MP"):
        check_pixels(big_jpeg, 20_000_000)
    assert check_pixels(big_jpeg, 20_000_000, reduce_to=256) == 750 * 750  # decoded at 1/8 scale
    assert open_rgb(big_jpeg, max_pixels=20_000_000, reduce_to=256).size == (375, 375)
    with pytest.raises(ImageDecodeError, match=r"750x750 = 0.6 MP when decoded at reduced scale; the limit here is "
                                               r"0.5 MP"):
        check_pixels(big_jpeg, 500_000, reduce_to=256)


def test_check_pixels_leaves_a_file_object_where_it_was() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="PNG")
    buf.seek(0)
    assert check_pixels(buf, 10_000) == 1200 and buf.tell() == 0
    assert open_rgb(buf).size == (40, 30)


def test_only_the_supported_formats_are_decoded(tmp_path: Path) -> None:
    """A file of another Pillow format (here PPM, EPS would run Ghostscript) is refused whatever its name."""
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "photo.jpg", format="PPM")
    with pytest.raises(ImageDecodeError, match="unrecognised file format"):
        open_rgb(tmp_path / "photo.jpg")
