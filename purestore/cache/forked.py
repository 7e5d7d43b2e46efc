"""A forked copy of ``pure copy`` that compresses (push) or restores (substitution) one path at
a time, next to the command's own threads.

Restoring a NAR keeps a core busy with Python work between system calls (parsing the NAR,
creating files), and so does dumping one.  Two such threads of one process mostly hand the GIL
back and forth: each of the ~5 system calls per file releases it, and every hand-over is a
context switch (23,000 of them for the benchmark closure, against 3,000 with one restoring
thread).  A worker *process*
started with a forkserver or ``spawn`` avoids that, but it imports everything again (~0.2 s of
CPU on two cores, more than it saves).  A plain ``fork`` of the running command costs a few
milliseconds: the child has every module already imported.

:class:`ForkedWorker` forks such a child, sends it one job at a time (a module-level function
and its arguments, pickled) and relays its byte progress.  The child serves jobs until the
parent closes the job socket; the parent kills it when a job is cancelled, so that the caller
can remove the job's temporary tree or file knowing nobody writes into it any more.

A job can also be fed a stream (``feed=``, an async iterable of bytes: a NAR downloaded over
HTTP by the parent's event loop): it goes through a pipe of its own, passed to the child with
the job, and the job reads it where its arguments hold :class:`DATA`.  The pipe's end is the
stream's end; a download that fails closes it early and the parent reports the download's error.

Forking copies the process as it is: a lock that another thread holds at that moment stays held
in the child forever.  So the worker must be started while no other thread of the process is
doing anything (the CLI, before the substitution starts); library callers do not get one unless
they ask for it.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import signal
import socket
import struct
import threading

import trio

from ..errors import CacheError
from .progress import Progress


class WorkerGone(CacheError):
    """The child died (or could not be reached) during a job: run the job in-process instead."""


class DATA:
    """Stands, among a job's arguments, for the ``next_chunk`` callable of its fed stream."""


_JOB_MAX = 1 << 20  # a job's pickled call, in one message
_PIPE_SIZE = 1 << 20  # asked for the data pipes (Linux gives at most /proc/sys/fs/pipe-max-size)

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


def _release_inherited(keep: set[int]) -> None:
    """Let go of every descriptor inherited from the parent but ``keep``: its sockets must
    close when the parent closes them (a server waits for that; the parent's epoll would go on
    reporting a socket a child still holds), its database and lock files are none of ours.

    Each is pointed at /dev/null rather than closed, so that its number is not reused: an object
    copied from the parent that closes its descriptor when collected then closes /dev/null, not
    a file this child opened since."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    keep = keep | {null}
    for name in names:
        fd = int(name)
        if fd not in keep:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass  # the directory listing's own descriptor, already closed


def _serve(jobs: socket.socket, results_fd: int) -> None:
    """The child: run each job received on ``jobs`` (one message each, with the read end of its
    data pipe if it is fed), answer on ``results_fd``; exit when the parent closes ``jobs``."""
    status = 0
    try:
        # trio's handlers belong to the parent's event loop: the child dies of a plain signal
        # (the parent removes what it was writing) and never writes to the parent's wakeup fd
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        _release_inherited({0, 1, 2, jobs.fileno(), results_fd})
        wlock = threading.Lock()
        while True:
            data, fds, _flags, _addr = socket.recv_fds(jobs, _JOB_MAX, 1)
            if not data:
                break
            progress = _PipeProgress(results_fd, wlock)
            try:
                fn, args = pickle.loads(data)
                if fds:
                    def next_chunk(fd=fds[0]) -> bytes:
                        return os.read(fd, _PIPE_SIZE)
                    args = tuple(next_chunk if a is DATA else a for a in args)
                result = ("ok", fn(*args, progress=progress))
            except Exception as e:
                result = ("err", _portable(e))
            finally:
                for fd in fds:
                    os.close(fd)  # the parent's writes fail now, if it is still writing
            progress.flush()
            _write_frame(results_fd, result, wlock)
    except BaseException:
        status = 1
    finally:
        os._exit(status)


class ForkedWorker:
    """A forked child that runs one job at a time; see the module docstring.

    ``claim()``, then ``await call(fn, *args, progress=p, feed=chunks)`` runs
    ``fn(*args, progress=…)`` in the child and returns its result or raises its exception, then
    ``release()``.  When the child is gone (it died, or a job was cancelled), ``usable`` is
    False, ``claim()`` says no, and callers run their jobs themselves.
    """

    def __init__(self, pid: int, jobs: socket.socket, results_fd: int):
        self.pid = pid
        self._jobs = jobs  # blocking: a job is one small message, and the child reads them all
        self._results = trio.lowlevel.FdStream(results_fd)
        self._buf = bytearray()
        self.busy = False
        self.usable = True

    @classmethod
    def start(cls) -> "ForkedWorker | None":
        """Fork the child (call it while no other thread is busy); None where fork is missing
        or fails."""
        if not hasattr(os, "fork"):
            return None
        made: list = []
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            made += [parent_end, child_end]
            res_r, res_w = os.pipe()
            made += [res_r, res_w]
            pid = os.fork()
        except OSError:  # no more processes or memory: the caller works in threads
            for x in made:
                x.close() if isinstance(x, socket.socket) else os.close(x)
            return None
        if pid == 0:  # the child never returns from here
            parent_end.close()
            os.close(res_r)
            _serve(child_end, res_w)
        child_end.close()
        os.close(res_w)
        return cls(pid, parent_end, res_r)

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

    def claim(self) -> bool:
        """Take the worker for one :meth:`call` (True), unless it is busy or gone; give it back
        with :meth:`release`.  Claim it before awaiting anything on the way to the call."""
        if self.busy or not self.usable:
            return False
        self.busy = True
        return True

    def release(self) -> None:
        self.busy = False

    async def call(self, fn, *args, progress: Progress | None = None, feed=None):
        """Run the job in the child (the caller has claimed the worker)."""
        if not self.busy or not self.usable:
            raise RuntimeError("the forked worker must be claimed first, and not be gone")
        finished = False
        relayed = 0
        feed_error: list[BaseException] = []
        data_w = None
        try:
            job = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
            fds = []
            if feed is not None:
                data_r, data_w = os.pipe()
                fds = [data_r]
                try:
                    fcntl.fcntl(data_w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
                except OSError:
                    pass  # a smaller pipe only means more, smaller reads
            try:
                socket.send_fds(self._jobs, [job], fds)
            except OSError as e:
                raise WorkerGone(f"the restoring process has gone away ({e.strerror or e})") from None
            finally:
                for fd in fds:
                    os.close(fd)  # the child has its own copy now

            async def pump(data: trio.lowlevel.FdStream) -> None:
                try:
                    async for chunk in feed:
                        await data.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the child stopped reading: its result says why
                except Exception as e:  # the download failed: the child sees the stream end early
                    feed_error.append(e)  # (noted before the child can answer, so it is not missed)
                finally:
                    data.close()  # the end of the stream for the child; no checkpoint

            msg = None
            async with trio.open_nursery() as nursery:  # nothing raised in here but Cancelled
                if data_w is not None:
                    nursery.start_soon(pump, trio.lowlevel.FdStream(data_w))
                    data_w = None  # the stream owns it
                while True:
                    msg = await self._frame()
                    if msg is None or msg[0] != "p":
                        break
                    if progress is not None:
                        progress.add_bytes(msg[1])
                        relayed += msg[1]
                nursery.cancel_scope.cancel()
            if msg is None:
                raise WorkerGone("the restoring process exited unexpectedly")
            kind, value = msg
            finished = True
            if feed_error:  # the download failed (the child then saw a short stream): that is why
                raise feed_error[0]
            if kind == "ok":
                return value
            raise value
        finally:
            if data_w is not None:
                os.close(data_w)
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
        """Let the child finish (it exits when its job socket closes) and reap it."""
        self.usable = False
        with trio.CancelScope(shield=True):
            self._jobs.close()
            if self.pid:
                await trio.to_thread.run_sync(self._reap)
            await self._results.aclose()


async def run_claimed(worker: ForkedWorker | None, job, cleanup):
    """Run ``job()`` (an async call of ``worker``) with the worker claimed and return
    ``(True, its result)``; ``(False, None)`` when the worker is missing or busy, or died during
    the job, and the caller then does the job itself.

    ``cleanup()`` (blocking; run in a thread, shielded) removes what a job that did not finish
    may have left: after the child died, and when the job was cancelled (the child is killed
    then).  A job's own error needs none: the job removed its output before raising it."""
    if worker is None or not worker.claim():
        return False, None
    try:
        return True, await job()
    except WorkerGone:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(cleanup)
        return False, None
    except BaseException as e:
        if not isinstance(e, Exception):  # cancelled, interrupted
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(cleanup)
        raise
    finally:
        worker.release()
