"""pure cache info: each configured (or given) cache checked as substitution opens it, usable
ones listed in the order substitution asks them, and the reason each other one is left out."""

from __future__ import annotations

import json

from conftest import closed_port, run_pure
from test_cache_support import PUB, start_server, stop_server


def cache_dir(path, text: str):
    path.mkdir()
    (path / "nix-cache-info").write_text(text)
    return f"file://{path}"


def test_caches_are_listed_in_substitution_order_with_the_reasons_for_the_others(tmp_path):
    fast = cache_dir(tmp_path / "fast", "StoreDir: /pure/store\nPriority: 30\nWantMassQuery: 1\n")
    plain = cache_dir(tmp_path / "plain", "StoreDir: /pure/store\n")
    nix = cache_dir(tmp_path / "nix", "StoreDir: /nix/store\n")
    broken = cache_dir(tmp_path / "broken", "Priority: ten\nnot a line of nix-cache-info\n")
    proc, served = start_server(tmp_path / "plain")
    try:
        with closed_port() as port:
            urls = [plain, nix, f"{served}?priority=20", fast, f"file://{tmp_path / 'missing'}",
                    f"http://127.0.0.1:{port}/", broken, "ftp://elsewhere/"]
            r = run_pure("--trusted-public-keys", PUB, "cache", "info", *urls, check=False)
            info = json.loads(run_pure("cache", "info", "--json", *urls, check=False).stdout)
    finally:
        stop_server(proc)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert [ln.split()[1] for ln in lines[:3]] == [f"{served}?priority=20", fast, plain]
    assert lines[0].startswith("1. ") and "ok (" in lines[0] and "Priority 20" in lines[0]
    assert lines[1].endswith("StoreDir /pure/store, Priority 30, WantMassQuery")
    assert lines[2].endswith("Priority 50")
    rest = "\n".join(lines[3:])
    assert len(lines) == 8 and all(ln.startswith("-  not used: ") for ln in lines[3:])  # each names its URL
    assert f"is for store dir '/nix/store', but this store's dir is '/pure/store'" in rest
    assert "does not exist" in rest and "cannot connect" in rest and "Priority must be a whole number, got 'ten'" in rest
    assert "unsupported cache URL 'ftp://elsewhere/'" in rest
    assert "3 of 8 caches usable; trusted public keys: test-key-1" in r.stderr
    assert [c["usable"] for c in info["caches"]] == [True] * 3 + [False] * 5
    assert info["caches"][0]["priority"] == 20 and info["caches"][1]["wantMassQuery"] is True
    assert all(c["milliseconds"] >= 0 for c in info["caches"][:3])


def test_the_configured_substituters_are_checked_by_default(tmp_path):
    good = cache_dir(tmp_path / "good", "StoreDir: /pure/store\n")
    conf = tmp_path / "pure.conf"
    conf.write_text(f"substituters = {good}\ntrusted-public-keys = {PUB}\noffline = true\n")
    r = run_pure("cache", "info", env={"PURE_CONFIG": str(conf)})
    assert r.stdout.startswith(f"1. {good}  ok (")
    assert "1 of 1 cache usable" in r.stderr and "offline: caches are not asked" in r.stderr
    r = run_pure("cache", "info", check=False)  # PURE_CONFIG=/dev/null: nothing configured
    assert r.returncode == 2 and "error: no binary caches to check" in r.stderr


def test_a_web_page_instead_of_nix_cache_info_is_said_so(tmp_path):
    """A URL that answers with an HTML page (a captive portal, a mistyped path): the error
    names the file once, without a doubled slash, and says it looks like a web page."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "nix-cache-info").write_text("<html><body>Please log in</body></html>\n")
    proc, served = start_server(tmp_path / "site")
    try:
        r = run_pure("cache", "info", served, check=False)
    finally:
        stop_server(proc)
    assert r.returncode == 1
    assert (f"{served}nix-cache-info: this is not a nix-cache-info but a web page "
            "(is the URL a binary cache's?)") in r.stdout + r.stderr


def test_a_cache_info_without_a_store_dir_is_for_any_store_dir_as_in_nix(tmp_path):
    """Nix checks StoreDir only when the line is there: such a cache is usable by any store."""
    bare = cache_dir(tmp_path / "bare", "Priority: 10\n")
    r = run_pure("cache", "info", bare)
    assert r.stdout.startswith(f"1. {bare}  ok (") and "StoreDir /pure/store, Priority 10" in r.stdout, r.stdout
    # pushed to and read from alike
    from test_cache_support import SEC, make_path, open_store
    (tmp_path / "k.sec").write_text(SEC)
    with open_store(tmp_path / "a") as store:
        p = store.print_path(make_path(store, "x", {"": b"x\n"}))
    run_pure("copy", "--to", bare, "--secret-key-file", tmp_path / "k.sec", p, root=tmp_path / "a")
    assert run_pure("cache", "path-info", bare, p).stdout.startswith(p)
    run_pure("cache", "verify", "--trusted-public-keys", PUB, bare, p)
    run_pure("copy", "--from", bare, "--trusted-public-keys", PUB, p, root=tmp_path / "b")


def test_a_nix_cache_info_of_random_bytes_is_refused_naming_the_url_and_the_line(tmp_path):
    """A server whose nix-cache-info is random bytes (not 'Key: value' lines): `pure cache info`
    leaves it out (as a build does, with a warning) and `pure copy --from` fails, each naming the
    file's URL and the line.  (Nix, and pure before, took it for an empty nix-cache-info: a cache
    for the reader's own store dir.)"""
    import os
    from test_cache_support import make_path, open_store
    (tmp_path / "junk").mkdir()
    # (no quote in it: repr() would quote the shown line with the other kind; no line end)
    junk = bytes(b for b in os.urandom(300) if b not in b"'\"\n")
    (tmp_path / "junk" / "nix-cache-info").write_bytes(b"\xa3\x9c" + junk)
    with open_store(tmp_path / "a") as store:
        p = store.print_path(make_path(store, "x", {"": b"x\n"}))
    proc, served = start_server(tmp_path / "junk")
    try:
        info = run_pure("cache", "info", served, check=False)
        copy = run_pure("copy", "--from", served, "--trusted-public-keys", PUB, p, root=tmp_path / "b", check=False)
    finally:
        stop_server(proc)
    said = f"{served}nix-cache-info: this is not a nix-cache-info: line 1 is not text (not UTF-8: '\\xa3\\x9c"
    assert info.returncode == 1 and info.stdout.startswith("-  not used: ") and said in info.stdout, info.stdout
    assert copy.returncode == 1 and said in copy.stderr and "hint: is the URL a binary cache's?" in copy.stderr, \
        copy.stderr
