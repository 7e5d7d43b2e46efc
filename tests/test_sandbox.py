"""The Linux build sandbox (purestore.build.sandbox), driven directly: each test runs a real
static busybox inside real namespaces and checks what it can and cannot see or do."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import BUSYBOX, sandbox_build_reason
from purestore.build.sandbox import SandboxSpec, prepare_root, run_sync
from purestore.errors import SandboxError

STORE = "/pure/store"
BB_PATH = f"{STORE}/0c6kzph7l0dcbfmjap64f0czdafn3b7x-busybox"

_reason = sandbox_build_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


@pytest.fixture(scope="module")
def busybox_dir(tmp_path_factory):
    """A store-path-like directory holding bin/busybox, to bind into the sandbox."""
    d = tmp_path_factory.mktemp("bb") / "busybox"
    (d / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, d / "bin" / "busybox")
    return d


def run(tmp_path, busybox_dir, script: str, *, network=False, inputs=None, env=None, ro_base=None):
    top = tmp_path / f"top{len(list(tmp_path.iterdir()))}"
    top.mkdir()
    spec = SandboxSpec(
        argv=(f"{BB_PATH}/bin/busybox", "sh", "-c", f"B={BB_PATH}/bin/busybox\n" + script),
        env={"PATH": "/path-not-set", "HOME": "/homeless-shelter", "out": f"{STORE}/x-out", **(env or {})},
        top=str(top), store_dir=STORE, inputs={BB_PATH: str(busybox_dir), **(inputs or {})},
        network=network, ro_base=ro_base,
    )
    status, out = run_sync(spec)
    return status, out.decode(), spec


@pytest.fixture
def tcp_server():
    """A TCP server on the host's 127.0.0.1 that answers 'hello' to every connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def test_identity_uid_hostname_pid1(tmp_path, busybox_dir):
    status, out, _ = run(tmp_path, busybox_dir, '$B id -u; $B id -g; $B hostname; echo $$; $B pwd')
    assert status == 0, out
    assert out.split() == ["1000", "100", "localhost", "1", "/build"]


def test_environment_is_exactly_what_was_given(tmp_path, busybox_dir):
    status, out, _ = run(tmp_path, busybox_dir, "$B env", env={"FOO": "bar baz"})
    assert status == 0, out
    keys = {line.split("=", 1)[0] for line in out.splitlines()}
    # sh adds PWD and SHLVL itself; nothing from the host leaks in
    assert keys == {"PATH", "HOME", "out", "FOO", "PWD", "SHLVL"}
    assert "FOO=bar baz" in out.splitlines()


def test_a_request_bigger_than_a_socket_buffer_reaches_the_builder(tmp_path, busybox_dir):
    """A derivation with a thousand inputs or long scripts in its environment makes a request
    to the fork server of several hundred KiB, more than a datagram may carry (the default
    socket send buffer is 208 KiB): it used to fail with 'Message too long'."""
    big = {f"BIG{i}": str(i) * 100_000 for i in range(4)}  # each under execve's 128 KiB a string
    inputs = {f"{STORE}/{i:032d}-in": str(busybox_dir) for i in range(1000)}
    status, out, _ = run(tmp_path, busybox_dir,
                         'echo ${#BIG0} ${#BIG3}; $B ls /pure/store | $B wc -l', env=big, inputs=inputs)
    assert status == 0, out
    assert out.split() == ["100000", "100000", "1001"]


def test_no_network_to_host_loopback(tmp_path, busybox_dir, tcp_server):
    status, out, _ = run(tmp_path, busybox_dir,
                         f"$B nc -w 3 127.0.0.1 {tcp_server} </dev/null && echo REACHED; exit 0")
    assert "REACHED" not in out and "hello" not in out
    assert "refused" in out or "unreachable" in out, out
    # the same command does reach the server when the network is allowed (fixed-output builds)
    status, out, _ = run(tmp_path, busybox_dir,
                         f"$B nc -w 3 127.0.0.1 {tcp_server} </dev/null && echo REACHED", network=True)
    assert status == 0 and "hello" in out and "REACHED" in out, out


def test_only_loopback_interface_and_no_dns(tmp_path, busybox_dir):
    status, out, _ = run(tmp_path, busybox_dir,
                         "$B ls /sys/class/net 2>/dev/null; $B ip -o link | $B cut -d: -f2; "
                         "$B nslookup example.com && echo RESOLVED; $B cat /etc/resolv.conf; exit 0")
    assert "RESOLVED" not in out
    ifaces = {w.strip() for w in out.splitlines() if w.strip() in ("lo", "eth0", "ens3", "enp0s3")}
    assert ifaces == {"lo"}, out


def test_store_paths_outside_the_inputs_are_invisible(tmp_path, busybox_dir):
    other = tmp_path / "other"
    other.mkdir()
    (other / "secret").write_text("s")
    dep = f"{STORE}/1b9p07z77phvv2hh6qd1dpkh3vidrl4w-dep"
    status, out, _ = run(tmp_path, busybox_dir, "$B ls /pure/store", inputs={dep: str(other)})
    assert status == 0, out
    assert sorted(out.split()) == sorted([BB_PATH.rsplit("/", 1)[1], dep.rsplit("/", 1)[1]])


def test_an_input_that_is_a_symlink_is_that_symlink_not_what_it_points_to(tmp_path, busybox_dir):
    """A store path may be a symlink (`pure store add` of a link, `source()` of one).  The builder
    sees the link, as in Nix: one to a host directory leads nowhere inside, one to another input
    leads there.  (Each input was bind-mounted, which follows a symlink on the host: the builder
    read the files of the host directory the link named, and in a rooted store a link to
    another store path failed the mount, since the host has no logical /pure/store.)"""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "s.txt").write_text("host secret")
    store = tmp_path / "store"
    store.mkdir()
    out_link, in_link = "2c6kzph7l0dcbfmjap64f0czdafn3b7x-out-link", "3c6kzph7l0dcbfmjap64f0czdafn3b7x-in-link"
    os.symlink(str(secret), store / out_link)
    os.symlink(f"{BB_PATH}/bin", store / in_link)
    status, out, _ = run(tmp_path, busybox_dir,
                         f"$B readlink {STORE}/{out_link}; $B cat {STORE}/{out_link}/s.txt 2>/dev/null || echo HIDDEN; "
                         f"$B ls {STORE}/{in_link}/",
                         inputs={f"{STORE}/{n}": str(store / n) for n in (out_link, in_link)},
                         ro_base=str(store))
    assert status == 0, out
    assert "host secret" not in out
    assert out.split() == [str(secret), "HIDDEN", "busybox"], out


def test_host_files_are_invisible(tmp_path, busybox_dir):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    status, out, _ = run(tmp_path, busybox_dir,
                         f"for f in /etc/shadow /root {repo} /home /usr /bin/sh /work; do "
                         f"[ -e $f ] && echo VISIBLE $f; done; $B ls /; $B cat /etc/passwd")
    assert status == 0, out
    assert "VISIBLE" not in out, out
    assert set(out.split("root:x")[0].split()) == {"build", "dev", "etc", "proc", "pure", "tmp"}


def test_inputs_root_and_proc_are_read_only_build_dir_is_writable(tmp_path, busybox_dir):
    script = textwrap.dedent(f"""\
        $B touch {BB_PATH}/new 2>/dev/null && echo WROTE-INPUT
        $B rm {BB_PATH}/bin/busybox 2>/dev/null; [ -e {BB_PATH}/bin/busybox ] || echo DELETED-INPUT
        $B touch /etc/passwd 2>/dev/null && echo WROTE-ETC
        $B mkdir /bin 2>/dev/null && echo WROTE-ROOT
        $B mount -o remount,rw {BB_PATH} 2>/dev/null && echo REMOUNTED
        $B umount {BB_PATH} 2>/dev/null && echo UNMOUNTED
        echo ok > /build/f && echo ok > /tmp/f && $B mkdir $out && echo BUILD-OK
    """)
    status, out, spec = run(tmp_path, busybox_dir, script)
    assert status == 0, out
    for bad in ("WROTE-INPUT", "DELETED-INPUT", "WROTE-ETC", "WROTE-ROOT", "REMOUNTED", "UNMOUNTED"):
        assert bad not in out
    assert "BUILD-OK" in out
    assert os.path.isdir(spec.host_path(f"{STORE}/x-out"))
    assert (busybox_dir / "bin" / "busybox").exists() and not (busybox_dir / "new").exists()


def test_dev_has_the_minimal_devices(tmp_path, busybox_dir):
    status, out, _ = run(tmp_path, busybox_dir,
                         "$B ls /dev; $B head -c 4 /dev/urandom | $B wc -c; echo x > /dev/null && echo NULL-OK")
    assert status == 0, out
    names = set(out.split())
    assert {"null", "zero", "full", "random", "urandom", "shm", "pts", "fd", "stdin", "stdout", "stderr"} <= names
    assert "sda" not in names and "vda" not in names and "NULL-OK" in out


def test_no_privileges_inside(tmp_path, busybox_dir):
    """The builder has no capabilities: it cannot mount, chroot, or change its uid."""
    status, out, _ = run(tmp_path, busybox_dir,
                         "$B mount -t tmpfs none /tmp 2>/dev/null && echo MOUNTED; "
                         "$B chroot / /bin/true 2>/dev/null && echo CHROOTED; "
                         "$B grep CapEff /proc/self/status; exit 0")
    assert "MOUNTED" not in out and "CHROOTED" not in out
    assert "CapEff:\t0000000000000000" in out


def test_processes_of_the_host_are_invisible(tmp_path, busybox_dir):
    status, out, _ = run(tmp_path, busybox_dir, "$B ls /proc | $B grep -c '^[0-9]'")
    assert status == 0
    assert int(out.strip()) <= 3  # sh, ls, grep


def test_exit_status_is_passed_through(tmp_path, busybox_dir):
    status, out, _ = run(tmp_path, busybox_dir, "echo bye; exit 7")
    assert status == 7 and out == "bye\n"


def test_missing_builder_is_a_sandbox_error(tmp_path, busybox_dir):
    top = tmp_path / "t"
    top.mkdir()
    spec = SandboxSpec(argv=(f"{STORE}/nothing/bin/sh",), env={}, top=str(top), store_dir=STORE,
                       inputs={BB_PATH: str(busybox_dir)})
    with pytest.raises(SandboxError, match="nothing/bin/sh"):
        run_sync(spec)


def test_unreadable_input_is_a_sandbox_error(tmp_path, busybox_dir):
    top = tmp_path / "t"
    top.mkdir()
    spec = SandboxSpec(argv=(f"{BB_PATH}/bin/busybox", "true"), env={}, top=str(top), store_dir=STORE,
                       inputs={BB_PATH: str(busybox_dir), f"{STORE}/1b9p07z77phvv2hh6qd1dpkh3vidrl4w-gone":
                               str(tmp_path / "does-not-exist")})
    prepare_root(spec)
    with pytest.raises(SandboxError, match="cannot set up the sandbox"):
        run_sync(spec)


def _world_executable(path: str) -> bool:
    """Whether every directory on the way to ``path`` (symlinks resolved) and the file itself
    can be used by others."""
    real = os.path.realpath(path)
    parts = real.split("/")
    for i in range(2, len(parts) + 1):
        p = "/".join(parts[:i])
        if not os.stat(p).st_mode & 0o001:
            return False
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged uid")
def test_works_for_an_unprivileged_user(tmp_path, busybox_dir):
    """As uid 65534 (no capabilities), with unprivileged user namespaces: same sandbox."""
    import tempfile
    work = tempfile.mkdtemp(prefix="purestore-test-unpriv-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    request_cleanup = lambda: shutil.rmtree(work, ignore_errors=True)  # noqa: E731
    from pathlib import Path
    work = Path(work)
    shutil.copytree(busybox_dir, work / "bb")
    for p in [work, *work.rglob("*")]:
        os.chown(p, 65534, 65534)
    code = textwrap.dedent(f"""\
        import sys
        from purestore.build.sandbox import SandboxSpec, run_sync
        spec = SandboxSpec(argv=({BB_PATH + '/bin/busybox'!r}, "sh", "-c",
                                 "{BB_PATH}/bin/busybox id -u; {BB_PATH}/bin/busybox hostname; echo $$"),
                           env={{}}, top={str(work / 'top')!r}, store_dir={STORE!r},
                           inputs={{{BB_PATH!r}: {str(work / 'bb')!r}}})
        status, out = run_sync(spec)
        sys.stdout.write(out.decode()); sys.exit(status)
    """)
    # The checkout and the venv may sit under a private directory (CI clones under /root): give
    # uid 65534 a readable copy of the packages the sandbox needs (purestore, attrs).
    import attr
    import attrs
    import purestore
    lib = work / "pylib"
    for mod in (purestore, attr, attrs):
        src = Path(mod.__file__).parent
        shutil.copytree(src, lib / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    for p_ in [lib, *lib.rglob("*")]:
        os.chmod(p_, 0o755 if p_.is_dir() else 0o644)
    # an interpreter uid 65534 can execute: ours, or the system's
    python, path = sys.executable, [str(lib)]
    if not _world_executable(python) and os.path.exists("/usr/bin/python3"):
        python = "/usr/bin/python3"
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", code],
                       capture_output=True, text=True, cwd=str(work),
                       env={"PYTHONPATH": ":".join(path), "PATH": "/usr/bin:/bin"})
    request_cleanup()
    if p.returncode != 0 and "Permission denied" in p.stderr and python in p.stderr:
        pytest.skip(f"uid 65534 cannot execute {python} (its directory is private)")
    if p.returncode != 0 and "cannot create the namespaces" in p.stderr:
        pytest.skip(f"unprivileged user namespaces unavailable: {p.stderr.strip()[-200:]}")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1000", "localhost", "1"]


# --- the fork server and malformed requests ------------------------------------------------------


class _Evil:
    """Unpickling this would run ``touch`` (a request must be plain data: it is refused)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _echoes(server, tmp_path, busybox_dir, text: str) -> None:
    """``server`` still runs a build: busybox echoing ``text`` in a sandbox."""
    top = tmp_path / "top"
    top.mkdir(exist_ok=True)
    spec = SandboxSpec(argv=(f"{BB_PATH}/bin/busybox", "echo", text), env={}, top=str(top),
                       store_dir=STORE, inputs={BB_PATH: str(busybox_dir)})
    assert run_sync(spec, server) == (0, text.encode() + b"\n")


def _send_raw(server, msg: bytes, fds: list[int]) -> bytes:
    """Send ``msg`` with ``fds`` to the fork server as a request, return its reply."""
    import socket as _socket
    with server.lock:
        if fds:
            _socket.send_fds(server.sock, [msg], fds)
        else:
            server.sock.send(msg)
        reply, got, _f, _a = _socket.recv_fds(server.sock, 4096, 1)
    for fd in got:
        os.close(fd)
    return reply


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("test-request", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


@pytest.mark.parametrize("case, expected", [
    ("short size", "expected the request's size"),
    ("empty message", "expected the request's size"),
    ("no fds", "expected 3 file descriptors"),
    ("empty message and no fds", "expected 3 file descriptors"),  # not the end of the stream
    ("too few fds", "expected 3 file descriptors"),
    ("size bigger than the data", "said to be 999 bytes"),
    ("huge size", "said to be"),
    ("garbage", "not a valid pickle"),
    ("truncated pickle", "not a valid pickle"),
    ("a pickle that calls something", "plain data only, not posix.system"),
    ("not a dict", "must be a dict, got list"),
    ("a field missing", "has no 'argv'"),
    ("a field of the wrong type", "'env' must be a dict of str to str"),
    ("a pipe for the request", "said to be 4 bytes"),
])
def test_fork_server_refuses_a_malformed_request_and_keeps_serving(tmp_path, busybox_dir, case, expected):
    """A malformed request gets a refusal saying why, not the server's death; the next build
    through the same server runs."""
    import pickle
    import struct
    from purestore.build.sandbox import ForkServer, make_request
    marker = tmp_path / "unpickled"
    good = make_request(SandboxSpec(argv=("/bin/true",), env={}, top=str(tmp_path), store_dir=STORE))
    log_r, log_w = os.pipe()
    st_r, st_w = os.pipe()
    server = ForkServer()
    opened = []

    def request(data: bytes, size: int | None = None, nfds: int = 3) -> tuple[bytes, list[int]]:
        fd = _memfd(data)
        opened.append(fd)
        return struct.pack("Q", len(data) if size is None else size), [log_w, st_w, fd][:nfds]

    try:
        if case == "short size":
            msg, fds = b"abc", request(b"")[1]
        elif case == "empty message":
            msg, fds = b"", request(b"")[1]
        elif case == "no fds":
            msg, fds = struct.pack("Q", 4), []
        elif case == "empty message and no fds":
            msg, fds = b"", []
        elif case == "too few fds":
            msg, fds = request(pickle.dumps(good), nfds=2)
        elif case == "size bigger than the data":
            msg, fds = request(b"x" * 10, size=999)
        elif case == "huge size":
            msg, fds = request(b"x" * 10, size=2 ** 62)
        elif case == "garbage":
            msg, fds = request(b"this is not a pickle")
        elif case == "truncated pickle":
            msg, fds = request(pickle.dumps(good)[:-20])
        elif case == "a pickle that calls something":
            msg, fds = request(pickle.dumps(_Evil(marker)))
        elif case == "not a dict":
            msg, fds = request(pickle.dumps([1, 2]))
        elif case == "a field missing":
            msg, fds = request(pickle.dumps({k: v for k, v in good.items() if k != "argv"}))
        elif case == "a field of the wrong type":
            msg, fds = request(pickle.dumps({**good, "env": {"A": 1}}))
        elif case == "a pipe for the request":
            pr, pw = os.pipe()
            os.write(pw, b"abcd")
            opened.extend([pr, pw])
            msg, fds = struct.pack("Q", 4), [log_w, st_w, pr]
        reply = _send_raw(server, msg, fds)
        assert reply.startswith(b"\0REFUSED:"), reply
        assert expected in reply.decode(), reply
        assert not marker.exists()
        assert server.proc.poll() is None, "the fork server died"
        # the same server still builds
        _echoes(server, tmp_path, busybox_dir, "still serving")
    finally:
        server.close()
        for fd in (log_r, log_w, st_r, st_w, *opened):
            os.close(fd)


def test_a_malformed_request_through_spawn_is_a_sandbox_error(tmp_path, busybox_dir):
    """ForkServer.spawn turns the refusal into a SandboxError that says why; the server serves on."""
    from purestore.build.sandbox import ForkServer
    server = ForkServer()
    r, w = os.pipe()
    try:
        with pytest.raises(SandboxError, match="refused a request.*has no 'argv'"):
            server.spawn({"env": {}}, w, w)
        _echoes(server, tmp_path, busybox_dir, "ok")
    finally:
        server.close()
        os.close(r)
        os.close(w)


def test_spawn_gives_the_whole_reason_of_a_refusal(tmp_path):
    """The reason a refusal gives reaches the SandboxError whole: spawn read at most 64 bytes of
    the reply (a pid), and a datagram is cut to what is read, so a reason over 55 bytes ended
    half way ("... must be a dict of str to str, got {")."""
    from purestore.build.sandbox import ForkServer, make_request
    good = make_request(SandboxSpec(argv=("/bin/true",), env={}, top=str(tmp_path), store_dir=STORE))
    server = ForkServer()
    r, w = os.pipe()
    try:
        with pytest.raises(SandboxError) as ei:
            server.spawn({**good, "env": {"A": 1}}, w, w)
        assert str(ei.value).endswith("the request's 'env' must be a dict of str to str, got {'A': 1}"), ei.value
    finally:
        server.close()
        os.close(r)
        os.close(w)


def test_a_fork_server_that_died_is_replaced_for_the_next_build(tmp_path, busybox_dir):
    """A fork server killed between builds (the OOM killer, a stray kill) made every later
    build of the run fail with 'the sandbox fork server failed: Broken pipe'."""
    import signal
    from purestore.build.sandbox import ForkServer
    server = ForkServer()
    try:
        first = server.proc
        first.send_signal(signal.SIGKILL)
        first.wait()
        _echoes(server, tmp_path, busybox_dir, "ok")
        assert server.proc is not first
    finally:
        server.close()
    assert server.proc.poll() is not None


def test_the_fork_server_is_not_in_pures_process_group_so_ctrl_c_does_not_reach_it():
    """Ctrl-C at a terminal goes to the foreground process group, pure's.  The fork server was in
    it and ignored SIGINT only once it had started, so a Ctrl-C while it loaded its modules
    ended it with a KeyboardInterrupt traceback on pure's stderr (seen under a stress run
    sending SIGINT to pure's group at random moments).  It has its own group: pure handles the
    Ctrl-C, and the server dies with pure (its builds are in sessions of their own already)."""
    from purestore.build.sandbox import ForkServer
    server = ForkServer()
    try:
        assert os.getpgid(server.proc.pid) == server.proc.pid != os.getpgrp()
    finally:
        server.close()
