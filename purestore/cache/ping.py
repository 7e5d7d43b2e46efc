"""``pure cache info``: is each binary cache usable, and in which order would substitution use
them (what ``nix store ping --store URL`` and a look at ``nix-cache-info`` tell a Nix user)?

For each URL (by default the configured substituters) :func:`cache_status` reads
``nix-cache-info`` as substitution does, timing the answer, and says why a cache would be left
out: a bad URL, no answer, no ``nix-cache-info``, another store dir.  Usable caches come first,
in the order substitution asks them (priority, then the order given).
"""

from __future__ import annotations

import time
from typing import Iterable

import attrs

from ..errors import CacheError
from ._nursery import open_nursery
from .backend import backend_for, parse_url
from .info import read_cache_info
from .url import hide_password


@attrs.define
class CacheStatus:
    url: str
    index: int  # place in the list given
    error: str | None = None  # why the cache is not usable; None: usable
    store_dir: str | None = None
    priority: int | None = None  # the one substitution uses (the URL's, else nix-cache-info's)
    want_mass_query: bool | None = None
    millis: float | None = None  # time to read nix-cache-info (connection included)

    @property
    def usable(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return {"url": self.url, "usable": self.usable, "error": self.error, "storeDir": self.store_dir,
                "priority": self.priority, "wantMassQuery": self.want_mass_query,
                "milliseconds": None if self.millis is None else round(self.millis, 1)}


async def cache_status(settings, urls: Iterable[str]) -> list[CacheStatus]:
    """The status of each cache, asked in parallel; usable ones first, in substitution order."""
    out: list[CacheStatus] = []

    async def one(i: int, given: str) -> None:
        url = hide_password(given)  # (what is said of it)
        st = CacheStatus(url, i)
        out.append(st)
        try:
            cu = parse_url(given)
            prio = cu.priority
            backend = backend_for(cu, settings)
        except CacheError as e:
            st.error = str(e)
            return
        async with backend:
            start = time.perf_counter()
            try:
                info = await read_cache_info(backend, url, default_store_dir=settings.store_dir)
            except CacheError as e:
                st.error = str(e)
                return
            st.millis = (time.perf_counter() - start) * 1000
        st.store_dir, st.want_mass_query = info.store_dir, info.want_mass_query
        st.priority = prio if prio is not None else info.priority
        try:
            info.check_store_dir(settings.store_dir, url)
        except CacheError as e:
            st.error = str(e)

    async with open_nursery() as n:
        for i, url in enumerate(dict.fromkeys(urls)):  # (a URL listed twice is one cache, as for substitution)
            n.start_soon(one, i, url)
    return sorted(out, key=lambda s: (not s.usable, s.priority if s.usable else 0, s.index))
