"""The forked helper process of `pure copy` (purestore/cache/forked.py).

The jobs below are module-level functions: the child, forked from this test process, finds them
by name.  Besides these tests, the substitution attack tests run `pure copy --from file://…`
through the CLI, which uses the worker on a machine with two cores or more, and the streamed
HTTP attacks and big-paths-over-HTTP test run with it explicitly."""

from __future__ import annotations

import os
import signal
import time
import types

import pytest
import trio

from conftest import run_pure
from purestore.cache.backend import open_backend
from purestore.cache.fetch import download
from purestore.cache.forked import ForkedWorker, WorkerGone, run_claimed
from purestore.cache.progress import Progress
from purestore.errors import CacheError, StoreError
from purestore.formats.narinfo import NarInfo
from purestore.store.fsnar import hash_path
from test_cache_support import SEC, make_closure, make_path, open_store


def job_pid(progress=None):
    return os.getpid()


def job_progress(total, step, progress=None):
    for _ in range(total // step):
        progress.add_bytes(step)
    return "done"


class Picky(Exception):
    """Pickles, but does not unpickle (its constructor wants two arguments)."""

    def __init__(self, a, b):
        super().__init__(a)


def job_fails(kind, progress=None):
    if kind == "picky":
        raise Picky("half a story", "the other half")
    if kind == "store":
        raise StoreError("disk on fire", hint="call the fire brigade")
    if kind == "unpicklable":
        class Local(Exception):
            pass
        raise Local("cannot be pickled")
    raise CacheError("bad NAR")


def job_dies(progress=None):
    os._exit(3)


def job_sleeps(seconds, progress=None):
    time.sleep(seconds)
    return "woke"


async def call(w, fn, *args, **kw):
    assert w.claim()
    try:
        return await w.call(fn, *args, **kw)
    finally:
        w.release()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_jobs_run_in_another_process_and_progress_is_relayed():
    w = ForkedWorker.start()
    try:
        assert await call(w, job_pid) not in (os.getpid(), None)
        p = Progress()
        assert await call(w, job_progress, 3 << 20, 64 << 10, progress=p) == "done"
        assert p.bytes_done == 3 << 20
        assert not w.busy and w.usable
    finally:
        await w.aclose()


async def test_errors_come_back_with_their_type_message_and_hint():
    w = ForkedWorker.start()
    try:
        with pytest.raises(CacheError, match="^bad NAR$"):
            await call(w, job_fails, "cache")
        with pytest.raises(StoreError) as e:
            await call(w, job_fails, "store")
        assert str(e.value) == "disk on fire" and e.value.hint == "call the fire brigade"
        with pytest.raises(CacheError, match="Local: cannot be pickled"):
            await call(w, job_fails, "unpicklable")
        with pytest.raises(CacheError, match="Picky: half a story"):
            await call(w, job_fails, "picky")
        assert w.usable  # a job's failure is not the worker's
        assert await call(w, job_sleeps, 0) == "woke"
    finally:
        await w.aclose()


async def test_a_child_that_dies_is_reported_and_reaped():
    w = ForkedWorker.start()
    pid = w.pid
    with pytest.raises(WorkerGone, match="exited unexpectedly"):
        await call(w, job_dies)
    assert not w.usable
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped
    await w.aclose()


async def test_a_cancelled_job_kills_the_child_at_once():
    w = ForkedWorker.start()
    pid = w.pid
    t0 = time.monotonic()
    with trio.move_on_after(0.3):
        await call(w, job_sleeps, 30)
    assert time.monotonic() - t0 < 5
    assert not w.usable and not alive(pid)
    await w.aclose()


async def test_run_claimed_says_when_the_caller_must_do_the_job_and_cleans_up_after_a_dead_child():
    """run_claimed (what push and substitution use): a result, or (False, None) when the worker
    is missing, busy or died during the job; cleanup only after a death or a cancellation."""
    cleaned = []

    def cleanup():
        cleaned.append(1)

    assert await run_claimed(None, None, cleanup) == (False, None)
    w = ForkedWorker.start()
    try:
        assert await run_claimed(w, lambda: w.call(job_sleeps, 0), cleanup) == (True, "woke")
        with pytest.raises(CacheError, match="^bad NAR$"):  # the job's own error: no clean-up
            await run_claimed(w, lambda: w.call(job_fails, "cache"), cleanup)
        assert cleaned == [] and not w.busy
        assert w.claim()  # busy: the caller does the job itself
        assert await run_claimed(w, lambda: w.call(job_pid), cleanup) == (False, None)
        w.release()
        assert await run_claimed(w, lambda: w.call(job_dies), cleanup) == (False, None)
        assert cleaned == [1] and not w.usable
    finally:
        await w.aclose()
    w = ForkedWorker.start()
    try:
        with trio.move_on_after(0.3):
            await run_claimed(w, lambda: w.call(job_sleeps, 30), cleanup)
        assert cleaned == [1, 1] and not w.usable
    finally:
        await w.aclose()


async def test_aclose_lets_the_child_exit():
    w = ForkedWorker.start()
    pid = w.pid
    await call(w, job_pid)
    await w.aclose()
    assert not alive(pid)


def pushed(tmp_path, make):
    """``make(store)`` a path in a new store and push it to a file:// cache; returns (cache dir,
    its narinfo, its NAR hash)."""
    src = tmp_path / "src"
    with open_store(src) as store:
        p = make(store)
        want = hash_path(store.real_path(p))
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    cache = tmp_path / "cache"
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", key, store.print_path(p), root=src)
    return cache, NarInfo.parse((cache / f"{p.hash_part}.narinfo").read_text(), "/pure/store"), want


async def test_download_falls_back_to_a_thread_when_the_worker_is_gone(tmp_path):
    # (over TINY_NAR: a tiny NAR is restored in the event loop, never by the worker)
    cache, ni, want = pushed(tmp_path, lambda store: make_path(store, "mid", {"blob": os.urandom(100 << 10)}))

    w = ForkedWorker.start()
    os.kill(w.pid, signal.SIGKILL)  # the child is gone before the job is sent
    url = f"file://{cache}"
    c = types.SimpleNamespace(url=url, backend=open_backend(url))
    with open_store(tmp_path / "dst") as dst:
        tmp = await download(dst, c, ni, None, w)
        assert hash_path(tmp) == want  # restored here, after the worker failed
    assert not w.usable
    await w.aclose()


async def test_a_tiny_nar_that_is_a_fifo_is_waited_for_outside_the_event_loop(tmp_path, monkeypatch):
    """A tiny NAR of a file:// cache is restored in the event loop when it is a file; one that
    is a FIFO (a tool streaming it in) is waited for in a thread, so the rest of the run goes
    on meanwhile: here the FIFO is fed by a task of the same run, once the restore has opened
    it.  (Restored in the event loop, the wait for its first bytes held up that task until
    FIFO_WAIT ran out: "a FIFO that nothing was written to".)"""
    import errno

    from purestore.cache import _files
    from purestore.cache.fetch import TINY_NAR

    monkeypatch.setattr(_files, "FIFO_WAIT", 5.0)
    cache, ni, want = pushed(tmp_path, lambda store: make_path(store, "tiny", {"f": b"a few bytes\n"}))
    assert ni.nar_size <= TINY_NAR and ni.file_size <= TINY_NAR
    nar = cache / ni.url
    data = nar.read_bytes()
    nar.unlink()
    os.mkfifo(nar)
    url = f"file://{cache}"
    c = types.SimpleNamespace(url=url, backend=open_backend(url))

    async def feed():
        while True:  # (opening a FIFO to write without blocking fails until a reader has it open)
            try:
                fd = os.open(nar, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                await trio.sleep(0.01)
        try:
            os.set_blocking(fd, True)
            os.write(fd, data)
        finally:
            os.close(fd)

    with open_store(tmp_path / "dst") as dst:
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(feed)
                tmp = await download(dst, c, ni, None, None)
        assert hash_path(tmp) == want


@pytest.mark.parametrize("kill", [False, True], ids=["worker", "worker-gone"])
async def test_a_big_nar_asked_for_ahead_is_restored_by_the_worker_or_asked_for_again(tmp_path, kill):
    """A big NAR whose response was opened before its restore started (fetch.Opened), fed to
    the forked worker; when the worker is gone (and may have read part of that response), the
    restore in a thread asks the cache afresh."""
    from purestore.cache.fetch import Opened
    from purestore.cache.server import serve_cache
    cache, ni, want = pushed(tmp_path, lambda store: make_path(store, "big", {"blob": os.urandom(2 << 20)}))
    w = ForkedWorker.start()
    if kill:
        os.kill(w.pid, signal.SIGKILL)
    async with trio.open_nursery() as n:
        (url,) = await n.start(lambda task_status: serve_cache(str(cache), "127.0.0.1:0", task_status=task_status))
        async with open_backend(url) as b:
            c = types.SimpleNamespace(url=url, backend=b)
            async with b.open_read(ni.url) as chunks:
                with open_store(tmp_path / "dst") as dst:
                    tmp = await download(dst, c, ni, None, w, Opened(chunks))
                    assert hash_path(tmp) == want
        n.cancel_scope.cancel()
    assert w.usable is not kill
    await w.aclose()


def test_cli_copy_from_file_cache_with_the_worker(tmp_path):
    """Several paths from a file:// cache through the CLI (the worker restores some of them)."""
    src = tmp_path / "src"
    with open_store(src) as store:
        lib, app = make_closure(store)
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    cache = tmp_path / "cache"
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", key, store.print_path(app), root=src)
    from test_cache_support import PUB
    dst = tmp_path / "dst"
    r = run_pure("copy", "-j", "2", "--from", f"file://{cache}", "--trusted-public-keys", PUB,
                 f"/pure/store/{app.base_name}", root=dst)
    assert "fetched 2 paths" in r.stderr
    run_pure("store", "verify", "--check-contents", root=dst)


@pytest.mark.parametrize("to", ["group", "command"])
def test_ctrl_c_while_the_worker_and_a_thread_restore_leaves_nothing_behind(tmp_path, to):
    """Both NARs are FIFOs fed two thirds of the way: one restore is in the worker, one in a thread of the
    command, both waiting for more, when SIGINT reaches the process group (Ctrl-C: the worker
    dies of it at once) or the command alone (it must stop the worker itself)."""
    import subprocess
    import sys
    import threading

    from conftest import pure_env
    from test_cache_support import PUB

    src = tmp_path / "src"
    with open_store(src) as store:  # NARs of 3 MiB: the restores read 1 MiB at a time
        lib = make_path(store, "big-lib", {"": os.urandom(3 << 20)})
        app = make_path(store, "big-app", {"data": os.urandom(3 << 20)}, refs=[lib])
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    cache = tmp_path / "cache"
    run_pure("copy", "--to", f"file://{cache}?compression=none", "--secret-key-file", key,
             store.print_path(app), root=src)

    started = []
    release = threading.Event()

    def feed(fifo, data):
        with open(fifo, "wb", buffering=0) as f:  # blocks until pure opens it for reading
            f.write(data[: 2 << 20])
            started.append(fifo)
            release.wait(30)

    feeders = []
    for sp in (lib, app):
        text = (cache / f"{sp.hash_part}.narinfo").read_text()
        nar = cache / next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
        data = nar.read_bytes()
        nar.unlink()
        os.mkfifo(nar)
        t = threading.Thread(target=feed, args=(nar, data), daemon=True)
        t.start()
        feeders.append(t)

    dst = tmp_path / "dst"
    p = subprocess.Popen(
        [sys.executable, "-m", "purestore.cli.main", "copy", "--from", f"file://{cache}",
         "--trusted-public-keys", PUB, f"/pure/store/{app.base_name}"],
        env=pure_env(dst, None, None), stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while len(started) < 2 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.02)
        assert len(started) == 2, "both restores should be under way"
        while len(os.listdir(dst / "pure/store/.tmp")) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # until both have created their temporary trees
        assert len(os.listdir(dst / "pure/store/.tmp")) == 2

        if to == "group":
            os.killpg(p.pid, signal.SIGINT)
        else:
            os.kill(p.pid, signal.SIGINT)
        time.sleep(0.3)
        release.set()  # the thread's read ends (the worker's was killed)
        err = p.communicate(timeout=60)[1]
    finally:
        release.set()
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "error: interrupted" in err and "Traceback" not in err, err
    store_dir = dst / "pure/store"
    assert [n for n in os.listdir(store_dir) if n != ".tmp"] == []
    assert os.listdir(store_dir / ".tmp") == []
    run_pure("store", "verify", "--check-contents", root=dst)


def _stop_group(pgid: int) -> None:
    """SIGSTOP the process group ``pgid`` and wait until every thread of it is stopped (at
    once when the group is gone)."""
    try:
        os.killpg(pgid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    while True:
        running = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[2]) != pgid:
                        continue
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] not in "tTZX":
                            running.append(tid)
            except (OSError, ValueError, IndexError):
                continue  # (gone meanwhile)
        if not running:
            return
        time.sleep(0.001)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("to", ["group", "command"])
def test_ctrl_c_during_a_push_leaves_no_temporary_file(tmp_path, to, sig):
    """Two big paths compress at once, one in the worker and one in a thread, when SIGINT comes
    (or SIGTERM, as `timeout` and service managers send: the same clean-up, exit status 143)."""
    import subprocess
    import sys

    from conftest import pure_env

    src = tmp_path / "src"
    with open_store(src) as store:
        lib = make_path(store, "big-lib", {"": os.urandom(4 << 20)})  # ~0.5 s each with xz
        app = make_path(store, "big-app", {"data": os.urandom(4 << 20)}, refs=[lib])
        app_p = store.print_path(app)
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    # The command's process group is stopped (SIGSTOP) once both temporary files are there, and
    # the signal sent only if, stopped, both compressions are still under way; then it goes on.
    # Each takes ~0.5 s: on a loaded machine they could end before a signal sent at once came.
    # A push that finished first is done again into a new cache (at most 5 times).
    for attempt in range(5):
        cache = tmp_path / f"cache-{attempt}"
        p = subprocess.Popen(
            [sys.executable, "-m", "purestore.cli.main", "copy", "--to",
             f"file://{cache}?compression=xz&compression-level=0", "--secret-key-file", str(key), app_p],
            env=pure_env(src, None, None), stderr=subprocess.PIPE, text=True, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

        def temps():
            try:
                return [n for n in os.listdir(cache / "nar") if n.startswith(".tmp-")]
            except FileNotFoundError:
                return []
        try:
            deadline = time.monotonic() + 60
            while len(temps()) < 2 and time.monotonic() < deadline and p.poll() is None:
                time.sleep(0.005)
            assert len(temps()) == 2, "both compressions should be under way"
            _stop_group(p.pid)
            in_time = p.poll() is None and len(temps()) == 2
            if in_time:
                if to == "group":
                    os.killpg(p.pid, getattr(signal, sig))
                else:
                    os.kill(p.pid, getattr(signal, sig))
            try:
                os.killpg(p.pid, signal.SIGCONT)
            except ProcessLookupError:  # (it had ended)
                pass
            err = p.communicate(timeout=120)[1]
        finally:
            if p.poll() is None:
                p.kill()
        if in_time:
            break
        assert p.returncode == 0, err  # the push ended first: again
    else:
        pytest.fail("each push ended before it could be stopped")
    if sig == "SIGINT":
        assert p.returncode == 130 and "error: interrupted" in err, err
    else:
        assert p.returncode == 143 and "error: terminated (SIGTERM)" in err, err
    assert "Traceback" not in err, err
    assert temps() == []
    assert not list(cache.glob("*.narinfo"))


def test_a_fork_that_fails_gives_no_worker_and_leaks_nothing(monkeypatch):
    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    before = sorted(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", no_fork)
    assert ForkedWorker.start() is None
    assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGTERM-in-background"])
def test_ctrl_c_stops_a_slow_compression_in_a_thread_at_once(tmp_path, sig):
    """One lane (-j 1: a thread of the command, no forked worker) compressing a NAR that takes
    many seconds (xz at level 9): the signal stops it within a chunk, not at the end of the NAR,
    and its temporary file is removed.  "in-background": started with SIGINT ignored, as a
    background job of a non-interactive shell (`pure copy … &` in a script) is."""
    background = sig.endswith("-in-background")
    sig = sig.split("-")[0]
    sigint = signal.SIG_IGN if background else signal.SIG_DFL
    import subprocess
    import sys

    from conftest import pure_env

    src = tmp_path / "src"
    with open_store(src) as store:
        big = make_path(store, "big", {"": os.urandom(48 << 20)})  # xz -9: well over 10 s here
        big_p = store.print_path(big)
    cache = tmp_path / "cache"
    p = subprocess.Popen(
        [sys.executable, "-m", "purestore.cli.main", "copy", "-j", "1", "--to",
         f"file://{cache}?compression=xz&compression-level=9", big_p],
        env=pure_env(src, None, None), stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    try:
        deadline = time.monotonic() + 60
        while not list(cache.glob("nar/.tmp-*")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1)  # well into the NAR
        assert p.poll() is None, p.communicate()[1]
        t0 = time.monotonic()
        os.kill(p.pid, getattr(signal, sig))
        err = p.communicate(timeout=60)[1]
        stopped_after = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == (130 if sig == "SIGINT" else 143), err
    assert ("error: interrupted" if sig == "SIGINT" else "error: terminated (SIGTERM)") in err, err
    assert "Traceback" not in err, err
    # (finishing the 48 MiB would take 40 s and more; one xz -9 chunk took 0.95 s when loaded)
    assert stopped_after < 15, f"took {stopped_after:.1f} s to stop"
    assert not list(cache.glob("nar/.tmp-*")) and not list(cache.glob("*.narinfo"))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_restore_in_a_thread_stops_at_once_when_the_command_is_interrupted(tmp_path, sig):
    """A big NAR from a file:// cache restored in a thread of the command (``-j 1``: no forked
    worker), its file a FIFO fed 64 KiB every 100 ms (13 s in all): SIGINT or SIGTERM stops the
    restore at its next read (the thread is not waited for until the NAR ends), and nothing is left."""
    import subprocess
    import sys
    import threading

    from conftest import pure_env
    from test_cache_support import PUB

    src = tmp_path / "src"
    with open_store(src) as store:
        big = make_path(store, "big", {"data": os.urandom(8 << 20)})
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    cache = tmp_path / "cache"
    run_pure("copy", "--to", f"file://{cache}?compression=none", "--secret-key-file", key,
             store.print_path(big), root=src)
    text = (cache / f"{big.hash_part}.narinfo").read_text()
    nar = cache / next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
    data = nar.read_bytes()
    nar.unlink()
    os.mkfifo(nar)
    fed, quit_feeding = [], threading.Event()

    def feed():
        try:
            with open(nar, "wb", buffering=0) as f:  # blocks until pure opens it for reading
                for i in range(0, len(data), 64 << 10):  # 64 KiB every 100 ms: 13 s in all
                    if quit_feeding.wait(0.1):
                        return
                    f.write(data[i:i + (64 << 10)])
                    fed.append(i)
        except BrokenPipeError:  # the reader is gone
            pass
    t = threading.Thread(target=feed, daemon=True)
    t.start()

    dst = tmp_path / "dst"
    p = subprocess.Popen(
        [sys.executable, "-m", "purestore.cli.main", "copy", "-j", "1", "--from", f"file://{cache}",
         "--trusted-public-keys", PUB, f"/pure/store/{big.base_name}"],
        env=pure_env(dst, None, None), stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while len(fed) < 3 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.02)
        assert len(fed) >= 3, "the restore should be under way"
        os.kill(p.pid, getattr(signal, sig))
        t0 = time.monotonic()
        err = p.communicate(timeout=30)[1]
        took = time.monotonic() - t0
    finally:
        quit_feeding.set()
        if p.poll() is None:
            p.kill()
    assert took < 5, f"the command took {took:.1f} s to stop: it waited for the restoring thread"
    assert p.returncode == (130 if sig == "SIGINT" else 143), err
    assert "Traceback" not in err, err
    store_dir = dst / "pure/store"
    assert [n for n in os.listdir(store_dir) if n != ".tmp"] == []
    assert os.listdir(store_dir / ".tmp") == []
    run_pure("store", "verify", "--check-contents", root=dst)
