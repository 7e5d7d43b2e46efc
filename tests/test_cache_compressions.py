"""NARs compressed as Nix can write them but pure does not (gzip, br, lz4, lzip; bzip2): read
from caches Nix 2.8 wrote (golden, tests/data/cache/README.md), and from bigger ones Nix writes
when it is installed; a damaged one is refused with its reason."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest

from conftest import DATA, needs_nix, run_pure
from test_cache_support import PUB, SEC

GOLDEN = DATA / "cache" / "nix-compressions"
TREE = "/nix/store/nai7hnixwpdj31gflmh2xaw00xjq4b7m-tree"
METHODS = ["gzip", "br", "lz4", "lzip", "bzip2"]


def fetch(root, url, path, check=True):
    return run_pure("--store", root, "--store-dir", "/nix/store", "--trusted-public-keys", PUB,
                    "copy", "--from", url, path, check=check)


def nar_file(cache):
    (name,) = os.listdir(cache / "nar")
    return cache / "nar" / name


@pytest.mark.parametrize("method", METHODS)
def test_a_cache_nix_wrote_with_each_compression_is_substituted(tmp_path, method):
    cache = tmp_path / "c"
    shutil.copytree(GOLDEN / method, cache)
    root = tmp_path / "s"
    fetch(root, f"file://{cache}", TREE)
    assert (root / "nix/store" / TREE.rsplit("/", 1)[1] / "a").read_text() == "a\n"
    run_pure("--store", root, "--store-dir", "/nix/store", "store", "verify", "--check-contents")
    r = run_pure("--store-dir", "/nix/store", "cache", "verify", "--check-contents", "--trusted-public-keys", PUB,
                 f"file://{cache}")
    assert "no problems" in r.stderr


def test_an_lzip_nar_of_two_members_is_substituted(tmp_path):
    """The lzip NAR in two members that Nix 2.8 reads whole (tests/data/cache/README.md)."""
    cache = tmp_path / "c"
    shutil.copytree(DATA / "cache" / "lzip-members", cache)
    root = tmp_path / "s"
    fetch(root, f"file://{cache}", TREE)
    assert (root / "nix/store" / TREE.rsplit("/", 1)[1] / "a").read_text() == "a\n"
    run_pure("--store", root, "--store-dir", "/nix/store", "store", "verify", "--check-contents")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_nar_in_each_compression_is_refused(tmp_path, method, damage):
    cache = tmp_path / "c"
    shutil.copytree(GOLDEN / method, cache)
    f = nar_file(cache)
    data = bytearray(f.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x55
    f.write_bytes(bytes(data))
    root = tmp_path / "s"
    r = fetch(root, f"file://{cache}", TREE, check=False)
    assert r.returncode == 1 and f"error: cannot substitute '{TREE}': " in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (root / "nix/store" / TREE.rsplit("/", 1)[1]).exists()


@needs_nix
@pytest.mark.parametrize("method", ["gzip", "br", "lz4", "lzip"])
def test_a_bigger_path_nix_compressed_is_substituted(tmp_path, method):
    """Several MiB, so that the NAR comes in many chunks and frames (lz4) or blocks."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    r = random.Random(3)
    (src / "d" / "text").write_text("".join(r.choice(["alpha ", "beta ", "gamma\n"]) for _ in range(400_000)))
    (src / "rand").write_bytes(r.randbytes(3_000_000))
    env = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command"}
    nixroot = tmp_path / "nixroot"
    path = subprocess.run(["nix-store", "--store", nixroot, "--add", src], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()
    keyfile = tmp_path / "k.sec"
    keyfile.write_text(SEC)
    cache = tmp_path / "cache"
    subprocess.run(["nix", "copy", "--store", nixroot, "--to",
                    f"file://{cache}?compression={method}&secret-key={keyfile}", path],
                   env=env, check=True, capture_output=True)
    root = tmp_path / "s"
    fetch(root, f"file://{cache}", path)
    got = root / "nix/store" / path.rsplit("/", 1)[1]
    assert (got / "rand").read_bytes() == (src / "rand").read_bytes()
    assert (got / "d" / "text").read_bytes() == (src / "d" / "text").read_bytes()


@needs_nix
@pytest.mark.parametrize("method", ["lz4", "lzip", "gzip", "br"])
def test_a_nar_of_exactly_a_step_s_size_is_read_whole(tmp_path, method):
    """A NAR of exactly 2 MiB (the reader's step) or 1 MiB: the stream's end comes after a step
    that filled its bound (lz4 once took such a NAR for truncated)."""
    env = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command"}
    keyfile = tmp_path / "k.sec"
    keyfile.write_text(SEC)
    for size in (1 << 20, 2 << 20):
        f = tmp_path / f"f{size}.txt"
        f.write_bytes(b"".join(b"line %d of text\n" % i for i in range(size // 10))[:size - 112])
        nixroot = tmp_path / "nixroot"
        path = subprocess.run(["nix-store", "--store", nixroot, "--add", f], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()
        cache = tmp_path / f"cache{size}"
        subprocess.run(["nix", "copy", "--store", nixroot, "--to",
                        f"file://{cache}?compression={method}&secret-key={keyfile}", path],
                       env=env, check=True, capture_output=True)
        assert f"NarSize: {size}\n" in next(cache.glob("*.narinfo")).read_text()
        fetch(tmp_path / "s", f"file://{cache}", path)
