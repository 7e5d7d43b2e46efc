"""Start a program that sees a rooted store at its logical store dir.

A rooted store (``--store ROOT``) keeps its files in ``ROOT/pure/store`` while every path in it
says ``/pure/store``.  To run something from it, :func:`spawn` forks a child that

1. enters a new mount namespace (and a user namespace mapping the caller's uid/gid to itself
   when not root), and makes every mount private so nothing propagates to the host;
2. mounts a tmpfs on ``<state_dir>/ns-root`` and builds a new root there: every top-level entry
   of the host's ``/`` is bind-mounted (recursively) or re-created as a symlink, except the
   directories leading to the store dir, which are re-created with their other entries bound;
3. bind-mounts the real store dir at the logical store dir (read-only), ``chroot``s into the new
   root, returns to the working directory, and ``exec``s the program.

The parent waits and returns the exit status; it keeps the store open meanwhile, so the
program's closure stays temp-rooted (a ``pure gc`` during the session does not touch it).
Meanwhile pure ignores Ctrl-C and SIGQUIT (the terminal sends them to the program as well) and
passes SIGTERM and SIGHUP on to the program, as if the program had been ``exec``ed (which is
what ``nix shell -c`` does): the program decides, and pure ends with its status.  pure killed
outright (SIGKILL) kills the program (its parent-death signal), which would otherwise run on
unrooted.  SIGINT, SIGQUIT, SIGTERM and SIGHUP that pure was started with ignored (``nohup``, a
script's background job) stay ignored for the program.
With the default root ``/`` no namespace is needed and the program runs directly (still as a
child, for the same reason).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from typing import Mapping, Sequence

from ..errors import ShellError

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

# sent to pure while the program runs, these are passed on to it (pure then exits with its status)
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

_libc = ctypes.CDLL(None, use_errno=True)  # libc is loaded already; find_library("c") forks ldconfig (30 ms)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
PR_SET_PDEATHSIG = 1


class ExitStatus(int):
    """A program's exit status: an ``int`` (128 + N when it was killed by signal N) that also
    says by which signal, ``signal`` (None when it exited)."""

    signal: int | None

    def __new__(cls, status: int, signal: int | None = None) -> "ExitStatus":
        self = super().__new__(cls, status)
        self.signal = signal
        return self


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None,
                       flags, data.encode() if data else None), f"mount {src or fstype} on {dst}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _bind_entries(host_dir: str, new_dir: str, skip: str | None) -> None:
    """Re-create ``host_dir``'s entries (except ``skip``) under ``new_dir`` as binds or links."""
    try:
        names = os.listdir(host_dir)
    except FileNotFoundError:
        return
    for n in names:
        if n == skip:
            continue
        src, dst = os.path.join(host_dir, n), os.path.join(new_dir, n)
        try:
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            elif os.path.isdir(src):
                os.mkdir(dst)
                _mount(src, dst, None, MS_BIND | MS_REC)
            else:
                open(dst, "w").close()
                _mount(src, dst, None, MS_BIND)
        except OSError:
            continue  # an entry we may not bind (e.g. a special file): leave it out


def enter_store_namespace(real_store_dir: str, store_dir: str, scratch: str, cwd: str) -> None:
    """Steps 1-3 of the module docstring, in the calling (single-threaded) process."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    else:
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(CLONE_NEWUSER|CLONE_NEWNS)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", scratch, "tmpfs", 0, "mode=0755")
    parts = [p for p in store_dir.split("/") if p]
    host, new = "/", scratch
    for p in parts:
        _bind_entries(host, new, p)
        host, new = os.path.join(host, p), os.path.join(new, p)
        os.mkdir(new, 0o755)
    _mount(real_store_dir, new, None, MS_BIND | MS_REC)
    try:
        _mount(None, new, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_REC)
    except OSError:
        pass  # read-only is hygiene, not a requirement
    os.chroot(scratch)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")


def _why_not_executed(path: str, err: int) -> str | None:
    """Why ``execve(path)`` failed with ENOENT although ``path`` is there (the interpreter its
    ``#!`` line names, or an ELF program's dynamic loader, is missing), or with ENOEXEC (it has
    no ``#!`` line).  None when ``path`` itself is missing or this cannot be told."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if err == errno.ENOEXEC:
        return None if head.startswith((b"#!", b"\x7fELF")) else \
            "Exec format error: it is neither an ELF program nor a script starting with a #! line"
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        if words:
            interp = os.fsdecode(words[0])
            if not os.path.exists(interp):
                return f"the interpreter its #! line names, {interp!r}, does not exist"
            return f"the interpreter its #! line names, {interp!r}, cannot be started: No such file or directory"
    elif head.startswith(b"\x7fELF"):
        return "its dynamic loader (the ELF interpreter it names) does not exist"
    return None


def spawn(argv: Sequence[str], env: Mapping[str, str], *, settings, cwd: str | None = None) -> ExitStatus:
    """Run ``argv`` (``argv[0]`` an absolute path as seen inside) with ``env``; wait; return its
    exit status (128 + signal number when killed by a signal, which ``.signal`` names).

    For a rooted store the child enters the store namespace first.  Raises :class:`ShellError`
    when the namespace cannot be set up or the program cannot be started.
    """
    cwd = cwd or os.getcwd()
    scratch = own_scratch = None
    if settings.rooted:
        scratch = os.path.join(settings.state_dir, "ns-root")
        try:
            os.makedirs(scratch, exist_ok=True)
        except OSError:  # a store this user only reads: a mount point of its own, removed after
            import tempfile
            try:
                scratch = own_scratch = tempfile.mkdtemp(prefix="pure-ns-root-")
            except OSError as e:
                raise ShellError(f"cannot make a mount point for the store namespace: {e.strerror}") from e
    try:
        return _spawn(argv, env, settings, cwd, scratch)
    finally:
        if own_scratch is not None:
            try:
                os.rmdir(own_scratch)
            except OSError:
                pass


def _spawn(argv: Sequence[str], env: Mapping[str, str], settings, cwd: str, scratch: str | None) -> ExitStatus:
    r, w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    # a signal that pure was started with ignored (`nohup pure run …`: SIGHUP; `pure run … &`
    # in a script: SIGINT and SIGQUIT) stays ignored for the program, as across an exec
    ignored = {s for s in (signal.SIGINT, signal.SIGQUIT, *FORWARDED_SIGNALS)
               if signal.getsignal(s) is signal.SIG_IGN}
    # SIGTERM and SIGHUP sent to pure go on to the program, and pure waits for it.  The
    # handlers are in place before the fork: blocking a signal holds it back in this thread
    # only, and one taken by another thread (a worker of an earlier trio run) ran the handler
    # in place then, the CLI's (pure ended with "terminated", the program left running on).
    # One that comes before the program's pid is known is passed on once it is.
    child: list[int] = []
    early: list[int] = []

    def forward(signum, frame):
        if not child:
            early.append(signum)
            return
        try:
            os.kill(child[0], signum)
        except ProcessLookupError:  # it has just exited: waitpid has its status
            pass

    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_quit = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    # (one ignored stays so: the program ignores it too)
    old_forwarded = {signum: signal.signal(signum, forward)
                     for signum in FORWARDED_SIGNALS if signum not in ignored}

    def restore() -> None:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGQUIT, old_quit)
        for signum, old in old_forwarded.items():
            signal.signal(signum, old)

    try:
        pid = os.fork()
    except BaseException:
        restore()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise
    if pid == 0:  # child: only async-signal-safe-ish work, then exec or _exit
        try:
            os.close(r)
            for signum in (signal.SIGINT, signal.SIGQUIT, *FORWARDED_SIGNALS):
                signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
            # Python ignores these, and an ignored signal stays ignored across exec: the program
            # (and every command of the shell) would get EPIPE instead of being ended by SIGPIPE
            # (subprocess's restore_signals does the same)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if scratch is not None:
                enter_store_namespace(settings.real_store_dir, settings.store_dir, scratch, cwd)
            # pure killed (SIGKILL, the OOM killer) kills the program too, as if it had been
            # exec'ed: it would otherwise run on, its closure no longer temp-rooted (set after
            # the namespace's change of credentials, which may clear it)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # (pure died before the prctl)
                os._exit(128 + signal.SIGKILL)
            os.execve(argv[0], list(argv), dict(env))
        except BaseException as e:  # noqa: BLE001 - reported to the parent through the pipe
            try:
                stage = "start " + argv[0] if isinstance(e, OSError) and e.filename == argv[0] else "set up the store namespace"
                msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                if isinstance(e, OSError) and e.filename == argv[0] and e.errno in (errno.ENOENT, errno.ENOEXEC):
                    msg = _why_not_executed(argv[0], e.errno) or msg
                os.write(w, f"{stage}\0{msg}\0{getattr(e, 'errno', 0) or 0}".encode())
            finally:
                os._exit(127)
    os.close(w)
    child.append(pid)
    try:
        for signum in early:
            forward(signum, None)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        with os.fdopen(r, "rb") as f:
            report = f.read()
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    finally:
        restore()
    if report:
        stage, msg, err = report.decode(errors="replace").split("\0")
        hint = None
        if stage.startswith("set up") and int(err or 0) in (errno.EPERM, errno.EINVAL, errno.ENOSPC):
            hint = "user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone)"
        raise ShellError(f"cannot {stage}: {msg}", hint=hint)
    if os.WIFSIGNALED(status):
        return ExitStatus(128 + os.WTERMSIG(status), os.WTERMSIG(status))
    return ExitStatus(os.WEXITSTATUS(status))
