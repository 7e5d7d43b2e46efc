"""The Linux build sandbox: a fresh set of namespaces, a private root, only the declared inputs.

How a sandboxed build is spawned (all through libc via ctypes, no helper binary)::

    pure (trio thread) --Popen(preexec_fn)--> middle --fork--> builder (PID 1 of a new PID ns)

* ``middle`` runs the ``preexec_fn``: it asks for SIGKILL when ``pure`` dies, unshares the user,
  mount, PID, IPC, UTS and (unless the build may use the network) network namespaces, maps uid
  1000 / gid 100 inside to the caller's uid/gid outside, and forks.  It then only waits for the
  builder and exits with its status, so ``Popen.pid`` stands for the whole build.
* The builder (PID 1 of the new PID namespace, SIGKILLed if ``middle`` dies) sets the hostname
  ``localhost``, brings up loopback, and assembles its root in memory: a tmpfs (read-only once
  assembled) with ``/build`` (cwd; bind of the on-disk build dir), ``/tmp`` (tmpfs), ``/proc``
  (a new procfs), ``/dev`` (tmpfs with null, zero, full, random, urandom, tty bound from the
  host, ``shm``, ``pts`` and the fd links), ``/etc`` (generated ``passwd``, ``group``,
  ``hosts``) and the store dir.  The store dir is an overlay: its lower layer is a tmpfs holding
  one mount point per input, on which each input path is bind-mounted read-only; its upper layer
  is on disk (``top/upper``), so whatever the builder creates there (its outputs) lands on the
  store's file system, ready to be renamed into place.  It then ``pivot_root``\\ s, detaches the
  old root, sets no-new-privs and execs the builder with exactly the given environment.  Because
  uid 1000 is not root inside, exec drops every capability.

Setup errors in the builder process are written to a dedicated pipe and raised here as
:class:`~purestore.errors.SandboxError`; builder output (stdout and stderr) goes to one pipe that
the caller reads as the build log.

Everything runs without privileges when unprivileged user namespaces are enabled, and as root.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import subprocess
from typing import Callable, Mapping, Sequence

import attrs

from ..errors import SandboxError

# --- libc -----------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.setdomainname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SYS_pivot_root = 155  # x86_64
SYS_close_range = 436

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

SANDBOX_UID = 1000
SANDBOX_GID = 100
SANDBOX_HOSTNAME = "localhost"

# Exit status of the builder process when the sandbox could not be set up (message on err pipe).
_SETUP_FAILED = 125


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None,
                       flags, data.encode() if data else None), f"mount {src or fstype} on {dst}")


def _locked_flags(path: str) -> int:
    """Mount flags that a remount inside a user namespace must keep (they are locked)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                   (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def _bind(src: str, dst: str, readonly: bool, rec: bool = True) -> None:
    _mount(src, dst, None, MS_BIND | (MS_REC if rec else 0))
    if readonly:
        _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(dst))


# --- what to run ----------------------------------------------------------------------------


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


# --- the child side ---------------------------------------------------------------------------


def _setup_in_child(spec: SandboxSpec, plan: "_Plan") -> None:
    """Runs in the builder process (PID 1 of the new namespaces), before exec."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    hn = SANDBOX_HOSTNAME.encode()
    _check(_libc.sethostname(hn, len(hn)), "sethostname")
    _check(_libc.setdomainname(b"(none)", 6), "setdomainname")
    if not spec.network:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            ifr = struct.pack("16sH14x", b"lo", 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
        finally:
            s.close()
    r, top = plan.root, plan.top
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # the root: an in-memory file system, read-only once assembled
    _mount("none", r, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    for d in ("build", "tmp", "proc", "dev", "etc"):
        os.mkdir(f"{r}/{d}", 0o755)
    for name, data in plan.etc:
        with open(f"{r}/etc/{name}", "wb") as f:
            f.write(data)
    _bind(top + "/build", r + "/build", readonly=False, rec=False)
    _mount("none", r + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    # the store dir: an overlay whose upper layer is on disk (outputs land in top/upper) and whose
    # lower layer is a small tmpfs holding one mount point per input
    store = plan.store
    os.makedirs(store, 0o755)
    _mount("none", store, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for (physical, target), is_dir in zip(plan.binds, plan.bind_dirs):
        if is_dir:
            os.mkdir(target)
        else:
            open(target, "wb").close()
    os.chmod(store, 0o1775)
    _mount("overlay", store, "overlay", MS_NOSUID | MS_NODEV,
           f"lowerdir={store},upperdir={top}/upper,workdir={top}/work,userxattr")
    for physical, target in plan.binds:
        _bind(physical, target, readonly=True, rec=False)
    _mount("proc", r + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = r + "/dev"
    _mount("none", dev, "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=0755,size=65536k")
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        open(f"{dev}/{name}", "w").close()
        try:
            _bind("/dev/" + name, f"{dev}/{name}", readonly=False, rec=False)
        except OSError:
            if name != "tty":
                raise
            os.unlink(f"{dev}/{name}")
    os.mkdir(dev + "/shm", 0o1777)
    _mount("none", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=65536k")
    os.mkdir(dev + "/pts", 0o755)
    try:
        _mount("devpts", dev + "/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
        os.symlink("pts/ptmx", dev + "/ptmx")
    except OSError:
        pass
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    _mount(None, r, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(r)
    _check(_libc.syscall(SYS_pivot_root, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/build")
    os.umask(0o022)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")


@attrs.frozen
class _Plan:
    top: str
    root: str
    store: str
    binds: tuple[tuple[str, str], ...]
    bind_dirs: tuple[bool, ...]
    etc: tuple[tuple[str, bytes], ...]
    flags: int
    uid: int
    gid: int
    parent: int
    err_w: int


def _make_preexec(spec: SandboxSpec, plan: _Plan) -> Callable[[], None]:
    def preexec() -> None:
        # In "middle": a fresh fork of pure.  Never raise a Python exception past here without
        # reporting it: subprocess would turn it into a confusing SubprocessError.
        try:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != plan.parent:
                os._exit(_SETUP_FAILED)
            _check(_libc.unshare(plan.flags), "unshare")
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"{SANDBOX_UID} {plan.uid} 1\n")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"{SANDBOX_GID} {plan.gid} 1\n")
        except BaseException as e:  # noqa: BLE001 - reported to the parent through the pipe
            _report(plan.err_w, f"cannot create the namespaces: {e}")
        pid = os.fork()
        if pid:
            # middle: keep only the status pipe (stdio to /dev/null, so the log pipe ends as soon
            # as the builder's processes are gone), wait for the builder, report its status
            # before exiting: tearing the namespaces down can take a while, and nobody needs to
            # wait for that to see the result.
            w = plan.err_w
            if w > 3:
                _libc.syscall(SYS_close_range, 3, w - 1, 0)
            _libc.syscall(SYS_close_range, w + 1, 0xFFFFFFFF, 0)
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
            try:
                os.write(w, STATUS_MARK + str(code).encode() + b"\n")
            finally:
                os._exit(code)
        try:
            _setup_in_child(spec, plan)
            os.set_inheritable(plan.err_w, False)
        except BaseException as e:  # noqa: BLE001
            _report(plan.err_w, f"cannot set up the sandbox: {e}")

    return preexec


def _report(fd: int, msg: str) -> None:
    try:
        os.write(fd, msg.encode(errors="replace")[:4000])
    finally:
        os._exit(_SETUP_FAILED)


def spawn(spec: SandboxSpec, stdout: int) -> tuple[subprocess.Popen, int]:
    """Start ``spec`` in a new sandbox with stdout and stderr going to fd ``stdout``.

    Returns the process (its pid is the "middle" process whose exit status is the builder's) and
    the read end of the status pipe: it carries a setup error message if the sandbox could not be
    set up, then the builder's exit status (see :func:`parse_status`), possibly before the
    process has exited (namespace teardown continues after the status is known).  Must be called from the thread that lives as long as the build
    (the trio thread): the build is SIGKILLed when that thread exits.

    Raises :class:`SandboxError` when the builder cannot be executed (e.g. does not exist).
    """
    top = os.path.realpath(spec.top)
    r = os.path.realpath(spec.root)
    binds = tuple((os.path.realpath(phys), r + logical) for logical, phys in sorted(spec.inputs.items()))
    bind_dirs = tuple(os.path.isdir(phys) and not os.path.islink(phys) for _, phys in sorted(spec.inputs.items()))
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if not spec.network:
        flags |= CLONE_NEWNET
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    plan = _Plan(top=top, root=r, store=r + spec.store_dir, binds=binds, bind_dirs=bind_dirs,
                 etc=_etc_files(spec), flags=flags, uid=os.geteuid(),
                 gid=os.getegid(), parent=os.getpid(), err_w=err_w)
    try:
        proc = subprocess.Popen(
            list(spec.argv), executable=spec.argv[0], env=dict(spec.env), cwd="/",
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stdout, pass_fds=(err_w,),
            preexec_fn=_make_preexec(spec, plan), start_new_session=True, close_fds=True,
        )
    except OSError as e:
        os.close(err_r)
        raise SandboxError(
            f"cannot run builder {spec.argv[0]!r} in the sandbox: {e.strerror or e}"
            + (" (it must be a store path among the inputs, or a static binary inside one)"
               if e.errno == errno.ENOENT else "")
        ) from e
    finally:
        os.close(err_w)
    return proc, err_r


STATUS_MARK = b"\0STATUS:"


def parse_status(data: bytes) -> tuple[int | None, str]:
    """Split what the status pipe carried into (builder exit status or None if not (yet)
    reported, setup error message or "")."""
    i = data.find(STATUS_MARK)
    if i < 0 or not data.endswith(b"\n"):
        return None, data.decode(errors="replace")
    return int(data[i + len(STATUS_MARK):-1]), data[:i].decode(errors="replace")


def read_status(err_r: int) -> tuple[int | None, str]:
    """Block until the status pipe reports (or ends), close it, and :func:`parse_status`."""
    try:
        data = b""
        while True:
            b = os.read(err_r, 4096)
            if not b:
                break
            data += b
            if parse_status(data)[0] is not None:
                break
        return parse_status(data)
    finally:
        os.close(err_r)


def run_sync(spec: SandboxSpec) -> tuple[int, bytes]:
    """Run ``spec`` to completion (blocking), returning (exit status, combined output).

    For tests and tools; the scheduler uses :func:`spawn` under trio.  Raises
    :class:`SandboxError` when the sandbox cannot be set up.
    """
    if not os.path.exists(spec.build_dir):
        prepare_root(spec)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        proc, err_r = spawn(spec, out_w)
    finally:
        os.close(out_w)
    chunks = []
    with os.fdopen(out_r, "rb") as f:
        while True:
            b = f.read1(65536)
            if not b:
                break
            chunks.append(b)
    code, err = read_status(err_r)
    status = proc.wait()
    if err:
        raise SandboxError(err)
    return (status if code is None else code), b"".join(chunks)


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
