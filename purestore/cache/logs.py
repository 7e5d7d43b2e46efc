"""Build logs kept in binary caches: ``log/<drv base name>``, as ``pure copy --to`` and Nix's
``nix store copy-log`` write them (plain text; Nix reads the same place for ``nix log``).

:func:`fetch_build_log` backs ``pure log`` when the local store has no log: each substituter is
asked in priority order, for the derivations the local store knows for the path and, when the
path is an output, for the ``Deriver`` its narinfo in that cache names.  Logs are not signed (in
Nix's format neither the log nor a narinfo's ``Deriver`` is covered by a signature): what comes
back is shown as what that cache says, and the caller says where it came from.
"""

from __future__ import annotations

import logging
from typing import Iterable

import attrs

from ..errors import CacheError, NarInfoError
from ..formats.narinfo import NarInfo
from ..formats.store_path import StorePath
from .backend import file_url
from .narinfo_lookup import Substituters

log = logging.getLogger("purestore.cache")


@attrs.frozen
class CacheLog:
    """A build log found in a cache: which cache, which derivation's log, its bytes."""

    url: str
    drv: StorePath
    data: bytes


@attrs.frozen
class LogSearch:
    """The result of :func:`fetch_build_log`: the log if found, and where it was looked for (the
    caches asked, and the derivations asked about), for an error that says so."""

    found: CacheLog | None
    caches: tuple[str, ...]
    drvs: tuple[StorePath, ...]


def log_name(drv: StorePath) -> str:
    """The cache file that holds ``drv``'s build log."""
    return f"log/{drv.base_name}"


async def _deriver_in(cache, path: StorePath, store_dir: str) -> StorePath | None:
    """The ``Deriver`` of ``path``'s narinfo in ``cache``, if it has one (unsigned information:
    only used to find a log)."""
    name = f"{path.hash_part}.narinfo"
    data = await cache.backend.get(name)
    if data is None:
        return None
    where = file_url(cache.url, name)
    try:
        ni = NarInfo.parse(data, store_dir, where=where)
    except NarInfoError as e:
        log.warning("warning: %s", e)
        return None
    if ni.store_path != path:
        log.warning("warning: %s describes %r, not the path asked for", where, ni.store_path.absolute(store_dir))
        return None
    return ni.deriver


async def fetch_build_log(settings, path: StorePath, drvs: Iterable[StorePath] = (),
                          urls: Iterable[str] | None = None) -> LogSearch:
    """Look for the build log of ``path`` (a ``.drv``, or an output whose derivations ``drvs``
    the local store knows) in the substituters (``urls``, default the configured ones), in
    priority order.  A cache that cannot be used or fails a request is warned about and skipped."""
    drvs = list(dict.fromkeys(drvs))
    if path.name.endswith(".drv") and path not in drvs:
        drvs.insert(0, path)
    asked: list[StorePath] = list(drvs)
    async with Substituters(settings, urls, trusted_keys=()) as subs:
        for cache in subs.caches:
            wanted = list(drvs)
            try:
                if not path.name.endswith(".drv"):
                    d = await _deriver_in(cache, path, settings.store_dir)
                    if d is not None and d not in wanted:
                        wanted.append(d)
                        if d not in asked:
                            asked.append(d)
                for d in wanted:
                    data = await cache.backend.get(log_name(d))
                    if data is not None:
                        return LogSearch(CacheLog(cache.url, d, data), tuple(c.url for c in subs.caches), tuple(asked))
            except CacheError as e:
                log.warning("warning: cannot read build logs from %r: %s", cache.url, e)
        return LogSearch(None, tuple(c.url for c in subs.caches), tuple(asked))
