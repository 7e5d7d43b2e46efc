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
   (``index-debug-info``), the build log ``log/<drv>``, and extra files (:func:`extra_files_for`);
4. sign the narinfo with the given secret keys (signing happens here, on the client; the cache
   server never sees a key) and upload ``<hash>.narinfo`` only after the narinfos of all its
   references: a reader never finds a narinfo whose references are missing.

Paths are processed in parallel (compression and hashing release the GIL, so worker threads use
all cores), largest NAR first so that the run does not end with one core busy on a big path, and
each NAR compressed single-threaded so the output is byte-identical to Nix's (unless
``parallel-compression`` asks for each NAR on all cores: for one big path).  The bytes are not
copied on the way: NAR chunks are views of the dumper's buffers (``fsnar.stream_path``), and the
compressed output is hashed and written straight from the compressor's buffer.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import stat
import tempfile
from typing import Iterable

import attrs
import trio

from ..errors import CacheError, CopyIncomplete, FormatError, KeyError_, StoreError
from ..formats.hash import Hash
from ..formats.narinfo import NarInfo
from ..formats.signing import SecretKey
from ..formats.store_path import StorePath
from . import _storeapi as S
from .backend import Backend, FileBackend, backend_for, file_url, make_dirs
from .url import parse_url, url_flag
from .compression import compressor, extension
from .info import CacheInfo
from .narinfo_cache import NegativeCache
from .forked import ForkedWorker, run_claimed
from .nar_jobs import (INLINE_NAR_MAX, Oversized, compress_path, compressed_inline, nar_listing,  # noqa: F401
                       push_temp_name)  # (nar_listing: API)
from ._nursery import open_nursery, run_stoppable
from .progress import Progress
from .prune import mark_used, open_dir_lock


def extra_files_for(store, path: StorePath) -> dict[str, bytes]:
    """Extra files to upload next to a path's narinfo (name in the cache → contents).

    Hook for the evidence layer: the path's signed provenance ``<hashpart>.provenance`` when the
    store keeps one (:mod:`purestore.store.provenance`).
    """
    from ..formats.provenance import provenance_file_name
    from ..store.provenance import read_provenance
    data = read_provenance(store, path)
    return {provenance_file_name(path.hash_part): data} if data is not None else {}


_BUILD_ID_DIR = ("lib", "debug", ".build-id")
_HEX = frozenset("0123456789abcdef")


def _debug_files(kind, names) -> list[tuple[str, str]]:
    """The separate debug files of a tree, as Nix's ``index-debug-info`` finds them: regular
    files ``lib/debug/.build-id/XX/YYYY….debug`` (2 and 38 lower-case hex digits; nothing
    through a symlink).  Returns (cache key ``debuginfo/XXYYYY….debug``, member) pairs; the
    key keeps the ``.debug`` suffix, as Nix 2.8 writes it.  ``kind(parts)``: "directory",
    "regular" or None for the entry at those path components; ``names(parts)``: a
    directory's entry names."""
    if any(kind(_BUILD_ID_DIR[:i]) != "directory" for i in range(1, len(_BUILD_ID_DIR) + 1)):
        return []
    found = []
    for s1 in sorted(names(_BUILD_ID_DIR)):
        if len(s1) != 2 or not set(s1) <= _HEX or kind((*_BUILD_ID_DIR, s1)) != "directory":
            continue
        for s2 in sorted(names((*_BUILD_ID_DIR, s1))):
            stem = s2[:-len(".debug")]
            if s2.endswith(".debug") and len(stem) == 38 and set(stem) <= _HEX \
                    and kind((*_BUILD_ID_DIR, s1, s2)) == "regular":
                found.append((f"debuginfo/{s1}{s2}", "/".join((*_BUILD_ID_DIR, s1, s2))))
    return found


def debug_info_files(real: str) -> list[tuple[str, str]]:
    """:func:`_debug_files` of the path at ``real`` on disk."""
    def kind(parts) -> str | None:
        try:
            mode = os.lstat(os.path.join(real, *parts)).st_mode
        except OSError:
            return None
        return "directory" if stat.S_ISDIR(mode) else "regular" if stat.S_ISREG(mode) else None
    return _debug_files(kind, lambda parts: os.listdir(os.path.join(real, *parts)))


def debug_info_members(listing: bytes) -> list[tuple[str, str]]:
    """:func:`_debug_files` from a path's ``.ls`` listing instead of its files (a copy between
    caches has no store)."""
    try:
        root = json.loads(listing.decode("utf-8", "surrogateescape")).get("root")
    except (ValueError, AttributeError):
        return []

    def node(parts):
        n = root
        for part in parts:
            if not isinstance(n, dict) or n.get("type") != "directory":
                return None
            n = (n.get("entries") or {}).get(part)
        return n if isinstance(n, dict) else None
    return _debug_files(lambda parts: (node(parts) or {}).get("type"),
                        lambda parts: list((node(parts) or {}).get("entries") or {}))


async def write_debug_links(backend: Backend, files: list[tuple[str, str]], nar_name: str) -> None:
    """Write ``debuginfo/<build id>`` links to the NAR holding each debug file (kept when the
    cache has one already, as Nix does), for debuggers that look debug info up by build id;
    ``files`` as :func:`debug_info_files` gives them."""
    limit = trio.CapacityLimiter(8)

    async def one(key: str, member: str) -> None:
        async with limit:
            if not await backend.exists(key):
                body = json.dumps({"archive": f"../{nar_name}", "member": member}, separators=(",", ":"))
                await backend.put(key, body.encode(), "application/json")
    async with open_nursery() as n:
        for key, member in files:
            n.start_soon(one, key, member)


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


async def ensure_cache_info(backend: Backend, store_dir: str, other: str = "this store's dir") -> CacheInfo:
    """Read ``nix-cache-info`` (checking the store dir; ``other``: whose dir it is, for the
    error) or create it."""
    data = await backend.get("nix-cache-info")
    if data is None:
        info = CacheInfo(store_dir)
        await backend.put("nix-cache-info", info.render().encode(), "text/x-nix-cache-info")
        return info
    info = CacheInfo.parse(data, file_url(backend.url, "nix-cache-info"), default_store_dir=store_dir)
    info.check_store_dir(store_dir, backend.url, other)
    return info


STALE_TEMP_SECONDS = 24 * 3600


@contextlib.asynccontextmanager
async def push_lock(directory: str):
    """The cache directory's lock, shared (see :mod:`.prune`); waits for a running prune."""
    import fcntl

    fd = open_dir_lock(directory)
    try:
        waited = False
        while True:  # polled, so that Ctrl-C works while waiting
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    logging.getLogger("purestore.cache").warning("waiting for the prune of %r to finish", directory)
                    waited = True
                await trio.sleep(0.1)
        yield
    finally:
        os.close(fd)


_ASKED_AT_ONCE = 64  # narinfos of a directory looked for in one worker thread


async def cached_paths(backend: Backend, paths: Iterable[StorePath], concurrency: int = 32, *,
                       key_names: set[str] | None = None, store_dir: str | None = None
                       ) -> tuple[set[StorePath], tuple[StorePath, ...] | None]:
    """The ``paths`` whose narinfo the cache has (asked ``concurrency`` at a time).  In a
    directory, an empty narinfo (what a crash of the machine can leave of one written just
    before) does not count: it is written again.

    Returns them, and with ``key_names`` (a push's keys) the paths whose narinfo lacks a
    signature by one of them: each narinfo is then read instead (one request all the same);
    not for a bucket (None), whose ranged GETs note what ``cache prune`` needs."""
    have: set[StorePath] = set()
    limit = trio.CapacityLimiter(concurrency)
    local = isinstance(backend, FileBackend)
    read = bool(key_names) and not backend.bucket
    lacking: list[StorePath] = []

    def take(p: StorePath, data: bytes | None) -> None:
        name = f"{p.hash_part}.narinfo"
        if data is None or (local and not data):
            return
        try:
            ni = NarInfo.parse(data, store_dir, where=file_url(backend.url, name))
            if ni.store_path != p:
                raise FormatError(f"it describes {ni.store_path.absolute(store_dir)!r}")
        except (FormatError, UnicodeDecodeError) as e:
            # pushed again, which writes a good one in its place (Nix, which only asks
            # whether the file exists, would leave it as it is)
            logging.getLogger("purestore.cache").warning(
                "warning: the cache's narinfo of %r cannot be used (%s): it is written again",
                p.absolute(store_dir), e)
            return
        have.add(p)
        if not key_names <= {sig.partition(":")[0] for sig in ni.sigs}:
            lacking.append(p)

    async def ask_batch(batch: list[StorePath]) -> None:
        """A directory's narinfos, a batch in one worker thread each: a hop to a thread and
        back costs more than the ``stat`` or read of a small file (0.2 ms a path, most of it
        waiting for the GIL, in a push of 200 small paths)."""
        names = [f"{p.hash_part}.narinfo" for p in batch]
        async with limit:
            if read:
                for p, data in zip(batch, await backend.get_many(names)):
                    take(p, data)
            else:
                for p, size in zip(batch, await backend.sizes(names)):
                    if size not in (None, 0):
                        have.add(p)

    async def ask(p: StorePath) -> None:  # (one request each: a bucket, a server)
        name = f"{p.hash_part}.narinfo"
        async with limit:
            if read:
                take(p, await backend.get(name))
            elif await backend.exists(name):
                have.add(p)

    async with open_nursery() as n:
        if local:
            paths = list(paths)
            for i in range(0, len(paths), _ASKED_AT_ONCE):
                n.start_soon(ask_batch, paths[i:i + _ASKED_AT_ONCE])
        else:
            for p in paths:
                n.start_soon(ask, p)
    return have, (tuple(sorted(lacking)) if read else None)


async def mark_present(backend: Backend, have: Iterable[StorePath]) -> None:
    """Paths a copy into the cache found there already count as used for ``cache prune``: a
    directory's narinfos get the time now, a bucket's a new Last-Modified (at most once an hour)."""
    names = sorted(f"{p.hash_part}.narinfo" for p in have)
    if not names:
        return
    if isinstance(backend, FileBackend):
        paths = [backend.local_path(n) for n in names]
        await trio.to_thread.run_sync(lambda: [mark_used(p) for p in paths])
    elif hasattr(backend, "mark_used"):
        await backend.mark_used(names)


async def nar_temp_dir(backend: Backend) -> str | None:
    """Where NAR files are made before they are put into the cache: its ``nar/`` directory
    for a ``file://`` cache (so that putting one is a rename), else None (the system's
    temporary directory).  Temporary NAR files left there by killed runs are removed once a
    day old."""
    if not isinstance(backend, FileBackend):
        await trio.to_thread.run_sync(_remove_stale_temps, tempfile.gettempdir(), ".tmp-push-")
        return None
    tmp_dir = os.path.join(backend.dir, "nar")
    try:
        make_dirs(tmp_dir)
    except OSError as e:
        raise CacheError(f"cannot create {tmp_dir!r}: {e.strerror}") from e
    await trio.to_thread.run_sync(_remove_stale_temps, tmp_dir)
    return tmp_dir


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_stale_temps(directory: str, prefix: str = ".tmp-") -> None:
    """Remove temporary files of pushes that were killed (older than a day, so never a live one's)."""
    import time
    now = time.time()
    try:
        with os.scandir(directory) as it:
            for e in it:
                if e.name.startswith(prefix) and e.is_file(follow_symlinks=False):
                    try:
                        if now - e.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                            os.unlink(e.path)
                    except OSError:
                        pass
    except OSError:
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
    method = compression or cu.param("compression") or "zstd"
    ext = extension(method)
    chosen_by = "--compression-level" if level is not None else f"cache URL {where!r}"  # for an error
    if level is None and cu.param("compression-level"):
        try:
            level = int(cu.param("compression-level"))  # type: ignore[arg-type]
        except ValueError:
            raise CacheError(f"cache URL {url!r}: compression-level must be an integer") from None
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
