"""Restored NARs kept in a substitution session, for a later substitution of the same session.

A path whose NAR came and passed every check (FileHash, NarHash, the restore) is not registered
when a reference of it failed to come: its referrers must wait for it.  A build then makes that
reference here, with the same path, and fetches the path again (a *late fetch*, see
``purestore/build/substitution.py``).  Instead of downloading it a second time, the restored
tree is kept: a temporary entry of the store, named for this process, which the store removes
once the process is gone (never while it runs), and which a garbage collection leaves alone.
The session removes what was not used when it closes.
"""

from __future__ import annotations

from typing import Iterable

import attrs
import trio

from ..formats.hash import Hash
from ..formats.store_path import StorePath
from .fetch import remove_temp


@attrs.frozen
class _Kept:
    url: str  # the cache it came from
    nar_hash: Hash  # the narinfo's, which the restored tree was checked against
    tmp: str  # the restored tree (canonical metadata, not yet moved into place)
    store: object


class RestoredTrees:
    """Verified restored trees of paths not registered, by path (see the module's docstring).
    Used from the trio thread only."""

    def __init__(self) -> None:
        self._kept: dict[StorePath, _Kept] = {}

    def __contains__(self, path: StorePath) -> bool:
        return path in self._kept

    def paths(self) -> list[StorePath]:
        return list(self._kept)

    def keep(self, store, path: StorePath, url: str, nar_hash: Hash, tmp: str) -> bool:
        """Keep ``tmp``, ``path``'s tree restored from the NAR of ``url`` checked against
        ``nar_hash``; this object removes it from now on.  False (the caller removes it) when
        one is kept for ``path`` already."""
        if path in self._kept:
            return False
        self._kept[path] = _Kept(url, nar_hash, tmp, store)
        return True

    async def take(self, path: StorePath, url: str, nar_hash: Hash) -> str | None:
        """The tree kept for ``path`` from ``url`` with ``nar_hash`` (the caller removes it from
        now on), or None.  One kept for other values is removed."""
        kept = self._kept.pop(path, None)
        if kept is None:
            return None
        if kept.url == url and kept.nar_hash == nar_hash:
            return kept.tmp
        await _remove([kept])
        return None

    async def discard(self, paths: Iterable[StorePath] | None = None) -> None:
        """Remove the trees kept for ``paths`` (all by default), also when cancelled."""
        keys = list(self._kept) if paths is None else [p for p in paths if p in self._kept]
        await _remove([self._kept.pop(p) for p in keys])


async def _remove(kept: list[_Kept]) -> None:
    if not kept:
        return

    def remove() -> None:
        for k in kept:
            try:
                remove_temp(k.store, k.tmp)
            except OSError:
                pass  # the store removes it once this process is gone
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(remove)
