"""Pure evaluation: an audit hook that refuses what an expression must not do.

While :func:`pure_mode` is active (in the current thread or task: the flag is a context variable),
the hook refuses, by raising :class:`PurityError`:

- network access (creating sockets, name lookups, ``urllib`` requests);
- subprocesses and ``exec*`` (``subprocess``, ``os.system``, ``os.exec*``, ``os.spawn*``,
  ``os.posix_spawn``, ``os.fork``, ``pty.spawn``), loading C libraries with ``ctypes``;
- writing or changing files (``open`` for writing, ``os.remove``, ``os.rename``, ``os.mkdir`` ...);
- reading files or listing directories outside the allowed roots: the expression's directory
  tree, the package set, ``-I`` roots, paths given to ``source()``, and Python's own library
  (so that ``import json`` works).

The environment (``os.environ``) is empty while pure mode is on.  Every refusal is also recorded,
so evaluation fails even if the expression catches the exception.

Audit hooks cannot be removed, so one hook is installed for the life of the process; it costs one
context variable lookup per audited event when pure mode is off.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import sysconfig
from typing import Iterator

from ..errors import PurityError

_NETWORK = {
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.gethostname", "socket.sendto", "socket.sendmsg", "socket.getnameinfo",
    "urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect", "nntplib.connect",
    "poplib.connect", "imaplib.open", "telnetlib.Telnet.open", "webbrowser.open",
}
_PROCESS = {
    "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "pty.spawn", "os.startfile", "ctypes.dlopen", "os.kill", "os.killpg", "signal.pthread_kill",
}
_WRITE = {
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate", "os.chmod",
    "os.chown", "os.chflags", "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.copyfile",
    "shutil.copymode", "shutil.copystat", "shutil.move", "shutil.chown", "os.mkfifo", "os.mknod",
    "os.putenv", "os.unsetenv", "tempfile.mkstemp", "tempfile.mkdtemp", "os.chdir",
}
_READDIR = {"os.listdir", "os.scandir", "os.listxattr", "os.getxattr", "glob.glob", "os.walk", "os.fwalk"}
_WATCHED = _NETWORK | _PROCESS | _WRITE | _READDIR | {"open"}

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class PureMode:
    """What one pure evaluation allows, and the refusals it saw."""

    def __init__(self, roots: list[str], where):
        self.roots = [_norm(r) for r in roots]
        self.where = where  # callable giving " (at file:line)" for the current expression frame
        self.refusals: list[PurityError] = []
        self.dynamic: list[str] = []  # more roots, added while evaluating (source() paths)

    def allow(self, path: str) -> None:
        self.roots.append(_norm(path))
        self.roots.append(_norm(os.path.realpath(path)))

    def allowed(self, path: str) -> bool:
        for r in self.roots + self.dynamic:
            if path == r or path.startswith(r if r.endswith("/") else r + "/"):
                return True
        return False

    def refuse(self, what: str) -> None:
        err = PurityError(f"pure evaluation refused {what}{self.where()}",
                          hint="expressions may only read their own directory tree, the package set, "
                               "-I roots and paths given to source(); no network, subprocesses or writes")
        self.refusals.append(err)
        raise err


def _norm(p: str) -> str:
    return os.path.normpath(os.path.abspath(p))


_MODE: contextvars.ContextVar[PureMode | None] = contextvars.ContextVar("purestore_pure_mode", default=None)
_installed = False
_active = 0


def _system_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            roots.add(sysconfig.get_path(key))
        except KeyError:
            pass
    roots.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the purestore package
    if sys.pycache_prefix:  # bytecode of the above, when kept elsewhere (PYTHONPYCACHEPREFIX)
        roots.add(sys.pycache_prefix)
    roots.update(("/dev/null", "/dev/urandom", "/dev/random"))
    return [r for r in roots if r]


def _path_of(arg) -> str | None:
    if isinstance(arg, int):
        return None  # an fd already open
    if isinstance(arg, bytes):
        arg = os.fsdecode(arg)
    if not isinstance(arg, str):
        try:
            arg = os.fspath(arg)
        except TypeError:
            return None
        if isinstance(arg, bytes):
            arg = os.fsdecode(arg)
    return _norm(arg)


def _hook(event: str, args) -> None:
    if not _active or event not in _WATCHED:
        return
    mode = _MODE.get()
    if mode is None:
        return
    if event == "open":
        path, fmode, flags = (tuple(args) + (None, None, None))[:3]
        p = _path_of(path)
        if p is None:
            return
        writing = (isinstance(fmode, str) and any(c in fmode for c in "wax+")) or \
                  (isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing:
            mode.refuse(f"to open {p!r} for writing: evaluation must not write files")
        if not mode.allowed(p):
            mode.refuse(f"to read {p!r}: it is outside the expression's directory tree, the package set, "
                        f"the -I roots and the paths given to source()")
        return
    if event in _READDIR:
        p = _path_of(args[0]) if args and args[0] is not None else _norm(".")
        if p is not None and not mode.allowed(p):
            mode.refuse(f"to list the directory {p!r}: it is outside the expression's directory tree, "
                        f"the package set, the -I roots and the paths given to source()")
        return
    if event in _NETWORK:
        mode.refuse(f"network access ({event}{_brief(args)})")
    if event in _PROCESS:
        what = ("to load a C library" if event == "ctypes.dlopen" else
                "to send a signal" if event in ("os.kill", "os.killpg", "signal.pthread_kill") else
                "to run a process")
        mode.refuse(f"{what} ({event}{_brief(args)})")
    if event in _WRITE:
        mode.refuse(f"to change the file system or the environment ({event}{_brief(args)})")


def _brief(args) -> str:
    try:
        shown = ", ".join(repr(a)[:60] for a in args[:2])
    except Exception:  # audit args can be anything; never fail while describing them
        return ""
    return f" {shown}" if shown else ""


def install() -> None:
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True


@contextlib.contextmanager
def pure_mode(roots: list[str], where=lambda: "") -> Iterator[PureMode]:
    """Run the body in pure mode allowing reads under ``roots`` (plus Python's library)."""
    global _active
    install()
    mode = PureMode(list(roots) + _system_roots(), where)
    saved_environ = os.environ
    saved_environb = getattr(os, "environb", None)
    token = _MODE.set(mode)
    _active += 1
    # Imports made during evaluation (stdlib or purestore modules not yet compiled) must not try
    # to write .pyc files: that is a write pure mode refuses, and it is not the expression's doing.
    saved_dont_write_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    os.environ = {}  # type: ignore[assignment]
    if saved_environb is not None:
        os.environb = {}  # type: ignore[assignment]
    try:
        yield mode
    finally:
        os.environ = saved_environ
        if saved_environb is not None:
            os.environb = saved_environb
        sys.dont_write_bytecode = saved_dont_write_bytecode
        _active -= 1
        _MODE.reset(token)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Lift pure mode for purestore's own work inside an evaluation (hashing a source() tree)."""
    token = _MODE.set(None)
    try:
        yield
    finally:
        _MODE.reset(token)
