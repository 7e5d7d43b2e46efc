"""The cache a push (:mod:`.push`) or a copy between caches (:mod:`.mirror`) writes to, before
and around the uploads: its ``nix-cache-info`` (:func:`ensure_cache_info`), the shared lock of a
cache directory that keeps a prune out (:func:`push_lock`), which narinfos it has already
(:func:`cached_paths`) and marking those as used for ``cache prune`` (:func:`mark_present`), and
where NAR files are prepared, with the leftovers of killed runs removed (:func:`nar_temp_dir`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Iterable

import trio

from ..errors import CacheError, FormatError
from ..formats.narinfo import NarInfo
from ..formats.store_path import StorePath
from ._nursery import open_nursery
from ._temps import remove_leftovers
from .backend import Backend, FileBackend, file_url, make_dirs
from .info import CacheInfo
from .prune import mark_used, open_dir_lock


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
    temporary directory).  Temporary files that killed runs left there are removed first
    (:func:`._temps.remove_leftovers`: at once when their process of this machine is gone, else
    once a day old)."""
    if not isinstance(backend, FileBackend):
        await trio.to_thread.run_sync(lambda: remove_leftovers(tempfile.gettempdir(), ".tmp-push-"))
        return None
    tmp_dir = os.path.join(backend.dir, "nar")
    try:
        make_dirs(tmp_dir)
    except OSError as e:
        raise CacheError(f"cannot create {tmp_dir!r}: {e.strerror}") from e
    await trio.to_thread.run_sync(remove_leftovers, tmp_dir)
    return tmp_dir
