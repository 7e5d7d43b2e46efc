"""pure copy --from A --to B: closures copied between caches without a store.  The mirror holds
the source's files byte for byte (so Nix's signatures and Nix itself still accept them), it
substitutes and verifies clean, nothing is written when a narinfo is refused, and a corrupt NAR
fails its path and its referrers while the rest is copied."""

from __future__ import annotations

import filecmp
import json
import shutil

import pytest

from conftest import DATA, HAVE_NIX, needs_nix, run_pure
from test_cache_support import (PUB, SEC, make_closure, make_path, narinfo_file, nix_copy_from, open_store,
                                rewrite_narinfo, start_server, stop_server)

NIX_CACHE = DATA / "cache" / "nix-cache"  # written by Nix 2.8 (tests/data/cache/README.md)
NIX_PATHS = ["/nix/store/hp4xhizqijy1k440fq06xfq6xpl37pf6-h.txt",
             "/nix/store/nai7hnixwpdj31gflmh2xaw00xjq4b7m-tree"]


def files(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def same_files(a, b, names):
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def source(tmp_path, listing=True):
    """A cache with lib ← app and a lone path, signed with the test key; returns (cache, paths)."""
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    root = tmp_path / "src"
    with open_store(root) as store:
        lib, app = make_closure(store)
        lone = make_path(store, "lone-1.0", {"x": b"alone\n" * 30})
        paths = {"lib": lib, "app": app, "lone": lone}
    cache = tmp_path / "A"
    url = f"file://{cache}" + ("?write-nar-listing=true" if listing else "")
    run_pure("copy", "--to", url, "--secret-key-file", key,
             *(p.absolute("/pure/store") for p in paths.values()), root=root)
    return cache, paths


def mirror(src, dst, *paths, check=True, keys=PUB, extra=()):
    args = ["copy", "--from", src, "--to", dst, *extra]
    if keys is not None:
        args += ["--trusted-public-keys", keys]
    return run_pure(*args, *paths, check=check)


def test_a_mirror_is_the_source_byte_for_byte_and_substitutes(tmp_path):
    a, p = source(tmp_path)
    b = tmp_path / "B"
    app, lone = p["app"].absolute("/pure/store"), p["lone"].absolute("/pure/store")
    r = mirror(f"file://{a}", f"file://{b}", app, lone, extra=["--json", "-v"])
    out = json.loads(r.stdout)
    assert f"copying path '{lone}' from 'file://{a}'" in r.stderr
    # references first, each narinfo, NAR and listing as the source has it
    assert out["copied"] == [p["lib"].absolute("/pure/store"), app, lone]
    assert out["skipped"] == [] and out["fileBytes"] == sum(f.stat().st_size for f in (a / "nar").iterdir())
    assert files(b) == files(a)
    same_files(a, b, files(a))
    run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{b}")
    root = tmp_path / "fresh"
    run_pure("copy", "--from", f"file://{b}", "--trusted-public-keys", PUB, app, root=root)
    run_pure("store", "verify", "--check-contents", root=root)
    # again: everything is there, nothing is copied
    again = json.loads(mirror(f"file://{a}", f"file://{b}", app, lone, extra=["--json"]).stdout)
    assert again["copied"] == [] and len(again["skipped"]) == 3


def test_nix_cache_mirrored_over_http_keeps_nix_bytes(tmp_path):
    """Nix's golden cache, served by `pure cache serve`, copied into another `pure cache serve`
    that takes uploads: every file arrives unchanged (Nix's signatures still check)."""
    a = tmp_path / "nixcache"
    shutil.copytree(NIX_CACHE, a)
    b = tmp_path / "B"
    b.mkdir()
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    src, src_url = start_server(a)
    dst, dst_url = start_server(b, token_file=token)
    try:
        mirror(src_url, dst_url + f"?token-file={token}", *NIX_PATHS)
    finally:
        stop_server(src)
        stop_server(dst)
    names = [n for n in files(a) if n.endswith((".narinfo", ".ls")) or n.startswith("nar/")]
    assert sorted(n for n in files(b) if n != "nix-cache-info") == names
    same_files(a, b, names + ["nix-cache-info"])
    if HAVE_NIX:  # and Nix takes the mirror
        nix_copy_from(tmp_path, f"file://{b}", NIX_PATHS[1], check=True)


@needs_nix
def test_nix_reads_a_mirror_of_a_pure_cache(tmp_path):
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    with open_store(tmp_path / "s", "/nix/store") as store:
        _lib, app = make_closure(store)
    app_p = app.absolute("/nix/store")
    run_pure("copy", "--to", f"file://{tmp_path / 'A'}", "--secret-key-file", key, app_p,
             root=tmp_path / "s", store_dir="/nix/store")
    mirror(f"file://{tmp_path / 'A'}", f"file://{tmp_path / 'B'}", app_p)
    p = nix_copy_from(tmp_path, f"file://{tmp_path / 'B'}", app_p)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("how", ["unsigned", "untrusted", "bad signature", "url outside"])
def test_a_refused_narinfo_writes_nothing(tmp_path, how):
    a, p = source(tmp_path)
    lib = p["lib"]
    if how == "unsigned":
        rewrite_narinfo(a, lib, drop_sigs=True)
        reason = "no signature"
    elif how == "untrusted":
        other = run_pure("key", "generate", "--name", "other-1").stdout.strip()
        rewrite_narinfo(a, lib, sign_with=other)
        reason = "not trusted"
    elif how == "bad signature":
        rewrite_narinfo(a, lib, nar_size=1 + rewrite_narinfo(a, lib).nar_size)  # signed before
        reason = "not trusted"
    else:
        rewrite_narinfo(a, lib, url="../../etc/passwd")
        reason = "points outside the cache"
    b = tmp_path / "B"
    r = mirror(f"file://{a}", f"file://{b}", p["app"].absolute("/pure/store"), check=False)
    assert r.returncode == 1
    assert f"error: cannot copy '{lib.absolute('/pure/store')}'" in r.stderr
    assert reason in r.stderr and "nothing was written" in r.stderr
    assert not b.exists()
    if how == "unsigned":  # asked for: copied, and the copy is still checked against the NAR
        mirror(f"file://{a}", f"file://{b}", p["app"].absolute("/pure/store"), keys=None,
               extra=["--no-check-sigs"])
        assert narinfo_file(b, lib).read_bytes() == narinfo_file(a, lib).read_bytes()


def test_a_corrupt_nar_fails_its_path_and_referrers_only(tmp_path):
    a, p = source(tmp_path, listing=False)
    lib_nar = a / rewrite_narinfo(a, p["lib"]).url
    data = bytearray(lib_nar.read_bytes())
    data[len(data) // 2] ^= 1
    lib_nar.write_bytes(bytes(data))
    b = tmp_path / "B"
    names = [q.absolute("/pure/store") for q in (p["app"], p["lone"])]
    r = mirror(f"file://{a}", f"file://{b}", *names, check=False)
    assert r.returncode == 1
    lib, app = p["lib"].absolute("/pure/store"), p["app"].absolute("/pure/store")
    assert f"cannot copy '{lib}'" in r.stderr and "corrupt zstd data" in r.stderr
    assert f"cannot copy '{app}'" in r.stderr and f"its reference '{lib}' could not be copied" in r.stderr
    assert "1 other path was copied (whole closures)" in r.stderr
    # the lone path is there, nothing of lib, no temporary file; the mirror verifies clean
    assert [n for n in files(b) if n.endswith(".narinfo")] == [f"{p['lone'].hash_part}.narinfo"]
    assert not (b / rewrite_narinfo(a, p["lib"]).url).exists()
    assert not [n for n in files(b) if ".tmp" in n]
    run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{b}")

    # --json says what was done and what failed, before the error (the same for a store)
    lone = p["lone"].absolute("/pure/store")
    r = mirror(f"file://{a}", f"file://{tmp_path / 'C'}", *names, check=False, extra=["--json"])
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["copied"] == [lone] and out["skipped"] == []
    assert sorted(out["failed"]) == sorted([lib, app]) and "corrupt zstd data" in out["failed"][lib]
    r = run_pure("copy", "--json", "--from", f"file://{a}", "--trusted-public-keys", PUB, *names,
                 root=tmp_path / "store", check=False)
    out = json.loads(r.stdout)
    assert r.returncode == 1 and sum(line.startswith("error: ") for line in r.stderr.splitlines()) == 1
    assert out["fetched"] == [lone] and out["skipped"] == [] and sorted(out["failed"]) == sorted([lib, app])
    assert f"its reference '{lib}'" in out["failed"][app]
    r = run_pure("copy", "--json", "--from", f"file://{a}", "--trusted-public-keys", PUB, lone,
                 root=tmp_path / "store")
    assert json.loads(r.stdout) == {"fetched": [], "skipped": [lone], "failed": {}, "narBytes": 0}


def test_a_nar_that_is_no_nar_is_not_copied_though_its_hashes_match(tmp_path):
    """A NAR file whose hashes and sizes are the (signed) narinfo's but which is no NAR a
    restore takes (a '..' entry, bytes after its end, cut short): refused as a substitution and
    `cache verify --check-contents` refuse it; the copy only parsed it for a listing, so it went
    into the mirror (which then failed every substitution and verify)."""
    import struct

    from purestore.formats.hash import Hash

    def s(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b + b"\0" * (-len(b) % 8)

    def nar(*tokens: bytes) -> bytes:
        return b"".join(map(s, tokens))

    regular = [b"(", b"type", b"regular", b"contents", b"x", b")"]
    good = nar(b"nix-archive-1", b"(", b"type", b"directory", b"entry", b"(", b"name", b"a", b"node", *regular,
               b")", b")")
    a, p = source(tmp_path, listing=False)
    lone = p["lone"]
    for i, (bad, said) in enumerate(((good.replace(s(b"a"), s(b"..")), "invalid entry name b'..'"),
                                     (good + s(b"more"), "trailing bytes after the end of the NAR"),
                                     (good[:-16], "NAR is truncated"))):
        ni = rewrite_narinfo(a, lone, sign_with=SEC, compression="none", url=f"nar/bad{i}.nar",
                             nar_hash=Hash.of_bytes(bad), nar_size=len(bad), file_hash=None, file_size=None)
        (a / ni.url).write_bytes(bad)
        b = tmp_path / f"B{i}"
        r = mirror(f"file://{a}", f"file://{b}", lone.absolute("/pure/store"), check=False)
        assert r.returncode == 1 and f"NAR file://{a}/{ni.url} is invalid: {said}" in r.stderr, r.stderr
        assert not (b / ni.url).exists() and not list(b.glob("*.narinfo"))
        assert not [n for n in files(b) if ".tmp" in n]


def test_a_reference_cycle_is_refused_before_anything_is_written(tmp_path):
    """Signed narinfos that refer to each other (lib → app → lib: only a hostile or broken cache
    has them), and one above them: each refused, naming why, the destination untouched.  The
    copy used to wait for good, each narinfo for the other's to be published."""
    import subprocess

    a, p = source(tmp_path, listing=False)
    sd = "/pure/store"
    rewrite_narinfo(a, p["lib"], sign_with=SEC, references=(p["app"],))
    rewrite_narinfo(a, p["lone"], sign_with=SEC, references=(p["app"],))
    b = tmp_path / "B"
    try:
        r = run_pure("copy", "--from", f"file://{a}", "--to", f"file://{b}", "--trusted-public-keys", PUB,
                     p["lone"].absolute(sd), check=False, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the copy of a reference cycle did not end")
    assert r.returncode == 1
    for q in ("lib", "app"):
        assert f"cannot copy '{p[q].absolute(sd)}' from 'file://{a}': its narinfo is part of a reference cycle" \
            in r.stderr, r.stderr
    assert (f"cannot copy '{p['lone'].absolute(sd)}' from 'file://{a}': its reference "
            f"'{p['app'].absolute(sd)}' is part of a reference cycle or refers to one") in r.stderr
    assert not b.exists()


def test_a_missing_reference_is_named_and_nothing_is_written(tmp_path):
    a, p = source(tmp_path)
    narinfo_file(a, p["lib"]).unlink()
    b = tmp_path / "B"
    r = mirror(f"file://{a}", f"file://{b}", p["app"].absolute("/pure/store"), check=False)
    assert r.returncode == 1
    assert (f"path '{p['lib'].absolute('/pure/store')}', which '{p['app'].absolute('/pure/store')}' "
            "refers to, is not in binary cache") in r.stderr
    assert not b.exists()


def test_signatures_added_and_listings_made(tmp_path):
    """--secret-key-file adds a signature (the source's stays); --write-nar-listing makes the
    listings the source lacks, equal to the ones a push writes."""
    a, p = source(tmp_path, listing=False)
    key2 = tmp_path / "k2.sec"
    run_pure("key", "generate", "--name", "mirror-1", "--secret-out", key2, "--public-out", tmp_path / "k2.pub")
    pub2 = (tmp_path / "k2.pub").read_text().strip()
    b = tmp_path / "B"
    app = p["app"].absolute("/pure/store")
    mirror(f"file://{a}", f"file://{b}", app, extra=["--secret-key-file", key2, "--write-nar-listing"])
    text = narinfo_file(b, p["app"]).read_text()
    sigs = [line for line in text.splitlines() if line.startswith("Sig: ")]
    assert sorted(s.split(":")[1].strip() for s in sigs) == ["mirror-1", "test-key-1"]
    # the mirror's own key alone is enough to substitute from it
    root = tmp_path / "fresh"
    run_pure("copy", "--from", f"file://{b}", "--trusted-public-keys", pub2, app, root=root)
    pushed = tmp_path / "P"
    run_pure("copy", "--to", f"file://{pushed}?write-nar-listing=true", app, root=tmp_path / "src")
    for q in (p["lib"], p["app"]):
        assert (b / f"{q.hash_part}.ls").read_bytes() == (pushed / f"{q.hash_part}.ls").read_bytes()


def test_a_store_dir_mismatch_is_refused(tmp_path):
    a, p = source(tmp_path)
    b = tmp_path / "B"
    b.mkdir()
    (b / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    r = mirror(f"file://{a}", f"file://{b}", p["app"].absolute("/pure/store"), check=False)
    assert r.returncode == 1 and (f"is for store dir '/nix/store', but the source cache's ('file://{a}') is "
                                  "'/pure/store'") in r.stderr, r.stderr
    assert files(b) == ["nix-cache-info"]


@pytest.mark.parametrize("extra, message", [
    (["--compression", "xz"], "--compression does not apply to a copy between caches"),
    (["--parallel-compression"], "--parallel-compression does not apply"),
    ([], "compression does not apply to a copy between caches"),  # on the URL
])
def test_recompression_options_are_refused(tmp_path, extra, message):
    a, p = source(tmp_path)
    dst = f"file://{tmp_path / 'B'}" + ("" if extra else "?compression=xz")
    r = mirror(f"file://{a}", dst, p["app"].absolute("/pure/store"), extra=extra, check=False)
    assert r.returncode != 0 and message in r.stderr
    assert not (tmp_path / "B").exists()


def test_usage_errors(tmp_path):
    r = run_pure("copy", "/pure/store/0rzqlwgy4qwib41y722122yp0p6a6qrq-lib-1.0", check=False)
    assert r.returncode == 2 and "--to URL, --from URL, or both" in r.stderr
    r = run_pure("copy", "--from", f"file://{tmp_path}", "--no-check-sigs",
                 "/pure/store/0rzqlwgy4qwib41y722122yp0p6a6qrq-lib-1.0", check=False)
    assert r.returncode == 2 and "always need a trusted signature" in r.stderr
    r = run_pure("copy", "--to", f"file://{tmp_path}/B", "--require-provenance",
                 "/pure/store/0rzqlwgy4qwib41y722122yp0p6a6qrq-lib-1.0", check=False)
    assert r.returncode == 2 and "--require-provenance applies to fetching (--from)" in r.stderr
    assert not (tmp_path / "B").exists()
    r = run_pure("copy", "--from", f"file://{tmp_path}", "--to", f"file://{tmp_path}/B", "not-a-path",
                 check=False)
    assert r.returncode == 2 and "'not-a-path' is not a store path" in r.stderr
    r = run_pure("copy", "--from", f"file://{tmp_path}", "--to", f"file://{tmp_path}/B",
                 "/pure/store/0rzqlwgy4qwib41y722122yp0p6a6qrq-lib-1.0", check=False,
                 env={"PURE_CONFIG": "/dev/null"})
    assert r.returncode == 1 and "no trusted public keys" in r.stderr
