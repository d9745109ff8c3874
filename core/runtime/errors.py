"""``UserError``: the base of every error caused by what a user gave us (a bad path, setting, image or model).

Front ends (``python -m core``, ``python -m export``, the app) show these as one-line messages. Anything else is a
bug and keeps its traceback. ``USER_ERRORS`` adds the operating-system errors a user's input can cause (a missing
or unreadable file).
"""

from __future__ import annotations


class UserError(Exception):
    """The input cannot be used as given; the message names the bad value and the fix."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)
