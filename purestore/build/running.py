"""Helpers of the scheduler: running one sandboxed builder, or one builtin builder, under trio
within the limits of the settings, group-committed ``syncfs``, lock waits, build directory
clean-up, exception-group unwrapping."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import trio

from ..errors import BuildError, HashMismatch, PurestoreError, SandboxError
from . import sandbox as sb
from ._builtin_child import ERROR_MARK
from ..store.fstree import remove_tree
from .logs import BuildLog


class Sandboxed:
    """A finished sandbox whose namespaces may still be tearing down: :meth:`reap` waits for that."""

    def __init__(self, sandbox: sb.Sandbox):
        self.sandbox = sandbox

    async def reap(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                if self.sandbox.pidfd >= 0:
                    await trio.lowlevel.wait_readable(self.sandbox.pidfd)
            finally:
                self.sandbox.close()


class BuildLimitExceeded(BuildError):
    """A builder went past a limit of the settings (``max-silent-time``, ``timeout``,
    ``max-build-log-size``) and was killed; the message says which (``timed out after 5 seconds
    of silence``), to follow "builder for X"."""


def _seconds(n: int) -> str:
    return f"{n} second{'s' if n != 1 else ''}"


async def run_sandboxed(server: sb.ForkServer, spec: sb.SandboxSpec, log: BuildLog, *,
                        max_silent_time: int = 0, timeout: int = 0,
                        max_log_size: int = 0) -> tuple[int, Sandboxed]:
    """Run the builder; feed its output to ``log``; return its exit status as soon as it is known
    (with a handle to reap the sandbox later).  On cancellation the whole sandbox is SIGKILLed and
    reaped before the Cancelled propagates.  Raises :class:`SandboxError` if it could not be set up,
    :class:`BuildLimitExceeded` (after killing and reaping the sandbox) when the builder wrote
    nothing for ``max_silent_time`` seconds, ran longer than ``timeout`` seconds, or wrote more
    than ``max_log_size`` bytes (each 0: no limit)."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        sandbox = sb.spawn(server, spec, out_w)
    except BaseException:
        os.close(out_r)
        raise
    finally:
        os.close(out_w)
    handle = Sandboxed(sandbox)
    stream = trio.lowlevel.FdStream(out_r)
    err_stream = trio.lowlevel.FdStream(os.dup(sandbox.status_fd))
    inf = float("inf")
    deadline = trio.current_time() + timeout if timeout else inf

    async def receive(s: trio.lowlevel.FdStream, size: int) -> bytes:
        """The next bytes of ``s`` within the limits (silence counts on the status pipe too: a
        builder that closed its output and hangs is as silent as one that writes nothing)."""
        silent_until = trio.current_time() + max_silent_time if max_silent_time else inf
        with trio.move_on_at(min(deadline, silent_until)):
            return await s.receive_some(size)
        if trio.current_time() >= deadline:
            raise BuildLimitExceeded(f"timed out after {_seconds(timeout)} (setting timeout)")
        raise BuildLimitExceeded(f"timed out after {_seconds(max_silent_time)} of silence (setting max-silent-time)")

    try:
        try:
            while True:
                data = await receive(stream, 65536)
                if not data:
                    break
                log.write(data)
                if max_log_size and log.size > max_log_size:
                    raise BuildLimitExceeded(f"was killed after writing more than {max_log_size} bytes of "
                                             f"log output (setting max-build-log-size)")
            status = b""
            while True:
                chunk = await receive(err_stream, 4096)
                status += chunk
                code, err = sb.parse_status(status)
                if code is not None or not chunk:
                    break
        except BaseException:
            sandbox.kill()
            await handle.reap()
            raise
        if err or code is None:
            await handle.reap()
            raise SandboxError(err or "the sandbox ended without reporting a status")
        return code, handle
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
            await err_stream.aclose()


_CHILD = ("import sys; sys.path.insert(0, {root!r}); from purestore.build._builtin_child import main; "
          "sys.exit(main(sys.argv[1:]))")


async def run_builtin(builder: str, drv_aterm: bytes, out: str, log: BuildLog, *,
                      max_silent_time: int = 0, timeout: int = 0, max_log_size: int = 0) -> None:
    """Run the builtin builder ``builder`` (``builtin:fetchurl``, …) for the derivation
    ``drv_aterm`` in a process of its own (:mod:`._builtin_child`), making ``out``; feed its
    lines to ``log``.  The same limits as :func:`run_sandboxed` apply, progress of a download
    counting as output for ``max_silent_time``.  Raises :class:`BuildLimitExceeded` when one is
    passed, :class:`~purestore.errors.HashMismatch` or :class:`~purestore.errors.BuildError` when
    the builder fails; on any of these and on cancellation its whole process group is SIGKILLed
    and reaped first."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CHILD.format(root=root), builder, out, str(os.getpid())], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    inf = float("inf")
    now = trio.current_time()
    deadline = now + timeout if timeout else inf
    last = [now]
    err = bytearray()
    exceeded: list[BaseException] = []

    async def feed() -> None:
        try:
            await proc.stdin.send_all(drv_aterm)
            await proc.stdin.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # (it died: its status says why)

    async def pump(stream, sink, scope: trio.CancelScope) -> None:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            last[0] = trio.current_time()
            try:
                sink(data)
            except BaseException as e:  # a full disk under the log
                exceeded.append(e)
                scope.cancel()
                return
            if max_log_size and log.size > max_log_size:
                exceeded.append(BuildLimitExceeded(
                    f"was killed after writing more than {max_log_size} bytes of log output "
                    f"(setting max-build-log-size)"))
                scope.cancel()
                return

    async def watch(scope: trio.CancelScope) -> None:
        while True:
            silent_until = last[0] + max_silent_time if max_silent_time else inf
            await trio.sleep_until(min(deadline, silent_until))
            t = trio.current_time()
            if t >= deadline:
                exceeded.append(BuildLimitExceeded(f"timed out after {_seconds(timeout)} (setting timeout)"))
            elif max_silent_time and t >= last[0] + max_silent_time:
                exceeded.append(BuildLimitExceeded(
                    f"timed out after {_seconds(max_silent_time)} of silence (setting max-silent-time)"))
            else:
                continue
            scope.cancel()
            return

    def kill() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # (not reaped yet: its pid is still its group's)
        except ProcessLookupError:
            pass

    try:
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(watch, outer.cancel_scope)
                async with trio.open_nursery() as pipes:
                    pipes.start_soon(feed)
                    pipes.start_soon(pump, proc.stdout, log.write, outer.cancel_scope)
                    pipes.start_soon(pump, proc.stderr, err.extend, outer.cancel_scope)
                code = await proc.wait()
                outer.cancel_scope.cancel()
            if exceeded:
                raise exceeded[0]
        except BaseException:
            if proc.returncode is None:
                kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
            raise
    finally:
        with trio.CancelScope(shield=True):
            for s in (proc.stdin, proc.stdout, proc.stderr):
                await s.aclose()
    if code == 0:
        return
    text = err.decode(errors="replace")
    if code == 1 and ERROR_MARK in text:
        report = json.loads(text.rsplit(ERROR_MARK, 1)[1])
        raise (HashMismatch if report["kind"] == "HashMismatch" else BuildError)(report["message"])
    how = (f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
    tail = "\n".join(text.lstrip(".").strip().splitlines()[-10:])
    raise BuildError(f"builtin builder {builder!r} {how}" + (f":\n{tail}" if tail else ""))


class GroupSync:
    """Group commit for ``syncfs``: whoever arrives while a flush runs shares the next one.

    A flush covers everything written before it started, so a waiter needs the flush after the
    one in progress; one such flush serves all who arrived meanwhile."""

    def __init__(self, path: str):
        self.path = path
        self.busy = False
        self.waiters: trio.Event | None = None
        self.error: BaseException | None = None

    async def _flush(self) -> None:
        from ..store.local import _syncfs
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_syncfs, self.path)

    async def sync(self) -> None:
        if self.busy:
            if self.waiters is None:
                self.waiters = trio.Event()
            ev = self.waiters
            await ev.wait()
            if self.error is not None:
                raise self.error
            return
        self.busy = True
        try:
            await self._flush()
            while self.waiters is not None:
                ev, self.waiters = self.waiters, None
                try:
                    await self._flush()
                    self.error = None
                except BaseException as e:
                    self.error = e
                    raise
                finally:
                    ev.set()
        finally:
            self.busy = False


def leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [x for sub in e.exceptions for x in leaves(sub)]
    return [e]


def unwrap(eg: BaseExceptionGroup) -> BaseException:
    """The one exception to raise for a nursery's group: Ctrl-C first, then a purestore error."""
    found = leaves(eg)
    for kind in (KeyboardInterrupt, SystemExit, PurestoreError):
        for e in found:
            if isinstance(e, kind):
                return e
    return found[0] if len(found) == 1 else eg


def keep_dir(top: str, name: str) -> str:
    """Move a failed build's top dir out of the store's temp area (which is cleaned on open)."""
    dest = tempfile.mkdtemp(prefix=f"pure-build-{name}-")
    os.rmdir(dest)
    try:
        os.rename(top, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            return top
        shutil.copytree(top, dest, symlinks=True)
        remove_tree(top)
    return dest
