"""The substituter API the builder uses: `substitute`, `fetch_path`; priorities, negative caching,
partial success, repair, offline, and many paths over HTTP with the in-process trio server."""

from __future__ import annotations

import os
import stat
import threading

import pytest
import trio

from test_cache_support import PUB, SEC, make_closure, make_path, open_store, rewrite_narinfo, settings_for


async def push(store, settings, url, paths, key=SEC):
    from purestore.cache import copy_to
    from purestore.formats.signing import SecretKey
    return await copy_to(store, settings, url, paths, secret_keys=[SecretKey.parse(key)] if key else [])


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "src"
    store = open_store(root)
    lib, app = make_closure(store)
    yield store, settings_for(root), lib, app
    store.close()


def dest(tmp_path, *caches, name="dst", **kw):
    root = tmp_path / name
    s = settings_for(root, substituters=tuple(caches), trusted_public_keys=(PUB,), **kw)
    from purestore.store.local import LocalStore
    return LocalStore.open(s, durable=False), s


async def test_substitute_fetches_closure_and_records_event(source, tmp_path):
    from purestore.cache import substitute
    from purestore.store import events
    store, s, lib, app = source
    await push(store, s, f"file://{tmp_path}/c", [app])
    d, ds = dest(tmp_path, f"file://{tmp_path}/c")
    with d:
        got = await substitute(d, ds, {app})
        assert got == {app}
        assert d.is_valid(lib) and d.query_path_info(app).references == frozenset({lib})
        assert d.verify(check_contents=True).ok
        subs = events.query_substitutions(d)
        assert {e["path"] for e in subs} == {d.print_path(app), d.print_path(lib)}
        assert all(e["cache"] == f"file://{tmp_path}/c" for e in subs)


async def test_priority_order_and_untrusted_cache_skipped(source, tmp_path, caplog):
    """The cache with the lower Priority wins; a cache with bad signatures is passed over."""
    import logging
    from purestore.cache import substitute
    from purestore.formats.signing import SecretKey
    from purestore.store import events
    store, s, lib, app = source
    for name in ("slow", "fast", "evil"):
        key = SecretKey.generate("evil-1").render() if name == "evil" else SEC
        await push(store, s, f"file://{tmp_path}/{name}", [app], key=key)
    (tmp_path / "fast" / "nix-cache-info").write_text("StoreDir: /pure/store\nPriority: 10\n")
    (tmp_path / "evil" / "nix-cache-info").write_text("StoreDir: /pure/store\nPriority: 1\n")
    d, ds = dest(tmp_path, f"file://{tmp_path}/evil", f"file://{tmp_path}/slow", f"file://{tmp_path}/fast")
    with d, caplog.at_level(logging.WARNING, logger="purestore.cache"):
        assert await substitute(d, ds, {app}) == {app}
        assert {e["cache"] for e in events.query_substitutions(d)} == {f"file://{tmp_path}/fast"}
    # the narinfo passed over is said, for each path, naming both caches (as Nix warns of it)
    said = sorted(r.getMessage() for r in caplog.records if "not using" in r.getMessage())
    assert len(said) == 2 and all(f"from 'file://{tmp_path}/evil'" in m and "is not trusted" in m
                                  and m.endswith(f"; using 'file://{tmp_path}/fast'") for m in said), said
    assert {m.split("'")[1] for m in said} == {d.print_path(app), d.print_path(lib)}


async def test_partial_success_and_nothing_untrusted_registered(source, tmp_path):
    from purestore.cache import substitute_report
    store, s, lib, app = source
    other = make_path(store, "other-1", {"": b"other\n"})
    c = tmp_path / "c"
    await push(store, s, f"file://{c}", [app, other])
    rewrite_narinfo(c, other, drop_sigs=True)
    d, ds = dest(tmp_path, f"file://{c}")
    with d:
        rep = await substitute_report(d, ds, {app, other})
        assert rep.valid == {app}
        assert "no signature" in rep.failures[other]
        assert not d.is_valid(other)


def _spoil_nar(cache, sp, how):
    text = (cache / f"{sp.hash_part}.narinfo").read_text()
    nar = cache / next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
    if how == "missing":
        nar.unlink()
    else:
        data = bytearray(nar.read_bytes())
        data[len(data) // 2] ^= 1
        nar.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["missing", "corrupt"])
async def test_a_failing_nar_falls_back_to_the_next_cache(source, tmp_path, caplog, how):
    """The preferred cache's NAR of lib is gone or corrupt: lib comes from the next cache with a
    trusted narinfo for it (with a warning), app still from the preferred one."""
    from purestore.cache import substitute_report
    from purestore.store import events
    store, s, lib, app = source
    for name in ("near", "far"):
        await push(store, s, f"file://{tmp_path}/{name}", [app])
    (tmp_path / "near" / "nix-cache-info").write_text("StoreDir: /pure/store\nPriority: 10\n")
    _spoil_nar(tmp_path / "near", lib, how)
    near, far = f"file://{tmp_path}/near?priority=10", f"file://{tmp_path}/far"
    from purestore.cache.progress import Progress
    d, ds = dest(tmp_path, far, near)
    with d:
        progress = Progress()
        rep = await substitute_report(d, ds, {app}, progress=progress)
        assert rep.valid == {app} and not rep.failures
        # the failed download is counted out again: the totals are the two paths, once each
        sizes = sum(d.query_path_info(p).nar_size for p in (lib, app))
        assert (progress.paths_done, progress.paths_total) == (2, 2)
        assert progress.bytes_done == progress.bytes_total == sizes
        assert d.verify(check_contents=True).ok
        came = {e["path"]: e["cache"] for e in events.query_substitutions(d)}
        assert came == {d.print_path(lib): far, d.print_path(app): near}
    assert f"cannot substitute '{d.print_path(lib)}' from '{near}'" in caplog.text
    assert f"trying '{far}'" in caplog.text
    # the NAR's place is named without the cache URL's parameters
    assert f"file://{tmp_path}/near/nar/" in caplog.text and "?priority=10/" not in caplog.text
    # every cache fails: the reason names each one, and nothing is registered
    _spoil_nar(tmp_path / "far", lib, how)
    d2, ds2 = dest(tmp_path, far, near, name="dst2")
    with d2:
        progress = Progress()
        rep = await substitute_report(d2, ds2, {app}, progress=progress)
        assert rep.valid == set() and d2.valid_paths() == []
        assert (progress.paths_done, progress.paths_total, progress.bytes_done, progress.bytes_total) == (0, 0, 0, 0)
        why = rep.failures[lib]
        assert why.startswith(f"from '{near}': ") and f"; from '{far}': " in why
        assert "could not be substituted" in rep.failures[app]


async def test_negative_lookups_are_cached_briefly(source, tmp_path):
    from purestore.cache import substitute
    store, s, lib, app = source
    c = f"file://{tmp_path}/c"
    await push(store, s, c, [lib])
    d, ds = dest(tmp_path, c, narinfo_cache_negative_ttl=3600)
    with d:
        assert await substitute(d, ds, {app}) == set()
        await push(store, s, c, [app])
        assert await substitute(d, ds, {app}) == set()  # still remembered as missing
        assert await substitute(d, ds.evolve(narinfo_cache_negative_ttl=0), {app}) == {app}
        # found there by a run that remembers nothing (as `pure copy --from`'s): no longer
        # remembered as missing (it was, for the TTL: the path, deleted, was not fetched again)
        d.delete([app])
        assert await substitute(d, ds, {app}) == {app}


def test_remembered_answers_past_their_time_are_removed(tmp_path):
    """The file of negative answers kept every answer for good: those older than the TTL and a
    day go when the memory is opened; recent ones stay."""
    import sqlite3
    import time

    from purestore.cache.narinfo_cache import NegativeCache
    mem = NegativeCache(str(tmp_path), 300)
    mem.add("file:///c", "a" * 32)
    mem.close()
    db = sqlite3.connect(tmp_path / "narinfo-cache.sqlite")
    with db:
        db.execute("INSERT INTO Negative VALUES (?, ?, ?)", ("file:///c", "b" * 32, time.time() - 2 * 86400))
    db.close()
    mem = NegativeCache(str(tmp_path), 300)
    assert mem.is_negative("file:///c", "a" * 32)
    mem.close()
    db = sqlite3.connect(tmp_path / "narinfo-cache.sqlite")
    assert [h for (h,) in db.execute("SELECT hash FROM Negative")] == ["a" * 32]
    db.close()


async def test_a_substituter_listed_twice_is_one_cache(source, tmp_path):
    """A URL in the list twice (substituters and extra-substituters): opened and asked once
    per path, as Nix takes it (it was asked twice for every narinfo, on a real server here)."""
    from purestore.cache import substitute
    from test_cache_support import start_server, stop_server
    store, s, lib, app = source
    c = tmp_path / "c"
    await push(store, s, f"file://{c}", [app])
    log = tmp_path / "access.log"
    proc, url = start_server(c, "--access-log", log)
    try:
        d, ds = dest(tmp_path, url, url)
        with d:
            with trio.fail_after(60):
                assert await substitute(d, ds, {app}) == {app}
    finally:
        stop_server(proc)
    asked = sorted(line.split('"')[1] for line in log.read_text().splitlines() if "/nar/" not in line)
    assert asked == sorted(f"GET /{name} HTTP/1.1" for name in
                           ("nix-cache-info", f"{lib.hash_part}.narinfo", f"{app.hash_part}.narinfo")), asked
    # and `pure cache info` lists it once
    import json

    from conftest import run_pure
    out = json.loads(run_pure("cache", "info", "--json", f"file://{c}", f"file://{c}").stdout)
    assert [x["url"] for x in out["caches"]] == [f"file://{c}"]


async def test_a_push_from_this_store_forgets_that_the_path_was_missing(source, tmp_path):
    """The store remembered "not in c" for app; this store then pushes app to c (with other URL
    parameters than the substituter's): the next lookup asks c again and fetches it, as Nix
    records a push.  (A push from elsewhere cannot tell this store: the test above.)"""
    from purestore.cache import substitute
    store, s, lib, app = source
    c, c2 = f"file://{tmp_path}/c", f"file://{tmp_path}/c2"
    await push(store, s, c, [lib])
    await push(store, s, c2, [app])
    d, ds = dest(tmp_path, c, narinfo_cache_negative_ttl=3600)
    with d:
        assert await substitute(d, ds, {app}) == set()  # remembered: c lacks app
        assert await substitute(d, ds.evolve(substituters=(c2,)), {app}) == {app}
        await push(d, ds, c + "?compression=xz", [app])
        d.delete([app])
        assert await substitute(d, ds, {app}) == {app}


async def test_offline_and_no_substituters_do_nothing(source, tmp_path):
    from purestore.cache import substitute
    store, s, lib, app = source
    c = f"file://{tmp_path}/c"
    await push(store, s, c, [app])
    d, ds = dest(tmp_path, c, offline=True)
    with d:
        assert await substitute(d, ds, {app}) == set()
        assert await substitute(d, ds.evolve(substituters=()), {app}) == set()
        assert d.valid_paths() == []


async def test_fetch_path_repairs_a_corrupted_path(source, tmp_path):
    from purestore.cache import fetch_path, substitute
    store, s, lib, app = source
    c = f"file://{tmp_path}/c"
    await push(store, s, c, [app])
    d, ds = dest(tmp_path, c)
    with d:
        await substitute(d, ds, {app})
        doc = os.path.join(d.real_path(app), "share", "doc")
        os.chmod(os.path.dirname(doc), 0o755)
        os.chmod(doc, 0o644)
        with open(doc, "ab") as f:
            f.write(b"tampered")
        assert not d.verify(check_contents=True).ok
        assert await fetch_path(d, ds, app, repair=True)
        assert d.verify(check_contents=True).ok
        assert stat.S_IMODE(os.stat(doc).st_mode) == 0o444


async def test_many_small_paths_over_http_in_parallel(tmp_path):
    """60 paths in a chain of dependencies and a fan-out, served by `serve_cache` in-process."""
    from purestore.cache import serve_cache, substitute
    root = tmp_path / "src"
    with open_store(root) as store:
        s = settings_for(root)
        leaves = [make_path(store, f"leaf-{i}", {"": f"leaf {i}\n".encode()}) for i in range(50)]
        top = make_path(store, "top", {"refs": "\n".join(map(store.print_path, leaves)).encode()}, refs=leaves)
        chain = [top]
        for i in range(10):
            chain.append(make_path(store, f"chain-{i}", {"": store.print_path(chain[-1]).encode()}, refs=[chain[-1]]))
        cache = tmp_path / "c"
        await push(store, s, f"file://{cache}", [chain[-1]])
    async with trio.open_nursery() as n:
        (url,) = await n.start(serve_cache, str(cache), "127.0.0.1:0")
        d, ds = dest(tmp_path, url + "/")
        with d:
            with trio.fail_after(60):
                assert await substitute(d, ds, {chain[-1]}) == {chain[-1]}
            assert len(d.valid_paths()) == 61
            assert d.verify(check_contents=True).ok
        n.cancel_scope.cancel()


@pytest.mark.parametrize("forked", [False, True], ids=["threads", "forked-worker"])
async def test_big_paths_over_http_stream_through_the_reading_thread(tmp_path, forked):
    """NARs of several MiB are streamed (not fetched in one piece) and read ahead of the restore
    by a thread that takes the chunks from the trio side; small ones are restored in one go.
    With the forked worker of `pure copy`, it takes one of the big NARs at a time, fed through
    a pipe, while threads restore the others."""
    from purestore.cache import serve_cache, substitute_report
    from purestore.cache import fetch, nar_jobs
    root = tmp_path / "src"
    with open_store(root) as store:
        s = settings_for(root)
        bigs = [make_path(store, f"big-{i}", {"blob": os.urandom(3 << 20), "x/small": b"s\n"}) for i in range(3)]
        top = make_path(store, "top", {"": "\n".join(map(store.print_path, bigs)).encode()}, refs=bigs)
        cache = tmp_path / "c"
        await push(store, s, f"file://{cache}", [top])
    sizes = [int(l.split()[1]) for f in cache.glob("*.narinfo") for l in f.read_text().splitlines()
             if l.startswith("FileSize:")]
    assert sum(n > fetch.SMALL_NAR for n in sizes) == 3 and sum(n >= nar_jobs.AHEAD_MIN for n in sizes) == 3
    async with trio.open_nursery() as n:
        (url,) = await n.start(serve_cache, str(cache), "127.0.0.1:0")
        d, ds = dest(tmp_path, url + "/")
        with d:
            with trio.fail_after(60):
                rep = await substitute_report(d, ds, {top}, jobs=2, fork_worker=forked)
                assert rep.valid == {top} and not rep.failures
            assert len(d.valid_paths()) == 4
            assert d.verify(check_contents=True).ok
        n.cancel_scope.cancel()


async def test_small_nars_over_http_download_many_at_once_by_default(tmp_path):
    """Small NARs wait on the network, not the CPU: by default 16 are downloaded at once (a cache
    a round trip away is then twice as fast as with the 4 at a time of a 2-core machine's old
    default).  A threaded server that holds every NAR request a moment counts them in flight."""
    import functools
    import http.server
    import threading
    import time
    from purestore.cache import substitute
    from purestore.cache.substituter import SMALL_FETCHES
    root = tmp_path / "src"
    with open_store(root) as store:
        s = settings_for(root)
        leaves = [make_path(store, f"leaf-{i}", {"": f"leaf {i}\n".encode()}) for i in range(40)]
        top = make_path(store, "top", {"refs": "\n".join(map(store.print_path, leaves)).encode()}, refs=leaves)
        cache = tmp_path / "c"
        await push(store, s, f"file://{cache}", [top])
    lock = threading.Lock()
    now = [0, 0]  # NAR requests in flight, the most at once
    # NAR requests are held until more than 8 are in flight (or 10 s have passed: a client that
    # never gets there ends the wait, and the test fails on its count), then each 0.25 s more.
    # Held 0.25 s alone, a loaded machine (the client and this server share one process) could
    # start fewer than 9 requests before the first was answered.
    many = threading.Event()

    class Slow(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if not self.path.startswith("/nar/"):
                return super().do_GET()
            with lock:
                now[0] += 1
                now[1] = max(now)
                if now[0] > 8:
                    many.set()
            try:
                if not many.wait(10):
                    many.set()
                time.sleep(0.25)
                return super().do_GET()
            finally:
                with lock:
                    now[0] -= 1

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Slow, directory=str(cache)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        d, ds = dest(tmp_path, f"http://127.0.0.1:{server.server_address[1]}/")
        with d:
            with trio.fail_after(60):
                assert await substitute(d, ds, {top}) == {top}
            assert len(d.valid_paths()) == 41 and d.verify(check_contents=True).ok
    finally:
        server.shutdown()
        server.server_close()
    assert 8 < now[1] <= SMALL_FETCHES, now


async def _held_elsewhere(store, s, tmp_path, n: int):
    """``n`` paths and one more pushed to a cache, and a destination store whose path locks of
    the ``n`` are held through lock files of their own (another "process"): (held, other, the
    destination store, its settings, the holder)."""
    from purestore.store.lock import PathLocks
    held = [make_path(store, f"held-{i}", {"": f"held {i}\n".encode()}) for i in range(n)]
    other = make_path(store, "other", {"": b"other\n"})
    await push(store, s, f"file://{tmp_path}/c", [*held, other])
    d, ds = dest(tmp_path, f"file://{tmp_path}/c")
    holder = PathLocks(d.locks.directory)
    for p in held:
        assert holder.acquire(p.base_name, blocking=False)
    return held, other, d, ds, holder


async def test_waiting_for_many_paths_another_process_holds_leaves_the_threads_free(source, tmp_path):
    """A substitution that waits for more paths than trio has default worker threads (another
    process holds their path locks) still lets everything else of the process that needs a
    thread go on: the waits used to take all 40, so a second substitution (or the registering
    and cleanup of the first) stood still until the other process let go, and when that process
    waited for this one in turn, neither ever ended (two `pure build`s fetching one closure of
    1000 paths into one store hung for good)."""
    from purestore.cache import substitute
    from purestore.cache.progress import Progress
    from purestore.cache.substituter import substitute_report
    from purestore.store.lock import PathLocks

    store, s, lib, _app = source
    n = trio.to_thread.current_default_thread_limiter().total_tokens + 10
    held, other, d, ds, holder = await _held_elsewhere(store, s, tmp_path, n)
    all_waiting = trio.Event()

    class CountingLocks(PathLocks):
        """The store's path locks, counting the waits for a lock held elsewhere."""
        waits = 0

        def wait_released(self, name):
            with self._mutex:
                self.waits += 1
                last = self.waits == n
            if last:
                trio.from_thread.run_sync(all_waiting.set)
            super().wait_released(name)

    class Notes(Progress):
        def __init__(self):
            super().__init__()
            self.lines: list[str] = []

        def note(self, text):
            self.lines.append(text)

    d.locks = CountingLocks(d.locks.directory)
    notes = Notes()
    with d:
        async with trio.open_nursery() as nursery:
            reports = []

            async def first():
                reports.append(await substitute_report(d, ds, held, progress=notes))
            nursery.start_soon(first)
            with trio.fail_after(60):  # a hang guard, not a timing: this takes milliseconds
                await all_waiting.wait()
                assert await substitute(d, ds, {other}) == {other}
            assert not any(d.is_valid(p) for p in held)
            for p in held:
                holder.release(p.base_name)
        [rep] = reports
        assert rep.valid == set(held) and sorted(rep.fetched) == sorted(held) and not rep.failures
        assert os.listdir(d.real_path(other).rsplit("/", 1)[0] + "/.tmp") == []
    # the first wait is named, the others counted (not a line each)
    assert len(notes.lines) == 2, notes.lines
    assert notes.lines[0].startswith("waiting for another process to finish '/pure/store/")
    assert notes.lines[1] == f"waited for another process to finish {n} paths in all"


async def test_waits_for_paths_another_process_holds_use_a_bounded_number_of_threads(source, tmp_path, monkeypatch):
    """The waits for path locks another process holds block at most WAIT_THREADS threads of a
    run; the others poll: a thread per path made a run waiting for 200 paths fail with "can't
    start new thread" (a traceback) under a pids limit of 150, as a container may have.  The
    waits still end once the locks are released, and the rest of the run goes on meanwhile."""
    import trio.testing

    from purestore import _lock_wait
    from purestore.cache import substitute
    from purestore.cache.substituter import substitute_report
    from purestore.store.lock import PathLocks

    monkeypatch.setattr(_lock_wait, "WAIT_THREADS", 4)
    store, s, _lib, _app = source
    n = 24
    held, other, d, ds, holder = await _held_elsewhere(store, s, tmp_path, n)
    all_refused, threads_in = trio.Event(), trio.Event()
    counted = threading.Lock()

    class CountingLocks(PathLocks):
        refused: set = set()
        inside = most = 0

        def acquire(self, name, *, blocking=True):
            got = super().acquire(name, blocking=blocking)
            if not got:
                self.refused.add(name)
                if len(self.refused) == n:
                    all_refused.set()
            return got

        def wait_released(self, name):
            # (its own lock: the trio thread takes PathLocks._mutex in acquire, so telling the
            # trio thread while holding that one could wait for good)
            with counted:
                self.inside += 1
                self.most = max(self.most, self.inside)
                four = self.inside == 4
            if four:
                trio.from_thread.run_sync(threads_in.set)
            try:
                super().wait_released(name)
            finally:
                with counted:
                    self.inside -= 1

    d.locks = locks = CountingLocks(d.locks.directory)
    with d:
        async with trio.open_nursery() as nursery:
            reports = []

            async def first():
                reports.append(await substitute_report(d, ds, held))
            nursery.start_soon(first)
            with trio.fail_after(60):  # a hang guard, not a timing
                await all_refused.wait()
                await threads_in.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert await substitute(d, ds, {other}) == {other}
            assert not any(d.is_valid(p) for p in held)
            for p in held:
                holder.release(p.base_name)
        [rep] = reports
        assert rep.valid == set(held) and sorted(rep.fetched) == sorted(held) and not rep.failures
    assert locks.most <= 4, locks.most
