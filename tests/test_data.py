"""Dataset sources: image decoding, safe zip extraction, samples and splits."""

from __future__ import annotations

import csv
import io
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.data import DatasetError, Item, load_dataset
from core.runtime.files import sha256_file
from core.runtime.images import ImageDecodeError, open_rgb
from core.safezip import NOT_AN_IMAGE, SKIPPED_LIST, UnsafeArchiveError, read_skipped, safe_extract
from core.samples import (
    SAMPLES,
    SampleError,
    make_shapes,
    parse_sample_spec,
    sample_metadata,
    shapes_class_counts,
)

# ---------------------------------------------------------------- helpers


def _img(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _class_tree(root: Path, counts: dict[str, int]) -> Path:
    for ci, (cls, n) in enumerate(counts.items()):
        for i in range(n):
            _img(root / cls / f"{cls}_{i:03d}.png", (ci * 60 % 256, i * 7 % 256, 90))
    return root


def _png_bytes(colour: tuple[int, int, int] = (10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _px(im: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert im.mode == "RGB"
    return im.getpixel(xy)


# ---------------------------------------------------------------- images


def test_every_common_image_format_is_loaded_and_other_files_are_skipped(tmp_path: Path) -> None:
    formats = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
               ".tif": "TIFF", ".tiff": "TIFF"}
    written = []
    (tmp_path / "mixed").mkdir()
    for i, (ext, fmt) in enumerate(formats.items()):
        for name in (f"lower{i}{ext}", f"UPPER{i}{ext.upper()}"):  # photo.JPG from cameras and Windows
            Image.new("RGB", (8, 8), (30 * i, 200, 30)).save(tmp_path / "mixed" / name, format=fmt)
            written.append(f"mixed/{name}")
    (tmp_path / "mixed" / "notes.txt").write_text("a photo log, not a photo")
    _class_tree(tmp_path, {"other": 4})
    ds = load_dataset(tmp_path, val_fraction=0.25)
    assert ds.classes == ["mixed", "other"]
    mixed = sorted(ds.relpath(it) for it in ds.items if ds.classes[it.label] == "mixed")
    assert mixed == sorted(written)  # every format, either case, decoded and used
    assert [(s.file, s.reason) for s in ds.skipped] == [("mixed/notes.txt", "not an image file extension")]


def test_mode_L_and_1(tmp_path: Path) -> None:
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert _px(open_rgb(tmp_path / "l.png")) == (77, 77, 77)
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    one.save(tmp_path / "one.png")
    im = open_rgb(tmp_path / "one.png")
    assert _px(im, (0, 0)) == (0, 0, 0) and _px(im, (1, 0)) == (255, 255, 255)


def test_mode_LA_transparent_is_white(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1), (40, 0))
    la.putpixel((1, 0), (40, 255))
    la.save(tmp_path / "la.png")
    im = open_rgb(tmp_path / "la.png")
    assert _px(im, (0, 0)) == (255, 255, 255)
    assert _px(im, (1, 0)) == (40, 40, 40)


@pytest.mark.parametrize("ext", [".png", ".gif"])
def test_mode_P_with_transparency(tmp_path: Path, ext: str) -> None:
    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # index 0 black (transparent), 1 red
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / f"p{ext}", transparency=0)
    im = open_rgb(tmp_path / f"p{ext}")
    assert _px(im, (0, 0)) == (255, 255, 255), "transparent palette pixel must become white, not black"
    assert _px(im, (1, 0)) == (255, 0, 0)


def test_mode_P_without_transparency(tmp_path: Path) -> None:
    p = Image.new("P", (1, 1), 1)
    p.putpalette([0, 0, 0, 0, 128, 255] + [0] * (256 * 3 - 6))
    p.save(tmp_path / "p.png")
    assert _px(open_rgb(tmp_path / "p.png")) == (0, 128, 255)


def test_mode_RGBA_alpha_over_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    rgba.save(tmp_path / "a.png")
    im = open_rgb(tmp_path / "a.png")
    assert _px(im, (0, 0)) == (255, 255, 255)
    assert _px(im, (1, 0)) == (0, 0, 255)
    assert all(abs(v - 127) <= 2 for v in _px(im, (2, 0)))


def test_mode_CMYK(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    cmyk.save(tmp_path / "c.tif")
    im = open_rgb(tmp_path / "c.tif")
    assert _px(im, (0, 0)) == (255, 255, 255)
    assert _px(im, (1, 0)) == (255, 0, 0)


def test_mode_I16_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 65535, 32768, 1000]], dtype=np.uint16)
    src = Image.fromarray(arr)
    assert src.mode == "I;16"
    src.save(tmp_path / "deep.png")
    im = open_rgb(tmp_path / "deep.png")
    assert [_px(im, (x, 0))[0] for x in range(4)] == [0, 255, 128, 4]


def test_mode_I_and_F(tmp_path: Path) -> None:
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert i32.mode == "I"
    i32.save(tmp_path / "i.tif")
    im = open_rgb(tmp_path / "i.tif")
    assert [_px(im, (x, 0))[0] for x in range(2)] == [0, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    f.save(tmp_path / "f.tif")
    im = open_rgb(tmp_path / "f.tif")
    assert [_px(im, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (0, 90, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert Image.open(tmp_path / "rot.jpg").size == (40, 20)
    assert open_rgb(tmp_path / "rot.jpg").size == (20, 40)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    assert _px(open_rgb(tmp_path / "anim.gif")) == (255, 0, 0)


def test_truncated_empty_and_non_image(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG")
    (tmp_path / "empty.png").write_bytes(b"")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageDecodeError) as e:
        open_rgb(tmp_path / "t.jpg")
    assert e.value.reason == "truncated image"
    with pytest.raises(ImageDecodeError, match="not an image"):
        open_rgb(tmp_path / "text.jpg")
    with pytest.raises(ImageDecodeError, match="empty file"):
        open_rgb(tmp_path / "empty.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12, 30])  # over the limit, and over twice the limit
def test_decompression_bomb_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int) -> None:
    _img(tmp_path / "big.png", size=(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match="too large"):
        open_rgb(tmp_path / "big.png")
    assert Image.MAX_IMAGE_PIXELS == 100


def test_open_rgb_accepts_file_objects_and_hash(tmp_path: Path) -> None:
    path = _img(tmp_path / "x.png", (1, 2, 3))
    with open(path, "rb") as f:
        assert _px(open_rgb(f)) == (1, 2, 3)
    import hashlib

    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- safe zip


def _zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def _good_entries(prefix: str = "data/") -> list[tuple[zipfile.ZipInfo | str, bytes]]:
    return [
        (f"{prefix}{c}/{c}{i}.png", _png_bytes((i * 40, 100 if c == "cats" else 0, 7)))
        for c in ("cats", "dogs")
        for i in range(3)
    ]


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("../evil.png", "'..'"),
        ("data/../../evil.png", "'..'"),
        ("/tmp/abs.png", "absolute path"),
        ("C:/windows/evil.png", "absolute path"),
        (_symlink_info("data/cats/link.png"), "symbolic link"),
    ],
)
def test_unsafe_entries_refused(tmp_path: Path, entry: zipfile.ZipInfo | str, message: str) -> None:
    zpath = _zip(tmp_path / "bad.zip", [*_good_entries(), (entry, b"/etc/passwd")])
    before = _listing(tmp_path)
    with pytest.raises(UnsafeArchiveError, match=message) as e:
        safe_extract(zpath, tmp_path / "out")
    name = entry.filename if isinstance(entry, zipfile.ZipInfo) else entry
    assert name in str(e.value) and "bad.zip" in str(e.value)
    assert _listing(tmp_path) == before, "a refused zip must leave nothing behind"


def test_zip_bomb_refused_while_streaming(tmp_path: Path) -> None:
    zpath = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("data/cats/a.png", _png_bytes())
        with zf.open("data/cats/zeros.png", "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(50):
                f.write(chunk)
    assert zpath.stat().st_size < 50 * 1024**2 / 200
    before = _listing(tmp_path)
    with pytest.raises(UnsafeArchiveError, match="zip bomb") as e:
        safe_extract(zpath, tmp_path / "out")
    assert "zeros.png" in str(e.value)
    assert _listing(tmp_path) == before


def test_zip_limits_entries_and_total_bytes(tmp_path: Path) -> None:
    zpath = _zip(tmp_path / "z.zip", _good_entries())
    with pytest.raises(UnsafeArchiveError, match="entries"):
        safe_extract(zpath, tmp_path / "a", max_entries=3)
    with pytest.raises(UnsafeArchiveError, match="uncompressed size"):
        safe_extract(zpath, tmp_path / "b", max_total_bytes=200)
    assert _listing(tmp_path) == ["z.zip"]


def test_zip_header_sizes_not_trusted(tmp_path: Path) -> None:
    """A central directory that understates an entry's size is caught (size check or CRC)."""
    zpath = _zip(tmp_path / "lie.zip", [("data/cats/a.png", bytes(5000)), ("data/dogs/b.png", _png_bytes())])
    raw = bytearray(zpath.read_bytes())
    with zipfile.ZipFile(zpath) as zf:
        info = zf.getinfo("data/cats/a.png")
    cd = raw.rfind(b"PK\x01\x02", 0, raw.rfind(b"data/cats/a.png"))
    raw[cd + 24 : cd + 28] = (10).to_bytes(4, "little")  # uncompressed size in the central directory
    assert info.file_size == 5000
    zpath.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchiveError):
        safe_extract(zpath, tmp_path / "out", max_total_bytes=4000)
    assert _listing(tmp_path) == ["lie.zip"]


def test_not_a_zip_and_corrupt(tmp_path: Path) -> None:
    (tmp_path / "fake.zip").write_text("not a zip at all")
    with pytest.raises(UnsafeArchiveError, match="not a valid zip"):
        safe_extract(tmp_path / "fake.zip", tmp_path / "out")
    good = _zip(tmp_path / "good.zip", _good_entries()).read_bytes()
    (tmp_path / "cut.zip").write_bytes(good[: len(good) // 2])
    with pytest.raises(UnsafeArchiveError):
        safe_extract(tmp_path / "cut.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hidden_and_macosx_ignored_and_single_root(tmp_path: Path) -> None:
    zpath = _zip(
        tmp_path / "mac.zip",
        [
            *_good_entries(),
            ("__MACOSX/data/cats/._cats0.png", b"junk"),
            ("data/.DS_Store", b"junk"),
            ("data/cats/.hidden.png", b"junk"),
            (".git/config", b"junk"),
        ],
    )
    root = safe_extract(zpath, tmp_path / "out")
    assert root == tmp_path / "out" / "data"
    assert _listing(tmp_path / "out") == [
        "data",
        "data/cats",
        "data/cats/cats0.png",
        "data/cats/cats1.png",
        "data/cats/cats2.png",
        "data/dogs",
        "data/dogs/dogs0.png",
        "data/dogs/dogs1.png",
        "data/dogs/dogs2.png",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_existing_extraction_never_destroyed(tmp_path: Path) -> None:
    good = _zip(tmp_path / "good.zip", _good_entries(prefix=""))
    root = safe_extract(good, tmp_path / "out")
    assert root == tmp_path / "out"
    before = _listing(tmp_path)
    with pytest.raises(FileExistsError):
        safe_extract(good, tmp_path / "out")
    bad = _zip(tmp_path / "bad.zip", [*_good_entries(prefix=""), ("../x", b"")])
    for dest in ("out", "out2"):
        with pytest.raises(UnsafeArchiveError):
            safe_extract(bad, tmp_path / dest)
    assert _listing(tmp_path) == sorted([*before, "bad.zip"])


def test_zip_loaded_end_to_end_and_cached(tmp_path: Path, lab_cache: Path) -> None:
    zpath = _zip(tmp_path / "pets.zip", _good_entries())
    ds = load_dataset(zpath, val_fraction=0.34)
    assert ds.classes == ["cats", "dogs"]
    assert ds.root.name == "data" and lab_cache / "zips" in ds.root.parents
    assert ds.counts() == {"train": {"cats": 2, "dogs": 2}, "val": {"cats": 1, "dogs": 1}}
    again = load_dataset(str(zpath), val_fraction=0.34)
    assert again.root == ds.root and again.items == ds.items
    with pytest.raises(UnsafeArchiveError, match="not a valid zip"):
        load_dataset(_zip_text(tmp_path / "broken.zip"))


def _zip_text(path: Path) -> Path:
    path.write_text("garbage")
    return path


def test_zip_extracts_only_image_files_and_lists_the_rest_as_skipped(tmp_path: Path) -> None:
    zpath = _zip(tmp_path / "mixed.zip", [("a/x.png", _png_bytes()), ("a/evil.html", b"<script>alert(1)</script>"),
                                          ("b/y.svg", b"<svg onload='alert(1)'/>"), ("b/z.png", _png_bytes())])
    root = safe_extract(zpath, tmp_path / "out")
    assert root == tmp_path / "out"  # two top-level folders: the extraction folder is the root
    assert _listing(root) == [SKIPPED_LIST, "a", "a/x.png", "b", "b/z.png"]
    assert read_skipped(root) == [("a/evil.html", NOT_AN_IMAGE), ("b/y.svg", NOT_AN_IMAGE)]
    assert "only images are unpacked" in NOT_AN_IMAGE


def test_members_not_unpacked_reach_the_dataset_skipped_list(tmp_path: Path, lab_cache: Path) -> None:
    """Through load_dataset(zip) and through safe_extract + load_dataset(root), as the app's upload does. A
    top-level page is not unpacked, so the single wrapping folder is still found as the root."""
    extra = [("index.html", b"<html/>"), ("data/cats/evil.html", b"<html/>"), ("data/notes.svg", b"<svg/>"),
             ("data/.hidden.html", b"x")]
    zpath = _zip(tmp_path / "pets.zip", [*_good_entries(), *extra])
    expected = [("cats/evil.html", NOT_AN_IMAGE), ("index.html", NOT_AN_IMAGE), ("notes.svg", NOT_AN_IMAGE)]
    ds = load_dataset(zpath, val_fraction=0.34)
    assert ds.root.name == "data" and ds.classes == ["cats", "dogs"]
    assert [(s.file, s.reason) for s in ds.skipped] == expected
    root = safe_extract(zpath, tmp_path / "upload")
    assert root == tmp_path / "upload" / "data" and not list(root.rglob("*.html")) and not list(root.rglob("*.svg"))
    assert [(s.file, s.reason) for s in load_dataset(root, val_fraction=0.34).skipped] == expected


def _strings(value: object):
    """Every key and leaf of a JSON-like value, as text."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    else:
        yield str(value)


def test_dataset_to_dict_names_no_server_path(tmp_path: Path, lab_cache: Path) -> None:
    root = _class_tree(tmp_path / "my-photos", {"ants": 4, "bees": 4})
    (root / "ants" / "notes.txt").write_text("hi")
    zpath = _zip(tmp_path / "photos.zip", [*_good_entries(), ("data/cats/page.html", b"<html/>")])
    for src, skipped in ((root, "ants/notes.txt"), (zpath, "cats/page.html")):
        report = load_dataset(src).to_dict()
        leaked = [v for v in _strings(report) if str(tmp_path) in v or str(lab_cache) in v or v.startswith("/")]
        assert not leaked, leaked
        assert report["source"] == src.name and report["root"] in ("my-photos", "data")
        assert [s["file"] for s in report["skipped"]] == [skipped]
    spec = "sample:shapes?per_class=3&size=16"
    assert load_dataset(spec).to_dict()["source"] == spec


def test_max_pixels_skips_oversize_images_from_their_header(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "ds", {"a": 3, "b": 3})
    _img(root / "a" / "big.png", size=(120, 100))
    ds = load_dataset(root, max_pixels=10_000)
    reasons = {s.file: s.reason for s in ds.skipped}
    assert reasons == {"a/big.png": "image too large: 120x100 = 12000 pixels; the limit here is 10000 pixels; "
                                    "resize it and upload again"}
    assert len(load_dataset(root).items) == 7
    with pytest.raises(DatasetError, match="max_pixels=0 must be a positive integer"):
        load_dataset(root, max_pixels=0)


# ---------------------------------------------------------------- folders and splits


def test_class_folders_skips_and_nested(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "ds", {"ants": 4, "bees": 4})
    _img(root / "bees" / "more" / "deep.png")
    (root / "ants" / "notes.txt").write_text("hi")
    (root / "ants" / "fake.jpg").write_text("not really")
    (root / "ants" / ".DS_Store").write_bytes(b"x")
    (root / ".hidden").mkdir()
    _img(root / ".hidden" / "x.png")
    _img(root / "loose.png")
    ds = load_dataset(root)
    assert ds.classes == ["ants", "bees"]
    assert sum(ds.counts()[s]["bees"] for s in ("train", "val")) == 5
    reasons = {s.file: s.reason for s in ds.skipped}
    assert reasons["ants/notes.txt"] == "not an image file extension"
    assert reasons["ants/fake.jpg"].startswith("not an image")
    assert "loose.png" in reasons
    assert not any(".DS_Store" in f or ".hidden" in f for f in reasons)
    assert all(isinstance(it, Item) and len(it.sha256) == 64 for it in ds.items)
    assert ds.predefined_split is False


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_truncated_and_bomb_skipped_with_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _class_tree(tmp_path / "ds", {"a": 3, "b": 3})
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "a" / "t.jpg")
    data = (root / "a" / "t.jpg").read_bytes()
    (root / "a" / "t.jpg").write_bytes(data[: len(data) // 2])
    _img(root / "b" / "huge.png", size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ds = load_dataset(root)
    reasons = {s.file: s.reason for s in ds.skipped}
    assert reasons["a/t.jpg"] == "truncated image"
    assert reasons["b/huge.png"].startswith("image too large (decompression bomb limit)")
    assert len(ds.items) == 6


def test_deterministic_stratified_split(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "ds", {"x": 10, "y": 10, "z": 10})
    a = load_dataset(root, seed=0)
    b = load_dataset(root, seed=0)
    c = load_dataset(root, seed=1)
    val = lambda ds: sorted(str(it.path) for it in ds.split("val"))  # noqa: E731
    assert val(a) == val(b)
    assert val(a) != val(c)
    assert a.counts()["val"] == {"x": 2, "y": 2, "z": 2}
    assert set(it.path for it in a.items) == set(it.path for it in c.items)


def test_every_class_in_val_even_when_imbalanced(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "ds", {"big": 40, "small": 2, "mid": 5})
    ds = load_dataset(root, val_fraction=0.1)
    assert all(n >= 1 for n in ds.counts()["val"].values())
    assert all(n >= 1 for n in ds.counts()["train"].values())


def test_test_split(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "ds", {"x": 10, "y": 3})
    ds = load_dataset(root, val_fraction=0.2, test_fraction=0.2)
    counts = ds.counts()
    assert counts["test"] == {"x": 2, "y": 1} and counts["val"] == {"x": 2, "y": 1}
    assert {p for p in counts} == {"train", "val", "test"}


def test_too_few_images_message(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "ds", {"many": 5, "lonely": 1})
    with pytest.raises(DatasetError) as e:
        load_dataset(root)
    msg = str(e.value)
    assert "'lonely'" in msg and "1 usable image" in msg and "at least 2" in msg
    root2 = _class_tree(tmp_path / "ds2", {"p": 5, "q": 2})
    with pytest.raises(DatasetError, match=r"'q' has 2 usable image\(s\).*at least 3"):
        load_dataset(root2, test_fraction=0.2)
    with pytest.raises(DatasetError, match=r"at least 4 .*min_per_class=4"):
        load_dataset(root2, min_per_class=4)


def test_one_class_and_empty_and_missing(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "one", {"only": 4})
    with pytest.raises(DatasetError, match="at least two class folders") as e:
        load_dataset(root)
    assert "'only'" in str(e.value) and "train/" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(_zip(tmp_path / "empty.zip", []))
    with pytest.raises(DatasetError, match="val_fraction"):
        load_dataset(root, val_fraction=1.5)


def test_predefined_train_val_respected(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _class_tree(root / "train", {"a": 3, "b": 2})
    _class_tree(root / "val", {"a": 1, "b": 1})
    ds = load_dataset(root, seed=123, val_fraction=0.5)
    assert ds.predefined_split is True
    assert ds.counts() == {"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}}
    assert all(it.path.relative_to(root).parts[0] == it.split for it in ds.items)
    assert all(ds.classes[it.label] == it.path.parent.name for it in ds.items)


def test_missing_val_folder_is_carved_from_train(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _class_tree(root / "train", {"a": 5, "b": 5})
    _class_tree(root / "test", {"a": 1, "b": 1})
    ds = load_dataset(root, val_fraction=0.2)
    assert ds.predefined_split is False
    assert ds.counts() == {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}}
    assert all(it.path.relative_to(root).parts[0] == "test" for it in ds.split("test"))
    assert all(it.path.relative_to(root).parts[0] == "train" for it in ds.split("val"))


def test_predefined_splits_must_share_classes(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _class_tree(root / "train", {"a": 3, "b": 2})
    _class_tree(root / "val", {"a": 1, "c": 1})
    with pytest.raises(DatasetError) as e:
        load_dataset(root)
    assert "missing in val/: b" in str(e.value) and "only in val/: c" in str(e.value)


def test_manifest_csv(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "ds", {"a": 3, "b": 3})
    ds = load_dataset(root)
    out = tmp_path / "out" / "manifest.csv"
    ds.write_manifest(out)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "class", "split", "sha256"]
    assert len(rows) == 6
    for row, it in zip(rows, ds.items, strict=True):
        assert (root / row["file"]) == it.path and row["class"] == ds.classes[it.label]
        assert row["split"] == it.split and row["sha256"] == sha256_file(it.path)
    assert [p.name for p in out.parent.iterdir()] == ["manifest.csv"]


# ---------------------------------------------------------------- samples


def test_parse_sample_spec() -> None:
    name, kw = parse_sample_spec("sample:shapes?per_class=40&imbalance=0.2&noise=0.1&duplicates=5&seed=1&size=64")
    assert name == "shapes"
    assert kw == {"per_class": 40, "imbalance": 0.2, "label_noise": 0.1, "duplicates": 5, "seed": 1, "image_size": 64}
    assert parse_sample_spec("sample:digits") == ("digits", {})
    assert set(SAMPLES) >= {"digits", "shapes"}
    with pytest.raises(SampleError, match=r"Did you mean 'shapes'.*sample:digits"):
        parse_sample_spec("sample:shapez")
    with pytest.raises(SampleError, match=r"Did you mean 'noise'"):
        parse_sample_spec("sample:shapes?nosie=0.1")
    with pytest.raises(SampleError, match=r"imbalance='2' .* \(0, 1\]"):
        parse_sample_spec("sample:shapes?imbalance=2")
    with pytest.raises(SampleError, match="integer"):
        parse_sample_spec("sample:shapes?per_class=lots")
    with pytest.raises(DatasetError, match="unknown sample"):
        load_dataset("sample:cats")


def test_shapes_imbalance_counts(tmp_path: Path) -> None:
    assert shapes_class_counts(20, 0.25) == [20, 10, 5]
    ds = load_dataset("sample:shapes?per_class=20&imbalance=0.25&size=16")
    assert ds.predefined_split and ds.classes == ["circle", "square", "triangle"]
    counts = ds.counts()
    totals = [counts["train"][c] + counts["val"][c] for c in ds.classes]
    assert totals == [20, 10, 5]
    assert ds.root.parent.name == "samples"


def test_shapes_duplicates_and_label_noise(tmp_path: Path) -> None:
    out = make_shapes(tmp_path / "s", per_class=12, image_size=16, label_noise=0.25, duplicates=4, seed=3)
    ds = load_dataset(out)
    train_hash = {it.sha256: it for it in ds.split("train")}
    dups = [it for it in ds.split("val") if it.sha256 in train_hash]
    assert len(dups) == 4
    for it in dups:
        twin = train_hash[it.sha256]
        assert twin.path.read_bytes() == it.path.read_bytes() and twin.path.name != it.path.name
        assert twin.label == it.label
    train = ds.split("train")
    wrong = [it for it in train if not it.path.name.startswith(ds.classes[it.label])]
    assert len(wrong) == round(0.25 * len(train)) == len(sample_metadata(out)["mislabelled"])
    assert not [it for it in ds.split("val") if not it.path.name.startswith(ds.classes[it.label])]
    # same parameters: same bytes; idempotent
    again = make_shapes(tmp_path / "s2", per_class=12, image_size=16, label_noise=0.25, duplicates=4, seed=3)
    assert sorted(sha256_file(p) for p in again.rglob("*.png")) == sorted(sha256_file(p) for p in out.rglob("*.png"))
    assert make_shapes(out, per_class=12, image_size=16, label_noise=0.25, duplicates=4, seed=3) == out


def test_sample_digits() -> None:
    ds = load_dataset("sample:digits")
    assert ds.classes == [str(d) for d in range(10)]
    assert len(ds.items) == 1797 and not ds.skipped
    im = open_rgb(ds.items[0].path)
    assert im.size == (32, 32)
