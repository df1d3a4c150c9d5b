"""The text a prompt asks to be rendered: its quoted spans.

One rule for the whole pack, so that quotes mean the same everywhere (a glyph encoder's spans, Text
Accuracy's default expected text, ...). It is the rule of the `get_glyph_texts` of diffusers' glyph-rendering
pipeline, kept exactly, order included: first every span in single
quotes '..', then in curly double quotes “..”, then in straight double quotes "..", then in corner
brackets 「..」. Spans are returned as written (no stripping), empty ones included.

Note what the reference rule implies: an apostrophe counts as a single quote, so "the cat's 'MEOW' and
dog's bowl" yields "s " and " and dog" among its spans. Where a prompt uses apostrophes, type the expected
text explicitly instead of relying on the prompt.
"""

from __future__ import annotations

import re

_SINGLE = re.compile(r"'([^']*)'")
_CURLY_DOUBLE = re.compile("\u201c([^\u201c\u201d]*)\u201d")
_DOUBLE = re.compile(r'"([^"]*)"')
_CORNER = re.compile("\u300c([^\u300c\u300d]*)\u300d")


def quoted_spans(prompt: str) -> list[str]:
    """The spans the prompt quotes, in the reference's order (see the module docstring)."""
    if not isinstance(prompt, str):
        raise TypeError(f"quoted_spans takes one prompt string, got {type(prompt).__name__}")
    return (_SINGLE.findall(prompt) + _CURLY_DOUBLE.findall(prompt) + _DOUBLE.findall(prompt)
            + _CORNER.findall(prompt))
