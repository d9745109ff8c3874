"""Safe zip extraction: no path traversal, no links, bounded size, all-or-nothing, image files only.

Only members with an image extension are written; every other visible member is listed, with the reason, in
``SKIPPED_LIST`` inside the returned dataset root (``read_skipped`` reads it back, ``core.data.load_dataset`` adds it
to ``Dataset.skipped``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from core.runtime.errors import UserError
from core.runtime.images import is_image_file

_CHUNK = 1 << 20
# Small files (e.g. a blank BMP) compress extremely well; ratios only count past this size.
_RATIO_GRACE_BYTES = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
# Hidden, so dataset scans and find_root pass over it, and no archive can supply it (hidden members are ignored).
SKIPPED_LIST = ".safezip-skipped.json"
NOT_AN_IMAGE = "not an image file (only images are unpacked)"


class UnsafeArchiveError(UserError, ValueError):
    """A zip archive was refused: unsafe entry, limit exceeded, or not a readable zip."""


def is_ignored_member(parts: tuple[str, ...]) -> bool:
    """Hidden files/folders (leading '.') and macOS '__MACOSX/' metadata are skipped."""
    return bool(parts) and (parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts))


def _member_parts(info: zipfile.ZipInfo, zip_name: str) -> tuple[str, ...]:
    """Validated path components of an entry; raises UnsafeArchiveError for unsafe names."""
    raw = info.filename
    name = raw.replace("\\", "/")
    fix = f"Re-create {zip_name} from a plain folder of images (no links, no absolute or '..' paths)."
    if "\x00" in name:
        raise UnsafeArchiveError(f"refused {zip_name}: entry {raw!r} has a NUL byte in its name. {fix}")
    if name.startswith("/") or _DRIVE.match(name):
        raise UnsafeArchiveError(f"refused {zip_name}: entry {raw!r} has an absolute path. {fix}")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(
            f"refused {zip_name}: entry {raw!r} uses '..' to point outside the extraction folder. {fix}"
        )
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise UnsafeArchiveError(f"refused {zip_name}: entry {raw!r} is a symbolic link. {fix}")
    if mode and kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchiveError(f"refused {zip_name}: entry {raw!r} is a special file (device, pipe or socket). {fix}")
    if info.flag_bits & 0x1:
        raise UnsafeArchiveError(
            f"refused {zip_name}: entry {raw!r} is encrypted. Re-create the zip without a password."
        )
    return parts


def find_root(folder: str | os.PathLike[str]) -> Path:
    """The dataset root inside an extracted folder: a single wrapping top-level folder, else itself."""
    folder = Path(folder)
    visible = [p for p in folder.iterdir() if not is_ignored_member((p.name,))]
    if len(visible) == 1 and visible[0].is_dir() and not visible[0].is_symlink():
        return visible[0]
    return folder


def read_skipped(root: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(file, reason)`` of the members ``safe_extract`` did not write, from ``root/SKIPPED_LIST``; [] when none.

    ``file`` is relative to the dataset root, or the member's path in the archive when it lies outside the root."""
    path = Path(root) / SKIPPED_LIST
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["skipped"]
        return [(str(e["file"]), str(e["reason"])) for e in entries]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnsafeArchiveError(f"{path} is unreadable ({exc}); delete the extracted folder and unpack the zip "
                                 "again") from exc


def _write_skipped(tmp: Path, skipped: list[tuple[str, ...]]) -> None:
    """Record the members not written in the dataset root ``find_root`` will pick inside ``tmp``."""
    if not skipped:
        return
    root = find_root(tmp)
    inside = root.relative_to(tmp).parts
    entries = []
    for parts in dict.fromkeys(skipped):  # an entry named twice is listed once
        name = "/".join(parts[len(inside):] if parts[: len(inside)] == inside else parts)
        entries.append({"file": name, "reason": NOT_AN_IMAGE})
    (root / SKIPPED_LIST).write_text(json.dumps({"skipped": entries}, indent=1), encoding="utf-8")


def _cleanup(tmp: Path, created: list[Path]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    for d in created:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


def safe_extract(
    zip_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    max_entries: int = 20_000,
    max_total_bytes: int = 2 * 1024**3,
    max_ratio: float = 200,
) -> Path:
    """Extract the image files of ``zip_path`` into ``dest_dir`` (which must not exist or be empty) and return the
    dataset root.

    Only members with an image extension (``core.runtime.images.is_image_file``) are written, so nothing else an
    upload carries (HTML, SVG, scripts) reaches the disk; the folders of the other visible members are still made,
    so the layout is the archive's, and the members are listed in ``SKIPPED_LIST`` (see ``read_skipped``).
    Everything is written into a temporary folder beside ``dest_dir`` and renamed into place
    only when the whole archive passed every check, so a refused archive leaves nothing behind.
    Byte counts are measured while decompressing, not taken from the headers.
    """
    zip_path = Path(zip_path)
    dest = Path(dest_dir).absolute()
    zname = zip_path.name
    try:
        archive_size = zip_path.stat().st_size
        zf = zipfile.ZipFile(zip_path)
    except FileNotFoundError as exc:
        raise UnsafeArchiveError(f"zip file {zip_path} does not exist; check the path") from exc
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UnsafeArchiveError(
            f"{zip_path} is not a valid zip file or it is corrupt ({exc}); "
            "re-create it with a standard zip tool (e.g. 'zip -r data.zip folder/')"
        ) from exc

    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise UnsafeArchiveError(
                f"refused {zname}: it has {len(infos)} entries, more than the limit of {max_entries}; "
                "split the dataset into smaller archives or pass the extracted folder instead"
            )
        plan = [(info, _member_parts(info, zname)) for info in infos]
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise FileExistsError(f"cannot extract {zname}: {dest} already exists and is not empty")

        created: list[Path] = []
        parent = dest.parent
        while not parent.exists():
            created.append(parent)
            parent = parent.parent
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            skipped = _extract_all(zf, plan, tmp, zname, archive_size, max_total_bytes, max_ratio)
            _write_skipped(tmp, skipped)
            try:
                os.rename(tmp, dest)
            except OSError as exc:
                raise FileExistsError(f"cannot extract {zname}: {dest} was created meanwhile ({exc})") from exc
        except BaseException:
            _cleanup(tmp, created)
            raise
    return find_root(dest)


def _extract_all(
    zf: zipfile.ZipFile,
    plan: list[tuple[zipfile.ZipInfo, tuple[str, ...]]],
    tmp: Path,
    zname: str,
    archive_size: int,
    max_total_bytes: int,
    max_ratio: float,
) -> list[tuple[str, ...]]:
    """Write the image members into ``tmp``; returns the path parts of the other visible files, not written."""
    total = 0
    buf = bytearray(_CHUNK)
    skipped: list[tuple[str, ...]] = []
    for info, parts in plan:
        if not parts or is_ignored_member(parts):
            continue
        target = tmp.joinpath(*parts)
        if os.path.commonpath([tmp, target]) != str(tmp):  # belt and braces
            raise UnsafeArchiveError(f"refused {zname}: entry {info.filename!r} escapes the extraction folder")
        try:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if not is_image_file(target.name):
                skipped.append(parts)
                continue
            compressed = max(1, min(info.compress_size, archive_size))
            written = 0
            with zf.open(info) as src, open(target, "xb") as out:
                view = memoryview(buf)
                while n := src.readinto(view):
                    written += n
                    total += n
                    if total > max_total_bytes:
                        raise UnsafeArchiveError(
                            f"refused {zname}: while extracting {info.filename!r} the uncompressed size passed "
                            f"the limit of {max_total_bytes} bytes; pass a smaller dataset or the extracted folder"
                        )
                    if written > _RATIO_GRACE_BYTES and written / compressed > max_ratio:
                        raise UnsafeArchiveError(
                            f"refused {zname}: entry {info.filename!r} expands more than {max_ratio:g}:1 "
                            f"({compressed} compressed bytes -> over {written} bytes), which looks like a "
                            "zip bomb; images do not compress like that, so re-create the archive from the "
                            "original image files"
                        )
                    out.write(view[:n])
        except FileExistsError as exc:
            raise UnsafeArchiveError(
                f"refused {zname}: entry {info.filename!r} appears twice in the archive; re-create the zip"
            ) from exc
        except (NotADirectoryError, IsADirectoryError) as exc:
            raise UnsafeArchiveError(
                f"refused {zname}: entry {info.filename!r} clashes with a file and a folder of the same name; "
                "re-create the zip"
            ) from exc
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise UnsafeArchiveError(
                f"{zname} is corrupt: entry {info.filename!r} could not be decompressed ({exc}); "
                "re-create the zip or download it again"
            ) from exc
        except NotImplementedError as exc:
            raise UnsafeArchiveError(
                f"{zname}: entry {info.filename!r} uses an unsupported compression method ({exc}); "
                "re-create the zip with standard 'deflate' compression"
            ) from exc
    return skipped
