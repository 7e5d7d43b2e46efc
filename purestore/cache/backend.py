"""Binary cache storage backends: ``file://DIR`` and ``http(s)://HOST[:PORT][/PREFIX]``.

A backend knows nothing of narinfo or NARs: it stores named files (``nix-cache-info``,
``<hash>.narinfo``, ``nar/<hash>.nar.zst``, ``log/<drv>``) behind four async operations:

- ``exists(name) -> bool``
- ``get(name) -> bytes | None`` for small files (``None`` when absent)
- ``open_read(name)`` an async context manager yielding an async iterator of chunks
  (raises :class:`CacheMissing` when absent)
- ``put_file(name, local_path, content_type)`` / ``put(name, data, content_type)``; ``file://``
  writes to a temporary name and renames, so a reader never sees a partial file.

A ``file://`` cache also answers for many files in one worker thread (``sizes``, ``get_many``),
reads the small files and puts the NAR files and narinfos that several tasks ask for or hand it
at once in one hop (:class:`._batch.BatchedCalls`): a hop costs more than the read or write of
a small file.

Names are checked by :func:`check_name`: relative, ``/``-separated, no ``..``, no empty or hidden
segments.  That is what keeps a narinfo ``URL`` from pointing outside the cache.

OS and HTTP errors are turned into :class:`CacheError` at the storage boundary: here for
``file://``, in :mod:`.http_backend` for HTTP (with its retries, resumed downloads, logins and
TLS settings).  Cache URL parameters (``?compression=zstd&secret-key=FILE`` …) are parsed by :func:`parse_url`.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import stat
import tempfile
from typing import AsyncIterator

import trio

from ..errors import CacheError
from ._batch import BatchedCalls
from ._files import open_regular, read_if_regular
from ._temps import temp_prefix
from .url import CacheURL, parse_url

CHUNK = 1 << 20

# a store path name's characters (Nix's: `?` too, as in a build log's `log/<hash>-q?x.drv`), not `.` first
_SEGMENT_RE = re.compile(r"[A-Za-z0-9+_=?-][A-Za-z0-9+_.=?-]*\Z")


class CacheMissing(CacheError, FileNotFoundError):
    """Raised by ``open_read`` when the cache does not have the named file."""


class CacheNotAnswering(CacheError):
    """Raised by a request to a remote cache that sent no answer at all (not even a status
    line) within the stall timeout (``stalled-download-timeout``), when it is not asked again:
    the cache had never answered, or the caller said not to (``retry_unanswered=False``).
    ``name``: the file asked for; ``timeout``: the seconds waited."""

    def __init__(self, message: str, *, name: str = "", timeout: float = 0.0, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.name = name
        self.timeout = timeout


def check_name(name: str, where: str = "cache") -> str:
    """Validate a file name inside a cache; raise :class:`CacheError` if it could leave the cache."""
    if not isinstance(name, str) or not name or len(name) > 1000:
        raise CacheError(f"{where}: invalid file name {name!r}")
    if "://" in name or name.startswith("/"):
        raise CacheError(f"{where}: {name!r} points outside the cache (absolute URLs are not followed)")
    for seg in name.split("/"):
        if seg in ("", ".", "..") or not _SEGMENT_RE.match(seg):
            raise CacheError(f"{where}: {name!r} points outside the cache or has a bad segment {seg!r}")
    return name


def open_backend(url: str | CacheURL, *, connect_timeout: float = 10, stall_timeout: float = 30,
                 max_connections: int = 16, token: str | None = None, attempts: int = 5,
                 netrc_file: str | None = None, ssl_cert_file: str | None = None) -> "Backend":
    """The backend for a cache URL (not yet connected; close it with ``aclose``).  ``attempts``:
    how many times an HTTP request is tried before a transient failure is reported.
    ``netrc_file``: where an HTTP cache's login is looked up (sent with HTTP basic
    authentication; an upload token, when there is one, is sent instead).  ``ssl_cert_file``:
    the CA certificates an ``https://`` cache's certificate is checked against, instead of the
    system's."""
    cu = parse_url(url) if isinstance(url, str) else url
    if cu.scheme == "file":
        return FileBackend(cu)
    if cu.scheme == "s3":
        from .s3_backend import open_s3_backend
        return open_s3_backend(cu, connect_timeout=connect_timeout, stall_timeout=stall_timeout,
                               max_connections=max_connections, attempts=attempts, ssl_cert_file=ssl_cert_file)
    from .http_backend import open_http_backend
    return open_http_backend(cu, connect_timeout=connect_timeout, stall_timeout=stall_timeout,
                             max_connections=max_connections, token=token, attempts=attempts,
                             netrc_file=netrc_file, ssl_cert_file=ssl_cert_file)


def file_mode() -> int:
    """The mode of a file written into a cache directory: 0644 whatever the umask, as Nix's
    (it sets umask 022 at start-up): a cache is written to be served, and a web server running
    as another user must read it.  A private cache is a matter of its directory's mode, or of
    the server's tokens."""
    return 0o644


def make_dirs(d: str) -> None:
    """``os.makedirs(d)`` with mode 0755 for each directory made, whatever the umask (as Nix's:
    see :func:`file_mode`); an existing directory keeps its mode."""
    if os.path.isdir(d):
        return
    parent = os.path.dirname(d)
    if parent and parent != d:
        make_dirs(parent)
    try:
        os.mkdir(d, 0o755)
    except FileExistsError:
        if os.path.isdir(d):
            return
        raise
    os.chmod(d, 0o755)


def file_url(url: str, name: str) -> str:
    """Where a file of the cache at ``url`` is, for messages: the URL without its parameters
    (``?priority=…``, ``?region=…``), then the name."""
    return f"{url.split('?')[0].rstrip('/')}/{name}"


def backend_for(url: str | CacheURL, settings, **kw) -> "Backend":
    """:func:`open_backend` with the timeouts, attempts and netrc file of ``settings``."""
    # 0: no limit, as in Nix (whose connect-timeout is 0 by default)
    return open_backend(url, connect_timeout=settings.connect_timeout or math.inf,
                        stall_timeout=settings.stalled_download_timeout or math.inf,
                        attempts=settings.download_attempts,
                        netrc_file=getattr(settings, "netrc_file", None),
                        ssl_cert_file=getattr(settings, "ssl_cert_file", None), **kw)


class Backend:
    """Interface of a cache backend (see the module docstring)."""

    cache_url: CacheURL
    bucket = False  # an object store (S3): files have no times of use, only Last-Modified

    @property
    def url(self) -> str:
        return self.cache_url.url

    async def exists(self, name: str) -> bool:
        raise NotImplementedError

    async def size(self, name: str) -> int | None:
        """The size of the file ``name`` in bytes, -1 when it exists but its size is not known,
        None when it does not exist."""
        return -1 if await self.exists(name) else None

    async def get(self, name: str, limit: int | None = None, *, retry_unanswered: bool = True) -> bytes | None:
        """The whole file ``name``, None when it does not exist.  ``limit``: the most bytes it
        should have (a remote cache's answer is not read past it; by default a limit for the
        kind of file, :func:`~.http_response.whole_limit`).  ``retry_unanswered=False``: a
        remote cache that does not answer the request at all within the stall timeout is not
        asked again (:class:`CacheNotAnswering`), where other failures that may pass are
        retried (a lookup, which treats such a cache as not having the file)."""
        raise NotImplementedError

    def open_read(self, name: str) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
        raise NotImplementedError

    async def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        raise NotImplementedError

    async def put_file(self, name: str, local: str, content_type: str = "application/octet-stream",
                       *, move: bool = False) -> None:
        raise NotImplementedError

    async def put_nar(self, name: str, local: str, size: int) -> None:
        """Move the NAR file ``local`` (a temporary file of ours) to ``name``, unless the cache has
        that file already: NAR files are named by their hash, so a file of that name is this one,
        unless something else wrote that name: one of another size than ``size`` is replaced (one
        whose size the cache does not say is kept).  ``local`` is gone afterwards."""
        if await self.size(name) in (size, -1):
            os.unlink(local)
        else:
            await self.put_file(name, local, "application/x-nix-nar", move=True)

    async def put_narinfo(self, name: str, data: bytes, store_dir: str) -> None:
        """Write a narinfo.  A directory keeps the signatures of the one it replaces (for the same
        contents: :func:`..formats.narinfo.merge_sigs`), as ``pure cache serve`` does with an
        upload; a bucket or another server takes it as it is."""
        await self.put(name, data, "text/x-nix-narinfo")

    async def list_narinfos(self) -> list[str] | None:
        """The names of the cache's narinfos (``<hash>.narinfo``, sorted); None when the cache
        cannot be listed (plain HTTP)."""
        return None

    async def aclose(self) -> None:
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


# -- file:// ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _narinfo_lock(directory: str, writes: trio.Lock):
    """:func:`.prune.open_narinfo_lock`'s lock, polled for so that Ctrl-C stops a writer that
    waits for it; said once when the wait passes a second (it is held for milliseconds).

    ``writes`` first puts this process's own writers of the directory in a row: each opens the
    lock file afresh, and two descriptors' ``flock`` exclude each other in one process too, so
    a push's parallel narinfo writes polled for each other (a push of 200 small paths took
    1.5 s instead of 0.3 s, and said it waited for "another writer")."""
    from .prune import open_narinfo_lock, try_lock
    async with writes:
        fd = open_narinfo_lock(directory)
        if fd is None:
            yield
            return
        try:
            waited = 0.0
            while not try_lock(fd):
                if waited < 1 <= waited + 0.02:
                    import logging
                    logging.getLogger("purestore.cache").warning(
                        "waiting for another writer of %r (a lock on its nix-cache-info)", directory)
                waited += 0.02
                await trio.sleep(0.02)
            yield
        finally:
            os.close(fd)


_A_FIFO = object()  # FileBackend._read_now's answer for a FIFO it was told not to wait on


class FileBackend(Backend):
    """A cache in a local directory; writes are atomic (temporary file, fsync-free rename)."""

    def __init__(self, cu: CacheURL):
        self.cache_url = cu
        self.dir = cu.base
        self._narinfo_writes = trio.Lock()  # (see _narinfo_lock)
        # narinfos written in batches, each under one holding of the lock; NARs put in batches
        self._narinfo_batches = BatchedCalls(lambda: _narinfo_lock(self.dir, self._narinfo_writes))
        self._nar_batches = BatchedCalls()
        self._read_batches = BatchedCalls()  # (small files: see get)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, check_name(name, self.url))

    def _err(self, what: str, name: str, e: OSError) -> CacheError:
        return CacheError(f"cache {self.url!r}: cannot {what} {name!r}: {e.strerror}")

    async def exists(self, name: str) -> bool:
        p = self._path(name)
        return await trio.to_thread.run_sync(os.path.exists, p)

    def _size_now(self, name: str) -> int | None:
        p = self._path(name)
        try:
            return os.stat(p).st_size
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._err("query", name, e) from e

    def _read_now(self, name: str, fifo: bool = True) -> bytes | object | None:
        """The file's bytes (None when there is none); ``fifo`` False: :data:`_A_FIFO` for a
        FIFO, not read here."""
        p = self._path(name)  # (a file of our own disk: read as it is, ``limit`` or not)
        try:
            if not fifo and stat.S_ISFIFO(os.stat(p).st_mode):
                return _A_FIFO
            with open_regular(p) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._err("read", name, e) from e

    async def size(self, name: str) -> int | None:
        self._path(name)  # (checked here, in the caller's thread)
        return await trio.to_thread.run_sync(self._size_now, name)

    async def sizes(self, names: list[str]) -> list[int | None]:
        """:meth:`size` of each of ``names``, asked in one worker thread (a thread hop costs
        more than the ``stat`` of a file on a local disk)."""
        for name in names:
            self._path(name)
        return await trio.to_thread.run_sync(lambda: [self._size_now(n) for n in names])

    async def get(self, name: str, limit: int | None = None, *, retry_unanswered: bool = True) -> bytes | None:
        self._path(name)
        # the reads that tasks ask for at once (the narinfos of a substitution) in one hop; a
        # FIFO, which may make its reader wait (see _files), is read in a thread of its own
        data = await self._read_batches.run(lambda: self._read_now(name, fifo=False))
        if data is _A_FIFO:
            data = await trio.to_thread.run_sync(self._read_now, name)
        return data

    async def get_many(self, names: list[str]) -> list[bytes | None]:
        """:meth:`get` of each of ``names``, read in one worker thread."""
        for name in names:
            self._path(name)
        return await trio.to_thread.run_sync(lambda: [self._read_now(n) for n in names])

    @contextlib.asynccontextmanager
    async def open_read(self, name: str):
        p = self._path(name)
        try:
            f = await trio.to_thread.run_sync(open_regular, p)
        except FileNotFoundError:
            raise CacheMissing(f"{file_url(self.url, name)} is missing from the cache") from None
        except OSError as e:
            raise self._err("read", name, e) from e

        async def chunks():
            while True:
                data = await trio.to_thread.run_sync(f.read, CHUNK)
                if not data:
                    return
                yield data
        try:
            yield chunks()
        finally:
            f.close()

    async def list_narinfos(self) -> list[str] | None:
        def names() -> list[str]:
            try:
                # every entry so named (not only regular files: one that cannot be read is a
                # problem for verify and sign to report, not to pass over); not our temp files
                return sorted(e.name for e in os.scandir(self.dir)
                              if e.name.endswith(".narinfo") and not e.name.startswith("."))
            except OSError as e:
                raise self._err("list", ".", e) from e
        return await trio.to_thread.run_sync(names)

    def local_path(self, name: str) -> str:
        """The file's path on disk (lets the substituter read a local cache without copying)."""
        return self._path(name)

    def _ensure_dir(self, p: str) -> None:
        d = os.path.dirname(p)
        try:
            make_dirs(d)
        except OSError as e:
            raise CacheError(f"cache {self.url!r}: cannot create directory {d!r}: {e.strerror}") from e

    def _temp_for(self, p: str, name: str) -> tuple[int, str]:
        """A new temporary file next to ``p`` (its directory made first): (fd, path)."""
        self._ensure_dir(p)
        try:
            return tempfile.mkstemp(prefix=temp_prefix(), dir=os.path.dirname(p))
        except OSError as e:
            raise self._err("write", name, e) from e

    def _write_with(self, name: str, fill) -> None:
        """Worker thread: ``fill(file)`` writes a temporary file that is then renamed to ``name``
        (removed again if anything fails)."""
        p = self._path(name)
        fd, tmp = self._temp_for(p, name)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
            os.chmod(tmp, file_mode())
            os.replace(tmp, p)
        except OSError as e:
            _unlink(tmp)
            raise self._err("write", name, e) from e
        except BaseException:
            _unlink(tmp)
            raise

    def _write(self, name: str, data: bytes) -> None:
        self._write_with(name, lambda f: f.write(data))

    async def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        await trio.to_thread.run_sync(self._write, name, data)

    async def put_narinfo(self, name: str, data: bytes, store_dir: str) -> None:
        from ..formats.narinfo import MAX_SIZE, merge_sigs
        p = self._path(name)

        def write():
            old = read_if_regular(p, MAX_SIZE)  # (none yet, or nothing to read: replaced all the same)
            self._write(name, merge_sigs(data, old))
        await self._narinfo_batches.run(write)

    async def put_nar(self, name: str, local: str, size: int) -> None:
        # one worker thread hop for the check and the move, shared with other NARs put at the
        # same time; a NAR file found there is used again: recent for `cache prune`
        from .prune import mark_used
        p = self._path(name)

        def put() -> None:
            if self._size_now(name) == size:
                os.unlink(local)
                mark_used(p)
            else:
                self._put_file_now(name, local, move=True)
        await self._nar_batches.run(put)

    async def put_file(self, name: str, local: str, content_type: str = "application/octet-stream",
                       *, move: bool = False) -> None:
        self._path(name)
        await trio.to_thread.run_sync(lambda: self._put_file_now(name, local, move=move))

    def _put_file_now(self, name: str, local: str, *, move: bool) -> None:
        """Worker thread: :meth:`put_file`."""
        p = self._path(name)
        self._ensure_dir(p)
        if move:
            try:
                os.chmod(local, file_mode())
                os.replace(local, p)
                return
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise self._err("write", name, e) from e
        def copy(out):
            with open(local, "rb") as src:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
        self._write_with(name, copy)
        if move:
            _unlink(local)


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
