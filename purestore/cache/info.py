"""``nix-cache-info``: the one file that describes a binary cache.

::

    StoreDir: /pure/store
    WantMassQuery: 1        (optional)
    Priority: 40            (optional; lower is preferred)

A client must refuse a cache whose ``StoreDir`` differs from its own store dir: paths (and their
hashes) only mean the same thing under the same store dir.
"""

from __future__ import annotations

import re

import attrs

from ..errors import CacheError

_WHOLE = re.compile(r"[-+]?[0-9]+")  # ASCII digits only ("²".isdigit() is true, int() refuses it)


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
        """Parse ``nix-cache-info`` as Nix does (a line without ':' is passed over); raise
        :class:`CacheError` naming ``where`` for a web page or a bad priority.  Without a ``StoreDir`` line the cache is taken to be for ``default_store_dir`` (as Nix
        takes it to be for its own), when one is given."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if text.lstrip().startswith("<"):
            raise CacheError(f"{where}: this is not a nix-cache-info but a web page "
                             f"(is the URL a binary cache's?)")
        fields: dict[str, str] = {}
        # as Nix reads it: lines split at "\n" only, a line without ':' ignored
        for line in text.split("\n"):
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "StoreDir" not in fields:
            if default_store_dir is None:
                raise CacheError(f"{where}: no 'StoreDir' line")
            fields["StoreDir"] = default_store_dir
        prio = fields.get("Priority", "50")
        if not _WHOLE.fullmatch(prio):
            raise CacheError(f"{where}: Priority must be a whole number, got {prio[:40]!r}")
        return cls(fields["StoreDir"], fields.get("WantMassQuery") == "1", int(prio))

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
