"""``UserError``: the base of every error caused by what a user gave us (a bad path, setting, image or model).

Front ends (``python -m core``, ``python -m export``, the app) show these as one-line messages. Anything else is a
bug and keeps its traceback. ``USER_ERRORS`` adds the operating-system errors a user's input can cause (a missing
or unreadable file). ``os_error_message`` turns the server's own operating-system trouble (a full disk, a name too
long for the file system, too many open files) into a plain sentence without any path, also when a library wrapped
the ``OSError`` (torch.save on a full disk raises a ``RuntimeError``).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator


class UserError(Exception):
    """The input cannot be used as given; the message names the bad value and the fix. ``title``: a short heading
    for a front end's error box (a class may set its own; ``title=`` sets one for this error)."""

    title: str | None = None

    def __init__(self, *args: object, title: str | None = None) -> None:
        super().__init__(*args)
        if title is not None:
            self.title = title


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)

DISK_FULL = ("The server's disk is full right now; your earlier model and data are kept. "
             "Try again later or with a smaller dataset.")
NAME_TOO_LONG = "A file or folder name in the upload is too long (over 255 bytes); shorten it and upload again."
FILE_TOO_LARGE = "A file is larger than the server can store; try a smaller dataset or model."
TOO_MANY_FILES = "The server has too many files open right now; try again in a minute."
NOT_PERMITTED = ("The server may not write its files right now (permission denied); this is not a problem with your "
                 "data. Try again later.")
READ_ONLY = "The server's disk is read-only right now; try again later."
OUT_OF_MEMORY = "The server ran out of memory; try a smaller image size, a smaller dataset or fewer images at once."

_BY_ERRNO: dict[int, str] = {
    errno.ENOSPC: DISK_FULL,
    errno.ENAMETOOLONG: NAME_TOO_LONG,
    errno.EFBIG: FILE_TOO_LARGE,
    errno.EMFILE: TOO_MANY_FILES,
    errno.ENFILE: TOO_MANY_FILES,
    errno.EACCES: NOT_PERMITTED,
    errno.EPERM: NOT_PERMITTED,
    errno.EROFS: READ_ONLY,
    errno.ENOMEM: OUT_OF_MEMORY,
}
if hasattr(errno, "EDQUOT"):  # not on every platform
    _BY_ERRNO[errno.EDQUOT] = DISK_FULL

# Text of errors that lost their errno on the way (C++ libraries re-raise a write failure as RuntimeError).
_BY_TEXT: tuple[tuple[str, str], ...] = (
    ("PytorchStreamWriter failed writing", DISK_FULL),  # torch.save: "...failed writing file data/0: file write failed"
    ("file write failed", DISK_FULL),
    ("unexpected pos", DISK_FULL),  # torch 2.x: "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
    ("No space left on device", DISK_FULL),
    ("Disk quota exceeded", DISK_FULL),
    ("File name too long", NAME_TOO_LONG),
    ("Too many open files", TOO_MANY_FILES),
)


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, then every exception it was raised from or during (``__cause__``, ``__context__``), once each."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def os_error_message(exc: BaseException) -> str | None:
    """A plain message (never a path) for an operating-system failure anywhere in ``exc``'s chain, else ``None``.

    Recognises the errno of an ``OSError`` (ENOSPC and EDQUOT: disk full; ENAMETOOLONG; EFBIG; EMFILE/ENFILE; EACCES/
    EPERM; EROFS; ENOMEM), a ``MemoryError``, and the text a library leaves when it re-raises one as something else.
    """
    chain = list(exception_chain(exc))
    for e in chain:  # an errno is the surest sign
        if isinstance(e, OSError) and e.errno in _BY_ERRNO:
            return _BY_ERRNO[e.errno]
        if isinstance(e, MemoryError):
            return OUT_OF_MEMORY
    for e in chain:
        text = str(e)
        for needle, message in _BY_TEXT:
            if needle in text:
                return message
    return None
