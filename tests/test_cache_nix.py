"""Interop with real Nix 2.8 (skipped without Nix): caches written by one are read by the other,
and our narinfo text equals Nix's for the same paths, compression and key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import DATA, needs_nix, run_pure
from test_cache_support import PUB, SEC, make_closure, open_store, start_server, stop_server

pytestmark = [needs_nix, pytest.mark.nix]

NIX_ENV = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command"}

DEMO_NIX = """
let dep = builtins.toFile "dep.txt" "dependency\\n"; in
derivation { name = "demo"; system = "x86_64-linux"; builder = "/bin/sh";
             args = [ "-c" "echo ${dep}" ]; src = ./tree; }
"""


def nix(*args, check=True, env=None):
    p = subprocess.run([str(a) for a in args], env={**NIX_ENV, **(env or {})}, capture_output=True, text=True,
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed: {p.stderr}")
    return p


@pytest.fixture
def keyfile(tmp_path):
    p = tmp_path / "k.sec"
    p.write_text(SEC)
    return p


def nix_closure_cache(tmp_path, keyfile):
    """A .drv with two references, instantiated by Nix and pushed with `nix copy` (zstd, signed)."""
    expr = tmp_path / "expr"
    expr.mkdir()
    shutil.copytree(DATA / "cache" / "src" / "tree", expr / "tree", symlinks=True)
    (expr / "demo.nix").write_text(DEMO_NIX)
    nixroot = tmp_path / "nixroot"
    drv = nix("nix-instantiate", "--store", nixroot, expr / "demo.nix").stdout.strip()
    closure = nix("nix-store", "--store", nixroot, "-qR", drv).stdout.split()
    cache = tmp_path / "nixcache"
    nix("nix", "copy", "--store", nixroot, "--derivation",
        "--to", f"file://{cache}?compression=zstd&secret-key={keyfile}", drv)
    return drv, closure, cache


def test_nix_cache_is_substituted_and_our_push_equals_nix(tmp_path, keyfile):
    drv, closure, nixcache = nix_closure_cache(tmp_path, keyfile)
    root = tmp_path / "pure"
    # substitute from Nix's cache with Nix's key trusted (config file, like a real setup)
    cfg = tmp_path / "pure.conf"
    cfg.write_text(f"substituters = file://{nixcache}\ntrusted-public-keys = {PUB}\n")
    run_pure("copy", "--from", f"file://{nixcache}", drv, root=root, store_dir="/nix/store",
             env={"PURE_CONFIG": str(cfg)})
    run_pure("store", "verify", "--check-contents", root=root, store_dir="/nix/store")
    info = json.loads(run_pure("store", "path-info", "--json", drv, root=root, store_dir="/nix/store").stdout)[0]
    assert sorted(info["references"]) == sorted(p for p in closure if p != drv)
    # push the same paths with the same key and compression: narinfos and NARs equal Nix's
    ours = tmp_path / "ourcache"
    run_pure("copy", "--to", f"file://{ours}?compression=zstd&secret-key={keyfile}", drv,
             root=root, store_dir="/nix/store")
    for p in closure:
        h = os.path.basename(p)[:32]
        assert (ours / f"{h}.narinfo").read_text() == (nixcache / f"{h}.narinfo").read_text()
    assert sorted(os.listdir(ours / "nar")) == sorted(os.listdir(nixcache / "nar"))
    assert (ours / "nix-cache-info").read_text() == (nixcache / "nix-cache-info").read_text()


def test_nix_cache_with_untrusted_key_is_refused(tmp_path, keyfile):
    drv, _closure, nixcache = nix_closure_cache(tmp_path, keyfile)
    r = run_pure("copy", "--from", f"file://{nixcache}", "--trusted-public-keys",
                 "other-1:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=", drv,
                 root=tmp_path / "pure", store_dir="/nix/store", check=False)
    assert r.returncode == 1 and "untrusted key 'test-key-1'" in r.stderr


@pytest.mark.parametrize("via", ["file", "http"])
def test_pure_cache_is_read_by_nix_copy(tmp_path, keyfile, via):
    """Input-addressed paths (no CA: Nix insists on a valid signature) pushed by `pure copy`."""
    root = tmp_path / "pure"
    with open_store(root, "/nix/store") as store:
        lib, app = make_closure(store)
        app_p, lib_p = store.print_path(app), store.print_path(lib)
    cache = tmp_path / "cache"
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, "--write-nar-listing",
             app_p, root=root, store_dir="/nix/store")
    proc = None
    url = f"file://{cache}"
    if via == "http":
        proc, url = start_server(cache)
    # Nix keeps narinfos in ~/.cache by URL: a server of an earlier test on this port must not answer
    fresh = {"XDG_CACHE_HOME": str(tmp_path / "nix-xdg-cache")}
    try:
        # an untrusted key: Nix refuses our paths
        bad = nix("nix", "copy", "--store", tmp_path / "nixbad", "--from", url, "--option",
                  "trusted-public-keys", "other-1:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=", app_p, check=False,
                  env=fresh)
        assert bad.returncode != 0 and "signature" in bad.stderr
        nixroot = tmp_path / "nixroot"
        nix("nix", "copy", "--store", nixroot, "--from", url, "--option", "trusted-public-keys", PUB, app_p,
            env=fresh)
    finally:
        if proc:
            stop_server(proc)
    out = json.loads(nix("nix", "path-info", "--store", nixroot, "--json", "-r", app_p).stdout)
    by_path = {o["path"]: o for o in out}
    assert set(by_path) == {app_p, lib_p}
    assert by_path[app_p]["references"] == [lib_p]
    assert any(s.startswith("test-key-1:") for s in by_path[app_p]["signatures"])
    nix("nix-store", "--store", nixroot, "--verify", "--check-contents")
    assert (nixroot / "nix/store" / app.base_name / "share/link").is_symlink()


def push_with_both(tmp_path, src, query, keyfile):
    """``src`` added to a Nix chroot store and to a rooted pure store (the same path), then
    pushed by each to a new file:// cache with ``?QUERY&secret-key=KEY``; returns (hash part,
    Nix's cache, ours)."""
    nixroot = tmp_path / "nixroot"
    path = nix("nix-store", "--store", nixroot, "--add", src).stdout.strip()
    nixcache, ours = tmp_path / "nixcache", tmp_path / "ours"
    nix("nix", "copy", "--store", nixroot, "--to", f"file://{nixcache}?{query}&secret-key={keyfile}", path)
    root = tmp_path / "pure"
    assert run_pure("store", "add", src, root=root, store_dir="/nix/store").stdout.strip() == path
    run_pure("copy", "--to", f"file://{ours}?{query}&secret-key={keyfile}", path, root=root, store_dir="/nix/store")
    return os.path.basename(path)[:32], nixcache, ours


def test_narinfo_equals_nix_for_big_compressible_paths(tmp_path, keyfile):
    """zstd output depends on the library version: compressing with the system libzstd (as Nix's
    libarchive does) gives the same NAR files, FileHash and FileSize for NARs beyond one block."""
    import random
    src = tmp_path / "big"
    src.mkdir()
    r = random.Random(7)
    words = [b"alpha ", b"beta ", b"gamma\n", b"delta ", b"epsilon "]
    (src / "text").write_bytes(b"".join(r.choice(words) for _ in range(120_000)))
    (src / "rand").write_bytes(r.randbytes(700_000))
    h, nixcache, ours = push_with_both(tmp_path, src, "compression=zstd", keyfile)
    assert (ours / f"{h}.narinfo").read_text() == (nixcache / f"{h}.narinfo").read_text()
    (nar,) = os.listdir(nixcache / "nar")
    assert (ours / "nar" / nar).read_bytes() == (nixcache / "nar" / nar).read_bytes()


@pytest.mark.parametrize("query", ["compression=xz", "compression=none", "compression=zstd&compression-level=9",
                                   "compression=zstd&compression-level=20",
                                   # Nix's own default value (-1), zstd's default (0), a fast level
                                   "compression=zstd&compression-level=-1", "compression=zstd&compression-level=0",
                                   "compression=zstd&compression-level=-7", "compression=xz&compression-level=-1",
                                   "compression=xz&compression-level=2&write-nar-listing=true"])
def test_narinfo_equals_nix_for_other_compressions(tmp_path, keyfile, query):
    """Single-threaded xz (Python's lzma on the system liblzma, as libarchive), no compression and
    other levels give Nix's bytes too."""
    src = tmp_path / "src"
    shutil.copytree(DATA / "cache" / "src" / "tree", src, symlinks=True)
    (src / "more").write_bytes(b"".join(b"line %d of some text\n" % i for i in range(40_000)))
    h, nixcache, ours = push_with_both(tmp_path, src, query, keyfile)
    assert (ours / f"{h}.narinfo").read_text() == (nixcache / f"{h}.narinfo").read_text()
    if "write-nar-listing" in query:
        assert (ours / f"{h}.ls").read_bytes() == (nixcache / f"{h}.ls").read_bytes()
