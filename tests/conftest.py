"""Shared test helpers: run the real `pure` CLI as a subprocess against a rooted store."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

HAVE_NIX = shutil.which("nix-store") is not None
needs_nix = pytest.mark.skipif(not HAVE_NIX, reason="Nix (nix-bin) is not installed")

BUSYBOX = "/bin/busybox"  # Debian's busybox-static, installed by scripts/test.sh

# Property-based tests run the same examples on every run and machine (derandomize: drawn from a
# seed made of the test's name, not a fresh random one), remember nothing between runs (no
# .hypothesis database, whose saved examples made a local run differ from CI's fresh clone),
# and have no time limit per example: Hypothesis's default 200 ms deadline, and its too_slow
# health check of data generation, failed tests on a loaded machine for reasons unrelated to
# what they check.
from hypothesis import HealthCheck, settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("purestore", derandomize=True, database=None, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
_hypothesis_settings.load_profile("purestore")


def sandbox_build_reason() -> str | None:
    """Why real sandboxed builds with a static busybox cannot run here (None: they can)."""
    if not os.path.exists(BUSYBOX):
        return "no /bin/busybox (install busybox-static)"
    with open(BUSYBOX, "rb") as f:
        head = f.read(1 << 20)
    if b"ld-linux" in head or b"/lib64/ld" in head:
        return "/bin/busybox is dynamically linked (install busybox-static)"
    from purestore.build.sandbox import sandbox_available
    return sandbox_available()


def pure_env(root: Path | None, store_dir: str | None = None, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PURE_")}
    env["PURE_CONFIG"] = "/dev/null"  # never read the host's config in tests
    if root is not None:
        env["PURE_STORE"] = str(root)
    if store_dir is not None:
        env["PURE_STORE_DIR"] = store_dir
    env["PYTHONPATH"] = str(REPO)
    if extra:
        env.update(extra)
    return env


def run_pure(*args, root=None, store_dir=None, input=None, check=True, env=None, cwd=None,
             timeout=600) -> subprocess.CompletedProcess:
    """Run `pure ARGS` as a real process; returns the completed process (text mode)."""
    cmd = [sys.executable, "-m", "purestore.cli.main", *map(str, args)]
    p = subprocess.run(
        cmd, input=input, capture_output=True, env=pure_env(root, store_dir, env), cwd=cwd,
        timeout=timeout, text=not isinstance(input, bytes),
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"pure {' '.join(map(str, args))} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
        )
    return p


def read_until(proc, *words: str) -> list[str]:
    """Lines of ``proc``'s stderr (text) up to the first that holds every one of ``words``; the
    test fails, with what was said, if the process ends first."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if all(w in line for w in words):
            return seen
    rest = proc.communicate()[1]
    pytest.fail(f"no line with {' and '.join(map(repr, words))}: {''.join(seen)}{rest}"[-2000:])


def read_pty(master: int) -> bytes:
    """Everything written to a pseudo-terminal, read from its ``master`` side until every
    process has closed the other side."""
    data = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        data += chunk
    return data


def run_pure_on_tty(*args, env, cwd, timeout=120) -> tuple[int, bytes, str]:
    """Run `pure ARGS` with its stderr on a pseudo-terminal (so that it draws its live status
    line); returns (exit status, stdout bytes, everything written to the terminal)."""
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", *map(str, args)], cwd=cwd, env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    data = read_pty(master)
    out = p.communicate(timeout=timeout)[0]
    os.close(master)
    return p.returncode, out, data.decode()


def blocked_on_lock(proc: subprocess.Popen, path, timeout: float = 60) -> bool:
    """Wait until ``proc`` (a thread of it) is blocked waiting for a lock (flock or fcntl) on the
    file ``path``, as /proc/locks shows it ('->'): the event to go on from, where a test slept
    "long enough" for the process to get there (and, on a loaded machine, went on before it
    had).  False if it ended first, or after ``timeout`` seconds."""
    import time
    ino = str(os.stat(path).st_ino)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with open("/proc/locks") as f:
            for line in f:
                # "7: -> FLOCK  ADVISORY  WRITE 1234 fe:00:5178596 0 EOF"
                fields = line.split()
                if len(fields) > 6 and fields[1] == "->" and fields[5] == str(proc.pid) \
                        and fields[6].rsplit(":", 1)[-1] == ino:
                    return True
        time.sleep(0.01)
    return False


@contextlib.contextmanager
def closed_port():
    """A port of 127.0.0.1 that refuses connections while the block runs: bound by a socket
    that does not listen, so that no other process can take it meanwhile (a port found free and
    released could be listened on by another program by the time the command connected)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def held_sleep() -> str:
    """A `sleep` for a builder that lasts until release() ends it (its number of seconds,
    thousands of years, drawn for the test, tells its process from any other's): for a builder
    that must still run when the test gets to what it checks, however loaded the machine (a
    fixed `sleep 5` ended first when what the test started meanwhile took that long).  Run it
    by busybox's path (`$B sleep …`), not as a shell's builtin or applet, so that it is a
    process of its own."""
    return f"sleep {10**11 + uuid.uuid4().int % 10**11}"


def release(held: str, timeout: float = 60) -> bool:
    """Kill the builder's ``held`` sleep, waiting up to ``timeout`` seconds for it to start (the
    builder's script goes on after it); False if it never ran or was already released."""
    import signal
    import time
    want = held.encode().split()
    deadline = time.monotonic() + timeout
    while True:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-3:-1] == want:
                        os.kill(int(pid), signal.SIGKILL)
                        return True
                except OSError:  # (gone meanwhile; ProcessLookupError is one)
                    pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


@pytest.fixture
def store_root(tmp_path) -> Path:
    """An empty directory to hold a rooted store."""
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def pure(store_root):
    """`pure(...)` runs the CLI against the test's rooted store (store dir /pure/store)."""
    def _pure(*args, **kw):
        kw.setdefault("root", store_root)
        return run_pure(*args, **kw)
    return _pure


@pytest.fixture
def settings(store_root):
    from purestore.store.settings import load_settings
    return load_settings(env={"PURE_CONFIG": "/dev/null"}, root=str(store_root))


# -- one toolchain store per test session --------------------------------------------------------
# Growing the toolchain from the seeds takes minutes, so the modules that need it
# (test_toolchain, test_sbom_hello, test_shell's devshell test) share one rooted store, named by
# PURE_TEST_HELLO_STORE.  When the caller did not name one, the session makes a fresh one and
# removes it at the end; the second and later builds in it are then no-ops.
_SESSION_TOOLCHAIN_STORE: str | None = None


def _default_signal_dispositions() -> None:
    """Tests check how pure treats SIGINT, SIGQUIT, SIGHUP and SIGTERM (Ctrl-C stops a build or
    a collection, `pure run` passes on or keeps ignored what it was given), so the processes they
    start must get these at their default action, as from a terminal.  A run started as a
    background job of a script (SIGINT and SIGQUIT ignored) or under nohup (SIGHUP ignored)
    would pass the ignored ones on to every process, since an exec keeps them ignored."""
    import signal
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
        if signal.getsignal(sig) is signal.SIG_IGN:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def pytest_configure(config):
    global _SESSION_TOOLCHAIN_STORE
    _default_signal_dispositions()
    if not os.environ.get("PURE_TEST_HELLO_STORE"):
        import tempfile
        _SESSION_TOOLCHAIN_STORE = tempfile.mkdtemp(prefix="pure-test-toolchain-", dir="/var/tmp")
        os.environ["PURE_TEST_HELLO_STORE"] = _SESSION_TOOLCHAIN_STORE


def pytest_unconfigure(config):
    if _SESSION_TOOLCHAIN_STORE and os.path.isdir(_SESSION_TOOLCHAIN_STORE):
        subprocess.run(["chmod", "-R", "u+w", _SESSION_TOOLCHAIN_STORE], check=False)
        shutil.rmtree(_SESSION_TOOLCHAIN_STORE, ignore_errors=True)
        os.environ.pop("PURE_TEST_HELLO_STORE", None)
