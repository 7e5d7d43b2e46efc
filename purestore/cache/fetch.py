"""Fetching one path from a binary cache: stream, verify, restore, install, register.

- :class:`_VerifyingReader` turns compressed chunks into NAR bytes while checking FileSize,
  FileHash, NarSize and NarHash (never decompressing beyond NarSize);
- :func:`download` streams a NAR from a cache into a fresh temporary name in the store (a
  ``file://`` cache is read in place; over HTTP small NARs come in one request, big ones through
  a memory channel into the restoring worker thread);
- :func:`install_batch` renames restored trees into place under the path locks, flushes the
  file system once and registers the batch in one transaction.

The closure logic (which paths, in which order) is in :mod:`.substituter`.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from typing import Callable

import trio

from ..errors import CacheError, NarError, StoreError
from ..formats.hash import Hash
from ..formats.narinfo import NarInfo
from ..formats.path_info import PathInfo
from ..formats.store_path import StorePath
from . import _storeapi as S
from .backend import Backend, FileBackend
from .compression import decompressor
from .progress import Progress

SMALL_NAR = 1 << 20  # compressed NARs up to this size are fetched in one piece over HTTP
class _VerifyingReader:
    """A file-like NAR source over compressed chunks that checks sizes and hashes on the way.

    ``next_chunk()`` returns compressed bytes, ``b""`` at the end.  Raises :class:`CacheError`
    when the compressed file exceeds FileSize, ends early, or decompresses beyond NarSize.
    """

    def __init__(self, next_chunk: Callable[[], bytes], ni: NarInfo, where: str, progress: Progress | None):
        self._next = next_chunk
        self.ni = ni
        self.where = where
        self.dec = decompressor(ni.compression)
        self.file_h = hashlib.sha256()
        self.file_n = 0
        self.nar_h = hashlib.sha256()
        self.nar_n = 0
        self.ended = False
        self.progress = progress
        # no FileSize: no compressor expands a NAR by more than this, so stop a bottomless stream
        self.max_file = ni.file_size if ni.file_size is not None else ni.nar_size + ni.nar_size // 64 + (1 << 20)

    def read(self, _n: int = -1) -> bytes:
        while not self.ended:
            c = self._next()
            if not c:
                self.ended = True
                if self.ni.file_size is not None and self.file_n < self.ni.file_size:
                    raise CacheError(f"download of {self.where} is truncated: got {self.file_n} of "
                                     f"{self.ni.file_size} bytes (FileSize)")
                if not self.dec.eof:
                    raise CacheError(f"compressed NAR {self.where} is truncated")
                return b""
            self.file_h.update(c)
            self.file_n += len(c)
            if self.file_n > self.max_file:
                if self.ni.file_size is not None:
                    raise CacheError(f"{self.where} is larger than its FileSize {self.ni.file_size}")
                raise CacheError(f"{self.where} is much larger than its NarSize {self.ni.nar_size} "
                                 f"(and its narinfo gives no FileSize)")
            try:
                out = self.dec.decompress(c)
            except CacheError as e:
                raise CacheError(f"{self.where}: {e}") from e
            if out:
                self.nar_h.update(out)
                self.nar_n += len(out)
                if self.nar_n > self.ni.nar_size:
                    raise CacheError(f"{self.where} decompresses to more than its NarSize {self.ni.nar_size}")
                if self.progress is not None:
                    self.progress.add_bytes(len(out))
                return out
        return b""

    def finish(self) -> None:
        """Read to the end and check FileSize, FileHash, NarSize and NarHash."""
        while self.read():
            pass
        self.verify()

    def verify(self) -> None:
        """Check FileSize, FileHash, NarSize and NarHash, all read."""
        ni = self.ni
        if ni.file_size is not None and self.file_n != ni.file_size:
            raise CacheError(f"{self.where} has {self.file_n} bytes, FileSize says {ni.file_size}")
        if ni.file_hash is not None:
            got = Hash("sha256", self.file_h.digest())
            if got != ni.file_hash:
                raise CacheError(f"{self.where} has hash {got.typed()}, FileHash says {ni.file_hash.typed()}")
        if self.nar_n != ni.nar_size:
            raise CacheError(f"NAR {self.where} has {self.nar_n} bytes, NarSize says {ni.nar_size}")
        got = Hash("sha256", self.nar_h.digest())
        if got != ni.nar_hash:
            raise CacheError(f"NAR {self.where} has hash {got.typed()}, NarHash says {ni.nar_hash.typed()}")


class _Ahead:
    """The verifying reader run in a thread of its own, a few chunks ahead of the restore.

    Reading, decompressing and both hashes are C work that releases the GIL; parsing the NAR
    and creating the files is Python work between system calls.  One thread for each keeps both
    busy, where several restoring threads mostly wait for each other's GIL.
    """

    def __init__(self, reader: _VerifyingReader, depth: int = 4):
        self._q: queue.Queue = queue.Queue(depth)
        self._stop = False
        self._done = False
        self._t = threading.Thread(target=self._run, args=(reader,), name="pure-nar-reader", daemon=True)
        self._t.start()

    def _run(self, reader: _VerifyingReader) -> None:
        try:
            while not self._stop:
                c = reader.read()
                self._q.put(c)
                if not c:
                    return
        except BaseException as e:  # handed to the restoring thread
            self._q.put(e)

    def read(self, _n: int = -1) -> bytes:
        if self._done:
            return b""
        item = self._q.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if not item:
            self._done = True
        return item

    def close(self) -> None:
        """Stop the reading thread (it may be waiting to hand over a chunk) and wait for it."""
        self._stop = True
        while self._t.is_alive():
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass
        self._t.join()


def _restore(next_chunk, ni: NarInfo, where: str, tmp: str, progress) -> None:
    """Worker thread: stream, verify and restore into ``tmp``, with canonical metadata."""
    from ..store.fsnar import restore_nar

    reader = _VerifyingReader(next_chunk, ni, where, progress)
    ahead = _Ahead(reader)
    try:
        try:
            restore_nar(ahead, tmp, canonical=True)
        except NarError as e:
            # corrupt data explains a bad NAR better: read on and report a size or hash mismatch first
            try:
                while ahead.read():
                    pass
                reader.verify()
            except CacheError as mismatch:
                raise CacheError(f"{mismatch} (and it is not a valid NAR: {e})") from e
            raise CacheError(f"NAR {where} is invalid: {e}") from e
        while ahead.read():
            pass
        reader.verify()
    finally:
        ahead.close()


def install_batch(store, settings, items: list[tuple[PathInfo, str, str]], repair: set[StorePath],
                   provenance: dict[StorePath, bytes] | None = None) -> dict:
    """Worker thread: under the path locks, rename restored trees into place, flush the file
    system once, and register the whole batch in one transaction.

    ``items`` are (info, tmp, cache url); every reference of every item is already valid.
    Returns path → None (installed and registered), "valid" (someone else got it first) or the
    exception that stopped it.
    """
    paths = [info.path for info, _t, _u in items]
    result: dict = {}
    store.add_temp_roots(paths)
    with store.lock_paths(paths):
        new: list[tuple[PathInfo, str]] = []
        for info, tmp, url in items:
            p = info.path
            existing = S.path_info(store, p)
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
            return result
    for info, url in new:
        _record(store, settings, info.path, url, info.nar_size)
        if provenance and info.path in provenance:
            _keep_provenance(store, info.path, provenance[info.path])
    return result


async def download(store, cache, ni: NarInfo, progress: Progress | None) -> str:
    """Stream, verify and restore the NAR into a fresh temporary name in the store; return it."""
    p = ni.store_path
    backend = cache.backend
    where = f"{cache.url.rstrip('/')}/{ni.url}"
    tmp = S.temp_path(store, p)
    try:
        if isinstance(backend, FileBackend):
            local = backend.local_path(ni.url)
            try:
                f = open(local, "rb")
            except FileNotFoundError:
                raise CacheError(f"{where} is missing from the cache") from None
            except OSError as e:
                raise CacheError(f"cannot read {where}: {e.strerror}") from e
            with f:
                await trio.to_thread.run_sync(_restore, lambda: f.read(1 << 20), ni, where, tmp, progress)
        elif ni.file_size is not None and ni.file_size <= SMALL_NAR:
            # small NARs: one request for the whole body, one thread hop to verify and restore
            data = await backend.get(ni.url)
            if data is None:
                raise CacheError(f"{where} is missing from the cache")
            chunks = iter((data, b""))
            await trio.to_thread.run_sync(_restore, lambda: next(chunks, b""), ni, where, tmp, progress)
        else:
            await _fetch_http(backend, ni, where, tmp, progress)
    except BaseException:
        if os.path.lexists(tmp):
            await trio.to_thread.run_sync(remove_temp, store, tmp)
        raise
    return tmp


def remove_temp(store, tmp: str) -> None:
    fn = getattr(store, "remove_temp", None)
    if fn is not None:
        fn(tmp)


async def _fetch_http(backend: Backend, ni: NarInfo, where: str, tmp: str, progress) -> None:
    send, recv = trio.open_memory_channel(8)
    pump_error: list[BaseException] = []

    async def pump():
        try:
            async with send:
                async with backend.open_read(ni.url) as chunks:
                    async for c in chunks:
                        await send.send(c)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as e:  # handed to the restoring thread and re-raised by the caller
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
    async with trio.open_nursery() as n:
        n.start_soon(pump)
        try:
            await trio.to_thread.run_sync(_restore, next_chunk, ni, where, tmp, progress)
        except Exception as e:  # re-raised below, outside the nursery (no exception group)
            failure.append(e)
        finally:
            recv.close()
            n.cancel_scope.cancel()
    if pump_error:
        raise pump_error[0]
    if failure:
        raise failure[0]




def _record(store, settings, path: StorePath, url: str, nar_size: int) -> None:
    try:
        from ..store import events
    except ImportError:
        return
    fn = getattr(events, "record_substitution", None)
    if fn is not None:
        fn(store, path.absolute(settings.store_dir), url, nar_size)


def _keep_provenance(store, path: StorePath, data: bytes) -> None:
    from ..store.provenance import write_provenance
    write_provenance(store, path, data)
