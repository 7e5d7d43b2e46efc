"""Debug info in a binary cache, as Nix's ``index-debug-info`` writes it: the separate debug files
of a path (``lib/debug/.build-id/XX/YYYY….debug``), found in its tree on disk
(:func:`debug_info_files`, a push) or in its ``.ls`` listing (:func:`debug_info_members`, a copy
between caches), and the ``debuginfo/<build id>`` links to the NAR holding each
(:func:`write_debug_links`), for debuggers that look debug info up by build id.
"""

from __future__ import annotations

import json
import os
import stat

import trio

from ._nursery import open_nursery
from .backend import Backend

_BUILD_ID_DIR = ("lib", "debug", ".build-id")
_HEX = frozenset("0123456789abcdef")


def _debug_files(kind, names) -> list[tuple[str, str]]:
    """The separate debug files of a tree, as Nix's ``index-debug-info`` finds them: regular
    files ``lib/debug/.build-id/XX/YYYY….debug`` (2 and 38 lower-case hex digits; nothing
    through a symlink).  Returns (cache key ``debuginfo/XXYYYY….debug``, member) pairs; the
    key keeps the ``.debug`` suffix, as Nix 2.8 writes it.  ``kind(parts)``: "directory",
    "regular" or None for the entry at those path components; ``names(parts)``: a
    directory's entry names."""
    if any(kind(_BUILD_ID_DIR[:i]) != "directory" for i in range(1, len(_BUILD_ID_DIR) + 1)):
        return []
    found = []
    for s1 in sorted(names(_BUILD_ID_DIR)):
        if len(s1) != 2 or not set(s1) <= _HEX or kind((*_BUILD_ID_DIR, s1)) != "directory":
            continue
        for s2 in sorted(names((*_BUILD_ID_DIR, s1))):
            stem = s2[:-len(".debug")]
            if s2.endswith(".debug") and len(stem) == 38 and set(stem) <= _HEX \
                    and kind((*_BUILD_ID_DIR, s1, s2)) == "regular":
                found.append((f"debuginfo/{s1}{s2}", "/".join((*_BUILD_ID_DIR, s1, s2))))
    return found


def debug_info_files(real: str) -> list[tuple[str, str]]:
    """:func:`_debug_files` of the path at ``real`` on disk."""
    def kind(parts) -> str | None:
        try:
            mode = os.lstat(os.path.join(real, *parts)).st_mode
        except OSError:
            return None
        return "directory" if stat.S_ISDIR(mode) else "regular" if stat.S_ISREG(mode) else None
    return _debug_files(kind, lambda parts: os.listdir(os.path.join(real, *parts)))


def debug_info_members(listing: bytes) -> list[tuple[str, str]]:
    """:func:`_debug_files` from a path's ``.ls`` listing instead of its files (a copy between
    caches has no store)."""
    # (the listing is the source cache's, unsigned: anything that is not a listing's shape,
    # entries that are no object or JSON nested past what the decoder takes, links nothing;
    # they were an AttributeError or RecursionError traceback that stopped the whole copy)
    try:
        root = json.loads(listing.decode("utf-8", "surrogateescape")).get("root")
    except (ValueError, AttributeError, RecursionError):
        return []

    def entries(n) -> dict:
        e = n.get("entries") if isinstance(n, dict) and n.get("type") == "directory" else None
        return e if isinstance(e, dict) else {}

    def node(parts):
        n = root
        for part in parts:
            n = entries(n).get(part)
        return n if isinstance(n, dict) else None
    return _debug_files(lambda parts: (node(parts) or {}).get("type"),
                        lambda parts: list(entries(node(parts))))


async def write_debug_links(backend: Backend, files: list[tuple[str, str]], nar_name: str) -> None:
    """Write ``debuginfo/<build id>`` links to the NAR holding each debug file (kept when the
    cache has one already, as Nix does), for debuggers that look debug info up by build id;
    ``files`` as :func:`debug_info_files` gives them."""
    limit = trio.CapacityLimiter(8)

    async def one(key: str, member: str) -> None:
        async with limit:
            if not await backend.exists(key):
                body = json.dumps({"archive": f"../{nar_name}", "member": member}, separators=(",", ":"))
                await backend.put(key, body.encode(), "application/json")
    async with open_nursery() as n:
        for key, member in files:
            n.start_soon(one, key, member)

