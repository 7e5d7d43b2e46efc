"""The Linux build sandbox: a fresh set of namespaces, a private root, only the declared inputs.

How a sandboxed build is spawned (all through libc via ctypes, no helper binary)::

    pure --socket--> fork server --fork--> middle --fork--> builder (PID 1 of a new PID ns)

* The fork server (:class:`ForkServer`, code in ``_forkserver.py``) is a small Python process
  started once per ``pure`` run: forking it is much cheaper than forking ``pure``.
* ``middle`` unshares the user, mount, PID, IPC, UTS and (unless the build may use the network)
  network namespaces, maps uid 1000 / gid 100 inside to the caller's uid/gid outside, forks the
  builder, waits for it, and writes its exit status to the status pipe before exiting.
* The builder (PID 1 of the new PID namespace) sets the hostname ``localhost``, brings up
  loopback, and assembles its root in memory: a tmpfs (read-only once assembled) with ``/build``
  (cwd; bind of the on-disk build dir), ``/tmp`` (tmpfs), ``/proc`` (a new procfs), ``/dev``
  (tmpfs with null, zero, full, random, urandom, tty bound from the host, ``shm``, ``pts`` and
  the fd links), ``/etc`` (generated ``passwd``, ``group``, ``hosts``) and the store dir.  The
  store dir is an overlay: its lower layer is a tmpfs holding one mount point per input, on which
  each input path is bind-mounted read-only; its upper layer is on disk (``top/upper``), so
  whatever the builder creates there (its outputs) lands on the store's file system, ready to be
  renamed into place.  It then ``pivot_root``\\ s, detaches the old root, sets no-new-privs and
  execs the builder with exactly the given environment, stdin ``/dev/null``, stdout and stderr
  the log pipe.  Because uid 1000 is not root inside, exec drops every capability.
* Everything dies with ``pure`` (PR_SET_PDEATHSIG at each level; the builder's whole PID
  namespace dies with the builder).

Setup errors are written to the status pipe and raised here as
:class:`~purestore.errors.SandboxError`.  Everything runs without privileges when unprivileged
user namespaces are enabled, and as root.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Mapping

import attrs

from ..errors import SandboxError

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

SANDBOX_UID = 1000
SANDBOX_GID = 100
SANDBOX_HOSTNAME = "localhost"

_REFUSED = b"\0REFUSED:"  # the server's reply to a malformed request (see _forkserver.py)
# the longest reply: a refusal (its reason at most 4000 bytes); a datagram is cut to what is read
_REPLY_MAX = len(_REFUSED) + 4096
_SERVER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_forkserver.py")


@attrs.frozen
class SandboxSpec:
    """One sandboxed process.

    ``top`` is an empty host directory on the store's file system.  It gets ``build/`` (the build
    dir, ``/build`` inside), ``upper/`` (whatever the builder creates in the store dir, e.g. its
    outputs: see :meth:`host_path`), ``work/`` (overlayfs' work dir) and ``root/`` (the mount
    point of the sandbox's in-memory root, unless ``root_mount`` names a shared one).  ``inputs`` maps logical store paths to their
    physical location.
    """

    argv: tuple[str, ...]
    env: Mapping[str, str]
    top: str
    store_dir: str
    inputs: Mapping[str, str] = attrs.field(factory=dict)
    network: bool = False
    extra_etc: Mapping[str, bytes] = attrs.field(factory=dict)
    root_mount: str | None = None
    ro_base: str | None = None  # physical store dir: inputs under it are canonical paths there


    @property
    def root(self) -> str:
        """Where the in-memory root is mounted (in the sandbox's own mount namespace): the
        shared empty directory ``root_mount`` if given (no per-build directory), else ``top/root``."""
        return self.root_mount or os.path.join(self.top, "root")

    @property
    def build_dir(self) -> str:
        return os.path.join(self.top, "build")

    def host_path(self, logical: str) -> str:
        """Where a path the builder wrote (an output in the store dir, or in /build) is on the host."""
        if logical.startswith(self.store_dir + "/"):
            return os.path.join(self.top, "upper", logical[len(self.store_dir) + 1:])
        if logical == "/build" or logical.startswith("/build/"):
            return self.top + logical
        raise ValueError(f"{logical!r} is neither in the store dir nor in /build")


_PASSWD = (
    "root:x:0:0:Nix build user:/build:/noshell\n"
    "nixbld:x:{uid}:{gid}:Nix build user:/build:/noshell\n"
    "nobody:x:65534:65534:Nobody:/:/noshell\n"
)
_GROUP = "root:x:0:\nnixbld:!:{gid}:\nnogroup:x:65534:\n"
_HOSTS = "127.0.0.1 localhost\n::1 localhost\n"


def prepare_root(spec: SandboxSpec) -> None:
    """Create the host side: ``build/``, ``upper/``, ``work/``, ``root/`` under ``top`` (blocking).

    Everything else (``/etc``, ``/dev``, ``/tmp``, the input mount points) is made in memory
    inside the sandbox, so a build costs four directory creations on disk whatever its inputs.
    """
    try:
        if not os.path.isdir(spec.top):
            os.mkdir(spec.top, 0o700)
        for d in ("build", "upper", "work") + (() if spec.root_mount else ("root",)):
            os.mkdir(os.path.join(spec.top, d), 0o700)
    except OSError as e:
        raise SandboxError(f"cannot prepare the build root in {spec.top!r}: {e}") from e


def _etc_files(spec: SandboxSpec) -> tuple[tuple[str, bytes], ...]:
    files = {name: text.format(uid=SANDBOX_UID, gid=SANDBOX_GID).encode()
             for name, text in (("passwd", _PASSWD), ("group", _GROUP), ("hosts", _HOSTS))}
    if spec.network:
        for name in ("resolv.conf", "services"):
            try:
                with open(f"/etc/{name}", "rb") as src:
                    files[name] = src.read()
            except OSError:
                pass
    files.update(spec.extra_etc)
    return tuple(sorted(files.items()))


# --- spawning -----------------------------------------------------------------------------------


class ForkServer:
    """The process that forks sandboxes (see the module docstring).  One per ``pure`` run;
    thread-safe; :meth:`close` stops it (it also dies with its parent).  When it has died
    (killed, out of memory), the next :meth:`spawn` starts a new one, so that the builds after
    it do not all fail.

    Raises :class:`SandboxError` when it cannot be started.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.closed = False
        self._start()

    def _start(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-S", "-E", _SERVER_FILE, str(b.fileno())], pass_fds=(b.fileno(),),
                stdin=subprocess.DEVNULL, close_fds=True, env={},
                # its own process group: Ctrl-C at the terminal (sent to pure's group) is pure's
                # to handle, and reached the server before it could ignore it, while it loaded
                # its modules (a KeyboardInterrupt traceback on pure's stderr)
                process_group=0,
            )
        except OSError as e:
            a.close()
            raise SandboxError(f"cannot start the sandbox fork server: {e}") from e
        finally:
            b.close()
        self.sock = a

    def spawn(self, req: dict, out_w: int, err_w: int) -> tuple[int, int]:
        """Send one request; returns (pid, pidfd or -1 if it already ended).

        Raises :class:`SandboxError` when the server is gone, or refuses the request as
        malformed (it stays up and serves the next requests)."""
        # The request goes in a memfd, not in the datagram: a SOCK_SEQPACKET message must fit
        # the socket's send buffer (net.core.wmem_default, 208 KiB), and a derivation with a
        # thousand inputs, or a long script in its environment, makes a bigger request.
        data = pickle.dumps(req)
        with self.lock:
            if not self.closed and self.proc.poll() is not None:
                # gone before this request: a new server (a request it was handling when it
                # died is not retried; the error below said so to its requester)
                self.sock.close()
                self._start()
            try:
                req_fd = os.memfd_create("pure-sandbox-request", os.MFD_CLOEXEC)
                try:
                    _write_all(req_fd, data)
                    socket.send_fds(self.sock, [struct.pack("Q", len(data))], [out_w, err_w, req_fd])
                finally:
                    os.close(req_fd)
                msg, fds, _f, _a = socket.recv_fds(self.sock, _REPLY_MAX, 1)
            except OSError as e:
                raise SandboxError(f"the sandbox fork server failed: {e}") from e
        if msg.startswith(_REFUSED):
            for fd in fds:
                os.close(fd)
            why = msg[len(_REFUSED):].decode(errors="replace")
            raise SandboxError(f"the sandbox fork server refused a request (a bug in purestore): {why}")
        if len(msg) != 4:
            raise SandboxError(f"the sandbox fork server died (exit status {self.proc.poll()})")
        return struct.unpack("i", msg)[0], (fds[0] if fds else -1)

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@attrs.define
class Sandbox:
    """A started sandbox: ``pid`` of its middle process, ``pidfd`` (-1 once closed), and
    ``status_fd``, the read end of the status pipe (see :func:`parse_status`)."""

    pid: int
    pidfd: int
    status_fd: int

    def kill(self) -> None:
        """SIGKILL the sandbox (its middle process; the builder's PID namespace dies with it)."""
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for fd in (self.pidfd, self.status_fd):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.status_fd = -1


def make_request(spec: SandboxSpec) -> dict:
    """The plain-data request the fork server gets for ``spec``."""
    top = os.path.realpath(spec.top)
    r = os.path.realpath(spec.root)
    binds = []
    base = spec.ro_base
    real_base = os.path.realpath(base) if base else None
    links = []
    for logical, phys in sorted(spec.inputs.items()):
        if base and phys.startswith(base + "/") and "/" not in phys[len(base) + 1:]:
            real = real_base + phys[len(base):]  # a store path: canonical below the store dir
            if os.path.islink(real):
                # A store path that is a symlink is made as that symlink, as Nix does: a bind
                # mount follows it on the host, which showed the builder whatever the link
                # points to outside the store (and, in a rooted store, failed for a link to
                # another store path, whose logical path the host does not have).
                links.append((r + logical, os.readlink(real)))
                continue
        else:
            real = os.path.realpath(phys)
        binds.append((real, r + logical, os.path.isdir(real)))
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if not spec.network:
        flags |= CLONE_NEWNET
    return {
        "argv": list(spec.argv), "env": dict(spec.env), "top": top, "root": r, "store": r + spec.store_dir,
        "binds": binds, "links": links, "etc": _etc_files(spec), "flags": flags, "network": spec.network,
        "uid": os.geteuid(), "gid": os.getegid(), "uid_inside": SANDBOX_UID, "gid_inside": SANDBOX_GID,
        "hostname": SANDBOX_HOSTNAME, "ro_base": real_base,
    }


def spawn(server: ForkServer, spec: SandboxSpec, stdout: int) -> Sandbox:
    """Start ``spec`` in a new sandbox with stdout and stderr going to fd ``stdout``.

    Read the status pipe (:attr:`Sandbox.status_fd`) for the outcome: setup errors (the builder
    could not be started) come as text, then the exit status.  Raises :class:`SandboxError` when
    the fork server fails.
    """
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid, pidfd = server.spawn(make_request(spec), stdout, err_w)
    except BaseException:
        os.close(err_r)
        raise
    finally:
        os.close(err_w)
    return Sandbox(pid, pidfd, err_r)


STATUS_MARK = b"\0STATUS:"


def parse_status(data: bytes) -> tuple[int | None, str]:
    """Split what the status pipe carried into (builder exit status, or minus the signal that
    killed it, or None if not (yet) reported; setup error message or "")."""
    i = data.find(STATUS_MARK)
    if i < 0 or not data.endswith(b"\n"):
        return None, data.decode(errors="replace")
    return int(data[i + len(STATUS_MARK):-1]), data[:i].decode(errors="replace")


def read_status(err_r: int) -> tuple[int | None, str]:
    """Block until the status pipe reports (or ends) and :func:`parse_status`."""
    data = b""
    while True:
        b = os.read(err_r, 4096)
        if not b:
            break
        data += b
        if parse_status(data)[0] is not None:
            break
    return parse_status(data)


def run_sync(spec: SandboxSpec, server: ForkServer | None = None) -> tuple[int, bytes]:
    """Run ``spec`` to completion (blocking), returning (exit status, or minus the signal that
    killed the builder; combined output).

    For tests and tools (starts a fork server if none is given); the scheduler uses
    :func:`spawn` under trio.  Raises :class:`SandboxError` when the sandbox cannot be set up.
    """
    if not os.path.exists(spec.build_dir):
        prepare_root(spec)
    own = server is None
    if own:
        server = ForkServer()
    try:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            sb = spawn(server, spec, out_w)
        except BaseException:
            os.close(out_r)
            raise
        finally:
            os.close(out_w)
        try:
            chunks = []
            with os.fdopen(out_r, "rb") as f:
                while True:
                    b = f.read1(65536)
                    if not b:
                        break
                    chunks.append(b)
            code, err = read_status(sb.status_fd)
        finally:
            sb.close()
    finally:
        if own:
            server.close()
    if err or code is None:
        raise SandboxError(err or "the sandbox ended without reporting a status")
    return code, b"".join(chunks)


def sandbox_available() -> str | None:
    """None if this machine can create build sandboxes, else the reason it cannot."""
    if not os.path.exists("/proc/self/ns/user"):
        return "the kernel has no user namespaces"
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                return "user namespaces are disabled (user.max_user_namespaces = 0)"
    except OSError:
        pass
    return None
