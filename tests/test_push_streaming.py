"""The push data path: NAR views from fsnar.stream_path, compression output handed over as views
(compression.compress_to / flush_to), reused dump buffers, and what a push guarantees whatever
order it compresses paths in (largest first)."""

from __future__ import annotations

import hashlib
import io
import os
import time
import random
import shutil
import threading

import pytest
import trio
import zstandard

from conftest import run_pure
from purestore.cache import compression as C
from purestore.store import fsnar
from test_cache_support import SEC, make_closure, make_path, open_store, settings_for


def _data(n: int, seed: int = 1) -> bytes:
    """Half random, half repetitive: both raw and compressed zstd blocks."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rng.randbytes(70_000) if rng.random() < 0.5 else b"text %d\n" % rng.randrange(50) * 4000
    return bytes(out[:n])


def _via_views(comp, pieces) -> bytes:
    out = bytearray()
    for p in pieces:
        C.compress_to(comp, p, out.extend)
    C.flush_to(comp, out.extend)
    return bytes(out)


@pytest.mark.skipif(C._LIBZSTD is None, reason="no system libzstd")
def test_system_zstd_bytes_do_not_depend_on_how_input_is_split():
    data = _data(5 << 20)
    whole = C.compressor("zstd")
    ref = whole.compress(data) + whole.flush()
    rng = random.Random(7)
    cuts = sorted(rng.randrange(len(data)) for _ in range(40)) + [len(data)]
    pieces, start = [], 0
    for c in cuts:
        pieces.append(memoryview(bytearray(data[start:c])))  # writable views, like the dumper's
        start = c
    assert _via_views(C.compressor("zstd"), pieces) == ref
    assert _via_views(C.compressor("zstd"), [data]) == ref  # one call bigger than the 1 MiB slices
    assert zstandard.ZstdDecompressor().decompressobj().decompress(ref) == data


@pytest.mark.skipif(C._LIBZSTD is None, reason="no system libzstd")
def test_system_zstd_output_buffer_grows_only_for_big_input_and_the_bytes_stay_the_same():
    """A compressor's output buffer is zstd's recommended size (~128 KiB) until a call brings
    more input than that: zeroing a buffer of a 1 MiB chunk's bound for every small NAR took a
    third of its compression time (190-250 us -> 126-140 us for a 300-byte NAR).  Small pieces
    then a big one give the bytes of one call."""
    out_size = C._LIBZSTD.ZSTD_CStreamOutSize()
    small = C.compressor("zstd")
    assert small._osz == out_size
    assert _via_views(small, [b"small path\n" * 30]) == _via_views(C.compressor("zstd"), [b"small path\n" * 30])
    assert small._osz == out_size
    data = _data(3 << 20, seed=5)
    whole = C.compressor("zstd")
    ref = whole.compress(data) + whole.flush()
    grown = C.compressor("zstd")
    pieces = [memoryview(bytearray(data[:1000])), memoryview(bytearray(data[1000:]))]
    assert _via_views(grown, pieces) == ref and grown._osz > out_size


@pytest.mark.parametrize("method", C.WRITABLE)
def test_compress_to_equals_compress_for_every_method(method):
    data = _data(600_000, seed=3)
    pieces = [data[:1], data[1:300_000], b"", data[300_000:]]
    a = C.compressor(method)
    ref = b"".join(a.compress(p) for p in pieces) + a.flush()
    views = []
    b = C.compressor(method)
    for p in pieces:
        C.compress_to(b, p, lambda v: views.append(bytes(v)))
    C.flush_to(b, lambda v: views.append(bytes(v)))
    assert all(views) and b"".join(views) == ref
    from purestore.cache.decompression import open_reader
    src = iter([ref[:7], ref[7:], b""])
    r = open_reader(method, type("Src", (), {"read": lambda self, n=-1: next(src)})())
    out = []
    while chunk := r.read(1 << 16):
        assert len(chunk) <= 1 << 16
        out.append(chunk)
    assert b"".join(out) == data


def _tree(root, seed: int):
    rng = random.Random(seed)
    root.mkdir()
    (root / "big").write_bytes(rng.randbytes(fsnar._BUFSIZE * 2 + 12345))
    (root / "mid").write_bytes(rng.randbytes(fsnar._SMALL))
    d = root / "sub"
    d.mkdir()
    for i in range(300):
        (d / f"f{i:03d}").write_bytes(rng.randbytes(rng.randrange(3000)))
    os.symlink("big", root / "link")
    os.chmod(root / "mid", 0o755)


def _dump(path) -> bytes:
    out = io.BytesIO()
    fsnar.dump_path(str(path), out)
    return out.getvalue()


def test_stream_path_gives_the_dump_path_bytes_as_views(tmp_path):
    _tree(tmp_path / "t", 1)
    (tmp_path / "small").write_bytes(b"tiny\n")
    for p in (tmp_path / "t", tmp_path / "small"):
        got, kinds = bytearray(), set()

        def emit(v):
            kinds.add(type(v))
            got.extend(v)

        size = fsnar.stream_path(str(p), emit)
        assert bytes(got) == _dump(p) and size == len(got)
        assert kinds == {memoryview}


def test_reused_buffers_keep_dumps_correct_in_threads_and_after_errors(tmp_path):
    trees = []
    for i in range(4):
        _tree(tmp_path / f"t{i}", i)
        trees.append((tmp_path / f"t{i}", hashlib.sha256(_dump(tmp_path / f"t{i}")).digest()))

    class Boom(Exception):
        pass

    def fail(v):
        raise Boom

    with pytest.raises(Boom):  # a failed dump must not hand out a buffer still in use
        fsnar.stream_path(str(trees[0][0]), fail)
    errors = []

    def work(k):
        try:
            for j in range(3):
                p, want = trees[(k + j) % len(trees)]
                h, _n = fsnar.hash_path(str(p))
                assert h.digest == want
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(fsnar._SPARE) <= fsnar._SPARE_MAX


@pytest.fixture
def keyfile(tmp_path):
    p = tmp_path / "test-key-1.sec"
    p.write_text(SEC)
    return p


def test_push_refuses_a_corrupt_path_and_leaves_no_temporary_file(tmp_path, keyfile):
    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, app = make_closure(store)
        app_p = store.print_path(app)
    real = root / app_p.lstrip("/")
    os.chmod(real / "share", 0o755)
    os.chmod(real / "share/doc", 0o644)
    (real / "share/doc").write_bytes(b"tampered " * 500)
    r = run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p,
                 root=root, check=False)
    assert r.returncode == 1 and "is corrupt: its NAR hash is" in r.stderr and "Traceback" not in r.stderr
    assert not (cache / f"{app.hash_part}.narinfo").exists()
    assert not [p for p in (cache / "nar").iterdir() if p.name.startswith(".tmp-")]


def test_a_corrupt_path_fails_alone_and_the_rest_of_the_push_goes_on(tmp_path, keyfile):
    """lib is corrupt: lib and app (which refers to it) are not published, other is; --json
    says so, the hint says how to repair, and the cache verifies clean."""
    import json

    from test_cache_support import PUB

    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, app = make_closure(store)
        other = make_path(store, "other-1.0", {"x": os.urandom(3 << 20)})  # the biggest: first
        names = {n: store.print_path(p) for n, p in (("lib", lib), ("app", app), ("other", other))}
    real = root / names["lib"].lstrip("/")
    os.chmod(real, 0o644)
    real.write_bytes(b"tampered " * 100)
    r = run_pure("copy", "--json", "--to", f"file://{cache}", "--secret-key-file", keyfile,
                 names["app"], names["other"], root=root, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert out["uploaded"] == [names["other"]] and out["skipped"] == []
    assert sorted(out["failed"]) == sorted([names["lib"], names["app"]])
    assert "is corrupt: its NAR hash is" in out["failed"][names["lib"]]
    assert out["failed"][names["app"]] == f"its reference {names['lib']!r} could not be copied"
    assert f"error: cannot copy {names['lib']!r}: path '{real}' is corrupt" in r.stderr
    assert f"cannot copy {names['app']!r}: its reference" in r.stderr
    assert "hint: run 'pure store verify --check-contents --repair'" in r.stderr
    assert sorted(p.name for p in cache.glob("*.narinfo")) == [f"{other.hash_part}.narinfo"]
    v = run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{cache}")
    assert v.stdout == ""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root to mount a small tmpfs")
def test_a_cache_that_fills_up_says_what_was_published(tmp_path, keyfile):
    """The cache's file system fills up half way: the error says so, --json still lists what
    was published and what was not, and the cache holds nothing half-published."""
    import json
    import shlex
    import subprocess
    import sys

    from conftest import pure_env
    from test_cache_support import PUB

    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        # pushed largest first: zeros (fit, compressed), then random bytes (do not), then the rest
        zeros = make_path(store, "zeros-1.0", {"x": bytes(3 << 20)})
        big = make_path(store, "big-1.0", {"x": os.urandom(3 << 19)})
        small = [make_path(store, f"small-{i}", {"x": os.urandom(2000)}) for i in range(3)]
        names = sorted(store.print_path(p) for p in [zeros, big, *small])
    pure = f"{shlex.quote(sys.executable)} -m purestore.cli.main"
    script = (f"mkdir -p {cache} && mount -t tmpfs -o size=1m tmpfs {cache} && "
              f"{pure} copy --json -j 1 --to file://{cache} --secret-key-file {keyfile} "
              f"{' '.join(names)} > {tmp_path}/out 2> {tmp_path}/err; echo $? > {tmp_path}/rc; "
              f"{pure} cache verify --check-contents --trusted-public-keys '{PUB}' file://{cache} "
              f"> {tmp_path}/verify 2>&1; echo $? >> {tmp_path}/rc")
    subprocess.run(["unshare", "-m", "sh", "-c", script], env=pure_env(root), check=True, timeout=120)
    rc, vrc = (tmp_path / "rc").read_text().split()
    err = (tmp_path / "err").read_text()
    assert rc == "1" and "No space left on device" in err and "Traceback" not in err, err
    out = json.loads((tmp_path / "out").read_text())
    # zeros was compressed first, so it is published, unless the disk filled up before even its
    # small narinfo was written (big is compressed meanwhile): then it failed for that reason
    z = store.print_path(zeros)
    assert out["uploaded"] == [z] or "No space left on device" in out["failed"][z], out
    assert sorted([*out["uploaded"], *out["failed"]]) == names
    big_p = store.print_path(big)
    assert out["failed"][big_p].startswith("cannot write ") and "No space left on device" in out["failed"][big_p]
    # the small ones were not started, because of the first path that met the full disk: big,
    # or zeros when its narinfo came after big's partial NAR had filled the disk
    first = [q for q in (z, big_p) if "No space left on device" in out["failed"].get(q, "")]
    whys = {f"not started: the push stopped when the cache failed on {q!r}" for q in first}
    why = out["failed"][store.print_path(small[0])]
    assert why in whys and all(out["failed"][store.print_path(p)] == why for p in small), json.dumps(out, indent=1)
    assert (out["narBytes"] > 3 << 20) == bool(out["uploaded"]), out  # what was published only
    assert err.count("error: ") == 1 and f"cannot copy {big_p!r}: cannot write " in err
    for p in small:  # each named (up to ten)
        assert f"cannot copy {store.print_path(p)!r}: {why}" in err, err
    assert vrc == "0", (tmp_path / "verify").read_text()


def test_push_of_big_referrers_first_still_writes_references_narinfos_first(tmp_path, monkeypatch):
    """Paths are compressed largest first; a narinfo still appears only after its references'."""
    from purestore.cache import push
    from purestore.cache.backend import FileBackend

    root, cache = tmp_path / "a", tmp_path / "cache"
    rng = random.Random(5)
    with open_store(root) as store:
        base = make_path(store, "base", {"": b"small\n"})
        mid = make_path(store, "mid", {"f": rng.randbytes(300_000)}, refs=[base])
        top = make_path(store, "top", {"f": rng.randbytes(3_000_000)}, refs=[mid, base])
        others = [make_path(store, f"o{i}", {"": rng.randbytes(rng.randrange(1, 200_000))}, refs=[base])
                  for i in range(6)]
        written = []
        real_put = FileBackend.put_narinfo

        async def put_narinfo(self, name, data, *a, **kw):
            written.append(name[:-len(".narinfo")])
            return await real_put(self, name, data, *a, **kw)

        monkeypatch.setattr(FileBackend, "put_narinfo", put_narinfo)
        res = trio.run(lambda: push.copy_to(store, settings_for(root), f"file://{cache}", [top, *others],
                                            jobs=2))
    assert set(res.uploaded) == {base, mid, top, *others}
    assert written.index(base.hash_part) < written.index(mid.hash_part) < written.index(top.hash_part)
    assert all(written.index(base.hash_part) < written.index(o.hash_part) for o in others)
    assert sorted(written) == sorted(p.hash_part for p in res.uploaded)


async def test_run_stoppable_stops_its_thread_and_waits_for_it_or_never_starts_it():
    import threading

    import trio

    from purestore.cache._nursery import run_stoppable

    calls, finished = [], threading.Event()

    async def cancelled_while_running(fn, *args, then=lambda: None, **kw):
        """run_stoppable(fn, *args, **kw), cancelled once ``fn`` runs in its thread (a fixed
        delay could come before the thread started on a loaded machine), then ``then()``."""
        running = threading.Event()

        def entered(*a, stop):
            running.set()
            return fn(*a, stop)

        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                async def cancel():
                    await trio.to_thread.run_sync(running.wait)
                    scope.cancel()  # (the waiting task has its Cancelled once this returns)
                    then()
                n.start_soon(cancel)
                await run_stoppable(entered, *args, **kw)

    def work(n, stop):
        calls.append(n)
        while not stop.wait(0.01):
            pass
        finished.set()  # the caller is still waiting for this
        return n

    await cancelled_while_running(work, 1)
    assert calls == [1] and finished.is_set()  # stopped, and waited for before it returned

    def pre_cancelled():  # in a run of its own: if it waited forever, the test still ends
        async def go():
            with trio.CancelScope() as scope:
                scope.cancel()  # cancelled before the thread is started: it never runs
                await run_stoppable(work, 2)
        trio.run(go)
    t = threading.Thread(target=pre_cancelled, daemon=True)
    t.start()
    await trio.to_thread.run_sync(t.join, 10)
    assert not t.is_alive(), "run_stoppable waits for a thread that was never started"
    await trio.sleep(0.1)
    assert calls == [1]
    assert await run_stoppable(lambda n, stop: n * 2, 21) == 42
    # a thread that finishes its work all the same: what it made is handed to discard
    discarded = []

    cancelled = threading.Event()

    def finishes(n, stop):
        cancelled.wait(30)  # does not look at stop: ends after the cancellation all the same
        return f"file-{n}"
    await cancelled_while_running(finishes, 3, then=cancelled.set, discard=discarded.append)
    assert discarded == ["file-3"]


def test_a_nar_file_of_the_wrong_size_under_the_right_name_is_replaced(tmp_path, keyfile):
    """NAR files are named by their hash, so a push that finds the name takes it as its NAR;
    but a file of another size there (something else wrote it) is not: it is replaced, and the
    cache verifies.  One of the right size is kept as it is."""
    from test_cache_support import PUB

    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, app = make_closure(store)
        app_p = store.print_path(app)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p, root=root)
    nars = sorted(cache.glob("nar/*"))
    good = {n: n.read_bytes() for n in nars}
    for n in cache.glob("*.narinfo"):
        n.unlink()
    nars[0].write_bytes(b"x\n")  # the right name, another size
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p, root=root)
    assert {n: n.read_bytes() for n in nars} == good
    v = run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{cache}")
    assert v.stdout == ""


def test_compression_runs_at_most_a_bounded_number_of_paths_ahead_of_the_uploads(tmp_path, monkeypatch):
    """A cache slower than the compression (a server at its CPU's limit, or across a network)
    gets at most UPLOADS_AHEAD compressed NARs waiting for it, besides those being compressed:
    the whole closure used to be compressed into temporary files first, and when the server went
    away mid-push each of them failed on its own, retried and warned (2000 small paths: 9,073
    lines of output instead of 121).  Here the cache takes no NAR until the push has done all it
    can meanwhile; then every path is pushed all the same."""
    import trio.testing

    from purestore.cache import push
    from purestore.cache.backend import FileBackend

    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        paths = [make_path(store, f"p{i}", {"": b"small %d\n" % i}) for i in range(60)]
        compressed: list[str] = []
        ahead: list[int] = []  # paths compressed while the cache took no NAR
        real_compress, real_put = push.compress_path, FileBackend.put_nar

        def compress_path(*args, **kw):
            compressed.append(args[0])
            return real_compress(*args, **kw)

        async def put_nar(self, name, *args, **kw):
            if name.startswith("nar/"):
                if not ahead:
                    ahead.append(-1)
                    await trio.testing.wait_all_tasks_blocked(cushion=0.2)  # nothing more to do
                    ahead[0] = len(compressed)
                    taking.set()
                await taking.wait()
            return await real_put(self, name, *args, **kw)

        taking = trio.Event()
        monkeypatch.setattr(push, "compress_path", compress_path)
        monkeypatch.setattr(FileBackend, "put_nar", put_nar)
        res = trio.run(lambda: push.copy_to(store, settings_for(root), f"file://{cache}", paths, jobs=2))
    assert set(res.uploaded) == set(paths)
    assert ahead[0] <= getattr(push, "UPLOADS_AHEAD", 16) + 2, ahead  # (jobs=2)


def _count_hops(monkeypatch) -> list[int]:
    """Counts trio.to_thread.run_sync calls (hops to a worker thread and back) from now on."""
    hops = [0]
    real = trio.to_thread.run_sync

    async def hop(*args, **kw):
        hops[0] += 1
        return await real(*args, **kw)
    monkeypatch.setattr(trio.to_thread, "run_sync", hop)
    return hops


def test_small_paths_are_compressed_in_the_calling_thread_and_big_ones_in_workers(tmp_path, monkeypatch):
    """A hop to a worker thread (or a job for the forked worker) and back costs more than
    compressing a small NAR with zstd: small paths are compressed in the event loop's thread,
    the big ones still in worker threads, and the forked worker is started only when two or
    more paths need it.  The NAR files and narinfos go to the cache in shared hops (a push of 200
    small paths made 1006 hops, 5 a path; 64 since).  The cache is the same either way."""
    from purestore.cache import push
    from purestore.cache.forked import ForkedWorker
    from purestore.formats.signing import SecretKey
    from test_cache_support import PUB

    root = tmp_path / "a"
    with open_store(root) as store:
        small = [make_path(store, f"p{i}", {"": b"small path %d\n" % i * 20}) for i in range(40)]
        big = [make_path(store, f"big{i}", {"": _data(200 << 10, seed=i)}) for i in range(2)]
        where: list[str] = []
        real = push.compress_path

        def compress_path(*args, **kw):
            where.append("main" if threading.current_thread() is threading.main_thread() else "worker")
            return real(*args, **kw)
        forks: list[int] = []
        monkeypatch.setattr(push, "compress_path", compress_path)
        monkeypatch.setattr(ForkedWorker, "start", classmethod(lambda cls: forks.append(1)))  # (None: threads)

        def push_to(cache, paths):
            where.clear()
            forks.clear()
            hops = _count_hops(monkeypatch)
            res = trio.run(lambda: push.copy_to(store, settings_for(root), f"file://{cache}?compression=zstd",
                                                paths, secret_keys=[SecretKey.parse(SEC)], jobs=2,
                                                fork_worker=True))
            monkeypatch.undo()
            monkeypatch.setattr(push, "compress_path", compress_path)
            monkeypatch.setattr(ForkedWorker, "start", classmethod(lambda cls: forks.append(1)))
            assert set(res.uploaded) == set(paths)
            return hops[0]

        hops = push_to(tmp_path / "c1", small)
        assert where == ["main"] * 40 and forks == []
        # compression and the existence checks: none; the rest at most two a path (NAR, narinfo)
        assert hops <= 2 * 40 + 5, hops
        push_to(tmp_path / "c2", [*small, *big])
        assert sorted(where) == ["main"] * 40 + ["worker"] * 2 and forks == [1]
    for c in ("c1", "c2"):
        v = run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{tmp_path / c}")
        assert v.returncode == 0 and v.stdout == ""


def test_a_small_path_grown_on_disk_is_reported_with_what_it_holds(tmp_path, keyfile, monkeypatch):
    """A path registered small but grown on disk (corrupt) is not compressed whole in the event
    loop: the compression there stops past INLINE_NAR_MAX, and a worker does it again to say
    what the path holds; nothing is published, no temporary file stays."""
    from purestore.cache import push
    from purestore.cache.nar_jobs import INLINE_NAR_MAX

    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        p = make_path(store, "grown", {"": b"small\n"})
        real = root / store.print_path(p).lstrip("/")
        os.chmod(real, 0o644)
        real.write_bytes(b"x" * (4 * INLINE_NAR_MAX))
        limits: list = []
        compress = push.compress_path

        def compress_path(*args, **kw):
            limits.append(kw.get("limit"))
            return compress(*args, **kw)
        monkeypatch.setattr(push, "compress_path", compress_path)
        with pytest.raises(push.CopyIncomplete) as e:
            trio.run(lambda: push.copy_to(store, settings_for(root), f"file://{cache}", [p], jobs=2))
    assert limits == [INLINE_NAR_MAX, None]
    assert f"is corrupt: its NAR hash is" in str(e.value) and f"({4 * INLINE_NAR_MAX + 112} bytes)" in str(e.value)
    assert not list(cache.glob("*.narinfo")) and not [f for f in (cache / "nar").iterdir()]


async def test_a_directory_cache_is_asked_for_many_narinfos_in_one_hop(tmp_path, monkeypatch):
    """cached_paths asks a directory for up to 64 narinfos in one worker thread (a stat or a
    read of a small file costs less than the hop): 130 paths, 3 hops, with or without keys.
    An empty narinfo does not count, one of another path is written again."""
    from purestore.cache.backend import open_backend
    from purestore.cache.push import cached_paths
    from purestore.formats.store_path import StorePath
    from test_cache_mirror import NIX_CACHE, NIX_PATHS

    SD = "/nix/store"
    d = tmp_path / "cache"
    d.mkdir()
    there = StorePath.parse(NIX_PATHS[0], SD)
    ni = (NIX_CACHE / f"{there.hash_part}.narinfo").read_bytes()
    nix32 = "0123456789abcdfghijklmnpqrsvwxyz"
    paths = [there] + [StorePath.parse(f"{SD}/{''.join(nix32[(i >> (5 * k)) & 31] for k in range(32))}-p{i}", SD)
                       for i in range(129)]
    (d / f"{there.hash_part}.narinfo").write_bytes(ni)
    (d / f"{paths[1].hash_part}.narinfo").write_bytes(b"")
    (d / f"{paths[2].hash_part}.narinfo").write_bytes(ni)  # another path's
    async with open_backend(f"file://{d}") as b:
        hops = _count_hops(monkeypatch)
        have, _ = await cached_paths(b, paths)
        assert hops[0] == 3 and have == {there, paths[2]}  # (exists only: not read)
        hops[0] = 0
        have, lacking = await cached_paths(b, paths, key_names={"no-such-key"}, store_dir=SD)
        assert hops[0] == 3 and have == {there} and lacking == (there,)
