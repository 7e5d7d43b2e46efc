"""The NAR grammar's tokens and limits (FORMATS.md 3), shared by the writer, the reader and
``store/fsnar.py``: ``str(s)`` framing, the precomputed frames of the common tokens, the limits on
names, targets, contents and nesting, and the checks of entry names and symlink targets.

The grammar itself is written in ``formats/nar.py``'s docstring.
"""

from __future__ import annotations

import struct

from ..errors import NarError

MAGIC = b"nix-archive-1"
MAX_NAME = 255
MAX_TARGET = 4096
MAX_DEPTH = 256
#: largest file contents accepted (a NAR length field above this is "absurd")
MAX_CONTENTS = 1 << 62
_CHUNK = 1 << 20
_TOKEN_MAX = 16  # longest grammar token is "nix-archive-1" (13)

_ZEROS = bytes(8)
_pack = struct.Struct("<Q").pack
_unpack = struct.Struct("<Q").unpack_from


def nar_str(s: bytes) -> bytes:
    """``str(s)`` of the grammar: length, bytes, zero padding."""
    n = len(s)
    return _pack(n) + s + _ZEROS[: (-n) & 7]


def padding(n: int) -> bytes:
    """Zero bytes that pad ``n`` content bytes to a multiple of 8."""
    return _ZEROS[: (-n) & 7]


# Precomputed framing, shared with store/fsnar.py.
HEADER = nar_str(MAGIC)
OPEN = nar_str(b"(")
CLOSE = nar_str(b")")
NODE_REGULAR = OPEN + nar_str(b"type") + nar_str(b"regular")
NODE_SYMLINK = OPEN + nar_str(b"type") + nar_str(b"symlink") + nar_str(b"target")
NODE_DIRECTORY = OPEN + nar_str(b"type") + nar_str(b"directory")
EXECUTABLE = nar_str(b"executable") + nar_str(b"")
CONTENTS = nar_str(b"contents")
ENTRY_NAME = nar_str(b"entry") + OPEN + nar_str(b"name")
NODE = nar_str(b"node")


def check_name(name: bytes, where: str = "", offset: int | None = None) -> bytes:
    """Validate a directory entry name; raise :class:`NarError` saying what is wrong."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > MAX_NAME:
        raise NarError(
            f"invalid entry name {name[:300]!r}{where}: expected 1..{MAX_NAME} bytes, not '.' or "
            f"'..', without '/' or NUL",
            offset,
        )
    return name


def check_target(target: bytes, where: str = "", offset: int | None = None) -> bytes:
    if not target or len(target) > MAX_TARGET or b"\0" in target:
        raise NarError(
            f"invalid symlink target {target[:300]!r}{where}: expected 1..{MAX_TARGET} bytes "
            f"without NUL",
            offset,
        )
    return target


def _where(path: tuple) -> str:
    shown = render_path(path)
    if len(shown) > 200:
        shown = "…" + shown[-200:]
    return f" at {shown!r}"


def render_path(path: tuple[bytes, ...]) -> str:
    """``/a/b`` for a NAR path tuple (``/`` for the root), undecodable bytes escaped."""
    return "/" + "/".join(p.decode("utf-8", "backslashreplace") for p in path)

