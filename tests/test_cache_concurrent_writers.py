"""Writers of one cache at the same time: a narinfo uploaded through `pure cache serve` is
checked (it parses, its NAR is there: a prune may have removed a NAR a push found present) and
keeps the signatures of the narinfo it replaces, as a push into a directory does."""

from __future__ import annotations

import shutil

import attrs
import pytest
import trio

from purestore.cache.backend import backend_for
from purestore.cache.server import serve_cache
from purestore.errors import CacheError
from purestore.formats.narinfo import NarInfo
from purestore.formats.signing import SecretKey
from test_cache_mirror import NIX_CACHE, NIX_PATHS
from test_cache_support import settings_for

SD = "/nix/store"
TOKEN = "up-token"


def narinfo_name(path: str) -> str:
    return path.split("/")[-1][:32] + ".narinfo"


async def with_cache(tmp_path, job):
    """Nix's golden cache copied to tmp_path, served with an upload token; ``job(backend, dir)``."""
    d = tmp_path / "cache"
    shutil.copytree(NIX_CACHE, d)
    (tmp_path / "token").write_text(TOKEN)
    async with trio.open_nursery() as n:
        (url,) = await n.start(lambda task_status: serve_cache(str(d), "127.0.0.1:0", upload_token=TOKEN,
                                                               task_status=task_status))
        async with backend_for(f"{url}?token-file={tmp_path / 'token'}", settings_for(tmp_path / "s", SD)) as b:
            await job(b, d)
        n.cancel_scope.cancel()


async def test_an_uploaded_narinfo_keeps_the_signatures_of_the_one_it_replaces(tmp_path):
    name = narinfo_name(NIX_PATHS[0])

    async def job(b, d):
        old = NarInfo.parse((d / name).read_bytes(), SD)
        keys = [SecretKey.generate("two-1"), SecretKey.generate("three-1")]
        for k in keys:  # each writer knew only the narinfo as it was before either wrote
            ni = attrs.evolve(old, sigs=(*old.sigs, k.sign(old.fingerprint(SD)).render()))
            await b.put_narinfo(name, ni.render(SD).encode(), SD)
        got = NarInfo.parse((d / name).read_bytes(), SD)
        assert sorted(s.split(":")[0] for s in got.sigs) == sorted(
            [s.split(":")[0] for s in old.sigs] + ["three-1", "two-1"])
    await with_cache(tmp_path, job)


async def test_what_nix_writes_is_taken_any_compression_and_size(tmp_path):
    """The server checks only what a reader needs: a compression pure does not read (lz4, as
    `nix copy --to …?compression=lz4` writes), fields it does not know, a narinfo of several MiB
    (a path with very many references) are stored as they are."""
    name = narinfo_name(NIX_PATHS[0])

    async def job(b, d):
        text = (d / name).read_bytes()
        (d / name).unlink()
        odd = text.replace(b"Compression: zstd", b"Compression: lz4").replace(b"Compression: xz", b"Compression: lz4")
        odd += b"Future: 1\n"
        await b.put_narinfo(name, odd, SD)
        assert (d / name).read_bytes() == odd
        many = b" ".join(b"%032d-ref" % i for i in range(60_000))
        big = b"".join((line if not line.startswith(b"References:") else b"References: " + many)
                       + b"\n" for line in text[:-1].split(b"\n"))
        assert len(big) > 2 << 20
        (d / name).unlink()
        await b.put_narinfo(name, big, SD)
        assert (d / name).read_bytes() == big
    await with_cache(tmp_path, job)


async def test_signing_a_narinfo_again_needs_no_nar(tmp_path):
    """Only a new narinfo needs its NAR in the cache: one signed again (same contents) is taken
    (as before the check; `cache sign` and `nix store sign` over HTTP)."""
    name = narinfo_name(NIX_PATHS[0])

    async def job(b, d):
        old = NarInfo.parse((d / name).read_bytes(), SD)
        (d / old.url).unlink()
        k = SecretKey.generate("two-1")
        await b.put_narinfo(name, old.with_sigs([k.sign(old.fingerprint(SD)).render()]).render(SD).encode(), SD)
        assert "Sig: two-1:" in (d / name).read_text()
    await with_cache(tmp_path, job)


async def test_a_narinfo_whose_nar_is_gone_is_refused_with_409_and_said_so(tmp_path):
    """What a push meets when a prune removed the NAR it had found present: the narinfo is not
    published (no narinfo without its NAR), and the error says what to do."""
    name = narinfo_name(NIX_PATHS[0])

    async def job(b, d):
        before = (d / name).read_bytes()
        ni = NarInfo.parse(before, SD)
        (d / ni.url).unlink()
        (d / name).unlink()
        with pytest.raises(CacheError) as e:
            await b.put_narinfo(name, before, SD)
        assert f"HTTP 409 Conflict: \"its NAR {ni.url} is not in the cache (a push uploads it first; pruned since" in str(e.value)
        assert "run the push again" in str(e.value)
        assert not (d / name).exists()
        # a NAR of another size than the narinfo's FileSize: the same
        (d / ni.url).write_bytes(b"short")
        with pytest.raises(CacheError, match="is 5 bytes, not"):
            await b.put_narinfo(name, before, SD)
        assert not (d / name).exists()
    await with_cache(tmp_path, job)


@pytest.mark.parametrize("text, says", [
    (b"hello\n", "is not a narinfo ('Key: value' lines with StorePath, URL, NarHash and NarSize)"),
    (b"StorePath: /nix/store/" + b"a" * 32 + b"-x\nURL: nar/x\n", "is not a narinfo"),
    (None, "another path"),
    ("escape", "points outside the cache"),
])
async def test_a_bad_narinfo_upload_is_refused_with_400(tmp_path, text, says):
    name = narinfo_name(NIX_PATHS[0])

    async def job(b, d):
        before = (d / name).read_bytes()
        ni = NarInfo.parse(before, SD)
        if text is None:  # another path's narinfo under this name
            data = (d / narinfo_name(NIX_PATHS[1])).read_bytes()
        elif text == "escape":
            data = attrs.evolve(ni, url="../outside.nar").render(SD).encode()
        else:
            data = text
        with pytest.raises(CacheError) as e:
            await b.put_narinfo(name, data, SD)
        assert "400" in str(e.value) and says in str(e.value)
        assert (d / name).read_bytes() == before
    await with_cache(tmp_path, job)


async def test_a_fifo_in_place_of_a_narinfo_is_replaced_not_waited_on(tmp_path):
    """Writing a narinfo reads the one it replaces: a FIFO there (nobody writing to it) must not
    hang the writer, in a directory or behind `cache serve`."""
    import os
    name = narinfo_name(NIX_PATHS[0])
    d = tmp_path / "dir"
    shutil.copytree(NIX_CACHE, d)
    data = (d / name).read_bytes()
    (d / name).unlink()
    os.mkfifo(d / name)
    with trio.fail_after(10):
        async with backend_for(f"file://{d}", settings_for(tmp_path / "s", SD)) as b:
            await b.put_narinfo(name, data, SD)
    assert (d / name).read_bytes() == data

    async def job(b, served):
        (served / name).unlink()
        os.mkfifo(served / name)
        with trio.fail_after(10):
            await b.put_narinfo(name, data, SD)
        assert (served / name).read_bytes() == data
    await with_cache(tmp_path, job)


def test_a_push_waiting_for_the_narinfo_lock_says_so_and_stops_on_sigterm(tmp_path):
    """The lock of narinfo writers is held for milliseconds; one held longer (another process
    stuck) is waited for with a word, and SIGTERM still stops the push at once, leaving no
    narinfo."""
    import fcntl
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import pure_env
    from test_cache_support import SEC, make_closure, open_store
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    with open_store(tmp_path / "a") as store:
        _lib, app = make_closure(store)
        app_p = store.print_path(app)
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "nix-cache-info").write_text("StoreDir: /pure/store\n")
    fd = os.open(cache / "nix-cache-info", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "copy", "--to", f"file://{cache}",
                                 "--secret-key-file", str(key), app_p], env=pure_env(tmp_path / "a", "/pure/store"),
                                stderr=subprocess.PIPE, text=True)
        line = ""
        deadline = time.monotonic() + 30
        while "waiting for another writer" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        assert f"waiting for another writer of '{cache}'" in line
        proc.send_signal(signal.SIGTERM)
        # it stops while the other writer still holds the lock (this test holds it until the
        # end of this block): a copy that waited for the lock in spite of SIGTERM never ends here
        rc = proc.wait(timeout=60)
        assert rc == 143
    finally:
        os.close(fd)
    assert not list(cache.glob("*.narinfo")) and not list(cache.glob(".tmp-*"))


@pytest.fixture
def refused(monkeypatch):
    """Whether each attempt at the narinfo lock found it held (True) or took it (False)."""
    from purestore.cache import prune
    seen: list[bool] = []
    try_lock = prune.try_lock

    def counting(fd):
        taken = try_lock(fd)
        seen.append(not taken)
        return taken
    monkeypatch.setattr(prune, "try_lock", counting)
    return seen


async def test_a_push_s_own_narinfo_writes_do_not_wait_for_each_other(tmp_path, refused):
    """Each narinfo write opens the lock file afresh, and two descriptors' flock exclude each
    other in one process too: a push's parallel writes polled for each other every 20 ms (200
    small paths took 1.5 s, not 0.5 s, and said they waited for "another writer").  The writes
    made while one is under way are made together, under one holding of the lock."""
    d = tmp_path / "cache"
    d.mkdir()
    (d / "nix-cache-info").write_text(f"StoreDir: {SD}\n")
    old = NarInfo.parse((NIX_CACHE / narinfo_name(NIX_PATHS[0])).read_bytes(), SD)
    async with backend_for(f"file://{d}", settings_for(tmp_path / "s", SD)) as b:
        async with trio.open_nursery() as n:
            for i in range(40):
                name = f"{i:032d}"[:32].replace("0", "a") + ".narinfo"
                n.start_soon(b.put_narinfo, name, old.render(SD).encode(), SD)
    assert 1 <= len(refused) < 40 and not any(refused), refused
    assert len(list(d.glob("*.narinfo"))) == 40


def test_the_server_s_own_narinfo_writes_do_not_wait_for_each_other(tmp_path, refused):
    """The same for ``cache serve``'s upload threads: they wait for each other on a lock, and
    poll the file's flock only for another process."""
    import threading
    import time

    from purestore.cache import prune
    d = tmp_path / "cache"
    d.mkdir()
    (d / "nix-cache-info").write_text(f"StoreDir: {SD}\n")

    def writer():
        for _ in range(10):
            with prune.narinfo_lock(str(d)):
                time.sleep(0.001)
    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(refused) == 60 and not any(refused)
