"""The child side of the sandbox, and a small fork server that runs it.

Forking ``pure`` itself for every build is slow (a big Python process: page tables, and every
page Python touches after the fork is copied).  So :class:`purestore.build.sandbox.ForkServer`
starts this file once, as ``python -S -E _forkserver.py FD`` (stdlib only, no purestore
imports, a few MiB), and asks it over a SOCK_SEQPACKET socket to spawn each sandbox::

    request:  its size (8 bytes) + fds [log write end, status write end, a memfd holding the
              pickle of a plain dict (see sandbox.py)]; in a datagram, a big request (many
              inputs, a long environment) would not fit the socket's send buffer
    reply:    pid of "middle" (4 bytes) + its pidfd, or, for a malformed request (a bug in
              ``pure``), ``\\0REFUSED:`` + why; the server then goes on serving

For each request the server forks "middle", which unshares the namespaces, maps uid 1000 / gid
100 to the caller's ids, forks the builder (PID 1 of the new PID namespace), waits for it and
writes ``\\0STATUS:<code>\\n`` (its exit status, or minus the signal that killed it) to the
status pipe before exiting (namespace teardown can be slow; nobody needs to wait for it).  The
builder sets up its root (see sandbox.py's docstring) and execs; setup or exec errors go to the
status pipe as text, then it exits 125.

The server dies with ``pure`` (PR_SET_PDEATHSIG), and each middle and builder with its parent, so
killing ``pure`` kills every build.  The server reaps its children automatically (SIGCHLD
ignored); ``pure`` watches them through their pidfds.
"""

import ctypes
import fcntl
import io
import os
import pickle
import select
import signal
import socket
import struct
import sys

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.setdomainname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long

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

STATUS_MARK = b"\0STATUS:"
REFUSED = b"\0REFUSED:"
SETUP_FAILED = 125


def _check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src, dst, fstype, flags, data=None):
    _check(_libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None,
                       flags, data.encode() if data else None), f"mount {src or fstype} on {dst}")


def _locked_flags(path):
    """Mount flags that a remount inside a user namespace must keep (they are locked)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                   (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def _bind(src, dst, readonly):
    _mount(src, dst, None, MS_BIND)
    if readonly:
        _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(dst))


def _close_from(first, keep=-1):
    if keep >= first:
        if keep > first:
            _libc.syscall(SYS_close_range, first, keep - 1, 0)
        _libc.syscall(SYS_close_range, keep + 1, 0xFFFFFFFF, 0)
    else:
        _libc.syscall(SYS_close_range, first, 0xFFFFFFFF, 0)


def _report(fd, msg):
    try:
        os.write(fd, msg.encode(errors="replace")[:4000])
    finally:
        os._exit(SETUP_FAILED)


def setup_root(req):
    """In the builder process, before exec: hostname, loopback, the root, pivot_root."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    hn = req["hostname"].encode()
    _check(_libc.sethostname(hn, len(hn)), "sethostname")
    _check(_libc.setdomainname(b"(none)", 6), "setdomainname")
    if not req["network"]:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            ifr = struct.pack("16sH14x", b"lo", 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
        finally:
            s.close()
    r, top, store = req["root"], req["top"], req["store"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # the root: an in-memory file system, read-only once assembled
    _mount("none", r, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    for d in ("build", "tmp", "proc", "dev", "etc"):
        os.mkdir(f"{r}/{d}", 0o755)
    for name, data in req["etc"]:
        with open(f"{r}/etc/{name}", "wb") as f:
            f.write(data)
    _bind(top + "/build", r + "/build", readonly=False)
    _mount("none", r + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    # the store dir: an overlay whose upper layer is on disk (outputs land in top/upper) and
    # whose lower layer is a small tmpfs holding one mount point per input
    os.makedirs(store, 0o755)
    _mount("none", store, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for physical, target, is_dir in req["binds"]:
        if is_dir:
            os.mkdir(target)
        else:
            open(target, "wb").close()
    for target, text in req["links"]:  # store paths that are symlinks: the link itself
        os.symlink(text, target)
    os.chmod(store, 0o1775)
    _mount("overlay", store, "overlay", MS_NOSUID | MS_NODEV,
           f"lowerdir={store},upperdir={top}/upper,workdir={top}/work,userxattr")
    # Inputs under ro_base are bound from one read-only bind of ro_base: a bind mount inherits
    # its source mount's read-only flag, so each input costs one mount call, not two.
    ro_base, ro = req.get("ro_base"), None
    if ro_base and any(p.startswith(ro_base + "/") for p, _, _ in req["binds"]):
        ro = r + "/dev"  # not yet used: a temporary place for the read-only view
        _bind(ro_base, ro, readonly=True)
    for physical, target, _ in req["binds"]:
        if ro is not None and physical.startswith(ro_base + "/"):
            _mount(ro + physical[len(ro_base):], target, None, MS_BIND)
        else:
            _bind(physical, target, readonly=True)
    if ro is not None:
        _check(_libc.umount2(ro.encode(), MNT_DETACH), "umount the read-only store view")
    _mount("proc", r + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = r + "/dev"
    _mount("none", dev, "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=0755,size=65536k")
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        open(f"{dev}/{name}", "w").close()
        try:
            _bind("/dev/" + name, f"{dev}/{name}", readonly=False)
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


def run_middle(req, out_w, err_w):
    """In a fresh child of the server: namespaces, then the builder.  Never returns."""
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        _check(_libc.unshare(req["flags"]), "unshare")
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{req['uid_inside']} {req['uid']} 1\n")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{req['gid_inside']} {req['gid']} 1\n")
        pid = os.fork()
    except BaseException as e:  # noqa: BLE001 - reported through the status pipe
        _report(err_w, f"cannot create the namespaces: {e}")
    if pid:
        # middle: keep only the status pipe; stdio to /dev/null so the log pipe ends as soon as
        # the builder's processes are gone; report the status before the (slow) teardown.
        _close_from(3, keep=err_w)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if null > 2:
            os.close(null)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        # minus the signal that killed it, as Python's returncode: 128 + N would be taken for
        # an exit status (a shell's `exit 139` after its child crashed)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        try:
            os.write(err_w, STATUS_MARK + str(code).encode() + b"\n")
        finally:
            os._exit(code if code >= 0 else 128 - code)
    try:
        setup_root(req)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        keep = err_w
        if keep <= 2:  # cannot happen (0-2 were taken), but stay safe
            keep = os.dup(err_w)
        _close_from(3, keep=keep)
        os.set_inheritable(keep, False)
        err_w = keep
    except BaseException as e:  # noqa: BLE001
        _report(err_w, f"cannot set up the sandbox: {e}")
    argv = req["argv"]
    try:
        os.execve(argv[0], argv, req["env"])
    except OSError as e:
        hint = (" (it must be a store path among the inputs, or a static binary inside one)"
                if e.errno == 2 else
                " (its arguments and environment together are more than Linux takes; pass the big "
                "attributes as files: passAsFile)" if e.errno == 7 else "")
        _report(err_w, f"cannot run builder {argv[0]!r} in the sandbox: {e.strerror}{hint}")
    except BaseException as e:  # noqa: BLE001
        _report(err_w, f"cannot run builder {argv[0]!r} in the sandbox: {e}")


class BadRequest(Exception):
    """A request the server cannot run (malformed: a bug in the caller); the message says why
    and goes back to the caller after :data:`REFUSED`."""


# How a request's plain data must look: name -> (check, what was expected).
def _is_str_list(v):
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


_FIELDS = {
    "argv": (lambda v: _is_str_list(v) and len(v) > 0, "a non-empty list of str"),
    "env": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                                  for k, x in v.items()), "a dict of str to str"),
    "top": (lambda v: isinstance(v, str), "a str"),
    "root": (lambda v: isinstance(v, str), "a str"),
    "store": (lambda v: isinstance(v, str), "a str"),
    "binds": (lambda v: isinstance(v, (list, tuple)) and all(
        isinstance(b, (list, tuple)) and len(b) == 3 and isinstance(b[0], str) and isinstance(b[1], str)
        and isinstance(b[2], bool) for b in v), "a list of (str, str, bool)"),
    "etc": (lambda v: isinstance(v, (list, tuple)) and all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], bytes)
        for e in v), "a list of (str, bytes)"),
    "flags": (lambda v: type(v) is int, "an int"),
    "network": (lambda v: isinstance(v, bool), "a bool"),
    "uid": (lambda v: type(v) is int, "an int"),
    "gid": (lambda v: type(v) is int, "an int"),
    "uid_inside": (lambda v: type(v) is int, "an int"),
    "gid_inside": (lambda v: type(v) is int, "an int"),
    "hostname": (lambda v: isinstance(v, str), "a str"),
    "ro_base": (lambda v: v is None or isinstance(v, str), "a str or None"),
    "links": (lambda v: isinstance(v, (list, tuple)) and all(
        isinstance(b, (list, tuple)) and len(b) == 2 and isinstance(b[0], str) and isinstance(b[1], str)
        for b in v), "a list of (str, str)"),
}

# A request's size is bounded (a memfd of a few MiB at most in practice); beyond this it is garbage.
MAX_REQUEST = 1 << 30


class _PlainUnpickler(pickle.Unpickler):
    """Plain data only (dict, list, tuple, str, bytes, int, bool, None): a malformed request
    cannot make the server import or call anything."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"a request holds plain data only, not {module}.{name}")


def _check_request(req):
    if not isinstance(req, dict):
        raise BadRequest(f"the request must be a dict, got {type(req).__name__}")
    for name, (ok, expected) in _FIELDS.items():
        if name not in req:
            raise BadRequest(f"the request has no {name!r}")
        if not ok(req[name]):
            raise BadRequest(f"the request's {name!r} must be {expected}, got {req[name]!r:.200}")
    return req


def read_request(msg, fds):
    """The request dict that ``msg`` (its size) and ``fds`` [log fd, status fd, memfd] carry.

    Raises :class:`BadRequest` when the message, the fds or the data are not a request; the
    caller closes ``fds`` then."""
    if len(fds) != 3:
        raise BadRequest(f"expected 3 file descriptors (log, status, request), got {len(fds)}")
    if len(msg) != 8:
        raise BadRequest(f"expected the request's size (8 bytes), got {len(msg)} bytes")
    (size,) = struct.unpack("Q", msg)
    req_fd = fds[2]
    try:
        have = os.fstat(req_fd).st_size
    except OSError as e:
        raise BadRequest(f"cannot read the request: {e}") from e
    if size > MAX_REQUEST or size != have:
        raise BadRequest(f"the request is said to be {size} bytes, but its file holds {have} bytes")
    data = bytearray()
    while len(data) < size:
        try:
            chunk = os.pread(req_fd, size - len(data), len(data))
        except OSError as e:
            raise BadRequest(f"cannot read the request: {e}") from e
        if not chunk:
            raise BadRequest(f"the request was truncated: {len(data)} of {size} bytes")
        data += chunk
    try:
        req = _PlainUnpickler(io.BytesIO(bytes(data))).load()
    except Exception as e:  # noqa: BLE001 - unpickling garbage raises almost anything
        raise BadRequest(f"the request is not a valid pickle: {type(e).__name__}: {e}") from e
    return _check_request(req)


def _refuse(sock, why):
    """Tell the caller its request was refused (a reply that is not a 4-byte pid)."""
    sock.send(REFUSED + why.encode(errors="replace")[:4000])


def _hung_up(sock):
    """Whether the caller closed its end (an empty read is then the end, not an empty request)."""
    p = select.poll()
    p.register(sock, select.POLLHUP | select.POLLRDHUP)
    return bool(p.poll(0))


def serve(sock_fd):
    """Answer requests until ``pure`` closes its end.  A malformed request (a bug in the
    caller) is refused with a reply saying why; the server goes on serving the next ones."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is pure's to handle
    sock = socket.socket(fileno=sock_fd)
    while True:
        try:
            msg, fds, flags, _addr = socket.recv_fds(sock, 64, 3)
        except InterruptedError:
            continue
        except ConnectionResetError:  # pure closed its end with a reply unread (interrupted)
            return
        if not msg and not fds and _hung_up(sock):
            return
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise BadRequest("the request message or its file descriptors were truncated")
            req = read_request(msg, fds)
            pid = os.fork()
        except BaseException as e:  # noqa: BLE001 - a bad request must not end the server
            for fd in fds:
                os.close(fd)
            why = str(e) if isinstance(e, BadRequest) else f"cannot fork: {e}" if isinstance(e, OSError) \
                else f"{type(e).__name__}: {e}"
            try:
                _refuse(sock, why)
            except (BrokenPipeError, ConnectionResetError):  # pure is gone
                return
            continue
        if pid == 0:
            try:
                sock.close()
                run_middle(req, fds[0], fds[1])
            finally:
                os._exit(SETUP_FAILED)
        for fd in fds:
            os.close(fd)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = -1
        try:
            socket.send_fds(sock, [struct.pack("i", pid)], [pidfd] if pidfd >= 0 else [])
        except (BrokenPipeError, ConnectionResetError):  # pure is gone (interrupted)
            return
        finally:
            if pidfd >= 0:
                os.close(pidfd)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
