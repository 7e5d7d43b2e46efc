"""``nix-cache-info``: the one file that describes a binary cache.

::

    StoreDir: /pure/store
    WantMassQuery: 1        (optional)
    Priority: 40            (optional; lower is preferred)

A client must refuse a cache whose ``StoreDir`` differs from its own store dir: paths (and their
hashes) only mean the same thing under the same store dir.

Read as Nix reads it (a text line without a ``Key: value`` is passed over, unknown keys are
ignored, no ``StoreDir`` line means the reader's own store dir), except that what cannot be a
nix-cache-info at all is refused, naming the line: bytes that are not UTF-8 text or hold a NUL
(a binary file, a compressed answer), and text with no ``Key: value`` line (another service's
page or answer); Nix takes both for an empty nix-cache-info of a cache for its own store dir.
"""

from __future__ import annotations

import re

import attrs

from ..errors import CacheError
from .url import MAX_DIGITS, whole

_WHOLE = re.compile(r"[-+]?[0-9]+")  # ASCII digits only ("²".isdigit() is true, int() refuses it)
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # a field's name (StoreDir, WantMassQuery, Priority, ...)
_HINT = "is the URL a binary cache's?"


def _shown(line: bytes) -> str:
    """A line for a message: its first 24 bytes, as Python writes bytes (escapes for the others)."""
    return repr(line[:24])[1:] + ("..." if len(line) > 24 else "")


def _text_lines(data: bytes, where: str) -> list[str]:
    """The lines of ``data`` (split at "\n" only), each UTF-8 text without NUL; else the
    error naming the first line that is not."""
    lines = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line, why = "", "not UTF-8"
        else:
            why = "a NUL byte" if "\0" in line else ""
        if why:
            raise CacheError(f"{where}: this is not a nix-cache-info: line {n} is not text ({why}: "
                             f"{_shown(raw)})", hint=_HINT)
        lines.append(line)
    return lines


@attrs.frozen
class CacheInfo:
    store_dir: str
    want_mass_query: bool = False
    priority: int = 50

    def render(self) -> str:
        out = f"StoreDir: {self.store_dir}\n"
        if self.want_mass_query:
            out += "WantMassQuery: 1\n"
        if self.priority != 50:
            out += f"Priority: {self.priority}\n"
        return out

    @classmethod
    def parse(cls, text: bytes | str, where: str, default_store_dir: str | None = None) -> "CacheInfo":
        """Parse ``nix-cache-info`` as Nix does (a text line without ``Key: value`` is passed
        over); raise :class:`CacheError` naming ``where`` (and the line) for a web page, bytes
        that are not text, text without a ``Key: value`` line, or a bad priority.  Without a
        ``StoreDir`` line the cache is taken to be for ``default_store_dir`` (as Nix takes it to
        be for its own), when one is given."""
        if isinstance(text, str):
            text = text.encode("utf-8", "surrogateescape")
        if text.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (an editor's): not the key's
            text = text[3:]
        lines = _text_lines(text, where)
        if "\n".join(lines).lstrip().startswith("<"):
            raise CacheError(f"{where}: this is not a nix-cache-info but a web page "
                             f"(is the URL a binary cache's?)")
        fields: dict[str, str] = {}
        # as Nix reads it: lines split at "\n" only, a line without ':' ignored
        for line in lines:
            key, sep, value = line.partition(":")
            if sep and _KEY.fullmatch(key.strip()):
                fields[key.strip()] = value.strip()
        if not fields and any(line.strip() for line in lines):
            n, first = next((n, line) for n, line in enumerate(lines, 1) if line.strip())
            raise CacheError(f"{where}: this is not a nix-cache-info: no line is 'Key: value' "
                             f"(line {n}: {_shown(first.encode())})", hint=_HINT)
        if "StoreDir" not in fields:
            if default_store_dir is None:
                raise CacheError(f"{where}: no 'StoreDir' line")
            fields["StoreDir"] = default_store_dir
        prio = fields.get("Priority", "50")
        if not _WHOLE.fullmatch(prio):
            raise CacheError(f"{where}: Priority must be a whole number, got {prio[:40]!r}")
        if len(prio.lstrip("+-").lstrip("0")) > MAX_DIGITS:  # (int() refuses over 4300 digits)
            raise CacheError(f"{where}: Priority {prio[:40]!r}{'...' if len(prio) > 40 else ''} is out of range "
                             f"(at most {MAX_DIGITS} digits)")
        return cls(fields["StoreDir"], fields.get("WantMassQuery") == "1", whole(prio))

    def check_store_dir(self, store_dir: str, where: str, other: str = "this store's dir") -> None:
        """Raise unless the cache is for ``store_dir`` (``other``: what that dir is, for the message)."""
        if self.store_dir != store_dir:
            raise CacheError(
                f"binary cache {where!r} is for store dir {self.store_dir!r}, "
                f"but {other} is {store_dir!r}",
                hint="use a cache made for the same --store-dir")


async def read_cache_info(backend, url: str, default_store_dir: str | None = None) -> CacheInfo:
    """Read and parse the ``nix-cache-info`` of the cache behind ``backend``; raise
    :class:`CacheError` when there is none (naming a ``file://`` directory that does not exist)."""
    import os

    from .backend import FileBackend
    data = await backend.get("nix-cache-info")
    if data is None:
        if isinstance(backend, FileBackend) and not os.path.isdir(backend.dir):
            raise CacheError(f"binary cache {url!r}: directory {backend.dir!r} does not exist")
        raise CacheError(f"binary cache {url!r} has no nix-cache-info (is it a cache?)")
    return CacheInfo.parse(data, url.partition("?")[0].rstrip("/") + "/nix-cache-info", default_store_dir)
