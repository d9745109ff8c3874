"""Visitor text through ``core.text``: rendered as Markdown (by markdown-it, a CommonMark renderer) it shows exactly
its own characters, with no element made from it."""

from __future__ import annotations

import html
import re

import pytest
from markdown_it import MarkdownIt

from core.text import MAX_CHARS, md, plain
from core.text import html as html_text

HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "[click](javascript:alert(1))",
    "![pixel](http://tracker.example/p.png)",
    "# big heading",
    "**bold** _it_ `code` ~~gone~~",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "<script>alert(1)</script>",
    "a\\*b & c &amp; d",
    "1. first\n2. second",
    "> quoted",
    "http://autolink.example",
]


def rendered(markdown: str) -> str:
    return MarkdownIt("commonmark").enable("table").enable("strikethrough").render(markdown)


@pytest.mark.parametrize("text", HOSTILE)
def test_md_renders_as_its_own_characters_and_no_element(text):
    out = rendered(md(text))
    tags = set(re.findall(r"<(\w+)", out))
    assert tags <= {"p"}, (text, out)  # one paragraph, no link, image, heading, emphasis, code, table or list
    shown = html.unescape(re.sub(r"<[^>]+>", "", out)).strip()
    assert shown == plain(text), (text, out)


def test_html_escapes_tags_for_error_popups():
    assert html_text("<b>x</b> & y") == "&lt;b&gt;x&lt;/b&gt; &amp; y"


def test_plain_drops_control_and_bidi_characters_and_cuts_long_text():
    assert plain("evil\u202egnp.exe\x00\nname") == "evilgnp.exe name"
    long = plain("x" * 5000)
    assert len(long) == MAX_CHARS and long.endswith("…")
