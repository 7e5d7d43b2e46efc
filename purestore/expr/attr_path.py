"""Attribute paths as ``-A`` takes them: dotted names, a name with dots in double quotes
(``pkgs."lib.v2".dev``), as in Nix."""

from __future__ import annotations

from typing import Iterable

from ..errors import UsageError


def parse_attr_path(attr: str) -> list[str]:
    """The names of the dotted attribute path ``attr``; as in Nix, double quotes hold a name
    with dots (``a."b.c"`` is ``a``, ``b.c``).  Raises :class:`UsageError` for a quote not
    closed, or an empty name outside quotes (``a..b``)."""
    parts, cur, quoted, start, open_at = [], "", False, True, 0
    for i, ch in enumerate(attr):
        if ch == '"':
            quoted, open_at, start = not quoted, i, False
        elif ch == "." and not quoted:
            if start:
                raise UsageError(f"attribute path {attr!r} has an empty name at position {i + 1}",
                                 hint='a name with dots goes in double quotes: -A \'a."b.c"\'')
            parts.append(cur)
            cur, start = "", True
        else:
            cur += ch
            start = False
    if quoted:
        raise UsageError(f"attribute path {attr!r} has a quote not closed (opened at position {open_at + 1})",
                         hint='a name with dots goes in double quotes, closed: -A \'a."b.c"\'')
    if start and attr:
        raise UsageError(f"attribute path {attr!r} has an empty name at position {len(attr) + 1}",
                         hint='a name with dots goes in double quotes: -A \'a."b.c"\'')
    parts.append(cur)
    return parts


def render_attr_path(parts: Iterable[str]) -> str:
    """``parts`` as an attribute path, a name with a dot (or empty) in double quotes."""
    return ".".join(f'"{p}"' if "." in p or not p else p for p in parts)
