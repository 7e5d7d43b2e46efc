"""Pushing closures to a binary cache (``pure copy --to URL``).

For each path of the closure of the given paths that the cache lacks (``<hash>.narinfo`` absent):

1. in a worker thread, dump the path's NAR, hashing it (checked against the NAR hash the store
   registered: a corrupt local path is never published) and compressing it into a temporary file
   while hashing the compressed bytes (FileHash) (:func:`.nar_jobs.compress_path`); a small NAR
   cheap to compress (:func:`.nar_jobs.compressed_inline`) in the event loop's own thread, which
   costs less than the hop to a worker and back;
2. upload ``nar/<nix32 FileHash>.nar<ext>`` (skipped if present: NARs are content-addressed;
   :meth:`.backend.Backend.put_nar`);
3. optionally upload the ``<hash>.ls`` listing and the ``debuginfo/`` links of its debug files
   (``index-debug-info``, :mod:`.debug_info`), the build log ``log/<drv>``, and extra files
   (:func:`extra_files_for`);
4. sign the narinfo with the given secret keys (signing happens here, on the client; the cache
   server never sees a key) and upload ``<hash>.narinfo`` only after the narinfos of all its
   references: a reader never finds a narinfo whose references are missing.

Paths are processed in parallel (compression and hashing release the GIL, so worker threads use
all cores), largest NAR first so that the run does not end with one core busy on a big path, and
each NAR compressed single-threaded so the output is byte-identical to Nix's (unless
``parallel-compression`` asks for each NAR on all cores: for one big path).  The bytes are not
copied on the way: NAR chunks are views of the dumper's buffers (``fsnar.stream_path``), and the
compressed output is hashed and written straight from the compressor's buffer.

Before the uploads, the cache is prepared and asked what it has already (``nix-cache-info``, the
directory lock, the narinfos present, where NAR files are made): :mod:`.destination`, shared with
the copy between caches (:mod:`.mirror`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
from typing import Iterable

import attrs
import trio

from ..errors import CacheError, CopyIncomplete, KeyError_, StoreError
from ..formats.hash import Hash
from ..formats.narinfo import NarInfo
from ..formats.signing import SecretKey
from ..formats.store_path import StorePath
from . import _storeapi as S
from .backend import FileBackend, backend_for
from .url import parse_url, url_flag
from .compression import WRITABLE, compressor, extension
from .debug_info import debug_info_files, write_debug_links
from .destination import cached_paths, ensure_cache_info, mark_present, nar_temp_dir, push_lock
from .narinfo_cache import NegativeCache
from .forked import ForkedWorker, run_claimed
from .nar_jobs import (INLINE_NAR_MAX, Oversized, compress_path, compressed_inline, nar_listing,  # noqa: F401
                       push_temp_name)  # (nar_listing: API)
from ._nursery import open_nursery, run_stoppable
from .progress import Progress


def extra_files_for(store, path: StorePath) -> dict[str, bytes]:
    """Extra files to upload next to a path's narinfo (name in the cache → contents).

    Hook for the evidence layer: the path's signed provenance ``<hashpart>.provenance`` when the
    store keeps one (:mod:`purestore.store.provenance`).
    """
    from ..formats.provenance import provenance_file_name
    from ..store.provenance import read_provenance
    data = read_provenance(store, path)
    return {provenance_file_name(path.hash_part): data} if data is not None else {}


async def _put_missing_extra_files(backend, store, present: list[StorePath]) -> None:
    """Upload the extra files (:func:`extra_files_for`) of paths the cache has already, where
    it lacks them: a provenance statement signed after the path was pushed goes up with the
    next push.  One the cache has is left as it is (it may be the builder's own)."""
    extra = await trio.to_thread.run_sync(lambda: [extra_files_for(store, p) for p in present])
    for files in extra:
        for name, data in files.items():
            if not await backend.exists(name):
                await backend.put(name, data)


@attrs.frozen
class PushResult:
    uploaded: tuple[StorePath, ...]
    skipped: tuple[StorePath, ...]
    nar_bytes: int
    file_bytes: int
    # skipped paths whose narinfo lacks a signature by one of the push's keys (None: not known)
    unsigned: tuple[StorePath, ...] | None = None


_LISTED = 10  # paths a failed push names one by one on stderr (--json lists them all)
# compressed NARs waiting for their upload, at most, besides those being compressed: a cache
# slower than the compression (a server across a network, or at its own CPU's limit) left the
# whole closure compressed in temporary files, and when it went away, every such path failed on
# its own, each retrying and warning (a push of 2000 small paths: 9,300 lines)
UPLOADS_AHEAD = 16
_KEY_HINT = "create one with 'pure key generate --name NAME --secret-out FILE --public-out FILE'"


def load_secret_key(path: str) -> SecretKey:
    """Read a secret key file; raise :class:`CacheError` when unreadable, ``KeyError_`` (naming
    the file, never quoting its contents) when malformed."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise CacheError(f"cannot read secret key file {path!r}: {e.strerror}", hint=_KEY_HINT) from e
    except UnicodeDecodeError:
        raise KeyError_(f"secret key file {path!r} is not text", hint=_KEY_HINT) from None
    try:
        return SecretKey.parse(text)
    except KeyError_ as e:
        raise KeyError_(f"secret key file {path!r}: {e}", hint=e.hint or _KEY_HINT) from None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def copy_to(store, settings, url: str, paths: Iterable[StorePath], *,
                  secret_keys: Iterable[SecretKey] = (), compression: str | None = None,
                  level: int | None = None, parallel: bool | None = None,
                  write_listing: bool | None = None, index_debug_info: bool | None = None,
                  jobs: int | None = None,
                  upload_logs: bool = True, progress: Progress | None = None,
                  fork_worker: bool = False) -> PushResult:
    """Copy the closure of ``paths`` to the cache at ``url`` (references first).

    URL parameters: ``compression`` (zstd, xz, none), ``compression-level``,
    ``parallel-compression`` (true/1: each NAR compressed on all cores, see :mod:`.compression`),
    ``secret-key`` (a key file; added to ``secret_keys``), ``write-nar-listing`` (true/1),
    ``index-debug-info`` (true/1: ``debuginfo/<build id>`` links, :func:`debug_info_files`).
    Keyword arguments override them.  Raises :class:`StoreError` for a path that is not valid
    here (before anything is copied), :class:`CacheError` when the cache cannot be used, and
    :class:`CopyIncomplete` (a CacheError, with the partial :class:`PushResult` and each failed
    path's reason) when some paths were not copied: a corrupt local path fails alone, with the
    paths that refer to it, and the rest is copied; a cache that fails (full, gone) stops the
    push.  ``fork_worker``: compress in a forked copy of this process
    as well (:mod:`.forked`); only for a caller whose other threads are all idle (the CLI).
    """
    cu = parse_url(url)
    url = cu.url  # (what is said of it: a login's password as ***)
    where = url.split("?")[0]
    for option, param in ((compression, "compression"), (level, "compression-level"),
                          (parallel, "parallel-compression")):
        given = cu.param(param)
        if option is None or given is None:
            continue
        same = (str(option).lower() == given.lower() if param != "compression-level"
                else re.fullmatch(r"-?[0-9]+", given) is not None and int(given) == option)
        if not same:
            raise CacheError(f"cache URL {where!r} asks for {param}={given}, the option for "
                             f"{str(option).lower()}: give it once")
    # (an empty ?compression= or ?compression-level=, a variable left unset, is not the
    # default: it was taken as zstd at level 3 without a word)
    method = compression or cu.param("compression", "zstd")
    if method not in WRITABLE:  # (an error that names where it came from, as for the level)
        raise CacheError(f"{'compression' if compression else f'cache URL {where!r}'}: cannot write "
                         f"compression {method!r}, expected one of {', '.join(WRITABLE)}")
    ext = extension(method)
    chosen_by = "--compression-level" if level is not None else f"cache URL {where!r}"  # for an error
    if level is None and cu.param("compression-level") is not None:
        try:
            level = int(cu.param("compression-level"))  # type: ignore[arg-type]
        except ValueError:
            raise CacheError(f"cache URL {url!r}: compression-level must be an integer, "
                             f"got {cu.param('compression-level')!r}") from None
    if parallel is None:
        parallel = url_flag(cu, "parallel-compression")
    if method == "none" and level is not None:  # accepted, as Nix accepts it, but said
        logging.getLogger("purestore.cache").warning(
            "warning: compression-level %s is ignored: the NARs are stored uncompressed (compression=none)", level)
    try:
        compressor(method, level, parallel)  # validate early
    except CacheError as e:
        raise CacheError(f"{chosen_by}: {e}") from None
    keys = list(secret_keys)
    if cu.param("secret-key"):
        keys.append(load_secret_key(cu.param("secret-key")))  # type: ignore[arg-type]
    if write_listing is None:
        write_listing = url_flag(cu, "write-nar-listing")
    if index_debug_info is None:
        index_debug_info = url_flag(cu, "index-debug-info")
    jobs = jobs or max(1, os.cpu_count() or 1)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    store_dir = settings.store_dir

    paths = set(paths)
    S.add_temp_roots(store, paths)  # with their closures, kept by a `pure gc` meanwhile
    for p in paths:
        if not S.is_valid(store, p):
            raise StoreError(f"path {p.absolute(store_dir)!r} is not valid in the local store")
    closure = await trio.to_thread.run_sync(S.closure, store, paths)
    order = await trio.to_thread.run_sync(S.topo_sort, store, closure)
    infos = {p: S.path_info(store, p) for p in order}

    backend = backend_for(cu, settings)
    async with backend, contextlib.AsyncExitStack() as held:
        await ensure_cache_info(backend, store_dir)
        if isinstance(backend, FileBackend):  # a prune of this directory waits for the push
            await held.enter_async_context(push_lock(backend.dir))
        have, unsigned = await cached_paths(backend, order, key_names={k.name for k in keys}, store_dir=store_dir)
        todo = [p for p in order if p not in have]
        await mark_present(backend, have)
        await _put_missing_extra_files(backend, store, [p for p in order if p in have])
        if progress:
            progress.expect(len(todo), sum(infos[p].nar_size for p in todo))

        done = {p: trio.Event() for p in todo}  # set when p's narinfo is written, or p failed
        failed: dict[StorePath, str] = {}
        cache_failed: list[tuple[StorePath, CacheError]] = []  # (the path it failed on, why)
        hints: list[str | None] = []
        published: list[StorePath] = []
        published_set: set[StorePath] = set()
        tmp_dir = await nar_temp_dir(backend)
        totals = [0, 0]

        # Largest NARs first, so that the last ones to finish are short and no core idles long
        # at the end; ``jobs`` workers compress, each handing a finished path to a publishing task.
        pending = collections.deque(sorted(todo, key=lambda p: -infos[p].nar_size))

        ahead = trio.Semaphore(UPLOADS_AHEAD + jobs)  # (see UPLOADS_AHEAD)

        async def compress_worker(n, worker: ForkedWorker | None) -> None:
            while pending and not cache_failed:
                await ahead.acquire()
                if not pending or cache_failed:  # (stopped while it waited)
                    ahead.release()
                    return
                p = pending.popleft()
                handed = False
                try:
                    handed = await compress_one(n, worker, p)
                finally:
                    if not handed:
                        ahead.release()

        async def compress_one(n, worker: ForkedWorker | None, p: StorePath) -> bool:
            """Compress ``p`` and start its upload (True), or fail it (False)."""
            info = infos[p]
            if progress:
                progress.message(f"copying path {p.absolute(store_dir)!r} to {backend.url.split('?')[0]!r}")
            tmp = push_temp_name(tmp_dir)
            args = (S.real_path(store, p), info.nar_hash, info.nar_size, method, level, parallel, tmp,
                    write_listing)
            try:
                res = None
                if compressed_inline(info.nar_size, method, level, parallel):  # (no thread hop)
                    with contextlib.suppress(Oversized):  # not what the store registered: see below
                        res = compress_path(*args, limit=INLINE_NAR_MAX)
                    if res is not None and progress:
                        progress.add_bytes(info.nar_size)
                if res is None:
                    ran, res = await run_claimed(
                        worker, lambda: worker.call(compress_path, *args, progress=progress),
                        lambda: _unlink_quietly(tmp))
                    if not ran:  # in a thread of this process, stopped at once by Ctrl-C
                        res = await run_stoppable(compress_path, *args, progress,
                                                  discard=lambda res: _unlink_quietly(res[0]))
            except StoreError as e:  # this path's own fault (corrupt, unreadable): the rest goes on
                failed[p] = str(e)
                hints.append(e.hint)
                done[p].set()
                return False
            except CacheError as e:  # the cache's (full, gone): no path is started after this one,
                failed[p] = str(e)  # those under way are published if the cache takes them
                cache_failed.append((p, e))
                done[p].set()
                stop_pending()
                return False
            n.start_soon(push_one, p, *res)
            return True

        def stop_pending() -> None:
            """The cache failed: the paths not started never will be; a referrer waiting for one
            (compressed first, being bigger) stops waiting, and is not published (see publish)."""
            while pending:
                done[pending.popleft()].set()

        async def push_one(p: StorePath, tmp: str, file_hash: Hash, file_size: int, ls: bytes | None):
            freed = [False]

            def free() -> None:  # its NAR is in the cache (or never will be): the next may come
                if not freed[0]:
                    freed[0] = True
                    ahead.release()
            try:
                await publish(p, tmp, file_hash, file_size, ls, free)
            except CacheError as e:  # the cache's (full, refused, gone): the push stops, as above
                failed[p] = str(e)
                cache_failed.append((p, e))
                done[p].set()
                stop_pending()
            finally:
                free()

        def reference_failed(p: StorePath) -> bool:
            r = next((r for r in infos[p].references if r != p and r in failed), None)
            if r is not None:  # never a narinfo whose references the cache lacks
                failed[p] = f"its reference {r.absolute(store_dir)!r} could not be copied"
                done[p].set()
            return r is not None

        async def publish(p: StorePath, tmp: str, file_hash: Hash, file_size: int, ls: bytes | None, free):
            info = infos[p]
            nar_name = f"nar/{file_hash.nix32}.nar{ext}"
            try:
                if reference_failed(p):  # already known: upload none of its files
                    os.unlink(tmp)
                    return
                # kept when it is there, unless it has another size (see Backend.put_nar)
                await backend.put_nar(nar_name, tmp, file_size)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            free()
            if ls is not None:
                await backend.put(f"{p.hash_part}.ls", ls, "application/json")
            if index_debug_info:
                real = S.real_path(store, p)
                try:
                    files = await trio.to_thread.run_sync(debug_info_files, real)
                except OSError as e:
                    raise StoreError(f"cannot list the debug files of {real!r}: {e.strerror}") from e
                await write_debug_links(backend, files, nar_name)
            if upload_logs and info.deriver is not None:
                log = await trio.to_thread.run_sync(S.build_log, store, info.deriver)
                if log is not None:
                    await backend.put(f"log/{info.deriver.base_name}", log, "text/plain; charset=utf-8")
            for name, data in extra_files_for(store, p).items():
                await backend.put(name, data)
            ni = NarInfo(
                store_path=p, url=nar_name, compression=method, file_hash=file_hash,
                file_size=file_size, nar_hash=info.nar_hash, nar_size=info.nar_size,
                references=info.references, deriver=info.deriver, sigs=info.sigs, ca=info.ca,
            )
            fp = ni.fingerprint(store_dir)
            ni = ni.with_sigs(k.sign(fp).render() for k in keys)
            for r in info.references:
                if r != p and r in done:
                    await done[r].wait()
            if reference_failed(p):
                return
            unpublished = next((r for r in info.references if r != p and r in done and r not in published_set), None)
            if unpublished is not None:  # never started: the cache failed meanwhile
                failed[p] = (f"its reference {unpublished.absolute(store_dir)!r} was not copied "
                             "(the push stopped when the cache failed)")
                done[p].set()
                return
            await backend.put_narinfo(f"{p.hash_part}.narinfo", ni.render(store_dir).encode(), store_dir)
            published.append(p)
            published_set.add(p)
            totals[0] += info.nar_size
            totals[1] += file_size
            done[p].set()
            if progress:
                progress.path_done(p.absolute(store_dir))

        lanes = min(jobs, len(todo))
        # one lane compresses in a forked copy of this process (see .forked): forked now, while
        # no thread of ours is busy; not when every path is compressed in this thread
        heavy = sum(not compressed_inline(infos[p].nar_size, method, level, parallel) for p in todo)
        worker = ForkedWorker.start() if fork_worker and min(lanes, heavy) >= 2 else None
        skipped = tuple(p for p in order if p in have)

        def stopped(e: CacheError, where: StorePath | None) -> CopyIncomplete:
            """The cache failed (full, refused, gone): what was done is said, and each path not
            copied (the first few on stderr, all in ``failures``)."""
            res = PushResult(tuple(published), skipped, totals[0], totals[1])
            rest = [p for p in order if p in done and p not in failed and p not in published]
            why = ("not started: the push stopped when the cache failed"
                   + (f" on {where.absolute(store_dir)!r}" if where is not None else f": {e}"))
            lines = [f"cannot copy {p.absolute(store_dir)!r}: {failed[p]}" for p in order if p in failed] or [str(e)]
            lines += [f"cannot copy {p.absolute(store_dir)!r}: {why}" for p in rest[:_LISTED]]
            if len(rest) > _LISTED:
                lines.append(f"... and {len(rest) - _LISTED} more paths not copied (--json lists them all)")
            return CopyIncomplete("\n".join(lines), result=res, hint=e.hint,
                                  failures={**failed, **{p: why for p in rest}})
        try:
            async with open_nursery() as n:
                for i in range(lanes):
                    n.start_soon(compress_worker, n, worker if i == 0 else None)
        except CacheError as e:
            raise stopped(e, None) from e
        finally:
            if worker is not None:
                await worker.aclose()
            NegativeCache.forget_pushed(getattr(settings, "state_dir", None),
                                        (p.hash_part for p in (*published, *have)))
        if cache_failed:
            raise stopped(cache_failed[0][1], cache_failed[0][0]) from cache_failed[0][1]
        if progress:
            progress.finish()
    res = PushResult(tuple(p for p in todo if p not in failed), skipped, totals[0], totals[1], unsigned)
    if failed:
        lines = [f"cannot copy {p.absolute(store_dir)!r}: {why}"
                 for p in order if (why := failed.get(p)) is not None]  # references (the causes) first
        raise CopyIncomplete("\n".join(lines), result=res, failures=failed,
                             hint=next((h for h in hints if h), None))
    return res
