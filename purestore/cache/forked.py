"""A second restoring process for ``pure copy --from file://…``, made by ``fork`` (no exec).

Restoring a NAR keeps a core busy with Python work between system calls (parsing the NAR,
creating files).  Two restoring threads of one process mostly hand the GIL back and forth: each
of the ~5 system calls per file releases it, and every hand-over is a context switch (23,000 of
them for the benchmark closure, against 3,000 with one restoring thread).  A worker *process*
started with a forkserver or ``spawn`` avoids that, but it imports everything again (~0.2 s of
CPU on two cores, more than it saves).  A plain ``fork`` of the running command costs a few
milliseconds: the child has every module already imported.

:class:`ForkedWorker` forks such a child, sends it one job at a time (a module-level function
and its arguments, pickled) and relays its byte progress.  The child serves jobs until the
parent closes the pipe; the parent kills it when a job is cancelled, so that the caller can
remove the job's temporary tree knowing nobody writes into it any more.

Forking copies the process as it is: a lock that another thread holds at that moment stays held
in the child forever.  So the worker must be started while no other thread of the process is
doing anything (the CLI, before the substitution starts); library callers do not get one unless
they ask for it.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import threading

import trio

from ..errors import CacheError
from .progress import Progress


class WorkerGone(CacheError):
    """The child died (or could not be reached) during a job: run the job in-process instead."""

_LEN = struct.Struct("<I")
_PROGRESS_EVERY = 1 << 20  # bytes of progress batched into one message


def _write_frame(fd: int, obj, lock: threading.Lock | None = None) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    frame = _LEN.pack(len(data)) + data
    if lock is not None:
        lock.acquire()
    try:
        with memoryview(frame) as mv:
            done = 0
            while done < len(frame):
                done += os.write(fd, mv[done:])
    finally:
        if lock is not None:
            lock.release()


def _read_exact(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        b = os.read(fd, n)
        if not b:
            return None
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


class _PipeProgress(Progress):
    """The child's progress: bytes are batched and sent to the parent as ("p", n) messages."""

    def __init__(self, fd: int, lock: threading.Lock):
        super().__init__()
        self._fd = fd
        self._wlock = lock
        self._pending = 0

    def add_bytes(self, n: int) -> None:
        self._pending += n
        if self._pending >= _PROGRESS_EVERY:
            n, self._pending = self._pending, 0
            _write_frame(self._fd, ("p", n), self._wlock)

    def flush(self) -> None:
        if self._pending:
            n, self._pending = self._pending, 0
            _write_frame(self._fd, ("p", n), self._wlock)


def _portable(e: Exception) -> Exception:
    """``e`` if it survives pickling both ways, else a :class:`CacheError` saying what it was."""
    try:
        pickle.loads(pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL))
        return e
    except Exception:
        return CacheError(f"{type(e).__name__}: {e}")


def _serve(jobs_fd: int, results_fd: int) -> None:
    """The child: run each job read from ``jobs_fd``, answer on ``results_fd``; exit at EOF."""
    status = 0
    try:
        # trio's handlers belong to the parent's event loop: the child dies of a plain signal
        # (the parent removes what it was writing) and never writes to the parent's wakeup fd
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        wlock = threading.Lock()
        while True:
            head = _read_exact(jobs_fd, _LEN.size)
            if head is None:
                break
            data = _read_exact(jobs_fd, _LEN.unpack(head)[0])
            if data is None:
                break
            progress = _PipeProgress(results_fd, wlock)
            try:
                fn, args = pickle.loads(data)
                result = ("ok", fn(*args, progress=progress))
            except Exception as e:
                result = ("err", _portable(e))
            progress.flush()
            _write_frame(results_fd, result, wlock)
    except BaseException:
        status = 1
    finally:
        os._exit(status)


class ForkedWorker:
    """A forked child that runs one job at a time; see the module docstring.

    ``await call(fn, *args, progress=p)`` runs ``fn(*args, progress=…)`` in the child and
    returns its result or raises its exception; ``busy`` says whether a job is running.  When
    the child is gone (it died, or a job was cancelled), ``usable`` is False and callers run
    their jobs themselves.
    """

    def __init__(self, pid: int, jobs_fd: int, results_fd: int):
        self.pid = pid
        self._jobs = trio.lowlevel.FdStream(jobs_fd)
        self._results = trio.lowlevel.FdStream(results_fd)
        self._buf = bytearray()
        self.busy = False
        self.usable = True

    @classmethod
    def start(cls) -> "ForkedWorker | None":
        """Fork the child (call it while no other thread is busy); None where fork is missing."""
        if not hasattr(os, "fork"):
            return None
        fds = []
        try:
            jobs_r, jobs_w = os.pipe()
            fds += [jobs_r, jobs_w]
            res_r, res_w = os.pipe()
            fds += [res_r, res_w]
            pid = os.fork()
        except OSError:  # no more processes or memory: the caller restores in threads
            for fd in fds:
                os.close(fd)
            return None
        if pid == 0:  # the child never returns from here
            os.close(jobs_w)
            os.close(res_r)
            _serve(jobs_r, res_w)
        os.close(jobs_r)
        os.close(res_w)
        return cls(pid, jobs_w, res_r)

    async def _frame(self):
        while True:
            if len(self._buf) >= _LEN.size:
                n = _LEN.unpack_from(self._buf)[0]
                if len(self._buf) >= _LEN.size + n:
                    data = bytes(self._buf[_LEN.size:_LEN.size + n])
                    del self._buf[:_LEN.size + n]
                    return pickle.loads(data)
            chunk = await self._results.receive_some(1 << 16)
            if not chunk:
                return None
            self._buf += chunk

    async def call(self, fn, *args, progress: Progress | None = None):
        if self.busy or not self.usable:
            raise RuntimeError("the forked worker is busy or gone")
        self.busy = True
        finished = False
        relayed = 0
        try:
            data = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
            try:
                await self._jobs.send_all(_LEN.pack(len(data)) + data)
            except (trio.BrokenResourceError, OSError) as e:
                raise WorkerGone(f"the restoring process has gone away ({e})") from None
            while True:
                msg = await self._frame()
                if msg is None:
                    raise WorkerGone("the restoring process exited unexpectedly")
                kind, value = msg
                if kind == "p":
                    if progress is not None:
                        progress.add_bytes(value)
                        relayed += value
                    continue
                finished = True
                if kind == "ok":
                    return value
                raise value
        finally:
            self.busy = False
            if not finished:
                # cancelled, or the child died: make sure it writes nothing more before the
                # caller removes the job's temporary tree (and runs the job again, counting anew)
                self._kill()
                if relayed:
                    progress.add_bytes(-relayed)

    def _kill(self) -> None:
        self.usable = False
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap()

    def _reap(self) -> None:
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.pid = 0

    async def aclose(self) -> None:
        """Let the child finish (it exits when its job pipe closes) and reap it."""
        self.usable = False
        with trio.CancelScope(shield=True):
            await self._jobs.aclose()
            if self.pid:
                await trio.to_thread.run_sync(self._reap)
            await self._results.aclose()
