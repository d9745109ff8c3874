"""Visitor text made safe for the page: the one place that escapes names, file names and messages.

On a public server, class names, file names, a model's metadata and error messages come from strangers and are
shown to them (and, through shared logs or reports, maybe to others). Two contexts exist:

- ``md``: Markdown components. HTML is escaped and every Markdown control character is backslash-escaped, so a
  class called ``[click](javascript:…)`` or ``![x](http://tracker)`` or ``# big`` reads as those characters,
  never as a link, an image, a heading or a tag. Newlines become spaces (no new block can start).
- ``html``: HTML contexts such as Gradio's error pop-ups (their message is rendered as HTML).

Both also drop control characters and cut very long text (``MAX_CHARS``), so one name cannot fill the page.
"""

from __future__ import annotations

import html as _html
import re
from typing import Any

MAX_CHARS = 500
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029\u202a-\u202e\u2066-\u2069]")  # incl. bidi overrides
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def plain(text: Any, max_chars: int = MAX_CHARS) -> str:
    """``text`` as one line of printable text: control and bidi-override characters dropped, whitespace runs
    collapsed, cut to ``max_chars`` with an ellipsis."""
    s = _CONTROL.sub("", str(text))
    s = re.sub(r"\s+", " ", s).strip()
    return s if len(s) <= max_chars else s[: max_chars - 1] + "…"


def html(text: Any, max_chars: int = MAX_CHARS) -> str:
    """Plain text for an HTML text context (not an attribute): ``&``, ``<`` and ``>`` escaped."""
    return _html.escape(plain(text, max_chars), quote=False)


def md(text: Any, max_chars: int = MAX_CHARS) -> str:
    """Plain text for a Markdown component: renders as exactly these characters (no tag, link, image, emphasis,
    heading, table or code span can be made from it)."""
    escaped = _html.escape(plain(text, max_chars), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", escaped)


def columns(rows: list[tuple[str, ...]] | list[list[str]]) -> str:
    """Rows of strings as left-aligned columns two spaces apart, for a terminal (first row: the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
