"""Pushing with ``parallel-compression`` (each NAR compressed on all cores) and
``index-debug-info`` (debuginfo/<build id> links), checked against golden files Nix 2.8 wrote
(tests/data/cache/parallel/README.md) and, where Nix is installed, against Nix itself."""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess

import pytest
import zstandard

from _parallel_tree import BUILD_ID, make_parallel_tree
from conftest import DATA, needs_nix, run_pure
from purestore.cache import compression as C
from test_cache_support import PUB, SEC

GOLD = DATA / "cache" / "parallel"
GOLD_PATH = "/nix/store/i1zsn41lxdpv32hckjy583j5hjb6f3ph-tree"
GOLD_HASH = "i1zsn41lxdpv32hckjy583j5hjb6f3ph"
NIX_ENV = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command"}


def _text(n: int) -> bytes:
    import random
    r = random.Random(3)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"%d" % r.randrange(10**6)]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(r.choice(words) for _ in range(12)) + b"\n"
    return bytes(out[:n])


def _all(comp, data: bytes, piece: int = 100_000) -> bytes:
    out = bytearray()
    for i in range(0, len(data), piece):
        C.compress_to(comp, data[i:i + piece], out.extend)
    C.flush_to(comp, out.extend)
    return bytes(out)


@pytest.fixture
def keyfile(tmp_path):
    p = tmp_path / "k.sec"
    p.write_text(SEC)
    return p


def test_parallel_xz_is_the_same_on_any_number_of_cores_and_reads_back():
    data = _text(3_000_000)  # three 1 MiB blocks at level 0
    one, four = _all(C._XzMT(0, 1), data), _all(C._XzMT(0, 4), data)
    assert one == four
    assert lzma.decompress(one) == data
    assert one != lzma.compress(data, lzma.FORMAT_XZ, preset=0)  # blocks: not the single-threaded stream
    with pytest.raises(Exception, match="used after its end"):
        c = C._XzMT(0, 2)
        c.flush()
        c.compress(b"more")


@pytest.mark.skipif(C._LIBZSTD is None, reason="no system libzstd")
def test_parallel_zstd_is_the_same_on_any_number_of_cores_and_reads_back():
    data = _text(12_000_000)  # several zstd jobs
    one, three = _all(C._SysZstd(3, 1), data), _all(C._SysZstd(3, 3), data)
    assert one == three
    assert zstandard.ZstdDecompressor().decompressobj().decompress(one) == data
    assert one != _all(C._SysZstd(3), data)
    if shutil.which("zstd"):  # the zstd tool's multi-threaded output, from the same library
        cli = subprocess.run(["zstd", "-3", "-T2", "--no-check", "-q", "-c"], input=data,
                             capture_output=True, check=True).stdout
        assert cli == one


def test_push_equals_nix_golden_parallel_xz_and_debug_info(tmp_path, keyfile):
    root = tmp_path / "pure"
    path = run_pure("store", "add", make_parallel_tree(tmp_path / "tree"), root=root,
                    store_dir="/nix/store").stdout.strip()
    assert path == GOLD_PATH
    cache = tmp_path / "cache"
    url = (f"file://{cache}?compression=xz&compression-level=0&parallel-compression=true"
           f"&index-debug-info=true&secret-key={keyfile}")
    run_pure("copy", "--to", url, path, root=root, store_dir="/nix/store")
    assert (cache / f"{GOLD_HASH}.narinfo").read_text() == (GOLD / f"{GOLD_HASH}.narinfo").read_text()
    # only the well-named regular file under real directories gets a link, named as Nix 2.8 names it
    assert sorted(os.listdir(cache / "debuginfo")) == sorted(os.listdir(GOLD / "debuginfo")) == [
        f"{BUILD_ID}.debug"]
    link = (cache / "debuginfo" / f"{BUILD_ID}.debug").read_text()
    assert link == (GOLD / "debuginfo" / f"{BUILD_ID}.debug").read_text()
    assert json.loads(link)["archive"] == "../" + next(
        line.split(": ")[1] for line in (cache / f"{GOLD_HASH}.narinfo").read_text().splitlines()
        if line.startswith("URL: "))
    # and it reads back: substituted into a fresh store, contents checked
    fresh = tmp_path / "fresh"
    run_pure("copy", "--from", f"file://{cache}", "--trusted-public-keys", PUB, path, root=fresh,
             store_dir="/nix/store")
    run_pure("store", "verify", "--check-contents", root=fresh, store_dir="/nix/store")
    # a link already there is kept (as Nix keeps it): pushing the path again leaves it
    (cache / "debuginfo" / f"{BUILD_ID}.debug").write_text("{}")
    os.unlink(cache / f"{GOLD_HASH}.narinfo")
    run_pure("copy", "--to", url, path, root=root, store_dir="/nix/store")
    assert (cache / "debuginfo" / f"{BUILD_ID}.debug").read_text() == "{}"


def test_debug_links_from_a_listing_that_is_not_a_listings_shape_are_none():
    """A copy between caches finds debug files in the source's .ls listing, which is not
    signed: entries that are not an object, or JSON nested deeper than the decoder goes, were an
    AttributeError or RecursionError traceback that stopped the copy; they link nothing."""
    from purestore.cache.debug_info import debug_info_members

    def listing(lib_entries) -> bytes:
        return json.dumps({"version": 1, "root": {"type": "directory", "entries": {
            "lib": {"type": "directory", "entries": lib_entries}}}}).encode()
    ids = {"type": "directory", "entries": {BUILD_ID[:2]: {"type": "directory", "entries": {
        f"{BUILD_ID[2:]}.debug": {"type": "regular", "size": 1}}}}}
    good = listing({"debug": {"type": "directory", "entries": {".build-id": ids}}})
    assert debug_info_members(good) == [(f"debuginfo/{BUILD_ID}.debug", f"lib/debug/.build-id/{BUILD_ID[:2]}/"
                                                                      f"{BUILD_ID[2:]}.debug")]
    for bad in (listing([1]), listing({"debug": {"type": "directory", "entries": "abc"}}),
                listing({"debug": {"type": "directory", "entries": {".build-id": {**ids, "entries": [2]}}}}),
                b"[" * 100000 + b"]" * 100000, b"null"):
        assert debug_info_members(bad) == []


def test_parallel_zstd_push_reads_back_and_differs_from_the_default(tmp_path, keyfile):
    root = tmp_path / "pure"
    path = run_pure("store", "add", make_parallel_tree(tmp_path / "tree"), root=root,
                    store_dir="/nix/store").stdout.strip()
    plain, par = tmp_path / "plain", tmp_path / "par"
    run_pure("copy", "--to", f"file://{plain}?secret-key={keyfile}", path, root=root, store_dir="/nix/store")
    r = run_pure("copy", "--to", f"file://{par}", "--secret-key-file", keyfile, "--parallel-compression",
                 "--json", path, root=root, store_dir="/nix/store")
    assert json.loads(r.stdout)["uploaded"] == [path]
    assert not (par / "debuginfo").exists()  # only with index-debug-info
    ni_plain = (plain / f"{GOLD_HASH}.narinfo").read_text()
    ni_par = (par / f"{GOLD_HASH}.narinfo").read_text()
    file_hash = [ln for ln in ni_par.splitlines() if ln.startswith("FileHash: ")]
    assert file_hash and file_hash[0] not in ni_plain
    fresh = tmp_path / "fresh"
    run_pure("copy", "--from", f"file://{par}", "--trusted-public-keys", PUB, path, root=fresh,
             store_dir="/nix/store")
    run_pure("store", "verify", "--check-contents", root=fresh, store_dir="/nix/store")


def test_bad_flags_are_refused_before_anything_is_written(tmp_path, keyfile):
    root = tmp_path / "pure"
    path = run_pure("store", "add", make_parallel_tree(tmp_path / "tree"), root=root,
                    store_dir="/nix/store").stdout.strip()
    cache = tmp_path / "cache"
    for bad in ("parallel-compression=maybe", "index-debug-info=2", "write-nar-listing=on"):
        r = run_pure("copy", "--to", f"file://{cache}?{bad}", path, root=root, store_dir="/nix/store",
                     check=False)
        key, value = bad.split("=")
        assert r.returncode == 1
        assert f"error: cache URL 'file://{cache}?{bad}': {key} must be true or false, got {value!r}" in r.stderr
        assert not cache.exists()
    r = run_pure("copy", "--from", f"file://{cache}", "--parallel-compression", path, root=root,
                 store_dir="/nix/store", check=False)
    assert r.returncode != 0 and "--parallel-compression applies to pushing (--to), not to --from" in r.stderr


@needs_nix
@pytest.mark.nix
def test_golden_files_are_what_nix_writes(tmp_path, keyfile):
    def nix(*args):
        return subprocess.run([str(a) for a in args], env=NIX_ENV, capture_output=True, text=True,
                              check=True, timeout=300).stdout
    nixroot = tmp_path / "nixroot"
    path = nix("nix-store", "--store", nixroot, "--add", make_parallel_tree(tmp_path / "tree")).strip()
    assert path == GOLD_PATH
    cache = tmp_path / "nixcache"
    nix("nix", "copy", "--store", nixroot, "--to",
        f"file://{cache}?compression=xz&compression-level=0&parallel-compression=true"
        f"&index-debug-info=true&secret-key={keyfile}", path)
    assert (cache / f"{GOLD_HASH}.narinfo").read_text() == (GOLD / f"{GOLD_HASH}.narinfo").read_text()
    assert sorted(os.listdir(cache / "debuginfo")) == sorted(os.listdir(GOLD / "debuginfo"))
    for name in os.listdir(GOLD / "debuginfo"):
        assert (cache / "debuginfo" / name).read_text() == (GOLD / "debuginfo" / name).read_text()
    # Nix reads what pure pushed with parallel zstd
    root = tmp_path / "pure"
    run_pure("store", "add", tmp_path / "tree", root=root, store_dir="/nix/store")
    ours = tmp_path / "ours"
    run_pure("copy", "--to", f"file://{ours}?parallel-compression=true&secret-key={keyfile}", path,
             root=root, store_dir="/nix/store")
    nix("nix", "copy", "--store", tmp_path / "nix2", "--from", f"file://{ours}", "--option",
        "trusted-public-keys", PUB, path)
    nix("nix-store", "--store", tmp_path / "nix2", "--verify", "--check-contents")


def test_a_copy_between_caches_writes_the_same_debug_info_links(tmp_path, keyfile):
    """`copy --from A --to 'B?index-debug-info=true'`: the links come from the path's listing
    (made from the NAR, which is checked anyway), the same as a push from the store writes and
    as Nix 2.8 wrote them; no .ls is written unless asked for."""
    root = tmp_path / "pure"
    path = run_pure("store", "add", make_parallel_tree(tmp_path / "tree"), root=root,
                    store_dir="/nix/store").stdout.strip()
    src, dst = tmp_path / "src", tmp_path / "dst"
    run_pure("copy", "--to", f"file://{src}?secret-key={keyfile}", path, root=root, store_dir="/nix/store")
    assert not (src / "debuginfo").exists()
    run_pure("copy", "--from", f"file://{src}", "--to", f"file://{dst}?index-debug-info=true",
             "--trusted-public-keys", PUB, path)
    assert sorted(os.listdir(dst / "debuginfo")) == sorted(os.listdir(GOLD / "debuginfo"))
    nar_url = next(line.split(": ")[1] for line in (dst / f"{GOLD_HASH}.narinfo").read_text().splitlines()
                   if line.startswith("URL: "))
    link = json.loads((dst / "debuginfo" / f"{BUILD_ID}.debug").read_text())
    assert link == {**json.loads((GOLD / "debuginfo" / f"{BUILD_ID}.debug").read_text()), "archive": "../" + nar_url}
    assert not list(dst.glob("*.ls"))
