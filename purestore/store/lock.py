"""Cross-process path locks: one lock file per store path under ``<state_dir>/locks``.

A lock is an exclusive ``flock`` on ``locks/<base name>.lock``.  ``flock`` locks belong to an
open file description, so two threads of one process that open the file separately exclude each
other just like two processes do; on top of that a per-name ``threading.RLock`` makes the lock
reentrant within one thread and lets a second thread wait without opening the file at all.

Lock files are removed when released (so ``locks/`` does not grow with the store).  A waiter that
wins the lock on a file that the previous holder has meanwhile unlinked sees ``st_nlink == 0``
and retries on a fresh file: the scheme Nix uses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from typing import Iterable, Iterator

from ..errors import StoreError


class _Held:
    __slots__ = ("rlock", "fd", "count", "waiters")

    def __init__(self):
        self.rlock = threading.RLock()
        self.fd: int | None = None
        self.count = 0
        self.waiters = 0


class PathLocks:
    """Named exclusive locks in one directory, safe across processes and threads."""

    def __init__(self, directory: str):
        self.directory = directory
        self._mutex = threading.Lock()
        self._held: dict[str, _Held] = {}

    def _file(self, name: str) -> str:
        return os.path.join(self.directory, name + ".lock")

    def acquire(self, name: str, *, blocking: bool = True) -> bool:
        """Take the lock ``name``; returns False only when ``blocking`` is False and it is busy.

        Raises :class:`StoreError` when the lock file cannot be created.
        """
        with self._mutex:
            h = self._held.get(name)
            if h is None:
                h = self._held[name] = _Held()
            h.waiters += 1
        try:
            if not h.rlock.acquire(blocking=blocking):
                return False
            try:
                if h.count == 0:
                    fd = self._flock(name, blocking)
                    if fd is None:
                        h.rlock.release()
                        return False
                    h.fd = fd
                h.count += 1
                return True
            except BaseException:
                if h.count == 0:
                    h.rlock.release()
                raise
        finally:
            with self._mutex:
                h.waiters -= 1

    def release(self, name: str) -> None:
        with self._mutex:
            h = self._held[name]
        h.count -= 1
        if h.count == 0:
            fd, h.fd = h.fd, None
            try:
                os.unlink(self._file(name))
            except FileNotFoundError:
                pass
            os.close(fd)  # closing drops the flock
        h.rlock.release()
        with self._mutex:
            if h.count == 0 and h.waiters == 0 and self._held.get(name) is h:
                del self._held[name]

    def _flock(self, name: str, blocking: bool) -> int | None:
        path = self._file(name)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise StoreError(f"cannot create lock file {path!r}: {e.strerror}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return None
                raise StoreError(f"cannot lock {path!r}: {e.strerror}") from e
            except BaseException:
                os.close(fd)
                raise
            if os.fstat(fd).st_nlink == 0:
                os.close(fd)  # the previous holder removed it while we waited: retry
                continue
            return fd

    def wait_released(self, name: str) -> None:
        """Block until nobody holds ``name`` (returns at once when nobody does); then try
        :meth:`acquire` again.  For a waiter that must not block its own thread while it holds
        other things: run this in a worker thread.  A shared ``flock`` on the lock file waits
        for the holder's exclusive one, whoever holds it (another process, or another thread
        of this one)."""
        try:
            fd = os.open(self._file(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold ``name`` for the duration of the ``with`` block."""
        self.acquire(name)
        try:
            yield
        finally:
            self.release(name)

    @contextlib.contextmanager
    def lock_many(self, names: Iterable[str]) -> Iterator[None]:
        """Hold all ``names``, taken in sorted order so that two callers cannot deadlock."""
        taken: list[str] = []
        try:
            for n in sorted(set(names)):
                self.acquire(n)
                taken.append(n)
            yield
        finally:
            for n in reversed(taken):
                self.release(n)


class ProcessFileLock:
    """A shared-or-exclusive ``flock`` on one file, held until :meth:`close` (e.g. ``gc.lock``)."""

    def __init__(self, path: str, *, shared: bool = False, blocking: bool = True):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"cannot open lock file {path!r}: {e.strerror}") from e
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BlockingIOError(e.errno, f"{path!r} is locked") from e
            raise StoreError(f"cannot lock {path!r}: {e.strerror}") from e

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
