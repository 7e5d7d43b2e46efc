"""Which cache's narinfo a substitution uses for a path: the lookup across the substituters.

- :class:`Substituters` is an open session on the configured caches: each is opened and its
  ``nix-cache-info`` read (a cache that cannot be used, or is for another store dir, is left
  out with a warning, or with ``strict`` is :class:`CacheUnusable`), and they are ranked by
  ``Priority``.  :meth:`Substituters.query` asks every cache for a path's narinfo at once and
  takes the best trusted one: it parses strictly, is for the path asked, carries a valid
  signature by a trusted key, its ``URL`` stays inside the cache (with require-provenance, a
  built path also needs a trusted provenance statement); the caches after the one that
  answers are not waited for.  Negative answers are remembered briefly
  (:mod:`.narinfo_cache`); what failed in a cache ranked before the one that answered is kept
  (``lookup_errors``, for Nix's ``fallback = false``).  A cache that does not answer a lookup
  at all within the stall timeout is not asked again: it is warned about once and counts as
  having none of the paths for the rest of the session (the lookups waiting for it end at
  once), so that one dead cache costs one timeout, not one per path.
- :func:`query_substitutable` asks for a closure's narinfos without fetching anything: what a
  build plans from and ``--dry-run`` shows.

Fetching what was found (the download and install scheduling) is :mod:`.substituter`'s.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable

import attrs
import trio

from ..errors import CacheError, NarInfoError, SignatureError
from ..formats.narinfo import NarInfo
from ..formats.signing import parse_public_keys, verify_any
from ..formats.store_path import StorePath
from . import _storeapi as S
from .backend import Backend, CacheNotAnswering, backend_for, check_name, file_url, parse_url
from .info import read_cache_info
from .narinfo_cache import NegativeCache
from .restored import RestoredTrees
from .url import hide_password
from ._nursery import open_nursery

log = logging.getLogger("purestore.cache")

QUERY_CONCURRENCY = 16  # narinfo queries in flight, sharing each cache's connection pool


class CacheUnusable(CacheError):
    """A cache that cannot be used at all (with ``strict``): unreachable, not a cache, another
    store dir."""


class _Rejected(Exception):
    """No cache had a usable narinfo, and at least one had an unusable one (reason)."""


class _Refused(str):
    """Why a narinfo a cache has cannot be used (not trusted, altered, another path, a URL
    outside the cache...)."""


class _LookupFailed(str):
    """Why a cache could not be asked for a narinfo (an error, not an answer: 5xx, a stall, a
    disabled cache), as opposed to a narinfo it had that cannot be used."""


@attrs.define
class _Cache:
    url: str
    backend: Backend
    priority: int
    # why it is not asked any more (it did not answer a lookup): it has nothing, for this session
    silent: str | None = None
    # the lookups waiting for its answer (cancelled when it is found not to answer)
    waiting: set = attrs.field(factory=set)


def _not_answering(url: str, e: CacheNotAnswering, rest: str) -> str:
    """The warning for a cache that did not answer ``e.name`` (``rest``: what is done about it)."""
    return (f"warning: binary cache {url.split('?')[0]!r} did not answer {e.name!r} within {e.timeout:g} s "
            f"(stalled-download-timeout): {rest}")


class Substituters:
    """An open session on a list of binary caches (use ``async with``).  A cache that cannot be
    used (unreachable, no ``nix-cache-info``, another store dir) is left out with a warning, or
    with ``strict`` makes opening fail (:class:`CacheUnusable`)."""

    def __init__(self, settings, urls: Iterable[str] | None = None,
                 trusted_keys: Iterable[str] | None = None, *, negative_ttl: int | None = None,
                 strict: bool = False):
        self.settings = settings
        # a URL listed twice (substituters and extra-substituters, say) is one cache, as in Nix:
        # asked once for each path, said once when it cannot be used
        self.urls = list(dict.fromkeys(settings.substituters if urls is None else urls))
        self.trusted = parse_public_keys(settings.trusted_public_keys if trusted_keys is None else trusted_keys)
        self.caches: list[_Cache] = []
        self.rejected: dict[str, str] = {}
        self.provenance: dict[StorePath, bytes] = {}  # verified statements (require-provenance)
        # (cache URL, hash part) → why its NAR could not be used: not downloaded again in this
        # session (a build that falls back to building a path may need its inputs fetched)
        self.failed: dict[tuple[str, str], str] = {}
        # path → why a cache ranked before the one that answered (or any, when none did)
        # could not be asked for it: Nix's ``fallback = false`` fails a build on these
        self.lookup_errors: dict[StorePath, str] = {}
        # restored NARs of paths that failed only with a reference, for a later substitution
        # in this session (a build's late fetch): not downloaded again
        self.restored = RestoredTrees()
        ttl = settings.narinfo_cache_negative_ttl if negative_ttl is None else negative_ttl
        self.negative = NegativeCache(getattr(settings, "state_dir", None), ttl)
        self.strict = strict

    async def __aenter__(self) -> "Substituters":
        async def open_one(i: int, given: str):
            url = hide_password(given)  # (what is said and recorded of it)
            try:
                cu = parse_url(given)  # (a priority that is no whole number is an error there)
                prio = cu.priority
                backend = backend_for(cu, self.settings)
            except CacheError as e:
                self.rejected[url] = str(e)
                failed.append(e)
                if not self.strict:
                    if repr(url) in str(e):  # the message names the URL already
                        log.warning("warning: not using binary cache: %s", e)
                    else:
                        log.warning("warning: not using binary cache %r: %s", url, e)
                return
            try:
                # (no StoreDir line: a cache for any store dir, as Nix takes it)
                info = await read_cache_info(backend, url, default_store_dir=self.settings.store_dir)
                info.check_store_dir(self.settings.store_dir, url)
            except CacheError as e:
                await backend.aclose()
                self.rejected[url] = str(e)
                failed.append(e)
                if not self.strict and isinstance(e, CacheNotAnswering):
                    log.warning("%s", _not_answering(url, e, "not using it in this run"))
                elif not self.strict:
                    why = str(e)
                    for named in (f"binary cache {url!r}", f"cache {url!r}"):
                        if why.startswith(named):  # the URL said once is enough
                            rest = why[len(named):]  # ": directory … does not exist", " is for store dir …"
                            why = rest[2:] if rest.startswith(": ") else "it" + rest
                            break
                    log.warning("warning: not using binary cache %r: %s", url, why)
                return
            priority = prio if prio is not None else info.priority
            opened.append((priority, i, _Cache(url, backend, priority)))

        opened: list[tuple[int, int, _Cache]] = []
        failed: list[CacheError] = []
        async with open_nursery() as n:
            for i, url in enumerate(self.urls):
                n.start_soon(open_one, i, url)
        self.caches = [c for _p, _i, c in sorted(opened, key=lambda t: (t[0], t[1]))]
        if failed and self.strict:
            await self.aclose()
            raise CacheUnusable(str(failed[0]), hint=failed[0].hint)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.restored.discard()
        for c in self.caches:
            await c.backend.aclose()
        self.negative.close()

    async def query(self, path: StorePath, exclude: Iterable[_Cache] = ()) -> tuple[_Cache, NarInfo] | None:
        """The best trusted narinfo for ``path`` (from a cache not in ``exclude``); None if no
        cache has one; raises :class:`_Rejected` if some cache had one that cannot be used (and
        none a good one)."""
        skip = {id(c) for c in exclude}
        caches = [c for c in self.caches if id(c) not in skip]
        results: list[NarInfo | str | None] = [None] * len(caches)
        answered = [False] * len(caches)

        def decided() -> bool:
            """A cache has a good narinfo and every cache before it (in priority order) has
            answered: the caches after it are not waited for (a slow or stalled one of lower
            priority must not hold up what a better one has: Nix does not ask them at all)."""
            for r, done in zip(results, answered):
                if not done:
                    return False
                if isinstance(r, NarInfo):
                    return True
            return True

        async def one(i: int, cache: _Cache):
            results[i] = await self._query_one(cache, path)
            answered[i] = True
            if decided():
                n.cancel_scope.cancel()

        if len(caches) == 1:  # (the usual case, `pure copy --from`): no nursery and task for it
            results[0] = await self._query_one(caches[0], path)
        else:
            async with open_nursery() as n:
                for i, c in enumerate(caches):
                    n.start_soon(one, i, c)
        # (the caches before the one that answers, in priority order: what failed there)
        chosen = next((i for i, r in enumerate(results) if isinstance(r, NarInfo)), len(results))
        errors = [r for r in results[:chosen] if isinstance(r, _LookupFailed)]
        if errors:
            self.lookup_errors[path] = "; ".join(errors)
        else:
            self.lookup_errors.pop(path, None)
        if chosen < len(results):
            good = caches[chosen].url.split("?")[0]
            for bad, why in zip(caches[:chosen], results[:chosen]):  # said, as Nix says it
                if isinstance(why, _Refused):
                    log.warning("warning: not using %r from %r: %s; using %r", path.absolute(self.settings.store_dir),
                                bad.url.split("?")[0], why, good)
            return caches[chosen], results[chosen]
        reasons = [r for r in results if isinstance(r, str)]
        if reasons:
            raise _Rejected("; ".join(reasons))
        return None

    async def _query_one(self, cache: _Cache, path: StorePath) -> NarInfo | str | None:
        sd = self.settings.store_dir
        name = f"{path.hash_part}.narinfo"
        if self.negative.is_negative(cache.url, path.hash_part):
            return None
        why = self.failed.get((cache.url, path.hash_part))
        if why is not None:
            return f"its NAR from {cache.url.split('?')[0]!r} failed earlier in this run: {why}"
        if cache.silent is not None:
            return None
        data = None
        with trio.CancelScope() as waiting:
            cache.waiting.add(waiting)
            try:
                data = await cache.backend.get(name, retry_unanswered=False)
            except CacheNotAnswering as e:
                self._silenced(cache, e)
                return None
            except CacheError as e:
                return _LookupFailed(e)
            finally:
                cache.waiting.discard(waiting)
        if waiting.cancelled_caught:  # the cache was found not to answer meanwhile
            return None
        if data is None:
            self.negative.add(cache.url, path.hash_part)
            return None
        self.negative.found(cache.url, path.hash_part)
        where = file_url(cache.url, name)
        try:
            ni = NarInfo.parse(data, sd, where=where)
        except NarInfoError as e:
            return _Refused(f"bad narinfo: {e}")
        if ni.store_path != path:
            return _Refused(f"{where} describes {ni.store_path.absolute(sd)!r}, not the path asked for")
        try:
            verify_any(ni.fingerprint(sd), ni.sigs, self.trusted)
        except SignatureError as e:
            return _Refused(f"narinfo {where} is not trusted: {e}")
        try:
            check_name(ni.url, where)
        except CacheError:
            return _Refused(f"narinfo {where} has URL {ni.url!r}, which points outside the cache")
        if getattr(self.settings, "require_provenance", False) and ni.ca is None:
            # content-addressed paths (sources, texts, fixed-output fetches) are checked by their
            # content address; provenance is required of input-addressed (built) paths
            reason = await self._check_provenance(cache, path, ni)
            if reason:
                return _Refused(reason)
        return ni

    def _silenced(self, cache: _Cache, e: CacheNotAnswering) -> None:
        """``cache`` did not answer a lookup: said once, and it is asked nothing more in this
        session (the lookups waiting for it end now, as if it had not had their paths)."""
        if cache.silent is not None:
            return
        cache.silent = str(e)
        log.warning("%s", _not_answering(cache.url, e, "not asking it for anything more in this run"))
        for scope in list(cache.waiting):
            scope.cancel()

    async def _check_provenance(self, cache: _Cache, path: StorePath, ni: NarInfo) -> str | None:
        """With require-provenance: the cache's ``<hash>.provenance`` must be a DSSE envelope
        signed by a trusted key whose statement has this path, with the narinfo's NarHash, as a
        subject.  Returns why not, or None (and keeps the envelope for the local store)."""
        from ..errors import ProvenanceError
        from ..formats.provenance import provenance_file_name, verify_for_path
        name = provenance_file_name(path.hash_part)
        where = file_url(cache.url, name)
        try:
            data = await cache.backend.get(name)
        except CacheError as e:
            return f"cannot read its provenance {where}: {e}"
        if data is None:
            return f"{cache.url!r} has no provenance statement for it (require-provenance is set)"
        try:
            verify_for_path(data, self.trusted, path.absolute(self.settings.store_dir), ni.nar_hash, where)
        except ProvenanceError as e:
            return f"its provenance is not valid: {e}"
        self.provenance[path] = data
        return None


@contextlib.asynccontextmanager
async def _session(session: Substituters | None, settings, *args, **kw):
    """``session`` itself (left open), or a new :class:`Substituters` closed on the way out."""
    if session is not None:
        yield session
    else:
        async with Substituters(settings, *args, **kw) as subs:
            yield subs


@attrs.frozen
class Substitutable:
    """What :func:`query_substitutable` found: ``found`` (path → (cache URL, narinfo)) for the
    paths that could be fetched with every missing path of their closures, ``failures`` (path →
    why not) for the others."""

    found: dict[StorePath, tuple[str, NarInfo]]
    failures: dict[StorePath, str]
    urls: tuple[str, ...] = ()  # the caches that could be used (the others were warned about)
    # path → why a cache could not be asked for it (before the one that answered, if any)
    lookup_errors: dict[StorePath, str] = attrs.field(factory=dict)
    # the paths in ``failures`` only because a missing reference of theirs cannot be
    # substituted: (cache URL, narinfo), for a build to fetch them once it has made that reference
    blocked: dict[StorePath, tuple[str, NarInfo]] = attrs.field(factory=dict)


async def query_substitutable(store, settings, paths: Iterable[StorePath], *,
                              session: Substituters | None = None) -> Substitutable:
    """Which of ``paths`` (and of the missing paths they refer to) the substituters could provide,
    without fetching anything: the narinfo queries of a substitution (trusted signatures, in
    parallel, priority order), what a build decides from and ``--dry-run`` shows.  A path
    whose missing reference no cache has is not substitutable.  Valid paths are left out;
    offline, nothing is asked.  ``session``: an open :class:`Substituters` to ask (left open)."""
    wanted = {p for p in paths if not S.is_valid(store, p)}
    found: dict[StorePath, tuple[str, NarInfo]] = {}
    failures: dict[StorePath, str] = {}
    if not wanted or settings.offline or not settings.substituters:
        return Substitutable(found, {p: "no substituter is used" for p in wanted})
    async with _session(session, settings) as subs:
        usable = tuple(c.url for c in subs.caches)
        seen = set(wanted)
        qlimit = trio.CapacityLimiter(QUERY_CONCURRENCY)

        async def visit(p: StorePath, nursery) -> None:
            async with qlimit:
                try:
                    r = await subs.query(p)
                except _Rejected as e:
                    failures[p] = str(e)
                    return
            if r is None:
                failures[p] = "no binary cache has it"
                return
            found[p] = (r[0].url, r[1])
            for ref in r[1].references:
                if ref != p and ref not in seen and not S.is_valid(store, ref):
                    seen.add(ref)
                    nursery.start_soon(visit, ref, nursery)

        async with open_nursery() as n:
            for p in wanted:
                n.start_soon(visit, p, n)
    changed = True
    blocked: dict[StorePath, tuple[str, NarInfo]] = {}
    while changed:  # a path is only as substitutable as its missing references
        changed = False
        for p, (_url, ni) in list(found.items()):
            bad = next((r for r in ni.references if r != p and r in failures), None)
            if bad is not None:
                blocked[p] = found.pop(p)
                failures[p] = f"its reference {bad.absolute(settings.store_dir)!r} cannot be substituted"
                changed = True
    lookup_errors = {p: why for p, why in subs.lookup_errors.items() if p in seen}
    return Substitutable(found, failures, usable, lookup_errors, blocked)
