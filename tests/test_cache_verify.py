"""`pure cache verify`: a cache checked as it stands (narinfos, signatures, NAR files, closure,
and with --check-contents every NAR's hashes and format), each problem named with its path."""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_pure
from test_cache_support import PUB, rewrite_narinfo, start_server, stop_server
from test_substitute_attacks import _nar_dir, _symlink_node, copy_of, nar_path, publish_raw, signed_cache


def verify(url, *args, check=False):
    return run_pure("cache", "verify", url, *args, check=check)


def report(r) -> dict:
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return signed_cache(tmp_path_factory.mktemp("tmpl"))


@pytest.fixture
def cache(template, tmp_path):
    """A copy of the attack tests' signed file:// cache (lib, app referring to lib)."""
    return copy_of(template, tmp_path)



def test_a_good_cache_has_no_problems(cache):
    c, lib, app = cache
    for extra in ([], ["--check-contents"]):
        r = verify(f"file://{c}", "--trusted-public-keys", PUB, "--json", *extra, check=True)
        rep = report(r)
        assert rep["ok"] and rep["checked"] == 2 and rep["problems"] == []
        assert rep["signaturesChecked"] and rep["contentsChecked"] == bool(extra)
    r = verify(f"file://{c}", "--trusted-public-keys", PUB, check=True)
    assert r.stdout == "" and f"checked 2 paths in file://{c}: no problems (signatures checked" in r.stderr


def test_narinfos_that_make_a_reference_cycle_are_problems(cache):
    """lib re-signed as referring to app, which refers to lib: no substitution or copy takes
    either (each would wait for the other), and verify said "no problems"; now each is named,
    with or without -r from app."""
    from test_cache_support import SEC
    c, lib, app = cache
    rewrite_narinfo(c, lib, sign_with=SEC, references=(app,))
    for args in ([], ["-r", app.absolute("/pure/store")]):
        r = verify(f"file://{c}", "--trusted-public-keys", PUB, "--json", *args)
        rep = report(r)
        assert r.returncode == 1 and rep["checked"] == 2, r.stdout + r.stderr
        assert sorted((x["path"], x["message"]) for x in rep["problems"]) == sorted(
            (p.absolute("/pure/store"), "its narinfo is part of a reference cycle") for p in (lib, app))


def test_a_narinfo_that_cannot_be_read_is_a_problem_not_passed_over(cache):
    """A directory, or a dangling symlink, named like a narinfo in a file:// cache: verify of
    the whole cache names each (it said "no problems" and counted only the readable ones),
    and sign refuses to go on, as it does for a narinfo that does not parse."""
    c, lib, app = cache
    (c / ("c" * 32 + ".narinfo")).mkdir()
    (c / ("g" * 32 + ".narinfo")).symlink_to(c / "nowhere")
    r = verify(f"file://{c}", "--trusted-public-keys", PUB, "--json")
    rep = report(r)
    assert r.returncode == 1 and rep["checked"] == 4 and not rep["ok"]
    text = json.dumps(rep["problems"])
    assert "c" * 32 + ".narinfo" in text and "not a regular file" in text and "g" * 32 + ".narinfo" in text
    sec = c.parent / "k.sec"
    run_pure("key", "generate", "--name", "other-1", "--secret-out", sec, "--public-out", c.parent / "k.pub")
    before = sorted(os.listdir(c))
    r = run_pure("cache", "sign", f"file://{c}", "--key-file", sec, "--trusted-public-keys", PUB, check=False)
    assert r.returncode == 1 and "not a regular file" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(c)) == before
    assert "other-1:" not in (c / f"{lib.hash_part}.narinfo").read_text()


def test_without_trusted_keys_signatures_are_not_checked_and_it_says_so(cache):
    c, lib, app = cache
    rewrite_narinfo(c, lib, drop_sigs=True)
    r = verify(f"file://{c}", check=True)
    assert "signatures not checked: no trusted keys" in r.stderr
    r = verify(f"file://{c}", "--trusted-public-keys", PUB)
    assert r.returncode == 1
    assert f"bad: '/pure/store/{lib.base_name}': not trusted: it has no signature" in r.stdout.splitlines()


def _corrupt(kind, c, lib, app):
    """Damage the cache; returns (the path that is bad, what the report must say)."""
    from purestore.formats.signing import SecretKey
    if kind == "untrusted key":
        rewrite_narinfo(c, app, sign_with=SecretKey.generate("evil-1").render())
        return app, "not trusted: "
    if kind == "altered after signing":
        rewrite_narinfo(c, app, nar_size=12345)
        return app, "not trusted: "
    if kind == "NAR file missing":
        os.unlink(nar_path(c, lib))
        return lib, "is missing"
    if kind == "NAR file truncated":
        f = nar_path(c, app)
        f.write_bytes(f.read_bytes()[:-10])
        return app, "FileSize says"
    if kind == "reference not in the cache":
        os.unlink(c / f"{lib.hash_part}.narinfo")
        return app, f"its reference '/pure/store/{lib.base_name}' is not in the cache"
    if kind == "URL outside":
        rewrite_narinfo(c, app, url="../etc/passwd")
        return app, "points outside the cache"
    if kind == "garbage narinfo":
        (c / f"{app.hash_part}.narinfo").write_text("StorePath: nonsense\n")
        return app, "bad narinfo"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["untrusted key", "altered after signing", "NAR file missing",
                                  "NAR file truncated", "reference not in the cache", "URL outside",
                                  "garbage narinfo"])
def test_each_kind_of_damage_is_named_with_its_path(cache, kind):
    c, lib, app = cache
    bad, why = _corrupt(kind, c, lib, app)
    r = verify(f"file://{c}", "--trusted-public-keys", PUB)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    label = f"{bad.hash_part}.narinfo" if kind == "garbage narinfo" else f"/pure/store/{bad.base_name}"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(f"bad: {label!r}: ")]
    assert any(why in ln for ln in lines), r.stdout
    assert "1 bad" in r.stderr
    rep = report(verify(f"file://{c}", "--trusted-public-keys", PUB, "--json"))
    assert not rep["ok"] and {p["narinfo"] for p in rep["problems"]} == {f"{bad.hash_part}.narinfo"}


def test_nar_contents_are_read_only_when_asked(cache):
    """Bytes flipped inside a NAR file (same size): only --check-contents sees it (FileHash)."""
    c, lib, app = cache
    f = nar_path(c, app)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert verify(f"file://{c}", "--trusted-public-keys", PUB).returncode == 0
    r = verify(f"file://{c}", "--trusted-public-keys", PUB, "--check-contents")
    assert r.returncode == 1 and f"bad: '/pure/store/{app.base_name}': " in r.stdout
    assert "FileHash says" in r.stdout or "truncated" in r.stdout or "invalid" in r.stdout, r.stdout


def test_with_r_the_closure_of_the_paths_named_is_checked(cache):
    """A reference whose NAR file is missing: checking only the referrer passes (its narinfo's
    references are there); -r checks the reference like the path named, and finds it."""
    c, lib, app = cache
    nar_path(c, lib).unlink()
    app_p, lib_p = f"/pure/store/{app.base_name}", f"/pure/store/{lib.base_name}"
    r = verify(f"file://{c}", "--trusted-public-keys", PUB, "--json", app_p)
    assert r.returncode == 0 and report(r)["checked"] == 1
    r = verify(f"file://{c}", "--trusted-public-keys", PUB, "--json", "-r", app_p)
    rep = report(r)
    assert r.returncode == 1 and rep["checked"] == 2
    assert [(p["path"], p["message"].split(" '")[0]) for p in rep["problems"]] == [(lib_p, "its NAR file")]
    r = verify(f"file://{c}", "--trusted-public-keys", PUB, "-r", lib_p)  # a path without references
    assert r.returncode == 1 and f"checked 1 path in file://{c}: 1 bad" in r.stderr, r.stderr


def test_a_malformed_nar_with_true_hashes_is_found_by_check_contents(cache):
    """A NAR whose hashes match its narinfo (a hostile signer made it) but that breaks the NAR
    rules (a symlink entry followed by a second entry of the same name)."""
    from purestore.formats.store_path import StorePath
    c, lib, app = cache
    evil = StorePath("1" * 32, "evil")
    publish_raw(c, evil, _nar_dir([(b"a", _symlink_node(b"/etc")), (b"a", _symlink_node(b"/tmp"))]))
    r = verify(f"file://{c}", f"/pure/store/{evil.base_name}", "--trusted-public-keys", PUB, "--check-contents")
    assert r.returncode == 1 and "is invalid" in r.stdout, r.stdout
    assert verify(f"file://{c}", f"/pure/store/{evil.base_name}", "--trusted-public-keys", PUB).returncode == 0


def test_over_http_paths_are_named(cache, tmp_path):
    c, lib, app = cache
    os.unlink(nar_path(c, lib))
    proc, url = start_server(c)
    try:
        r = verify(url, f"/pure/store/{app.base_name}", f"/pure/store/{lib.base_name}",
                   "--trusted-public-keys", PUB, "--check-contents")
        assert r.returncode == 1
        assert f"bad: '/pure/store/{lib.base_name}': its NAR file" in r.stdout and "is missing" in r.stdout
        assert f"'/pure/store/{app.base_name}'" not in r.stdout
        r = verify(url, f"/pure/store/{app.base_name}", "--trusted-public-keys", PUB, check=True)
        assert "checked 1 path in" in r.stderr
        r = verify(url, "--trusted-public-keys", PUB)
        assert r.returncode == 1 and "cannot be listed over HTTP" in r.stderr and "hint: name the" in r.stderr
        r = verify(url, "/pure/store/" + "3" * 32 + "-absent")
        assert r.returncode == 1 and "the cache has no narinfo for it" in r.stdout
    finally:
        stop_server(proc)


def test_unusable_caches_and_bad_arguments_are_clear_errors(tmp_path):
    r = verify(f"file://{tmp_path}/none")
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = verify(f"file://{tmp_path}")
    assert r.returncode == 1 and "has no nix-cache-info" in r.stderr
    (tmp_path / "nix-cache-info").write_text("StoreDir: /pure/store\n")
    r = verify(f"file://{tmp_path}", "not-a-path")
    assert r.returncode == 2 and "is not a store path" in r.stderr
    r = verify(f"file://{tmp_path}", check=True)
    assert "checked 0 paths" in r.stderr


def test_the_golden_cache_written_by_nix_verifies(tmp_path):
    """The cache Nix 2.8 wrote (tests/data/cache/nix-cache, store dir /nix/store) checks clean
    with its key, contents included; with another key every path is named untrusted."""
    from conftest import DATA
    from purestore.formats.signing import SecretKey
    url = f"file://{DATA}/cache/nix-cache"
    pub = (DATA / "cache/test-key-1.pub").read_text().strip()
    rep = report(verify(url, "--trusted-public-keys", pub, "--check-contents", "--json", check=True))
    assert rep["ok"] and rep["checked"] == 2 and rep["storeDir"] == "/nix/store"
    other = SecretKey.generate("other-1").public_key().render()
    rep = report(verify(url, "--trusted-public-keys", other, "--json"))
    assert sorted(p["path"] for p in rep["problems"]) == [
        "/nix/store/hp4xhizqijy1k440fq06xfq6xpl37pf6-h.txt", "/nix/store/nai7hnixwpdj31gflmh2xaw00xjq4b7m-tree"]


def test_small_nars_are_checked_without_a_thread(cache, tmp_path, monkeypatch):
    """A NAR of a few KiB (most of a cache of small paths) is read whole and checked in the
    event loop: --check-contents made a worker thread and a hop back to the event loop for
    each of its chunks (2000 small paths: 3.0 s, against 1.1 s now), and makes no more thread
    hops than the check without contents."""
    import trio

    from purestore.cache.verify import verify_cache
    from test_cache_support import settings_for
    c, lib, app = cache
    hops: list[str] = []
    to_thread, from_thread = trio.to_thread.run_sync, trio.from_thread.run

    async def counting(fn, *args, **kw):
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await to_thread(fn, *args, **kw)

    def counting_back(fn, *args, **kw):
        hops.append(getattr(fn, "__name__", repr(fn)))
        return from_thread(fn, *args, **kw)
    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    monkeypatch.setattr(trio.from_thread, "run", counting_back)
    counts = {}
    for contents in (False, True):
        hops.clear()
        rep = trio.run(lambda: verify_cache(settings_for(tmp_path / "s"), f"file://{c}", trusted_keys=[PUB],
                                            check_contents=contents))
        assert rep.results and not rep.bad and rep.contents_checked == contents
        counts[contents] = len(hops)
    assert counts[True] == counts[False]


@pytest.mark.parametrize("kind", ["NAR file missing", "NAR file truncated", "altered after signing"])
def test_damage_is_named_the_same_when_contents_are_read(cache, kind):
    """The small NARs read in the event loop report damage as the streamed ones do."""
    c, lib, app = cache
    bad, why = _corrupt(kind, c, lib, app)
    r = verify(f"file://{c}", "--trusted-public-keys", PUB, "--check-contents")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(f"bad: '/pure/store/{bad.base_name}': ")]
    assert lines and "1 bad" in r.stderr, r.stdout
    if kind == "NAR file truncated":
        assert any("truncated" in ln for ln in lines), lines
    else:
        assert any(why in ln for ln in lines), lines


def test_a_small_nar_that_is_a_fifo_is_waited_for_outside_the_event_loop(cache, tmp_path, monkeypatch):
    """A small NAR file that is a FIFO is read as a big NAR is, in a worker thread: reading it
    in the event loop (as a small regular file is) blocked the loop, and every other check of
    the run, while it waited up to FIFO_WAIT (30 s) for the FIFO's first bytes: a writer that
    needs the loop before it writes came too late.  Here the loop goes on while the check waits,
    and the NAR written into the FIFO then checks out."""
    import trio

    from purestore.cache import _files
    from purestore.cache.verify import verify_cache
    from test_cache_support import settings_for
    monkeypatch.setattr(_files, "FIFO_WAIT", 3.0)  # what the loop was blocked for
    c, lib, app = cache
    nar = nar_path(c, app)
    data = nar.read_bytes()
    nar.unlink()
    os.mkfifo(nar)

    async def main():
        async with trio.open_nursery() as n:
            def write():
                try:
                    with open(nar, "wb") as f:  # (waits for the check to open it)
                        trio.from_thread.run_sync(lambda: None)  # (waits for the event loop)
                        f.write(data)
                except BrokenPipeError:  # the check gave up
                    pass
            n.start_soon(trio.to_thread.run_sync, write)
            return await verify_cache(settings_for(tmp_path / "s"), f"file://{c}", trusted_keys=[PUB],
                                      check_contents=True)
    rep = trio.run(main)
    assert rep.results and not rep.bad, rep
