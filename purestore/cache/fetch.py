"""Fetching one path from a binary cache: stream, verify, restore, install, register.

- :func:`download` streams a NAR from a cache into a fresh temporary name in the store, verified
  and restored by :mod:`.nar_jobs` in a worker thread (a ``file://`` cache is read in place; over
  HTTP small NARs come in one request, big ones through a memory channel into the thread);
- :func:`install_batch` renames restored trees into place under the path locks, flushes the
  file system once and registers the batch in one transaction.

The closure logic (which paths, in which order) is in :mod:`.substituter`.
"""

from __future__ import annotations

import contextlib
import os
import stat
from functools import partial

import trio

from ..errors import CacheError, StoreError
from ..formats.narinfo import NarInfo
from ..formats.path_info import PathInfo
from ..formats.store_path import StorePath
from . import _storeapi as S
from .backend import Backend, FileBackend, file_url
from ._nursery import run_stoppable
from .forked import DATA, run_claimed
from .nar_jobs import restore_file, restore_stream
from .progress import Progress

SMALL_NAR = 1 << 20  # compressed NARs up to this size are fetched in one piece over HTTP
HAND_OVER = 1 << 20  # bytes of a streamed download handed to the restoring thread at once
TINY_NAR = 32 << 10  # NARs up to this size (signed NarSize, enforced) restore in the event loop


def install_batch(store, settings, items: list[tuple[PathInfo, str, str]], repair: set[StorePath],
                   provenance: dict[StorePath, bytes] | None = None, *, locked: bool = False) -> dict:
    """Worker thread: under the path locks, rename restored trees into place, flush the file
    system once, and register the whole batch in one transaction.  ``locked``: the caller
    holds the items' path locks already (taken in another thread: not taken again here).

    ``items`` are (info, tmp, cache url); every reference of every item is already valid.
    Returns path → None (installed and registered), "valid" (someone else got it first) or the
    exception that stopped it.
    """
    paths = [info.path for info, _t, _u in items]
    result: dict = {}
    store.add_temp_roots(paths)
    with contextlib.nullcontext() if locked else store.lock_paths(paths):
        new: list[tuple[PathInfo, str]] = []
        valid = S.valid_paths(store, paths)  # (one query: the path infos only of those)
        for info, tmp, url in items:
            p = info.path
            existing = S.path_info(store, p) if p in valid else None
            if existing is not None and p not in repair:
                result[p] = "valid"
                continue
            if existing is not None and existing.nar_hash != info.nar_hash:
                result[p] = StoreError(
                    f"cannot repair {p.absolute(settings.store_dir)!r}: the cache's NAR hash "
                    f"{info.nar_hash.typed()} differs from the registered {existing.nar_hash.typed()}")
                continue
            try:
                store.install_path(tmp, p)
            except StoreError as e:
                result[p] = e
                continue
            result[p] = None
            if existing is None:
                new.append((info, url))
        if any(v is None for v in result.values()) and getattr(store, "durable", False):
            from ..store.local import _syncfs
            _syncfs(store.real_store_dir)
        try:
            S.register(store, [info for info, _u in new])
        except StoreError as e:
            for info, _u in new:
                result[info.path] = e
                try:  # not valid after all: no unregistered copy stays in the store dir
                    remove_temp(store, S.real_path(store, info.path))
                except (OSError, StoreError):
                    pass  # the next install of the path replaces it
            return result
    _record(store, settings, [(info.path, url, info.nar_size, info.deriver) for info, url in new])
    for info, url in new:
        if provenance and info.path in provenance:
            _keep_provenance(store, info.path, provenance[info.path])
    return result


class Opened:
    """A NAR's response, opened (request sent, head received) before a lane was free to restore
    it: the chunks of its body, to be read once (see :func:`download`)."""

    def __init__(self, chunks):
        self._chunks = chunks

    def take(self):
        """The chunks the first time; None after (the reader must ask the cache afresh)."""
        chunks, self._chunks = self._chunks, None
        return chunks


@contextlib.asynccontextmanager
async def _nar_body(backend: Backend, ni: NarInfo, opened: Opened | None):
    chunks = opened.take() if opened is not None else None
    if chunks is not None:
        yield chunks
    else:
        async with backend.open_read(ni.url) as chunks:
            yield chunks


async def download(store, cache, ni: NarInfo, progress: Progress | None, worker=None,
                   opened: Opened | None = None, umask: int | None = None) -> str:
    """Stream, verify and restore the NAR into a fresh temporary name in the store; return it.

    ``worker`` (a :class:`.forked.ForkedWorker`), when given and idle, restores in its process
    instead of a thread of this one: from a ``file://`` cache, or a big NAR streamed over HTTP
    (downloaded here, restored there).  ``opened``: the big NAR's response, already asked for.
    ``umask``: the process's umask, read once by a caller that downloads many paths (else read
    for each restore)."""
    p = ni.store_path
    backend = cache.backend
    where = file_url(cache.url, ni.url)
    tmp = S.temp_path(store, p)
    # a store that flushes before it registers gets the big files' data written straight to disk
    direct = bool(getattr(store, "durable", False))
    from_file = partial(restore_file, direct=direct, umask=umask)
    from_stream = partial(restore_stream, direct=direct, umask=umask)
    try:
        if isinstance(backend, FileBackend):
            args = (backend.local_path(ni.url), ni, where, tmp)
            if ni.nar_size <= TINY_NAR and ni.file_size is not None and ni.file_size <= TINY_NAR \
                    and _plain_file(args[0]):
                # as over HTTP: restoring costs less than the hop to a worker would (a FIFO,
                # which may make its reader wait, see _files, goes below: the run goes on meanwhile)
                from_file(*args, progress)
                await trio.lowlevel.checkpoint()
                return tmp
            ran, _ = await run_claimed(worker, lambda: worker.call(from_file, *args, progress=progress),
                                       lambda: _remove_partial(store, tmp))
            if not ran:  # in a thread, stopped at its next MiB when this task is cancelled
                await run_stoppable(from_file, *args, progress)
        elif ni.file_size is not None and ni.file_size <= SMALL_NAR:
            # small NARs: one request for the whole body, verified and restored in one go
            # (a little over FileSize: a Content-Encoding may add some; FileSize is checked after)
            data = await backend.get(ni.url, limit=ni.file_size + (ni.file_size >> 4) + 4096)
            if data is None:
                raise CacheError(f"{where} is missing from the cache")
            chunks = iter((data, b""))
            args = (lambda: next(chunks, b""), ni, where, tmp, progress)
            if ni.nar_size <= TINY_NAR:
                # a few files of a few KiB: restoring costs less than the hop to a thread would
                from_stream(*args)
                await trio.lowlevel.checkpoint()
            else:
                await trio.to_thread.run_sync(from_stream, *args)
        else:
            async def streamed_to_worker():
                async with _nar_body(backend, ni, opened) as chunks:
                    await worker.call(from_stream, DATA, ni, where, tmp, progress=progress, feed=chunks)

            ran, _ = await run_claimed(worker, streamed_to_worker, lambda: _remove_partial(store, tmp))
            if not ran:  # (a worker that died half way used ``opened`` up: it is asked for afresh)
                await _fetch_http(backend, ni, where, tmp, progress, opened, direct, umask)
    except BaseException:
        if os.path.lexists(tmp):
            with trio.CancelScope(shield=True):  # cancelled too (Ctrl-C): nothing writes there now
                await trio.to_thread.run_sync(_remove_partial, store, tmp)
        raise
    return tmp


def _plain_file(path: str) -> bool:
    """Whether ``path`` is no FIFO (a file, or what :func:`.nar_jobs.restore_file` refuses or
    finds missing, as quickly where it runs): a tiny NAR that is one may be read in the event
    loop."""
    try:
        return not stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return True


def _remove_partial(store, tmp: str) -> None:
    """What a restore killed half way left: a partial tree at ``tmp``, or nothing."""
    if os.path.lexists(tmp):
        remove_temp(store, tmp)


def remove_temp(store, tmp: str) -> None:
    fn = getattr(store, "remove_temp", None)
    if fn is not None:
        fn(tmp)


async def _fetch_http(backend: Backend, ni: NarInfo, where: str, tmp: str, progress,
                      opened: Opened | None = None, direct: bool = False, umask: int | None = None) -> None:
    await stream_to_thread(lambda: _nar_body(backend, ni, opened),
                           lambda next_chunk: restore_stream(next_chunk, ni, where, tmp, progress, direct=direct,
                                                             umask=umask))


async def stream_to_thread(open_chunks, consume):
    """Read the async chunks of ``open_chunks()`` (an async context manager) in this task while
    ``consume(next_chunk)`` runs in a worker thread (``next_chunk()`` gives bytes, ``b""`` at
    the end); return what ``consume`` returns.  An error of the stream is raised before one of
    ``consume`` (which then mostly just saw the stream end early)."""
    send, recv = trio.open_memory_channel(8)
    pump_error: list[BaseException] = []

    async def pump():
        try:
            async with send:
                async with open_chunks() as chunks:
                    # the socket gives ~100 KiB at a time; each hand-over to the worker thread
                    # costs a round trip between threads, so hand over about 1 MiB at once
                    parts: list[bytes] = []
                    size = 0
                    async for c in chunks:
                        parts.append(c)
                        size += len(c)
                        if size >= HAND_OVER:
                            await send.send(b"".join(parts) if len(parts) > 1 else parts[0])
                            parts, size = [], 0
                    if parts:
                        await send.send(b"".join(parts))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the consumer stopped early
        except Exception as e:  # handed to the consumer and re-raised by the caller
            pump_error.append(e)

    token = trio.lowlevel.current_trio_token()

    def next_chunk() -> bytes:
        try:
            return trio.from_thread.run(recv.receive, trio_token=token)
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if pump_error:
                raise pump_error[0]
            return b""

    failure: list[Exception] = []
    result = None
    async with trio.open_nursery() as n:
        n.start_soon(pump)
        try:
            result = await trio.to_thread.run_sync(consume, next_chunk)
        except Exception as e:  # re-raised below, outside the nursery (no exception group)
            failure.append(e)
        finally:
            recv.close()
            n.cancel_scope.cancel()
    if pump_error:
        raise pump_error[0]
    if failure:
        raise failure[0]
    return result




def _record(store, settings, paths: list[tuple[StorePath, str, int, StorePath | None]]) -> None:
    """Record the substitution of each (path, cache url, NAR size, deriver), all in one transaction."""
    if not paths:
        return
    try:
        from ..store import events
    except ImportError:
        return
    sd = settings.store_dir
    fn = getattr(events, "record_substitutions", None)
    if fn is not None:
        fn(store, [(path.absolute(sd), url, nar_size, drv and drv.absolute(sd))
                   for path, url, nar_size, drv in paths])
        return
    fn = getattr(events, "record_substitution", None)
    if fn is not None:
        for path, url, nar_size, drv in paths:
            fn(store, path.absolute(sd), url, nar_size, drv and drv.absolute(sd))


def _keep_provenance(store, path: StorePath, data: bytes) -> None:
    from ..store.provenance import write_provenance
    write_provenance(store, path, data)
