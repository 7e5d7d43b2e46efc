"""What a binary cache says about store paths, read without a store (``pure cache path-info``,
like ``nix path-info --store URL``): each path's narinfo, and with ``recursive`` or closure
sizes, the narinfos of its whole closure.

The narinfos are parsed strictly with the cache's own store dir (from ``nix-cache-info``), so a
Nix cache can be asked from a purestore set up for another store dir.  Signatures are reported,
and checked against trusted keys when some are given (:attr:`CachePathInfo.trusted`); nothing is
refused for being unsigned, since nothing is installed.
"""

from __future__ import annotations

from typing import Iterable

import attrs
import trio

from ..errors import CacheError, NarInfoError, SignatureError
from ..formats.narinfo import NarInfo
from ..formats.signing import parse_public_keys, verify_any
from ..formats.store_path import StorePath
from ._nursery import open_nursery
from .backend import backend_for
from .info import read_cache_info

CONCURRENCY = 16  # narinfo requests at once (sharing the connection pool)


@attrs.frozen
class CachePathInfo:
    """One path's narinfo, with its closure's sizes when asked for, and its trust: the name of
    a trusted key that signed it, or why none did (None when no keys were given)."""

    info: NarInfo
    closure_size: int | None = None
    closure_download_size: int | None = None
    trusted: str | None = None
    untrusted_reason: str | None = None

    def to_json(self, store_dir: str) -> dict:
        """The object ``nix path-info --json --store URL`` prints for this path (Nix 2.8's keys,
        in its order)."""
        ni = self.info
        out = ni.path_info().to_json(store_dir, self.closure_size)
        if ni.url:
            out["url"] = ni.url
        if ni.file_hash is not None:
            out["downloadHash"] = ni.file_hash.sri
        if ni.file_size:
            out["downloadSize"] = ni.file_size
        if self.closure_download_size is not None:
            out["closureDownloadSize"] = self.closure_download_size
        return out


@attrs.frozen
class CacheQuery:
    url: str
    store_dir: str
    infos: list[CachePathInfo]  # sorted by path, as Nix prints them


async def cache_path_infos(settings, url: str, paths: Iterable[StorePath], *, recursive: bool = False,
                           closure_sizes: bool = False, trusted_keys: Iterable[str] | None = None) -> CacheQuery:
    """The narinfos of ``paths`` (and of their closures with ``recursive``) in the cache at
    ``url``.  Raises :class:`CacheError` naming the path when one is not in the cache, or its
    narinfo is unreadable, or (when its closure is needed) a path it refers to is missing."""
    trusted = parse_public_keys(trusted_keys or ())
    backend = backend_for(url, settings)
    url = backend.url  # (what is said of it: a login's password as ***)
    async with backend:
        info = await read_cache_info(backend, url, default_store_dir=settings.store_dir)
        sd = info.store_dir
        got: dict[StorePath, NarInfo] = {}
        wanted = list(dict.fromkeys(paths))
        need_closure = recursive or closure_sizes
        referrer: dict[StorePath, StorePath] = {}  # a path fetched for the closure → who refers to it
        limit = trio.CapacityLimiter(CONCURRENCY)

        async def fetch(p: StorePath) -> None:
            async with limit:
                got[p] = await _narinfo(backend, url, sd, p, referrer.get(p))
            if need_closure:
                for r in got[p].references:
                    if r not in got and r not in referrer and r not in wanted:
                        referrer[r] = p
                        n.start_soon(fetch, r)

        async with open_nursery() as n:
            for p in wanted:
                n.start_soon(fetch, p)

        def closure(p: StorePath) -> set[StorePath]:
            seen, todo = {p}, [p]
            while todo:
                for r in got[todo.pop()].references:
                    if r not in seen:
                        seen.add(r)
                        todo.append(r)
            return seen

        shown = sorted(got if recursive else wanted, key=lambda p: p.base_name)
        out = []
        for p in shown:
            ni = got[p]
            size = dl = None
            if closure_sizes:
                c = closure(p)
                size = sum(got[q].nar_size for q in c)
                dl = sum(got[q].file_size or 0 for q in c)
            key = reason = None
            if trusted:
                try:
                    key = verify_any(ni.fingerprint(sd), ni.sigs, trusted)
                except SignatureError as e:
                    reason = str(e)
            out.append(CachePathInfo(ni, size, dl, key, reason))
        return CacheQuery(url, sd, out)


async def _narinfo(backend, url: str, sd: str, p: StorePath, referrer: StorePath | None) -> NarInfo:
    return (await read_narinfo(backend, url, sd, p, referrer))[0]


async def read_narinfo(backend, url: str, sd: str, p: StorePath,
                       referrer: StorePath | None = None) -> tuple[NarInfo, bytes]:
    """``p``'s narinfo in the cache, parsed strictly (with the file's bytes); raises
    :class:`CacheError` when the cache lacks it (naming ``referrer``, the path that refers to
    it, when given), or it is unreadable or for another path."""
    name = f"{p.hash_part}.narinfo"
    data = await backend.get(name)
    if data is None:
        why = f", which {referrer.absolute(sd)!r} refers to," if referrer else ""
        raise CacheError(f"path {p.absolute(sd)!r}{why} is not in binary cache {url!r}")
    where = f"{url.split('?')[0].rstrip('/')}/{name}"
    try:
        ni = NarInfo.parse(data, sd, where=where)
    except NarInfoError as e:
        raise CacheError(f"cannot read the narinfo of {p.absolute(sd)!r}: {e}") from None
    if ni.store_path != p:
        raise CacheError(f"{where} describes {ni.store_path.absolute(sd)!r}, not {p.absolute(sd)!r}")
    return ni, data
