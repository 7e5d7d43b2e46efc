"""JSON text as Nix 2.8 writes it, for the outputs that must equal Nix's byte for byte (``.ls``
NAR listings, ``nar ls --json``, ``show-derivation``).

Nix's JSON writer (``toJSON`` in libutil's json.cc) escapes ``"`` and ``\\`` and writes ``\\n``,
``\\r`` and ``\\t``; every other control character below 0x20 becomes ``\\u00XX``, backspace and
form feed included, for which Python's :func:`json.dumps` writes ``\\b`` and ``\\f``.  Other
characters go as they are (``ensure_ascii=False``); strings that hold bytes that are not UTF-8
(surrogate escapes) are the caller's to encode with ``surrogateescape``."""

from __future__ import annotations

import json
import re

__all__ = ["dumps"]

# every backslash in JSON text starts an escape of two characters (or \uXXXX, whose "u" no
# replacement touches): reading them pairwise from the left never splits an escaped backslash
_ESCAPE = re.compile(r"\\.")
_NIX_FORM = {"\\b": "\\u0008", "\\f": "\\u000c"}


def _nix_form(m: re.Match) -> str:
    s = m.group()
    return _NIX_FORM.get(s, s)


def dumps(obj, *, indent: int | None = None, separators: tuple[str, str] | None = None) -> str:
    """``json.dumps(obj, ensure_ascii=False, ...)`` with Nix's escapes for backspace and form feed."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent, separators=separators)
    if "\\b" in text or "\\f" in text:
        text = _ESCAPE.sub(_nix_form, text)
    return text
