"""Temporary roots and the roots directories of a store's state dir.

Protocol (shared with the garbage collector, ``store/gc.py``):

- Every process that uses a store creates ``<state_dir>/temproots/<pid>`` and holds an
  exclusive ``flock`` on it for as long as it lives.  Whoever can take that lock knows the
  process is gone.  The same lock says whether the process's temporary entries in the store
  (``<real_store_dir>/.tmp/<pid>-…``) are still being written.
- A temporary root is one line, the logical absolute store path, appended to that file while
  holding ``<state_dir>/gc.lock`` *shared*.  The collector holds ``gc.lock`` *exclusive* for a
  whole collection, reads every temproots file (:func:`read_temp_roots`) and keeps those paths
  and their closures.  A long-running process (``pure store serve``) can drop a temporary root
  again (:meth:`TempRoots.remove`): the file is rewritten without it, under the same shared lock.
- Permanent roots are symlinks under ``gcroots/``; ``gcroots/auto/`` holds indirect roots
  (links to ``result`` symlinks elsewhere).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

from ..errors import StoreError
from ..formats.store_path import StorePath
from .lock import ProcessFileLock

TEMPROOTS = "temproots"
GCROOTS = "gcroots"
GC_LOCK = "gc.lock"

_registry_lock = threading.Lock()
# temproots file path -> _Entry (one per file and process, shared by the stores that use it)
_registry: dict[str, "_Entry"] = {}


class _Entry:
    __slots__ = ("pid", "fd", "users", "lock")

    def __init__(self, fd: int):
        self.pid = os.getpid()
        self.fd = fd
        self.users = 0
        self.lock = threading.Lock()  # writes to the file


def temproots_dir(state_dir: str) -> str:
    return os.path.join(state_dir, TEMPROOTS)


def gcroots_dir(state_dir: str) -> str:
    return os.path.join(state_dir, GCROOTS)


def auto_roots_dir(state_dir: str) -> str:
    return os.path.join(state_dir, GCROOTS, "auto")


def gc_lock_path(state_dir: str) -> str:
    return os.path.join(state_dir, GC_LOCK)


def gc_lock(state_dir: str, *, shared: bool = False, blocking: bool = True) -> ProcessFileLock:
    """Take ``gc.lock`` (exclusive for a collection, shared to add a temporary root)."""
    return ProcessFileLock(gc_lock_path(state_dir), shared=shared, blocking=blocking)


class TempRoots:
    """This process's temproots file, locked for the life of the process (shared by all stores
    of this process that use the same state dir)."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.path = os.path.join(temproots_dir(state_dir), str(os.getpid()))
        with _registry_lock:
            entry = _registry.get(self.path)
            if entry is None or entry.pid != os.getpid():
                entry = _registry[self.path] = _Entry(_open_locked(self.path))
            entry.users += 1
            self._entry = entry
        self._closed = False

    def add(self, logical_path: str) -> None:
        """Record ``logical_path`` (or several, one per line) as a temporary root of this process."""
        data = (logical_path + "\n").encode()
        entry = self._entry
        with gc_lock(self.state_dir, shared=True), entry.lock:
            try:
                os.write(entry.fd, data)
            except OSError as e:
                raise StoreError(f"cannot write temporary root to {self.path!r}: {e.strerror}") from e

    def remove(self, logical_path: str) -> None:
        """Drop one earlier :meth:`add` of ``logical_path`` (the garbage collector may take the
        path again once no other :meth:`add` of it remains)."""
        line = logical_path.encode()
        entry = self._entry
        with gc_lock(self.state_dir, shared=True), entry.lock:
            try:
                lines = _read_all(entry.fd).splitlines()
                if line not in lines:
                    return
                lines.remove(line)
                os.ftruncate(entry.fd, 0)
                os.write(entry.fd, b"".join(k + b"\n" for k in lines))  # (appended: at the start)
            except OSError as e:
                raise StoreError(f"cannot rewrite temporary roots file {self.path!r}: {e.strerror}") from e

    def close(self) -> None:
        """Drop this user; the file is removed when the process's last store closes."""
        if self._closed:
            return
        self._closed = True
        with _registry_lock:
            entry = _registry.get(self.path)
            if entry is None or entry.pid != os.getpid():
                return
            entry.users -= 1
            if entry.users == 0:
                del _registry[self.path]
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                os.close(entry.fd)


def _read_all(fd: int) -> bytes:
    parts, off = [], 0
    while chunk := os.pread(fd, 1 << 16, off):
        parts.append(chunk)
        off += len(chunk)
    return b"".join(parts)


def _open_locked(path: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreError(f"cannot create temporary roots file {path!r}: {e.strerror}") from e
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        if st.st_nlink == 0:  # a cleaner removed a stale file of a dead process with our pid
            os.close(fd)
            continue
        os.ftruncate(fd, 0)  # anything there was written by a dead process with the same pid
        return fd


def owner_alive(state_dir: str, pid: int) -> bool:
    """Whether process ``pid`` still holds its temproots lock (so its temporaries are in use)."""
    path = os.path.join(temproots_dir(state_dir), str(pid))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


def remove_dead_temproots(state_dir: str) -> list[int]:
    """Delete temproots files of processes that are gone; returns their pids."""
    d = temproots_dir(state_dir)
    dead = []
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return dead
    for name in names:
        if not (name.isascii() and name.isdigit()):
            continue
        path = os.path.join(d, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            if os.fstat(fd).st_nlink:
                os.unlink(path)
                dead.append(int(name))
        finally:
            os.close(fd)
    return dead


def read_temp_roots_by_pid(state_dir: str, store_dir: str) -> list[tuple[int, StorePath]]:
    """(pid, path) for every temporary root of a live process (hold ``gc.lock`` exclusively)."""
    out: list[tuple[int, StorePath]] = []
    d = temproots_dir(state_dir)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return out
    for name in names:
        if not (name.isascii() and name.isdigit()) or not owner_alive(state_dir, int(name)):
            continue
        try:
            with open(os.path.join(d, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        for line in data.decode(errors="replace").splitlines():
            try:
                out.append((int(name), StorePath.parse(line, store_dir)))
            except ValueError:
                continue
    return out


def read_temp_roots(state_dir: str, store_dir: str) -> set[StorePath]:
    """All temporary roots of live processes (call while holding ``gc.lock`` exclusively)."""
    return {sp for _pid, sp in read_temp_roots_by_pid(state_dir, store_dir)}
