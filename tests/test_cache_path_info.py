"""`pure cache path-info URL PATH...`: what a cache holds for paths, without a store; its --json
is `nix path-info --json --store URL`'s (golden file by Nix 2.8, and live where Nix is)."""

from __future__ import annotations

import json

import pytest

from conftest import DATA, needs_nix, run_pure
from test_cache_support import PUB, SEC, make_closure, open_store, start_server, stop_server

NIX_CACHE = DATA / "cache" / "nix-cache"
H = "/nix/store/hp4xhizqijy1k440fq06xfq6xpl37pf6-h.txt"
TREE = "/nix/store/nai7hnixwpdj31gflmh2xaw00xjq4b7m-tree"
OTHER_KEY = "other-1:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="


def test_json_is_the_bytes_nix_prints_for_its_own_cache():
    # the store dir comes from the cache: this purestore's own is /pure/store
    r = run_pure("cache", "path-info", "--json", "-rS", f"file://{NIX_CACHE}", H, TREE)
    assert r.stdout.rstrip("\n") == (DATA / "cache" / "nix-path-info.json").read_text()


def test_text_columns_and_trust(tmp_path):
    r = run_pure("cache", "path-info", "-sS", "--download-size", f"file://{NIX_CACHE}", TREE, H)
    # as Nix: the path column padded to the longest path
    assert r.stdout.splitlines() == [f"{H}\t{120:>11}\t{91:>11}\t{120:>11}",
                                     f"{TREE} \t{880:>11}\t{234:>11}\t{880:>11}"]
    r = run_pure("cache", "path-info", "--trusted-public-keys", PUB, f"file://{NIX_CACHE}", H)
    assert r.stdout == f"{H}\ttrusted by test-key-1\n"
    r = run_pure("cache", "path-info", "--trusted-public-keys", OTHER_KEY, "--json", f"file://{NIX_CACHE}", H)
    (obj,) = json.loads(r.stdout)
    assert obj["untrusted"] == "signed only by untrusted key 'test-key-1' (the trusted ones are 'other-1')"
    # the line `nix path-info --sigs -s --store URL` prints (Nix 2.8): a content address first
    r = run_pure("cache", "path-info", "--sigs", "-s", f"file://{NIX_CACHE}", "hp4xhizqijy1k440fq06xfq6xpl37pf6-h.txt")
    assert r.stdout == (f"{H}\t        120\tca:fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw "
                        "test-key-1:8IR391I8XdhF5VHOZTZZY+2QWzBs1RJOCf6VhhGhAwxXgv3EhH7SIQnfYKQe/XH7BX4kg12TnSofGg51XLtEDw==\n")


@pytest.fixture
def closure_cache(tmp_path):
    """A cache holding lib and app (app refers to lib), by `pure copy`; returns (cache, lib, app)."""
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    with open_store(tmp_path / "a") as store:
        lib, app = make_closure(store)
        lib_p, app_p = store.print_path(lib), store.print_path(app)
        sizes = {lib_p: store.query_path_info(lib).nar_size, app_p: store.query_path_info(app).nar_size}
    cache = tmp_path / "cache"
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", key, app_p, root=tmp_path / "a")
    return cache, lib_p, app_p, sizes


def test_closure_sizes_and_recursion(closure_cache):
    cache, lib, app, sizes = closure_cache
    r = run_pure("cache", "path-info", "--json", "-S", f"file://{cache}", app)
    (obj,) = json.loads(r.stdout)
    assert obj["path"] == app and obj["references"] == [lib]
    assert obj["closureSize"] == sizes[lib] + sizes[app]
    assert obj["closureDownloadSize"] > 0 and obj["downloadSize"] < obj["closureDownloadSize"]
    r = run_pure("cache", "path-info", "-r", f"file://{cache}", app)
    assert r.stdout.split() == sorted([lib, app], key=lambda p: p.rsplit("/", 1)[1])


def test_over_http(closure_cache):
    cache, lib, app, _sizes = closure_cache
    proc, url = start_server(cache)
    try:
        r = run_pure("cache", "path-info", "-r", "--trusted-public-keys", PUB, url, app)
    finally:
        stop_server(proc)
    assert sorted(r.stdout.splitlines()) == sorted([f"{lib}\ttrusted by test-key-1", f"{app}\ttrusted by test-key-1"])


def test_missing_paths_and_broken_narinfos_are_named(closure_cache):
    cache, lib, app, _sizes = closure_cache
    url = f"file://{cache}"
    missing = "/pure/store/" + "0" * 32 + "-gone"
    r = run_pure("cache", "path-info", url, app, missing, check=False)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"error: path {missing!r} is not in binary cache {url!r}\n"
    (cache / f"{lib.rsplit('/', 1)[1][:32]}.narinfo").unlink()
    assert run_pure("cache", "path-info", url, app).stdout == f"{app}\n"  # its closure is not needed
    r = run_pure("cache", "path-info", "-S", url, app, check=False)
    assert r.returncode == 1
    assert r.stderr == f"error: path {lib!r}, which {app!r} refers to, is not in binary cache {url!r}\n"
    ni = cache / f"{app.rsplit('/', 1)[1][:32]}.narinfo"
    ni.write_text(ni.read_text().replace("NarSize: ", "NarSize: x"))
    r = run_pure("cache", "path-info", url, app, check=False)
    assert r.returncode == 1 and r.stderr.startswith(f"error: cannot read the narinfo of {app!r}: ")
    assert "NarSize" in r.stderr
    r = run_pure("cache", "path-info", url, "not-a-path", check=False)
    assert r.returncode == 2 and "'not-a-path' is not a store path" in r.stderr
    r = run_pure("cache", "path-info", f"file://{cache}-nowhere", app, check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr


WITHREF_NIX = """
let B = "${./bb}/bin/busybox"; dep = builtins.toFile "dep.txt" "dependency\\n"; in
derivation { name = "withref"; system = "x86_64-linux"; builder = B; inherit B;
             args = [ "sh" "-c" "echo ${dep} > $out" ]; }
"""


@needs_nix
def test_json_equals_nix_for_a_built_path_with_a_reference_and_a_deriver(tmp_path):
    from test_cache_logs import _nix, nix_build
    nixroot, out, _drv = nix_build(tmp_path, WITHREF_NIX)
    cache = tmp_path / "nixcache"
    _nix("nix", "copy", "--store", nixroot, "--to", f"file://{cache}?compression=zstd", out)
    url = f"file://{cache}"
    theirs = _nix("nix", "path-info", "--json", "-rS", "--store", url, out)
    ours = run_pure("cache", "path-info", "--json", "-rS", url, out).stdout
    assert ours.rstrip("\n") == theirs
    # the text lines too: references first, the path column padded
    for flags in (["-r"], ["-rsS"], ["-r", "--sigs"], ["-s"]):
        assert run_pure("cache", "path-info", *flags, url, out).stdout.rstrip("\n") == \
            _nix("nix", "path-info", *flags, "--store", url, out).rstrip("\n"), flags
    objs = json.loads(ours)
    assert len(objs) == 2 and any(o.get("deriver") for o in objs) and any(o["references"] for o in objs)


def test_a_path_of_another_store_dir_is_not_taken_for_the_caches_own(tmp_path):
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    """/pure/store/<hash>-h.txt is another path than the cache's /nix/store/<hash>-h.txt: refused
    with the cache's store dir named, by path-info, verify and sign alike; the base name alone,
    or a symlink to the path (`./result`), names it."""
    import shutil

    other = "/pure/store/" + H.rsplit("/", 1)[1]
    shutil.copytree(NIX_CACHE, tmp_path / "cache")  # sign must not touch the golden files, whatever happens
    url = f"file://{tmp_path / 'cache'}"
    for cmd in (("cache", "path-info"), ("cache", "verify", "--trusted-public-keys", PUB),
                ("cache", "sign", "--key-file", str(key))):
        r = run_pure(*cmd, url, other, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"error: {other!r} is not in the store dir of {url!r}, '/nix/store'" in r.stderr, r.stderr
    link = tmp_path / "result"
    link.symlink_to(H)
    r = run_pure("cache", "path-info", url, str(link), H.rsplit("/", 1)[1])
    assert set(r.stdout.splitlines()) == {H}, r.stdout


def test_verify_json_names_a_path_the_cache_lacks():
    missing = "/nix/store/" + "a" * 32 + "-x"
    r = run_pure("cache", "verify", "--json", "--trusted-public-keys", PUB, f"file://{NIX_CACHE}", missing,
                 check=False)
    assert r.returncode == 1
    problems = json.loads(r.stdout)["problems"]
    assert [(p["path"], p["message"]) for p in problems] == [(missing, "the cache has no narinfo for it")]
