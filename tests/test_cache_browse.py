"""pure cache ls / pure cache cat: looking inside a path in a binary cache without installing it,
with Nix's output (checked against the golden cache Nix wrote, and against `nix store ls` where
Nix is installed), a trusted signature required, and a NAR checked before any byte is shown."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import DATA, needs_nix, run_pure
from purestore.formats.store_path import StorePath
from test_cache_support import PUB, SEC, narinfo_file, pushed_closure, rewrite_narinfo, start_server, stop_server

GOLD = DATA / "cache" / "nix-cache"
TREE = "/nix/store/nai7hnixwpdj31gflmh2xaw00xjq4b7m-tree"
OTHER_KEY = "other-1:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
# what Nix 2.8 prints for `nix store ls --store file://tests/data/cache/nix-cache ARGS`
NIX_LS = {
    ("-l", f"{TREE}/a"): "-r--r--r--                    2 a\n",
    ("-l", f"{TREE}/sub"): "lrwxrwxrwx                    0 ./link -> ../a\n-r-xr-xr-x                   10 ./x\n",
    ("-d", f"{TREE}/sub"): ".\n",
    ("-ld", TREE): "dr-xr-xr-x                    0 .\n",
    ("-lR", TREE): ("-r--r--r--                    2 ./a\ndr-xr-xr-x                    0 ./sub\n"
                    "lrwxrwxrwx                    0 ./sub/link -> ../a\n-r-xr-xr-x                   10 ./sub/x\n"),
    ("-R", TREE): "./a\n./sub\n./sub/link\n./sub/x\n",
    ("--json", TREE): '{"type":"directory","entries":{"a":{},"sub":{}}}',
    ("--json", "-R", TREE): ('{"type":"directory","entries":{"a":{"type":"regular","size":2,"narOffset":232},'
                             '"sub":{"type":"directory","entries":{"link":{"type":"symlink","target":"../a"},'
                             '"x":{"type":"regular","size":10,"executable":true,"narOffset":784}}}}}'),
}


def ls(cache, *args, check=True, **kw):
    return run_pure("cache", "ls", "--trusted-public-keys", PUB, f"file://{cache}", *args, check=check, **kw)


@pytest.mark.parametrize("args", sorted(NIX_LS))
def test_ls_prints_what_nix_prints(args):
    out = ls(GOLD, *args).stdout
    assert out.rstrip("\n") == NIX_LS[args].rstrip("\n")


@pytest.mark.parametrize("args", sorted(NIX_LS))
def test_ls_from_the_nar_equals_ls_from_the_listing(args):
    assert ls(GOLD, "--no-listing", *args).stdout == ls(GOLD, *args).stdout


@needs_nix
@pytest.mark.nix
def test_the_expected_output_is_nix_s():
    env = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command"}
    for args in NIX_LS:
        got = subprocess.run(["nix", "store", "ls", "--store", f"file://{GOLD}", *args], env=env,
                             capture_output=True, text=True, check=True).stdout
        assert got.rstrip("\n") == NIX_LS[args].rstrip("\n"), args


def test_cat_over_http_and_file(tmp_path):
    cache = tmp_path / "cache"
    sd, app = pushed_closure(tmp_path, cache)
    proc, url = start_server(cache)
    try:
        for u in (url, f"file://{cache}"):
            r = run_pure("cache", "cat", "--trusted-public-keys", PUB, u, f"{app}/share/doc")
            assert r.stdout == "documentation " * 500
            listing = json.loads(run_pure("cache", "ls", "--trusted-public-keys", PUB, "--json", "-R", u, app).stdout)
            assert listing["entries"]["share"]["entries"]["link"] == {"type": "symlink", "target": "../bin/app"}
    finally:
        stop_server(proc)
    r = run_pure("cache", "cat", "--trusted-public-keys", PUB, f"file://{cache}", f"{app}/share/link", check=False)
    assert r.returncode == 1 and f"error: path '{app}/share/link' is not a regular file (a symlink to '../bin/app')" in r.stderr
    r = run_pure("cache", "cat", "--trusted-public-keys", PUB, f"file://{cache}", f"{app}/share/nope", check=False)
    assert r.returncode == 1 and f"error: path '{app}/share/nope' does not exist" in r.stderr
    r = run_pure("cache", "ls", "--trusted-public-keys", PUB, f"file://{cache}", f"{sd}/{'0' * 32}-gone", check=False)
    assert r.returncode == 1 and "is not in binary cache" in r.stderr


def test_a_tampered_nar_is_never_shown(tmp_path):
    cache = tmp_path / "cache"
    sd, app = pushed_closure(tmp_path, cache)
    # pushed again uncompressed, so that a changed byte still makes a well-formed NAR
    shutil.rmtree(cache)
    run_pure("copy", "--to", f"file://{cache}?compression=none", "--secret-key-file", tmp_path / "k.sec", app,
             root=tmp_path / "a", store_dir=sd)
    nar = next(p for p in (cache / "nar").iterdir() if b"documentation" in p.read_bytes())
    data = nar.read_bytes()
    nar.write_bytes(data.replace(b"documentation", b"DOCUMENTATION", 1))
    r = run_pure("cache", "cat", "--trusted-public-keys", PUB, f"file://{cache}", f"{app}/share/doc", check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert "FileHash says" in r.stderr or "NarHash says" in r.stderr
    # --no-listing reads the NAR and refuses it too; the unsigned listing is only used without it
    r = run_pure("cache", "ls", "--trusted-public-keys", PUB, "--no-listing", f"file://{cache}", app, check=False)
    assert r.returncode == 1 and r.stdout == ""


def test_signatures_are_required_and_urls_stay_inside(tmp_path):
    cache = tmp_path / "cache"
    sd, app = pushed_closure(tmp_path, cache)
    r = run_pure("cache", "cat", "--trusted-public-keys", OTHER_KEY, f"file://{cache}", f"{app}/share/doc", check=False)
    assert r.returncode == 1 and f"error: narinfo of '{app}' in 'file://{cache}' is not trusted" in r.stderr
    assert r.stdout == ""
    r = run_pure("cache", "cat", f"file://{cache}", f"{app}/share/doc", check=False)
    assert r.returncode == 1 and "no trusted public keys" in r.stderr and "--no-check-sigs" in r.stderr
    r = run_pure("cache", "cat", "--no-check-sigs", f"file://{cache}", f"{app}/share/doc")
    assert r.stdout == "documentation " * 500
    # a narinfo (validly signed) whose URL leaves the cache
    sp = StorePath.from_base_name(os.path.basename(app))
    rewrite_narinfo(cache, sp, sd, sign_with=SEC, url="../../etc/passwd")
    assert "../../etc/passwd" in narinfo_file(cache, sp).read_text()
    r = run_pure("cache", "cat", "--trusted-public-keys", PUB, f"file://{cache}", f"{app}/share/doc", check=False)
    assert r.returncode == 1 and "points outside the cache" in r.stderr and r.stdout == ""


def test_json_listing_object_for_a_file():
    out = ls(GOLD, "--json", f"{TREE}/sub/x").stdout
    assert json.loads(out) == {"type": "regular", "size": 10, "executable": True, "narOffset": 784}


def test_a_malformed_listing_is_an_error_and_no_listing_reads_the_nar(tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(GOLD, cache)
    (cache / "nai7hnixwpdj31gflmh2xaw00xjq4b7m.ls").write_text('{"version": 1, "root": {"type": "socket"}}')
    r = ls(cache, TREE, check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert f"error: listing file://{cache}/nai7hnixwpdj31gflmh2xaw00xjq4b7m.ls is malformed: .: unknown type 'socket'" in r.stderr
    assert "hint: --no-listing reads the path's NAR instead" in r.stderr  # (the way out, said)
    assert ls(cache, "--no-listing", "-lR", TREE).stdout.rstrip("\n") == NIX_LS[("-lR", TREE)].rstrip("\n")


@pytest.mark.parametrize("root,said", [
    ('{"type": "directory", "entries": {"../../etc": {"type": "regular", "size": 5}}}',
     ".: '../../etc' is not a name a NAR can hold"),
    ('{"type": "directory", "entries": {"sub": {"type": "directory", "entries": {"a/b": {"type": "regular"}}}}}',
     "./sub: 'a/b' is not a name a NAR can hold"),
    ('{"type": "directory", "entries": {"a": {"type": "regular", "size": -5}}}',
     "./a: size and narOffset must be whole numbers of bytes, got -5 and None"),
    ('{"type": "directory", "entries": {"a": {"type": "regular", "size": true}}}',
     "./a: size and narOffset must be whole numbers of bytes, got True and None"),
    ('{"type": "directory", "entries": {"a": {"type": "regular", "executable": "yes"}}}',
     "./a: executable must be true or false, got 'yes'"),
    ('{"type": "symlink", "target": 5}', ".: a symlink's target must be a string, got 5"),
])
def test_a_listing_that_no_nar_could_have_is_refused(tmp_path, root, said):
    """A listing is not signed, and is read strictly: a name no NAR can hold ('..', one with a
    '/'), a negative size or another type of value is an error naming the entry (they were
    printed as they came: `./../../etc`, a size of -5)."""
    cache = tmp_path / "cache"
    shutil.copytree(GOLD, cache)
    (cache / "nai7hnixwpdj31gflmh2xaw00xjq4b7m.ls").write_text(f'{{"version": 1, "root": {root}}}')
    r = ls(cache, "-lR", TREE, check=False)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert f"error: listing file://{cache}/nai7hnixwpdj31gflmh2xaw00xjq4b7m.ls is malformed: {said}" in r.stderr, r.stderr


@pytest.mark.parametrize("depth", [257, 5000])
def test_a_listing_nested_deeper_than_a_nar_can_be_is_refused(tmp_path, depth):
    """A listing of more than 256 nested directories (the NAR limit) is malformed; one nested
    deeper than Python's JSON decoder goes was a RecursionError traceback."""
    cache = tmp_path / "cache"
    shutil.copytree(GOLD, cache)
    root = '{"type": "regular", "size": 1}'
    for _ in range(depth):
        root = f'{{"type": "directory", "entries": {{"d": {root}}}}}'
    (cache / "nai7hnixwpdj31gflmh2xaw00xjq4b7m.ls").write_text(f'{{"version": 1, "root": {root}}}')
    r = ls(cache, "-lR", TREE, check=False)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert (f"error: listing file://{cache}/nai7hnixwpdj31gflmh2xaw00xjq4b7m.ls is malformed: "
            in r.stderr and "nested more than 256 directories deep" in r.stderr), r.stderr


def test_names_that_are_not_utf8_keep_their_bytes(tmp_path):
    """A file named by bytes that are not UTF-8: the .ls listing holds its bytes as they are
    (as Nix writes it), `cache ls` prints them (from the listing and from the NAR alike), and
    `cache cat` finds the file by the name given on the command line."""
    import sys

    from conftest import REPO, pure_env
    from test_cache_support import make_path, open_store

    key = tmp_path / "k.sec"
    key.write_text(SEC)
    root, cache = tmp_path / "src", tmp_path / "cache"
    name = b"\xff\xfe-bin"
    with open_store(root) as store:
        sp = store.print_path(make_path(store, "odd", {"ok": b"fine\n", os.fsdecode(name): b"odd contents\n"}))
    run_pure("copy", "--to", f"file://{cache}?write-nar-listing=true", "--secret-key-file", key, sp, root=root)
    listing = (cache / (sp.rsplit("/", 1)[1][:32] + ".ls")).read_bytes()
    assert b'"' + name + b'":{"type":"regular"' in listing, listing

    def pure_bytes(*args):
        p = subprocess.run([sys.executable, "-m", "purestore.cli.main", *args], env=pure_env(None),
                           capture_output=True, cwd=REPO, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout
    for extra in ((), ("--no-listing",)):
        out = pure_bytes("cache", "ls", *extra, "--trusted-public-keys", PUB, f"file://{cache}", sp)
        assert out.splitlines() == [b"./ok", b"./" + name], out  # byte order, as in the NAR
        # --json as `nix store ls --json` prints it: the name's bytes, not escapes of them
        out = pure_bytes("cache", "ls", *extra, "--json", "--trusted-public-keys", PUB, f"file://{cache}", sp)
        assert b'"' + name + b'":{}' in out and b"\\u" not in out, out
    assert pure_bytes("cache", "cat", "--trusted-public-keys", PUB, f"file://{cache}",
                      os.fsdecode(sp.encode() + b"/" + name)) == b"odd contents\n"
