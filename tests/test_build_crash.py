"""Concurrency and crashes: two builders on one store, SIGKILL and Ctrl-C in the middle of a build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import held_sleep, pure_env, release, run_pure
from test_build import build, expr, needs_sandbox, open_store  # noqa: F401 - fixtures

pytestmark = needs_sandbox


def start_build(store_root, tmp_path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "build", *map(str, args)],
                            cwd=tmp_path, env=pure_env(store_root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a Ctrl-C must reach it even if our own SIGINT is ignored (background job)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_line(stream, needle: str, timeout: float = 60) -> str:
    """Read lines from a pipe until one contains ``needle`` (bounded)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not seen; got {''.join(seen)!r}")


def read_until(stream, needle: str) -> str:
    """The lines read from a pipe up to and including the first that contains ``needle``."""
    seen = []
    while line := stream.readline():
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not seen; got {''.join(seen)!r}")


# what a test's builder has in its command line, for processes_with() to find it: unique to this
# run (pytest's pid was not: "WAIT123" is in another run's "WAIT1234", and pids are reused)
_RUN = uuid.uuid4().hex


def processes_with(marker: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


def wait_gone(marker: str, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = processes_with(marker)
        if not left:
            return []
        time.sleep(0.05)
    return processes_with(marker)


def running_sandbox(marker: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not processes_with(marker):
        time.sleep(0.02)
    assert processes_with(marker), "the builder never started"


@pytest.mark.slow
def test_two_builders_on_overlapping_graphs_build_each_path_once(expr, tmp_path, store_root):
    f = expr('''\
shared = [sh(f"shared{i}", f"$B sleep 0.3; echo {i} > $out") for i in range(3)]
left = sh("left", f"echo {' '.join(map(str, shared))} > $out")
right = sh("right", f"echo {' '.join(map(str, shared))} right > $out")
''')
    p1 = start_build(store_root, tmp_path, f, "-A", "left", "--no-link", "-j", "2")
    p2 = start_build(store_root, tmp_path, f, "-A", "right", "--no-link", "-j", "2")
    o1, e1 = p1.communicate(timeout=300)
    o2, e2 = p2.communicate(timeout=300)
    assert p1.returncode == 0, e1
    assert p2.returncode == 0, e2
    st = open_store(store_root)
    try:
        from purestore.store import events
        built = [b["name"] for b in events.query_builds(st) if b["status"] == "built"]
        assert sorted(built) == ["left", "right", "shared0", "shared1", "shared2"]
        assert st.verify().ok
    finally:
        st.close()


def test_a_build_waiting_for_another_process_says_so(expr, tmp_path, store_root):
    """A second `pure build` of what another process is building waits for it, and says so once
    (it printed the plan and then nothing while it waited), also as a `waiting` JSON event.
    The first builder runs until both have said so (its `sleep 5` could end before the two
    had started, on a loaded machine: they then found the path built and said nothing)."""
    import json
    marker = f"WAIT{_RUN}"
    held = held_sleep()
    f = expr(f'default = sh("slow", ": {marker}; $B {held}; echo x > $out")\n')
    p1 = start_build(store_root, tmp_path, f, "--no-link")
    p2 = p3 = None
    guard = threading.Timer(120, release, (held, 0))  # the reads below end, whatever happens
    guard.start()
    try:
        running_sandbox(marker)
        p2 = start_build(store_root, tmp_path, f, "--no-link")
        p3 = start_build(store_root, tmp_path, f, "--no-link", "--json")
        e2_head = read_until(p2.stderr, "waiting for another process")
        o3_head = read_until(p3.stdout, '"waiting"')
        assert release(held), "the first builder's sleep was not found"
        o2, e2 = p2.communicate(timeout=120)
        o3, e3 = p3.communicate(timeout=120)
        o1, e1 = p1.communicate(timeout=120)
    finally:
        guard.cancel()
        for p in (p1, p2, p3):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    e2, o3 = e2_head + e2, o3_head + o3
    assert p1.returncode == p2.returncode == p3.returncode == 0, (e1, e2, e3)
    out = o1.strip()
    assert o2.strip() == out and e2.count(f"waiting for another process to finish '{out}'") == 1, e2
    waiting = [json.loads(line) for line in o3.splitlines() if '"waiting"' in line]
    assert len(waiting) == 1 and waiting[0]["path"] == out and waiting[0]["drv"].endswith("-slow.drv")


@pytest.mark.slow
def test_sigkill_mid_build_leaves_a_consistent_store_and_retry_succeeds(expr, tmp_path, store_root, pure):
    """(The builder sleeps until released, not for 3 s: killed mid-build however slowly the test
    got to the kill, and the retry goes on at once.)"""
    marker = f"MARK{_RUN}kill"
    held = held_sleep()
    f = expr(f'default = sh("victim", ": {marker}; $B {held}; $B mkdir $out; echo done > $out/f")\n')
    p = start_build(store_root, tmp_path, f)
    wait_for_line(p.stderr, "building")
    running_sandbox(marker)
    p.kill()
    p.wait()
    assert wait_gone(marker) == [], "the builder outlived pure"
    st = open_store(store_root)  # opening cleans the dead process's temporary entries
    try:
        assert not [x for x in st.valid_paths() if x.name == "victim"]
        assert st.verify().ok
        tmp = Path(st.real_store_dir, ".tmp")
        assert list(tmp.iterdir()) == []
    finally:
        st.close()
    threading.Thread(target=release, args=(held,), daemon=True).start()  # (the retry's builder)
    out = build(pure, tmp_path, f).stdout.strip()
    assert (store_root / out.lstrip("/") / "f").read_text() == "done\n"


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_json_build_ends_with_an_error_event(expr, tmp_path, store_root, sig):
    """`pure build --json` stopped by a signal: its last stdout line is the error event the README
    promises (there was none: a script saw the stream end, or end at "done", status aside)."""
    import json
    marker = f"JSON{_RUN}{sig}"
    f = expr(f'default = sh("slow", ": {marker}; $B sleep 30; echo x > $out")\n')
    p = start_build(store_root, tmp_path, f, "--json", "--no-link")
    running_sandbox(marker)
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=30)
    code, word = (130, "interrupted") if sig == "SIGINT" else (143, "terminated (SIGTERM)")
    assert p.returncode == code, err
    last = json.loads(out.splitlines()[-1])
    assert last == {"type": "error", "error": word, "hint": None, "exitStatus": code}
    # the statuses are those `pure build --help` names (it named 0, 1 and 104 only)
    help_text = " ".join(run_pure("build", "--help").stdout.split())
    assert f"{code} when interrupted (Ctrl-C)" in help_text or f"{code} on SIGTERM" in help_text
    assert "2 on bad usage" in help_text


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_kills_the_builders_removes_temporaries_and_releases_locks(expr, tmp_path, store_root, pure, sig):
    """Ctrl-C, or SIGTERM (as `timeout`, systemd and CI runners send it): the same clean-up."""
    marker = f"MARK{_RUN}{sig}"
    f = expr(f'default = [sh(f"int{{i}}", f": {marker}; $B sleep 30; echo {{i}} > $out") for i in range(2)]\n')
    p = start_build(store_root, tmp_path, f, "-j", "2")
    wait_for_line(p.stderr, "building")
    running_sandbox(marker)
    t = time.monotonic()
    p.send_signal(getattr(signal, sig))
    rest = p.stderr.read()
    p.wait(timeout=30)
    assert time.monotonic() - t < 10
    code, word = (130, "interrupted") if sig == "SIGINT" else (143, "terminated")
    assert p.returncode == code and word in rest and "Traceback" not in rest, rest
    assert processes_with(marker) == []  # killed before pure exited
    st = open_store(store_root)
    try:
        assert list(Path(st.real_store_dir, ".tmp").iterdir()) == []
        assert list(Path(st.state_dir, "locks").iterdir()) == []
        from purestore.store import events
        assert {b["status"] for b in events.query_builds(st)} == {"interrupted"}
    finally:
        st.close()
