"""Checking a binary cache as it stands (``pure cache verify``), without a store.

For every narinfo asked for (the given paths, or all of a ``file://`` cache's):

- it is there and parses strictly, for the path its file name names, with the cache's store dir;
- it has a valid signature by a trusted key (when trusted keys are given);
- its ``URL`` stays inside the cache and the NAR file is there (with the size ``FileSize`` says,
  where the cache tells sizes: a ``file://`` cache);
- each of its references has a narinfo in the cache (else substituting it would fail), and with
  ``recursive`` each of those is checked the same way, through the whole closure;
- with ``check_contents``: the NAR file is read whole and checked as substitution checks it
  (FileSize, FileHash, NarSize, NarHash, and a well-formed NAR), without writing anything.

Each path gets a list of problems (empty: good).  Nothing here raises for one path's problem;
a cache that cannot be used at all (unreachable, no ``nix-cache-info``) raises
:class:`CacheError`.
"""

from __future__ import annotations

import os
import stat
from typing import Iterable

import attrs
import trio

from ..errors import CacheError, FormatError, NarError, SignatureError
from ..formats.narinfo import NarInfo
from ..formats.signing import parse_public_keys, verify_any
from ..formats.store_path import StorePath
from ._graph import cycle_problems
from ._nursery import open_nursery
from .backend import CacheMissing, FileBackend, check_name, backend_for, file_url
from .fetch import TINY_NAR, stream_to_thread
from .info import read_cache_info
from .nar_jobs import VerifyingReader, read_checked
from .progress import Progress

CONCURRENCY = 16  # narinfos checked at once (their requests share the connection pool)


@attrs.define
class CacheReport:
    """What :func:`verify_cache` found: narinfo file name → problems (empty: good)."""

    url: str
    store_dir: str
    signatures_checked: bool
    contents_checked: bool
    results: dict[str, list[str]] = attrs.field(factory=dict)
    paths: dict[str, str] = attrs.field(factory=dict)  # narinfo name → store path (when known)

    @property
    def bad(self) -> dict[str, list[str]]:
        return {n: p for n, p in sorted(self.results.items()) if p}

    def label(self, name: str) -> str:
        """The store path a narinfo is for, else its file name."""
        return self.paths.get(name, name)


async def verify_cache(settings, url: str, paths: Iterable[StorePath] | None = None, *,
                       trusted_keys: Iterable[str] | None = None, check_contents: bool = False,
                       recursive: bool = False, progress: Progress | None = None) -> CacheReport:
    """Check the narinfos of ``paths`` in the cache at ``url`` (None: all of them, for a
    ``file://`` or ``s3://`` cache; an HTTP cache cannot be listed); ``recursive``: and of every
    path in their closures (each reference the cache has is checked like them).
    ``trusted_keys``: None for the settings' ``trusted-public-keys``; no keys at all: signatures
    are not checked."""
    keys = list(settings.trusted_public_keys if trusted_keys is None else trusted_keys)
    trusted = parse_public_keys(keys)
    backend = backend_for(url, settings)
    url = backend.url  # (what is said of it: a login's password as ***)
    async with backend:
        info = await read_cache_info(backend, url, default_store_dir=settings.store_dir)
        sd = info.store_dir
        if paths is None:
            names = await backend.list_narinfos()
            if names is None:
                raise CacheError(f"binary cache {url!r} cannot be listed over HTTP",
                                 hint="name the store paths to check")
        else:
            names = sorted({f"{p.hash_part}.narinfo" for p in paths})
        report = CacheReport(url, sd, bool(trusted), check_contents)
        for p in paths or ():  # named even when the cache has no narinfo for it
            report.paths[f"{p.hash_part}.narinfo"] = p.absolute(sd)
        if progress:
            progress.expect(len(names), 0)
        present: dict[str, bool] = {}  # narinfo name → the cache has it (references' checks)

        async def has(name: str) -> bool:
            if name not in present:
                present[name] = await backend.exists(name)
            return present[name]

        limit = trio.CapacityLimiter(CONCURRENCY)
        # reading NARs is CPU work (decompressing, hashing, parsing: the parse holds the GIL):
        # one per core (measured: 50 NARs, 350 MB: 0.73-0.79 s, against 0.90-1.02 s 16 at once)
        nar_limit = trio.CapacityLimiter(os.cpu_count() or 1)

        seen = set(names)
        graph: dict[str, list[str]] = {}  # narinfo name → its references' (for cycles)

        async def one(name: str, n) -> None:
            refs = graph[name] = []
            async with limit:
                problems = report.results[name] = []
                try:
                    await _check(backend, sd, name, trusted, nar_limit if check_contents else None, has,
                                 problems, report, progress, refs)
                except CacheError as e:
                    problems.append(str(e))
            if progress:
                progress.path_done(report.label(name))
            if recursive:  # the references the cache has (a missing one is this path's problem)
                for ref in refs:
                    if ref not in seen and present.get(ref):
                        seen.add(ref)
                        if progress:
                            progress.expect(1, 0)
                        n.start_soon(one, ref, n)

        async with open_nursery() as n:
            for name in names:
                n.start_soon(one, name, n)
        # narinfos that refer to each other, among those checked: no substitution takes them
        for name, via in sorted(cycle_problems(graph, graph.__getitem__).items()):
            report.results[name].append("its narinfo is part of a reference cycle" if via is None else
                                        f"its reference {report.label(via)!r} is part of a reference "
                                        "cycle or refers to one")
        if progress:
            progress.finish()
    return report


async def _check(backend, sd: str, name: str, trusted, nar_limit: trio.CapacityLimiter | None, has,
                 problems: list[str], report: CacheReport, progress, refs: list[str]) -> None:
    """Check one narinfo; ``nar_limit``: read the NAR too, holding it (None: do not).  The
    narinfo names of its references go to ``refs``."""
    data = await backend.get(name)
    if data is None:
        problems.append("the cache has no narinfo for it")
        return
    try:
        ni = NarInfo.parse(data, sd, where=name)
    except FormatError as e:
        problems.append(f"bad narinfo: {e}")
        return
    report.paths[name] = ni.store_path.absolute(sd)
    if f"{ni.store_path.hash_part}.narinfo" != name:
        problems.append(f"{name} describes {ni.store_path.absolute(sd)!r}, another path")
    if trusted:
        try:
            verify_any(ni.fingerprint(sd), ni.sigs, trusted)
        except SignatureError as e:
            problems.append(f"not trusted: {e}")
    for r in ni.references:
        if r != ni.store_path:
            refs.append(f"{r.hash_part}.narinfo")
            if not await has(refs[-1]):
                problems.append(f"its reference {r.absolute(sd)!r} is not in the cache")
    try:
        check_name(ni.url, name)
    except CacheError:
        problems.append(f"its URL {ni.url!r} points outside the cache")
        return
    if nar_limit is not None:
        if progress:
            progress.expect(0, ni.nar_size)
        try:
            async with nar_limit:
                await check_nar(backend, ni, name, progress)
        except (CacheError, NarError) as e:
            problems.append(str(e))
        return
    if isinstance(backend, FileBackend):
        try:
            size = os.stat(backend.local_path(ni.url)).st_size
        except FileNotFoundError:
            problems.append(f"its NAR file {ni.url!r} is missing")
            return
        except OSError as e:
            problems.append(f"cannot read its NAR file {ni.url!r}: {e.strerror}")
            return
        if ni.file_size is not None and size != ni.file_size:
            problems.append(f"its NAR file {ni.url!r} has {size} bytes, FileSize says {ni.file_size}")
    elif not await backend.exists(ni.url):
        problems.append(f"its NAR file {ni.url!r} is missing")


async def check_nar(backend, ni: NarInfo, name: str, progress) -> None:
    """Read the NAR file whole through the substituter's verifying reader, parse the NAR."""
    where = file_url(backend.url, ni.url)

    def read_all(next_chunk) -> None:
        read_checked(VerifyingReader(next_chunk, ni, where, progress))

    if ni.nar_size <= TINY_NAR and ni.file_size is not None and ni.file_size <= TINY_NAR:
        # a few KiB (most paths of a cache of small ones): read whole and checked here, which
        # costs less than the thread and its hops back for each chunk (2000 small paths: 2.4 s)
        data = await _read_small(backend, ni.url, ni.file_size + 1)  # one more: FileSize exceeded
        if data is None:
            raise CacheError(f"its NAR file {ni.url!r} is missing")
        if data is not _STREAMED:
            chunks = iter((data,))
            read_all(lambda: next(chunks, b""))
            await trio.lowlevel.checkpoint()
            return
    try:
        await stream_to_thread(lambda: backend.open_read(ni.url), read_all)
    except CacheMissing:
        raise CacheError(f"its NAR file {ni.url!r} is missing") from None


_STREAMED = object()  # (see _read_small)


async def _read_small(backend, name: str, limit: int) -> bytes | None | object:
    """At most ``limit`` bytes of the small file ``name`` (None: it is not there): of a
    ``file://`` cache read here (a page-cache read is quicker than a thread hop), of another
    asked for whole.  ``_STREAMED`` for a file of a ``file://`` cache that is no regular file:
    it is read as a big NAR is, in a worker thread, which waits for a FIFO's bytes (up to
    ``FIFO_WAIT`` for the first), or refuses anything else; that wait blocked the event loop,
    and with it every other check of the run, for 30 s a FIFO."""
    if not isinstance(backend, FileBackend):
        return await backend.get(name, limit=limit + (limit >> 4) + 4096)  # (a Content-Encoding may add some)
    path = backend.local_path(name)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # (not opened here: a FIFO's bytes would go)
            return _STREAMED
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"cannot read its NAR file {name!r}: {e.strerror}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return _STREAMED
        with open(fd, "rb", closefd=False) as f:
            return f.read(limit)
    except OSError as e:
        raise CacheError(f"cannot read its NAR file {name!r}: {e.strerror}") from e
    finally:
        os.close(fd)
