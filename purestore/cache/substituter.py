"""Substitution: making paths valid by downloading them from binary caches.

:func:`substitute` is what the builder calls; :func:`copy_from` backs ``pure copy --from``;
:func:`fetch_path` re-fetches one path (``repair``).

How a path is substituted:

1. **Query** (all wanted paths and, transitively, their missing references, in parallel, with a
   pooled HTTP client): every configured cache is asked for ``<hash>.narinfo``; a cache whose
   ``nix-cache-info`` names another store dir is refused.  A narinfo is used only if it parses
   strictly, is for the path asked, its ``URL`` stays inside the cache, and it carries a valid
   signature by a trusted key.  Among caches that qualify, the lowest ``Priority`` wins.
   Negative answers are remembered briefly (:mod:`.narinfo_cache`).
2. **Fetch** (several at once, the biggest waiting NAR first; registered references before
   referrers): the NAR file is streamed from the cache (a ``file://`` cache is read in place)
   through a reader that hashes the compressed bytes (FileHash/FileSize), decompresses them,
   hashes and counts the NAR (NarHash/NarSize, never decompressing beyond NarSize) and restores
   it into a temporary directory in the store (never writing outside it).  Only when every
   check passed is it given canonical metadata, renamed into place under the path lock and
   registered with its references and signatures.

Untrusted or corrupt data is never registered: the path fails with a reason naming the path and
what was wrong, its referrers fail too, and everything else goes on.

The narinfo lookup of step 1 (which cache, which narinfo) is :mod:`.narinfo_lookup`'s
(:class:`Substituters`); this module walks the closure, schedules the fetches and installs what
they restored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from functools import partial
from typing import Iterable

import trio

from ..errors import CacheError, CopyIncomplete, FormatError, SignatureError, StoreError
from ..formats.narinfo import NarInfo
from ..formats.signing import parse_public_keys
from ..formats.store_path import StorePath
from . import _storeapi as S
from .backend import FileBackend, parse_url
from .fetch import SMALL_NAR, Opened, download, install_batch, remove_temp
from .forked import ForkedWorker
from .narinfo_lookup import QUERY_CONCURRENCY, CacheUnusable, Substituters, _Cache, _Rejected, _session
from ._gate import LargestFirst
from ._nursery import open_nursery
from ._present import SubstituteReport, present_report
from .progress import Progress

log = logging.getLogger("purestore.cache")

# Small NARs over HTTP downloaded at once by default: they wait on the network, not on the CPU,
# so with a cache a round trip away (10 ms) this many are twice as fast as four (measured with
# benchmarks/copy_cache.py's latency proxy) and cost nothing on loopback.  Big NARs and file://
# restores are CPU work and go one per core whatever this is.
SMALL_FETCHES = 16
AHEAD = 4  # big NARs over HTTP asked for before a lane is free to restore them (at most)


_PRESENT = "(valid already)"  # download_from's answer for a path registered meanwhile


# -- the closure -----------------------------------------------------------------------------------


async def substitute_report(store, settings, paths: Iterable[StorePath], *,
                            urls: Iterable[str] | None = None, trusted_keys: Iterable[str] | None = None,
                            progress: Progress | None = None, repair: Iterable[StorePath] = (),
                            jobs: int | None = None, negative_ttl: int | None = None,
                            fork_worker: bool = False, strict_caches: bool = False,
                            known: dict[StorePath, tuple[str, NarInfo]] | None = None,
                            session: Substituters | None = None) -> SubstituteReport:
    """Substitute ``paths`` (and their missing references) from the caches; never raises for a
    single path's failure: see the report's ``failures``.  ``repair`` paths are fetched even if
    valid and put back in place.

    ``fork_worker``: restore from ``file://`` caches and big NARs over HTTP in a forked copy of
    this process as well (:mod:`.forked`); only for a caller whose other threads are all idle
    now (the CLI).  ``strict_caches``: a cache that cannot be used raises
    :class:`CacheUnusable` instead of being left out with a warning.  ``known``: narinfos that
    :func:`query_substitutable` found in this run (cache URL, narinfo), used without asking
    again.  ``session``: an open :class:`Substituters` to use (and leave open) instead of
    opening the caches again (``urls``, ``trusted_keys``, ``negative_ttl`` and
    ``strict_caches`` are then the session's)."""
    paths = set(paths)
    # with require-provenance the query keeps each verified statement in its session: known
    # narinfos need that session, or else they are asked for again
    if getattr(settings, "require_provenance", False) and session is None:
        known = {}
    known = known or {}
    repair = set(repair)
    sd = settings.store_dir
    report = SubstituteReport()
    explicit_jobs = jobs is not None
    jobs = jobs or max(SMALL_FETCHES, 2 * (os.cpu_count() or 1))

    def valid(p: StorePath) -> bool:
        return p not in repair and S.is_valid(store, p)

    # A path found valid is relied on (the paths asked for, the references of what is fetched):
    # its temporary root comes first, so that a `pure gc` meanwhile cannot delete it.
    S.add_temp_roots(store, paths)
    wanted = paths - (S.valid_paths(store, paths) - repair)
    if not wanted:
        report.valid = set(paths)
        return report
    if settings.offline:
        report.valid = S.valid_paths(store, paths)
        return report

    lanes = jobs if explicit_jobs else max(1, min(jobs, os.cpu_count() or 1))
    use_worker = fork_worker and lanes >= 2
    async with _session(session, settings, urls, trusted_keys, negative_ttl=negative_ttl, strict=strict_caches) \
            as subs, _forked_worker(use_worker) as worker:
        if not subs.caches and not subs.rejected:
            report.valid = S.valid_paths(store, paths)
            return report
        found: dict[StorePath, tuple[_Cache, NarInfo]] = {}
        by_url = {c.url: c for c in subs.caches}
        seen = set(wanted)
        queried = {p: trio.Event() for p in wanted}  # set when p's narinfo query has finished
        events: dict[StorePath, trio.Event] = {}     # set when p is registered or has failed
        ok: set[StorePath] = set()
        qlimit = trio.CapacityLimiter(QUERY_CONCURRENCY)
        flimit = trio.CapacityLimiter(jobs)
        # Restoring a big NAR, or any from a file:// cache, is CPU work (each keeps two threads
        # busy, see nar_jobs._Ahead): more at once than cores only contend for the GIL (measured:
        # 50 big paths from nginx took 2.7 s with 4 at once, 1.9 s with 2).  Small NARs over
        # HTTP wait on the network instead and go ``jobs`` at a time.  An explicit ``jobs``
        # (say, for a distant cache where each connection is slow) applies to all.  The biggest
        # waiting NAR gets the next lane (_gate.LargestFirst).
        lanes_gate = LargestFirst(lanes)
        # A big NAR over HTTP is asked for while it waits for a lane (at most this many at once):
        # its request and the server's first bytes then cross the network while the lane's
        # previous NAR is restored, instead of one round trip per NAR after it (measured: 50
        # big paths from nginx 40 ms away, +1.2 s over loopback without this).  If the server
        # gives up on a response left unread too long, the download resumes (backend retries).
        ahead_gate = LargestFirst(min(lanes, AHEAD))
        send, recv = trio.open_memory_channel(math.inf)
        outcome: dict[StorePath, object] = {}
        locks = getattr(store, "locks", None)  # the store's path locks (a local store has them)
        from ..store.fstree import read_umask
        umask = read_umask()  # once for the run's restores, not once each (~25 µs a read)
        waited: list[StorePath] = []  # paths whose lock another process held when wanted

        async def visit(p: StorePath, queries, fetches):
            """Query p's narinfo; on success start fetching it at once and query its references."""
            try:
                if p in known and known[p][0] in by_url and (known[p][0], p.hash_part) not in subs.failed:
                    r = (by_url[known[p][0]], known[p][1])
                else:
                    async with qlimit:
                        try:
                            r = await subs.query(p)
                        except _Rejected as e:
                            report.failures[p] = str(e)
                            return
                if r is None:
                    extra = "; ".join(subs.rejected.values())
                    if len(subs.caches) == 1 and not extra:
                        report.failures[p] = f"binary cache {subs.caches[0].url.split('?')[0]!r} does not have it"
                    else:
                        report.failures[p] = "no binary cache has it" + (f" ({extra})" if extra else "")
                    return
                found[p] = r
                events[p] = trio.Event()
                if progress:
                    progress.expect(1, r[1].nar_size)
                new_refs = [ref for ref in r[1].references if ref != p and ref not in seen]
                S.add_temp_roots(store, new_refs)
                have = S.valid_paths(store, new_refs) - repair if new_refs else ()
                for ref in new_refs:
                    if ref not in seen and ref not in have:  # (a reference repeated: seen now)
                        seen.add(ref)
                        queried[ref] = trio.Event()
                        queries.start_soon(visit, ref, queries, fetches)
                fetches.start_soon(fetch, p)
            finally:
                queried[p].set()

        async def registrar():
            """Registers restored paths in batches: one lock round, one flush, one transaction."""
            async with recv:
                async for first in recv:
                    batch = [first]
                    while True:
                        try:
                            batch.append(recv.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    items = [(info, tmp, url) for info, tmp, url, _e in batch]
                    try:
                        res = await trio.to_thread.run_sync(partial(
                            install_batch, store, settings, items, repair, subs.provenance,
                            locked=locks is not None))
                    except StoreError as e:
                        res = {info.path: e for info, _t, _u in items}
                    for info, _tmp, _url, done in batch:
                        outcome[info.path] = res.get(info.path)
                        done.set()

        def ref_failure(p: StorePath, r: StorePath) -> str:
            return (f"its reference {r.absolute(sd)!r} could not be substituted: "
                    f"{report.failures.get(r, 'unknown reason')}")

        def keep_restored(p: StorePath, cache: _Cache, ni: NarInfo, tmp: str) -> bool:
            """``p`` failed with a reference, its tree ``tmp`` restored and checked: kept in the
            caller's session (for a later substitution of ``p`` in it, once the reference is
            made), True; not in a session of this call only, which closes on the way out."""
            return session is not None and subs.restored.keep(store, p, cache.url, ni.nar_hash, tmp)

        async def open_ahead(stack: contextlib.AsyncExitStack, cache: _Cache, ni: NarInfo):
            """Ask for the NAR now (holding a place of ``ahead_gate``); returns the opened
            response and the function that gives the place back (once the lane is entered)."""
            await ahead_gate.acquire(ni.nar_size)
            held = [True]

            def give_back() -> None:
                if held:
                    held.clear()
                    ahead_gate.release()
            stack.callback(give_back)
            chunks = await stack.enter_async_context(cache.backend.open_read(ni.url))
            return Opened(chunks), give_back

        async def download_from(p: StorePath, cache: _Cache, ni: NarInfo, counted: Progress | None) -> str:
            big = (ni.file_size if ni.file_size is not None else ni.nar_size) > SMALL_NAR
            local = isinstance(cache.backend, FileBackend)
            async with contextlib.AsyncExitStack() as stack:
                opened, give_back = (await open_ahead(stack, cache, ni) if big and not local
                                     else (None, None))
                async with lanes_gate.enter(ni.nar_size) if big or local else flimit:
                    if give_back is not None:
                        give_back()
                    if valid(p):  # registered meanwhile by another process (a second `pure copy`)
                        return _PRESENT
                    if progress:
                        progress.message(f"copying path {p.absolute(sd)!r} from {cache.url!r}")
                    return await download(store, cache, ni, counted, worker, opened, umask)

        async def fetch(p: StorePath):
            cache, ni = found[p]
            tmp = None
            locked = False
            # p's bytes in the progress, so that a download that is not used (failed, or another
            # process had registered p meanwhile) is taken back out of the counts
            counted = _PathBytes(progress) if progress else None
            fetched = False
            try:
                if locks is not None:
                    # held until p is registered: a second process substituting (or building) p
                    # waits here, then finds it valid, instead of downloading it again (Nix's
                    # path locks); taken before a lane, so that waiting holds none
                    try:
                        await _take_path_lock(locks, p, progress, sd, waited)
                    except StoreError as e:  # the lock file cannot be made (say, a full disk)
                        report.failures[p] = str(e)
                        return
                    locked = True
                    if valid(p):  # the process we waited for registered it: nothing is asked for
                        ok.add(p)
                        report.present.append(p)
                        return
                # restored already by a substitution of this session that failed with a reference
                tmp = await subs.restored.take(p, cache.url, ni.nar_hash)
                if tmp is not None and counted is not None:
                    counted.add_bytes(ni.nar_size)  # (what the download would have counted)
                # a cache whose NAR fails (missing, corrupt, cut off) is passed over for the next
                # one with a trusted narinfo for the path, as Nix does
                tried: list[tuple[_Cache, str]] = []
                while tmp is None:
                    try:
                        tmp = await download_from(p, cache, ni, counted)
                        if tmp is _PRESENT:
                            tmp = None
                            ok.add(p)
                            report.present.append(p)
                            return
                    except (CacheError, FormatError, StoreError, SignatureError) as e:
                        tried.append((cache, str(e)))
                        if getattr(e, "hint", None) and len(tried) == 1:
                            report.hints[p] = e.hint
                        if not isinstance(e, StoreError):  # the cache's NAR: not tried again this session
                            subs.failed[(cache.url, p.hash_part)] = str(e)
                        if counted is not None:
                            counted.take_back()
                        try:
                            nxt = await subs.query(p, exclude=[c for c, _ in tried])
                        except _Rejected:
                            nxt = None
                        if nxt is None:
                            report.failures[p] = (tried[0][1] if len(tried) == 1 else "; ".join(
                                f"from {c.url!r}: {why}" for c, why in tried))
                            return
                        log.warning("warning: cannot substitute %r from %r: %s; trying %r",
                                    p.absolute(sd), cache.url, e, nxt[0].url)
                        if progress:
                            progress.expect(0, nxt[1].nar_size - ni.nar_size)
                        cache, ni = found[p] = nxt
                # references before referrers: wait until each is registered (or has failed)
                for r in sorted(ni.references):
                    if r == p:
                        continue
                    if r in queried:
                        await queried[r].wait()
                        if r not in events:
                            report.failures[p] = ref_failure(p, r)
                            if keep_restored(p, cache, ni, tmp):
                                tmp = None
                            return
                        await events[r].wait()
                        if r not in ok:
                            if p not in report.failures:  # (else failed already: a reference cycle)
                                report.failures[p] = ref_failure(p, r)
                                if keep_restored(p, cache, ni, tmp):
                                    tmp = None
                            return
                    elif not S.is_valid(store, r):  # valid when asked, deleted since (by hand)
                        report.failures[p] = (f"its reference {r.absolute(sd)!r} was valid but is not any "
                                              "more (deleted meanwhile)")
                        return
                if p in report.failures:  # part of a reference cycle
                    return
                info = ni.path_info()
                done = trio.Event()
                await send.send((info, tmp, cache.url, done))
                await done.wait()
                res = outcome.get(p)
                if isinstance(res, BaseException):
                    report.failures[p] = str(res)
                    return
                ok.add(p)
                if isinstance(cache.backend, FileBackend):  # used: recent for `pure cache prune`
                    from .prune import mark_used
                    mark_used(cache.backend.local_path(f"{p.hash_part}.narinfo"))
                if res is None:
                    report.fetched.append(p)
                    report.nar_bytes += ni.nar_size
                    fetched = True
                    if progress:
                        progress.path_done(p.absolute(sd))
                else:
                    report.present.append(p)
            finally:
                if progress and not fetched:  # not fetched by this run: out of the totals
                    counted.take_back()
                    progress.expect(-1, -ni.nar_size)
                events[p].set()
                if tmp is not None and os.path.lexists(tmp):
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(remove_temp, store, tmp)
                if locked:
                    locks.release(p.base_name)

        async with open_nursery() as outer:
            outer.start_soon(registrar)
            async with send:
                async with open_nursery() as fetches:
                    async with open_nursery() as queries:
                        for p in sorted(wanted):
                            queries.start_soon(visit, p, queries, fetches)
                    # every narinfo is known: members of reference cycles (only a hostile cache
                    # can make one) fail, which releases the fetches waiting on each other
                    order = set(_topo(found))
                    for p in found:
                        if p not in order:
                            report.failures[p] = "its narinfo is part of a reference cycle"
                            events[p].set()
        if progress and len(waited) > 1 and hasattr(progress, "note"):
            progress.note(f"waited for another process to finish {len(waited)} paths in all")
        if progress:
            progress.finish()

    report.valid = S.valid_paths(store, paths)
    return report


@contextlib.asynccontextmanager
async def _forked_worker(wanted: bool):
    """A :class:`.forked.ForkedWorker` (or None), forked now: before any fetch has started a
    thread, so that no lock is held by a busy thread at the fork."""
    worker = ForkedWorker.start() if wanted else None
    try:
        yield worker
    finally:
        if worker is not None:
            await worker.aclose()


class _PathBytes(Progress):
    """One path's share of a substitution's progress: bytes go on to ``outer`` and are counted,
    so that a download that is not used can be taken back out (:meth:`take_back`)."""

    def __init__(self, outer: Progress):
        super().__init__(outer.verb)
        self.outer = outer
        self.n = 0

    def add_bytes(self, n: int) -> None:
        with self._lock:  # (the restoring thread, or the trio thread relaying a forked worker)
            self.n += n
        self.outer.add_bytes(n)

    def message(self, text: str) -> None:
        self.outer.message(text)

    def take_back(self) -> None:
        with self._lock:
            n, self.n = self.n, 0
        if n:
            self.outer.add_bytes(-n)


async def _take_path_lock(locks, p: StorePath, progress: Progress | None, store_dir: str,
                          waited: list[StorePath]) -> None:
    """Take ``p``'s path lock in the trio thread (it is released there too) without blocking
    it: while someone else holds the lock, wait for it in a worker thread of its own (see
    :func:`._storeapi.wait_lock_released`).  The first path of a run that waits is named;
    the others are only counted in ``waited`` (two runs fetching one closure of 1000 paths
    at once said 500 lines each)."""
    told = False
    while not locks.acquire(p.base_name, blocking=False):
        if not told:
            told = True
            waited.append(p)
            if len(waited) == 1 and hasattr(progress, "note"):
                progress.note(f"waiting for another process to finish {p.absolute(store_dir)!r}")
        await S.wait_lock_released(locks, p.base_name)


def _topo(found: dict[StorePath, tuple[_Cache, NarInfo]]) -> list[StorePath]:
    deps = {p: {r for r in ni.references if r != p and r in found} for p, (_c, ni) in found.items()}
    users: dict[StorePath, set[StorePath]] = {p: set() for p in found}
    for p, ds in deps.items():
        for d in ds:
            users[d].add(p)
    ready = sorted(p for p, ds in deps.items() if not ds)
    order: list[StorePath] = []
    remaining = {p: len(ds) for p, ds in deps.items()}
    while ready:
        p = ready.pop()
        order.append(p)
        for u in users[p]:
            remaining[u] -= 1
            if remaining[u] == 0:
                ready.append(u)
    return order


async def substitute(store, settings, paths: set[StorePath], progress: Progress | None = None, *,
                     fork_worker: bool = False, known: dict[StorePath, tuple[str, NarInfo]] | None = None,
                     urls: Iterable[str] | None = None, session: Substituters | None = None) -> set[StorePath]:
    """Make ``paths`` valid from the configured substituters where possible.

    For each wanted path that is not valid, query the substituters (priority order, in
    parallel, only narinfos signed by a trusted key), fetch its closure (references first) and
    register it.  Returns the requested paths that are now valid.  Failures of single paths are
    logged as warnings (``purestore.cache`` logger) and never registered.  ``fork_worker``:
    see :func:`substitute_report`.
    """
    report = await substitute_report(store, settings, paths, progress=progress, fork_worker=fork_worker,
                                     known=known, urls=urls, session=session)
    for p, why in sorted(report.failures.items()):
        log.warning("warning: cannot substitute %r: %s", p.absolute(settings.store_dir), why)
    return report.valid


async def copy_from(store, settings, url: str, paths: Iterable[StorePath], *,
                    trusted_keys: Iterable[str] | None = None, progress: Progress | None = None,
                    check_sigs: bool = True, jobs: int | None = None,
                    fork_worker: bool = False) -> SubstituteReport:
    """``pure copy --from URL PATH…``: fetch ``paths`` and their closures from one cache
    (asking it afresh: remembered negative answers are ignored).

    Raises :class:`CacheError` when the cache cannot be used (unreachable, no
    ``nix-cache-info``, another store dir), and naming each path that could not be fetched and why.
    ``fork_worker``: see :func:`substitute_report`.
    """
    paths = set(paths)
    report = present_report(store, url, paths, trusted_keys)  # (also what the CLI asks first)
    if report is not None:
        return report
    sd = settings.store_dir
    parse_url(url)  # a malformed URL or key is an error even when nothing needs fetching
    if trusted_keys is not None:
        trusted_keys = list(trusted_keys)
        parse_public_keys(trusted_keys)
    try:
        report = await substitute_report(store, settings.evolve(offline=False), paths, urls=[url],
                                         trusted_keys=trusted_keys, progress=progress, negative_ttl=0,
                                         jobs=jobs, fork_worker=fork_worker, strict_caches=True)
    except CacheUnusable as e:  # one error for all the paths, not one line each
        names = [repr(p.absolute(sd)) for p in sorted(paths) if not S.is_valid(store, p)]
        what = ", ".join(names) if len(names) <= 3 else f"{len(names)} paths ({', '.join(names[:2])}, ...)"
        raise CacheError(f"cannot substitute {what}: {e}", hint=e.hint) from None
    missing = sorted(paths - report.valid)
    if missing:
        lines = [f"cannot substitute {p.absolute(sd)!r}: {report.failures.get(p, 'unknown reason')}"
                 for p in missing]
        # and what failed in their closures, each once (what failed only with a reference of its
        # own is said by that reference's line): one run shows every problem of the cache
        lines += [f"cannot substitute {p.absolute(sd)!r} (a reference): {why}"
                  for p, why in sorted(report.failures.items())
                  if p not in paths and not why.startswith("its reference ")]
        hints = {report.hints.get(p) for p in missing}  # one for all of them, or none
        raise CopyIncomplete("\n".join(lines) if len(lines) > 1 else lines[0], result=report,
                             failures={**{p: "unknown reason" for p in missing}, **report.failures},
                             hint=hints.pop() if len(hints) == 1 else None)
    return report


async def fetch_path(store, settings, path: StorePath, *, repair: bool = False) -> bool:
    """Fetch ``path``'s NAR again from the substituters (with ``repair``, even if it is valid,
    replacing the files on disk after checking the NAR hash against the registered one).
    Returns True if the path is valid afterwards; raises :class:`CacheError` with the reason
    otherwise."""
    report = await substitute_report(store, settings, {path}, repair={path} if repair else ())
    if path in report.failures:
        raise CacheError(f"cannot fetch {path.absolute(settings.store_dir)!r}: {report.failures[path]}")
    if path not in report.valid:
        raise CacheError(f"cannot fetch {path.absolute(settings.store_dir)!r}: no substituter is configured")
    return True
