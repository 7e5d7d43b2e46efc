"""`pure copy`, `pure key`, `pure store sign`: push closures to caches and fetch them back."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
import sys
import time

import pytest

from conftest import DATA, REPO, closed_port, pure_env, run_pure
from test_cache_support import (
    PUB, SEC, make_closure, make_path, open_store, pushed_closure, settings_for, start_server, stop_server,
)

from purestore._pids import this_machine

GOLD = DATA / "cache" / "nix-cache"
SRC = DATA / "cache" / "src"
NIX_H = "/nix/store/hp4xhizqijy1k440fq06xfq6xpl37pf6-h.txt"
NIX_TREE = "/nix/store/nai7hnixwpdj31gflmh2xaw00xjq4b7m-tree"


@pytest.fixture
def keyfile(tmp_path):
    p = tmp_path / "test-key-1.sec"
    p.write_text(SEC)
    return p


def test_push_of_same_paths_is_byte_identical_to_nix_copy(tmp_path, keyfile):
    """Same paths, zstd, same key, listings on: every file of our cache equals Nix 2.8's."""
    root = tmp_path / "r"
    src = tmp_path / "src"
    shutil.copytree(SRC, src, symlinks=True)
    out = run_pure("store", "add", src / "h.txt", src / "tree", root=root, store_dir="/nix/store")
    assert out.stdout.split() == [NIX_H, NIX_TREE]
    cache = tmp_path / "cache"
    run_pure("copy", "--to", f"file://{cache}?compression=zstd&secret-key={keyfile}&write-nar-listing=true",
             NIX_H, NIX_TREE, root=root, store_dir="/nix/store")
    ours = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    theirs = sorted(str(p.relative_to(GOLD)) for p in GOLD.rglob("*") if p.is_file())
    assert ours == theirs
    for rel in theirs:
        assert (cache / rel).read_bytes() == (GOLD / rel).read_bytes(), rel


def test_push_then_fetch_round_trip_with_closure(tmp_path, keyfile):
    src_root, dst_root, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    with open_store(src_root) as store:
        lib, app = make_closure(store)
        app_p, lib_p = store.print_path(app), store.print_path(lib)
    res = run_pure("copy", "--json", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p, root=src_root)
    pushed = json.loads(res.stdout)
    assert pushed["uploaded"] == [lib_p, app_p]  # references first
    ni = (cache / f"{app.hash_part}.narinfo").read_text()
    assert f"References: {lib.base_name}\n" in ni and "Compression: zstd\n" in ni
    assert (cache / "nix-cache-info").read_text() == "StoreDir: /pure/store\n"

    res = run_pure("copy", "--json", "--from", f"file://{cache}", "--trusted-public-keys", PUB, app_p, root=dst_root)
    assert sorted(json.loads(res.stdout)["fetched"]) == sorted([lib_p, app_p])
    info = json.loads(run_pure("store", "path-info", "--json", app_p, root=dst_root).stdout)[0]
    assert info["references"] == [lib_p]
    assert any(s.startswith("test-key-1:") for s in info["signatures"])
    assert run_pure("store", "verify", "--check-contents", root=dst_root).returncode == 0
    real = dst_root / "pure/store" / app.base_name
    assert os.readlink(real / "share/link") == "../bin/app"
    assert stat.S_IMODE(os.stat(real / "bin/app").st_mode) == 0o444
    assert os.stat(real / "bin/app").st_mtime == 1


def test_push_skips_paths_already_in_cache(tmp_path, keyfile):
    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, app = make_closure(store)
        lib_p, app_p = store.print_path(lib), store.print_path(app)
    r = run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, lib_p, root=root)
    assert re.search(rf"^copied 1 path to file://{re.escape(str(cache))} \([\d.]+ K?i?B of NAR, [\d.]+ K?i?B compressed\); "
                     r"0 already there$", r.stderr, re.M), r.stderr
    ni_file = cache / f"{lib.hash_part}.narinfo"
    before = (ni_file.stat().st_ino, ni_file.read_bytes())
    r = run_pure("copy", "--json", "-v", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p, root=root)
    res = json.loads(r.stdout)
    assert res["uploaded"] == [app_p] and res["skipped"] == [lib_p]
    # -v names each path copied, and only those
    assert f"copying path '{app_p}' to 'file://{cache}'" in r.stderr and lib_p not in r.stderr
    # not written again (the same file, the same bytes); only its time is updated, which marks
    # it as recent for `pure cache prune`
    assert (ni_file.stat().st_ino, ni_file.read_bytes()) == before
    r = run_pure("copy", "-v", "--from", f"file://{cache}", "--trusted-public-keys", PUB, app_p, root=tmp_path / "b")
    assert re.search(r"^fetched 2 paths \([\d.]+ K?i?B of NAR\) from file://", r.stderr, re.M), r.stderr
    assert f"copying path '{lib_p}' from 'file://{cache}'" in r.stderr


def _pushed_closure(tmp_path, keyfile):
    """lib and app pushed to a file:// cache: (store root, cache, lib, app, app printed, app's
    narinfo file, its text)."""
    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, app = make_closure(store)
        app_p = store.print_path(app)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p, root=root)
    ni = cache / f"{app.hash_part}.narinfo"
    return root, cache, lib, app, app_p, ni, ni.read_text()


def test_an_empty_narinfo_is_written_again(tmp_path, keyfile):
    """What a crash of the machine can leave of a narinfo written just before, an empty file,
    does not count as the path being in the cache: the next push writes it again."""
    root, cache, lib, app, app_p, ni, text = _pushed_closure(tmp_path, keyfile)
    ni.write_text("")
    r = run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p, root=root)
    assert "copied 1 path" in r.stderr and "1 already there" in r.stderr, r.stderr
    assert ni.read_text() == text
    run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{cache}", app_p)


@pytest.mark.parametrize("junk", [b"garbage\n", b"\xff\xfe", "another path"])
def test_a_push_with_keys_writes_a_narinfo_that_cannot_be_used_again(tmp_path, keyfile, junk):
    """A narinfo in the cache that does not parse, or describes another path, was counted as
    "already there", and the note then offered a `pure cache sign` that fails on it.  A push
    with keys (which reads the narinfos) says so and writes it again."""
    root, cache, lib, app, app_p, ni, text = _pushed_closure(tmp_path, keyfile)
    if junk == "another path":
        ni.write_text((cache / f"{lib.hash_part}.narinfo").read_text())
    else:
        ni.write_bytes(junk)
    r = run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p, root=root)
    assert f"warning: the cache's narinfo of '{app_p}' cannot be used (" in r.stderr, r.stderr
    assert "copied 1 path" in r.stderr and "1 already there" in r.stderr and "note:" not in r.stderr, r.stderr
    assert ni.read_text() == text
    run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{cache}")


def test_push_without_a_key_warns_last_and_only_when_it_uploads(tmp_path):
    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, _app = make_closure(store)
    r = run_pure("copy", "--to", f"file://{cache}", store.print_path(lib), root=root)
    assert r.stderr.splitlines()[-1].startswith("warning: no secret key given"), r.stderr
    assert "Signature" not in (cache / f"{lib.hash_part}.narinfo").read_text()
    r = run_pure("copy", "--to", f"file://{cache}", store.print_path(lib), root=root)
    assert "warning" not in r.stderr and "copied 0 paths" in r.stderr and "1 already there" in r.stderr, r.stderr
    assert "note" not in r.stderr
    # with a key now: the path already there is not signed again, and a note says how to
    (tmp_path / "k.sec").write_text(SEC)
    r = run_pure("copy", "--to", f"file://{cache}", "-k", tmp_path / "k.sec", store.print_path(lib), root=root)
    assert "Signature" not in (cache / f"{lib.hash_part}.narinfo").read_text()
    note = r.stderr.splitlines()[-1]
    lib_p = store.print_path(lib)
    command = f"pure cache sign --key-file KEY -r file://{cache} {lib_p}"
    assert note == (f"note: 1 path already there was not signed again; to add signatures in place: {command} "
                    "(it signs only what a trusted key signed already: add --trusted-public-keys KEYS, or "
                    "--no-check-sigs)")
    # the command works as said (this narinfo has no signature: --no-check-sigs)
    args = command.split()[1:]
    args[args.index("KEY")] = str(tmp_path / "k.sec")
    run_pure(*args, "--no-check-sigs")
    assert "Sig: test-key-1:" in (cache / f"{lib.hash_part}.narinfo").read_text()
    # pushed again with the key: already signed by it, nothing to say
    r = run_pure("copy", "--to", f"file://{cache}", "-k", tmp_path / "k.sec", store.print_path(lib), root=root)
    assert "note" not in r.stderr, r.stderr
    # a referrer pushed with it into a cache whose lib is unsigned: the note names lib only
    cache2 = tmp_path / "cache2"
    run_pure("copy", "--to", f"file://{cache2}", lib_p, root=root)
    r = run_pure("copy", "--to", f"file://{cache2}", "-k", tmp_path / "k.sec", store.print_path(_app), root=root)
    assert r.stderr.splitlines()[-1].startswith(
        f"note: 1 path already there was not signed again; to add signatures in place: "
        f"pure cache sign --key-file KEY -r file://{cache2} {lib_p} ("), r.stderr
    from purestore.cli.copy_cmd import _sign_again_command
    assert _sign_again_command("http://h:1/?token-file=/t&secret-key=/k.sec&compression=xz", ["/a", "/b", "/c", "/d"]) \
        == "pure cache sign --key-file KEY -r 'http://h:1/?token-file=/t' /a /b /c ..."


def test_a_plus_in_a_url_parameter_is_a_plus_as_nix_reads_it(tmp_path):
    """``?secret-key=/keys/c++.sec`` names that file, as in Nix (whose query values are only
    percent-decoded); form encoding made the '+' a space and the push failed with "cannot read
    secret key file '/keys/c  .sec'".  A space is written %20, a '+' may be written %2B too."""
    root, cache = tmp_path / "a", tmp_path / "cache"
    keys = tmp_path / "c++ keys"
    keys.mkdir()
    (keys / "c++.sec").write_text(SEC)
    with open_store(root) as store:
        lib, _app = make_closure(store)
    lib_p = store.print_path(lib)
    run_pure("copy", "--to", f"file://{cache}?secret-key={tmp_path}/c++%20keys/c%2B+.sec", lib_p, root=root)
    assert "Sig: test-key-1:" in (cache / f"{lib.hash_part}.narinfo").read_text()
    from purestore.cache.url import parse_url
    assert parse_url("http://h/?token-file=/t/a+b%20c&priority=+7").params == {"token-file": "/t/a+b c",
                                                                               "priority": "+7"}
    from purestore.cli.copy_cmd import _sign_again_command  # the note's URL reads back the same
    assert _sign_again_command("http://h/?token-file=/t/a+b%20c&secret-key=/k+.sec", ["/a"]) \
        == "pure cache sign --key-file KEY -r 'http://h/?token-file=/t/a+b%20c' /a"


def test_a_nar_url_with_a_query_is_asked_with_it_as_nix_asks_it(tmp_path):
    """Harmonia's narinfos give ``URL: nar/<NAR hash>.nar?hash=<path hash>``: Nix asks for that
    file with that query, and so does pure now (it sent the '?' quoted, as part of the name, got
    404 and could not substitute from such a cache).  A mirror keeps the file without the query,
    and the narinfo's URL too, so that any static server serves the copy."""
    from conftest import HAVE_NIX
    from test_cache_support import nix_copy_from
    cache = tmp_path / "cache"
    store_dir, app_p = pushed_closure(tmp_path, cache)
    for ni in cache.glob("*.narinfo"):  # (the URL is not signed)
        ni.write_text(re.sub(r"(?m)^URL: (.*)$", rf"URL: \1?hash={ni.name[:32]}", ni.read_text()))
    proc, url = start_server(cache, "--access-log", tmp_path / "access.log")
    try:
        run_pure("copy", "--from", url, "--trusted-public-keys", PUB, app_p, root=tmp_path / "b", store_dir=store_dir)
        run_pure("store", "verify", "--check-contents", root=tmp_path / "b", store_dir=store_dir)
        asked = re.findall(r'"GET /(nar/\S+) HTTP/1.1" 200', (tmp_path / "access.log").read_text())
        assert len(asked) == 2 and all(re.fullmatch(r"nar/[0-9a-z]{52}\.nar\.zst\?hash=[0-9a-z]{32}", a)
                                       for a in asked), asked
        mirror = tmp_path / "mirror"
        run_pure("copy", "--from", url, "--to", f"file://{mirror}", "--trusted-public-keys", PUB, app_p)
        assert sorted(f"nar/{f.name}" for f in (mirror / "nar").iterdir()) == sorted(a.split("?")[0] for a in asked)
        assert all("?" not in ni.read_text() for ni in mirror.glob("*.narinfo"))
        run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{mirror}")
        if HAVE_NIX and store_dir == "/nix/store":  # what Nix does with the same cache
            nix_copy_from(tmp_path, url.rstrip("/"), app_p, check=True)
    finally:
        stop_server(proc)


@pytest.mark.parametrize("comp,ext", [("xz", ".nar.xz"), ("none", ".nar")])
def test_other_compressions_round_trip(tmp_path, keyfile, comp, ext):
    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, app = make_closure(store)
        app_p = store.print_path(app)
    run_pure("copy", "--to", f"file://{cache}?compression={comp}&secret-key={keyfile}", app_p, root=root)
    assert all(p.name.endswith(ext) for p in (cache / "nar").iterdir())
    run_pure("copy", "--from", f"file://{cache}", "--trusted-public-keys", PUB, app_p, root=tmp_path / "b")
    run_pure("store", "verify", "--check-contents", root=tmp_path / "b")


def test_push_and_fetch_over_http_with_upload_token(tmp_path, keyfile):
    root, cache = tmp_path / "a", tmp_path / "served"
    cache.mkdir()
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with open_store(root) as store:
        lib, app = make_closure(store)
        app_p = store.print_path(app)
    proc, url = start_server(cache, token_file=token)
    try:
        # without the token the server refuses uploads
        r = run_pure("copy", "--to", url, app_p, root=root, check=False)
        assert r.returncode == 1 and "refused (HTTP 401 Unauthorized" in r.stderr and "Traceback" not in r.stderr
        run_pure("copy", "--to", f"{url}?token-file={token}", "--secret-key-file", keyfile, app_p, root=root)
        assert (cache / f"{app.hash_part}.narinfo").exists()
        run_pure("copy", "--from", url, "--trusted-public-keys", PUB, app_p, root=tmp_path / "b")
        run_pure("store", "verify", "--check-contents", root=tmp_path / "b")
    finally:
        stop_server(proc)


def test_a_big_upload_the_server_refuses_gets_its_answer(tmp_path, keyfile):
    """A NAR of a few MB (still being sent when the server answers): a missing token gets 401
    and the hint, a server without uploads 405 and what it says, at once (no retries), and the
    server logs nothing stored."""
    root = tmp_path / "a"
    with open_store(root) as store:
        big = store.print_path(make_path(store, "big", {"": os.urandom(6 << 20)}))
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    for what in ("no token", "read-only"):
        cache = tmp_path / what.replace(" ", "-")
        cache.mkdir()
        (cache / "nix-cache-info").write_text("StoreDir: /pure/store\n")  # the NAR is the first upload
        proc, url = start_server(cache, token_file=token if what == "no token" else None)
        try:
            r = run_pure("copy", "--to", url, "--secret-key-file", keyfile, big, root=root, check=False)
        finally:
            stop_server(proc)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "retrying" not in r.stderr and "broken" not in r.stderr, r.stderr
        assert "upload of 'nar/" in r.stderr or "cannot upload 'nar/" in r.stderr
        if what == "no token":
            assert "refused (HTTP 401 Unauthorized" in r.stderr and "hint: give the server's upload token" in r.stderr
        else:
            assert "HTTP 405" in r.stderr and "uploads are disabled" in r.stderr
        assert not list(cache.rglob("*.nar*")) and not list(cache.glob("*.narinfo"))


def _immutable(path, on: bool) -> bool:
    """chattr ±i (so that even root cannot write there); False where that is not possible."""
    r = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.parametrize("locked", ["", "log"])
def test_a_cache_directory_that_cannot_be_written_is_an_error(tmp_path, keyfile, locked):
    """The narinfo (or the build log) cannot be written: an error naming the file, no traceback,
    and no temporary file left in the cache."""
    root, cache = tmp_path / "a", tmp_path / "cache"
    from purestore.formats.store_path import StorePath
    from test_cache_support import keep_build_log
    drv = StorePath("1" * 32, "app.drv")
    with open_store(root) as store:
        lib = make_path(store, "lib", {"": b"lib\n"})
        app = make_path(store, "app", {"": b"app\n"}, deriver=drv if locked else None)
        if locked:  # a build log to upload, into the directory that cannot be written
            keep_build_log(store, drv, b"building app\n")
        lib_p, app_p = store.print_path(lib), store.print_path(app)
    url = f"file://{cache}?secret-key={keyfile}"
    run_pure("copy", "--to", url, lib_p, root=root)
    target = cache / locked if locked else cache
    target.mkdir(exist_ok=True)
    if not _immutable(target, True):
        pytest.skip("chattr +i does not work here")
    try:
        r = run_pure("copy", "--to", url, app_p, root=root, check=False)
    finally:
        _immutable(target, False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and err[0].startswith(f"error: cannot copy {app_p!r}: cache 'file://{cache}?"), r.stderr
    assert re.search(r"cannot (write|create directory) .*: Operation not permitted$", err[0]), err
    assert not [p for p in cache.rglob(".tmp-*")]


def test_server_without_token_is_read_only(tmp_path):
    """Read-only without --upload-token-file, even with PURE_CACHE_TOKEN exported (that is for
    clients pushing); the directory may be given as its file:// URL."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "nix-cache-info").write_text("StoreDir: /pure/store\n")
    proc, url = start_server(f"file://{tmp_path}/c", env={"PURE_CACHE_TOKEN": "s3cret"})
    try:
        import httpx
        assert httpx.get(url + "nix-cache-info").text == "StoreDir: /pure/store\n"
        assert httpx.head(url + "nix-cache-info").headers["content-length"] == "22"
        assert httpx.get(url + "missing.narinfo").status_code == 404
        assert httpx.put(url + "x.narinfo", content=b"x").status_code == 405
        assert httpx.put(url + "x.narinfo", content=b"x", headers={"Authorization": "Bearer s3cret"}).status_code == 405
        assert httpx.get(url + "nar/%2e%2e/%2e%2e/etc/passwd").status_code in (400, 404)
    finally:
        stop_server(proc)


def test_key_generate_and_public(tmp_path):
    sec, pub = tmp_path / "k.sec", tmp_path / "k.pub"
    run_pure("key", "generate", "--name", "cache.example-1", "--secret-out", sec, "--public-out", pub)
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert pub.read_text().startswith("cache.example-1:")
    out = run_pure("key", "public", input=sec.read_text()).stdout.strip()
    assert out == pub.read_text()
    again = run_pure("key", "generate", "--name", "x", "--secret-out", sec, check=False)
    assert again.returncode != 0 and "already exists" in again.stderr
    bad = run_pure("key", "public", input="nope", check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: secret key")


def test_key_public_says_why_it_has_no_secret_key_to_read(tmp_path):
    """`pure key public` with stdin closed, a directory, or bytes that are not UTF-8 text: an
    `error:` line that says which, status 1, no traceback."""
    pure = [sys.executable, "-m", "purestore.cli.main", "key", "public"]
    r = subprocess.run(["sh", "-c", 'exec "$@" <&-', "sh", *pure], capture_output=True, text=True,
                       env=pure_env(None), cwd=REPO)
    assert (r.returncode, r.stderr.splitlines()[0]) == (
        1, "error: cannot read the secret key from standard input: it is closed"), r.stderr
    # `pure key public < DIR`: CPython itself refuses to start with a directory as stdin, before
    # pure runs ("<stdin> is a directory, cannot continue")...
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        r = subprocess.run(pure, stdin=fd, capture_output=True, text=True, env=pure_env(None), cwd=REPO)
    finally:
        os.close(fd)
    assert r.returncode != 0 and "is a directory" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # ...so pure's own error is for main() called once stdin has become a directory
    r = subprocess.run([sys.executable, "-c", f"import os; os.dup2(os.open({str(tmp_path)!r}, os.O_RDONLY), 0); "
                        "from purestore.cli.main import main; raise SystemExit(main(['key', 'public']))"],
                       capture_output=True, text=True, env=pure_env(None), cwd=REPO)
    assert (r.returncode, r.stderr.splitlines()[0]) == (
        1, "error: cannot read the secret key from standard input: it is a directory"), r.stderr
    # not UTF-8, whatever the locale (it was a traceback where stdin decodes strictly)
    r = run_pure("key", "public", input=b"test-key-1:\xff\n", check=False)
    assert (r.returncode, r.stderr.splitlines()[0]) == (
        1, b"error: the secret key on standard input is not UTF-8 text"), r.stderr
    r = run_pure("key", "public", input=b"test-key-1:\xff\n", check=False, env={"PYTHONIOENCODING": "utf-8:strict"})
    assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr
    # nothing on stdin (`< /dev/null`, an empty file): said so, not "not of the form name:base64"
    for empty in (b"", b"\n"):
        r = run_pure("key", "public", input=empty, check=False)
        assert (r.returncode, r.stderr.splitlines()) == (1, [
            b"error: standard input is empty: expected a secret key (NAME:BASE64)",
            b"hint: give the secret key file on stdin: pure key public < FILE"]), r.stderr

def test_key_generate_writes_both_files_or_neither(tmp_path):
    """An output that cannot be written is found before either key is: no half-made pair; and
    --force replaces an existing file by a new one of mode 0600 (never keeping the old mode)."""
    sec, pub = tmp_path / "k.sec", tmp_path / "k.pub"
    pub.write_text("old\n")
    r = run_pure("key", "generate", "--name", "k-1", "--secret-out", sec, "--public-out", pub, check=False)
    assert r.returncode == 2 and f"error: '{pub}' already exists" in r.stderr
    assert not sec.exists() and pub.read_text() == "old\n"
    r = run_pure("key", "generate", "--name", "k-1", "--secret-out", sec, "--public-out", sec, check=False)
    assert r.returncode == 2 and "a file each" in r.stderr and not sec.exists()
    # the same file by other names: a symlink to it, a symlink of its directory (said as
    # "cannot write 'link.pub': File exists", the two temporary files' names colliding)
    os.symlink("k.sec", tmp_path / "link.pub")
    os.symlink(".", tmp_path / "here")
    for other in (tmp_path / "link.pub", tmp_path / "here" / "k.sec"):
        r = run_pure("key", "generate", "--name", "k-1", "--secret-out", sec, "--public-out", other, "--force",
                     check=False)
        assert r.returncode == 2 and f"error: '{sec}' and '{other}' lead to the same file" in r.stderr, r.stderr
        assert not sec.exists()
    os.unlink(tmp_path / "link.pub")
    os.unlink(tmp_path / "here")
    r = run_pure("key", "generate", "--name", "k-1", "--secret-out", sec,
                 "--public-out", tmp_path / "nodir" / "k.pub", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr and not sec.exists()  # not a usage error
    # an empty name (--secret-out "$UNSET") is an error, not "print the secret key on stdout"
    for opt in ("--secret-out", "--public-out"):
        r = run_pure("key", "generate", "--name", "k-1", opt, "", check=False)
        assert r.returncode == 2 and r.stdout == "" and f"argument {opt}: empty file name" in r.stderr

    sec.write_text("old secret\n")
    sec.chmod(0o644)
    run_pure("key", "generate", "--name", "k-1", "--secret-out", sec, "--public-out", pub, "--force")
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert run_pure("key", "public", input=sec.read_text()).stdout.strip() == pub.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pub", "k.sec"]  # no temporary files left


def test_outputs_that_are_not_regular_files_are_written_into_never_replaced(tmp_path):
    """A device, a FIFO or /dev/stdout given as an output is written into, as a shell's `>`
    writes: renaming a file over it would replace /dev/null or /dev/stdout for the whole
    machine.  (Checked with FIFOs, which a regression would replace harmlessly.)"""
    import threading

    def fifo_reader(path):
        os.mkfifo(path)
        got = []
        t = threading.Thread(target=lambda: got.append(open(path).read()), daemon=True)
        t.start()
        return t, got

    pub = tmp_path / "pub.fifo"
    t, got = fifo_reader(pub)
    run_pure("key", "generate", "--name", "k-1", "--secret-out", tmp_path / "k.sec", "--public-out", pub)
    t.join(30)
    assert stat.S_ISFIFO(os.lstat(pub).st_mode)
    assert got == [run_pure("key", "public", input=(tmp_path / "k.sec").read_text()).stdout.strip()]
    # /dev/stdout, to a pipe: the public key is printed
    r = run_pure("key", "generate", "--name", "k-2", "--secret-out", tmp_path / "k2.sec", "--public-out", "/dev/stdout")
    assert r.stdout.startswith("k-2:") and os.path.islink("/dev/stdout")
    # /dev/stdout, appending to a file (`>> log`): written through the descriptor, nothing truncated
    log = tmp_path / "keys.log"
    log.write_text("kept\n")
    with open(log, "a") as out:
        subprocess.run([sys.executable, "-m", "purestore.cli.main", "key", "generate", "--name", "k-3", "--secret-out",
                        str(tmp_path / "k3.sec"), "--public-out", "/dev/stdout"], stdout=out, env=pure_env(None),
                       check=True, cwd=REPO)
    assert log.read_text().startswith("kept\nk-3:")
    # a symlink to a regular file stays a link: the file it points to gets the key
    (tmp_path / "real.pub").write_text("old\n")
    os.symlink("real.pub", tmp_path / "link.pub")
    run_pure("key", "generate", "--name", "k-4", "--secret-out", tmp_path / "k4.sec", "--public-out",
             tmp_path / "link.pub", "--force")
    assert os.path.islink(tmp_path / "link.pub") and (tmp_path / "real.pub").read_text().startswith("k-4:")
    # an SBOM written to a FIFO
    with open_store(tmp_path / "a") as store:
        p = store.print_path(make_path(store, "x", {"": b"x\n"}))
    out = tmp_path / "sbom.fifo"
    t, got = fifo_reader(out)
    run_pure("sbom", "-o", out, p, root=tmp_path / "a")
    t.join(30)
    assert stat.S_ISFIFO(os.lstat(out).st_mode) and json.loads(got[0])


def test_vector_key_public():
    assert run_pure("key", "public", input=SEC).stdout.strip() == PUB


def test_store_sign_adds_signature_that_verifies(tmp_path, keyfile):
    from purestore.formats.narinfo import fingerprint
    from purestore.formats.signing import PublicKey, Signature

    root = tmp_path / "a"
    with open_store(root) as store:
        lib, _app = make_closure(store)
    run_pure("store", "sign", "--key-file", keyfile, store.print_path(lib), root=root)
    with open_store(root) as store:
        info = store.query_path_info(lib)
        fp = fingerprint("/pure/store", lib, info.nar_hash, info.nar_size, info.references)
    (sig,) = info.sigs
    assert PublicKey.parse(PUB).verify(fp, Signature.parse(sig))


def test_push_uploads_build_log_and_extra_files_hook(tmp_path, keyfile, monkeypatch):
    """A pushed path with a deriver whose log the store keeps gets log/<drv> in the cache."""
    from purestore.cache import push
    from purestore.formats.store_path import StorePath
    from test_cache_support import keep_build_log, make_path

    root, cache = tmp_path / "a", tmp_path / "cache"
    drv = StorePath("1" * 32, "thing.drv")
    with open_store(root) as store:
        out = make_path(store, "thing", {"": b"built\n"}, deriver=drv)
        keep_build_log(store, drv, b"building thing\ndone\n")
        out_p = store.print_path(out)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, out_p, root=root)
    assert (cache / "log" / drv.base_name).read_bytes() == b"building thing\ndone\n"
    assert f"Deriver: {drv.base_name}\n" in (cache / f"{out.hash_part}.narinfo").read_text()
    with open_store(root) as store:
        assert push.extra_files_for(store, out) == {}  # no provenance kept for this path


def test_push_to_cache_of_other_store_dir_is_refused(tmp_path, keyfile):
    root, cache = tmp_path / "a", tmp_path / "cache"
    cache.mkdir()
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    with open_store(root) as store:
        lib, _app = make_closure(store)
    r = run_pure("copy", "--to", f"file://{cache}", store.print_path(lib), root=root, check=False)
    assert r.returncode == 1
    assert "is for store dir '/nix/store', but this store's dir is '/pure/store'" in r.stderr
    assert list((cache).iterdir()) == [cache / "nix-cache-info"]


@pytest.mark.parametrize("direction,url,msg", [
    ("--to", "ssh://host", "unsupported cache URL"),
    ("--to", "file://relative/dir", "file URLs must be file:///absolute/dir"),
    ("--to", "file:///x?compression=lz4", "cannot write compression 'lz4', expected one of zstd, xz, none"),
    # a name no cache uses is said the same way, naming the URL (it was "unknown compression
    # 'ZSTD'", naming nothing), and a level that is no number says what it got
    # a '#' starts a fragment, which was dropped: the cache was file:///srv/c, named file:///srv/c#1
    ("--to", "file:///srv/c#1", "cache URL 'file:///srv/c#1' has a fragment ('#1'), which a cache URL has no use for"),
    ("--from", "http://h/#", "cache URL 'http://h/#' has a fragment ('#'), which a cache URL has no use for"),
    ("--to", "file:///x?compression=ZSTD",
     "cache URL 'file:///x': cannot write compression 'ZSTD', expected one of zstd, xz, none"),
    ("--to", "file:///x?compression-level=abc",
     "cache URL 'file:///x?compression-level=abc': compression-level must be an integer, got 'abc'"),
    # empty (a variable left unset): it was taken for the default, zstd at level 3
    ("--to", "file:///x?compression=",
     "cache URL 'file:///x': cannot write compression '', expected one of zstd, xz, none"),
    ("--to", "file:///x?compression-level=",
     "cache URL 'file:///x?compression-level=': compression-level must be an integer, got ''"),
    ("--to", "file:///x?bogus=1", "unknown parameter 'bogus'"),
    ("--to", "file:///x?compression-level=99", "cache URL 'file:///x': zstd compression level must be -131072..22 (-1 or 0: the default, 3), got 99"),
    # the path is valid already, so nothing is fetched: the URL is checked all the same
    ("--from", "ftp://cache.example/", "unsupported cache URL 'ftp://cache.example/'"),
    ("--from", "http://", "cache URL 'http://': missing host"),
    ("--from", "file://relative/dir", "file URLs must be file:///absolute/dir"),
])
def test_bad_cache_urls(tmp_path, direction, url, msg):
    root = tmp_path / "a"
    with open_store(root) as store:
        lib, _app = make_closure(store)
    r = run_pure("copy", direction, url, store.print_path(lib), root=root, check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and msg in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("direction,query,key,values", [
    ("--to", "compression=xz&compression=zstd", "compression", "'xz' and 'zstd'"),
    ("--to", "secret-key=/a.sec&compression=xz&secret-key=/b.sec", "secret-key", "'/a.sec' and '/b.sec'"),
    ("--from", "priority=10&priority=10", "priority", "'10' and '10'"),
])
def test_a_cache_url_parameter_given_twice_is_an_error_naming_it(tmp_path, direction, query, key, values):
    """`file:///c?compression=xz&compression=zstd` took the last value without a word (Nix takes
    the first): which one was meant is not known, so it is an error naming the parameter, and
    nothing is written."""
    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, _app = make_closure(store)
    where = root if direction == "--to" else tmp_path / "b"
    r = run_pure("copy", direction, f"file://{cache}?{query}", store.print_path(lib), root=where, check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"error: cache URL 'file://{cache}?{query}': parameter {key!r} is given twice "
                               f"({values})\nhint: give each parameter once"), r.stderr
    assert not cache.exists()


def test_a_level_without_compression_is_pushed_with_a_warning(tmp_path):
    """compression=none with a level: accepted (Nix accepts it), stored uncompressed, and said."""
    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, _app = make_closure(store)
    r = run_pure("copy", "--to", f"file://{cache}?compression=none&compression-level=9", store.print_path(lib),
                 root=root)
    assert "warning: compression-level 9 is ignored: the NARs are stored uncompressed" in r.stderr, r.stderr
    assert [p.suffix for p in (cache / "nar").iterdir()] == [".nar"]
    r = run_pure("copy", "--to", f"file://{tmp_path / 'c2'}?compression=none", store.print_path(lib), root=root)
    assert "ignored" not in r.stderr


@pytest.mark.parametrize("content,reason", [
    (SEC.split(":", 1)[1], "is not of the form 'name:base64'"),  # the name left out
    (":" + SEC.split(":", 1)[1], "has an empty key name"),
    ("test-key-1:" + SEC.split(":", 1)[1][:-8], "decodes to"),
])
def test_a_malformed_secret_key_file_is_named_and_never_quoted(tmp_path, content, reason):
    root = tmp_path / "a"
    with open_store(root) as store:
        lib, _app = make_closure(store)
    bad = tmp_path / "bad.sec"
    bad.write_text(content + "\n")
    cache = tmp_path / "cache"
    r = run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", bad, store.print_path(lib),
                 root=root, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: secret key file '{bad}': " in r.stderr and reason in r.stderr, r.stderr
    secret = SEC.split(":", 1)[1]
    assert secret[:8] not in r.stderr and secret[-12:-8] not in r.stderr
    assert not cache.exists()


def test_a_public_key_file_given_as_the_secret_key_says_so(tmp_path):
    root = tmp_path / "a"
    with open_store(root) as store:
        lib, _app = make_closure(store)
    pub = tmp_path / "key.pub"
    pub.write_text(PUB + "\n")
    for args in (["copy", "--to", f"file://{tmp_path / 'cache'}", "--secret-key-file", pub],
                 ["store", "sign", "--key-file", pub]):
        r = run_pure(*args, store.print_path(lib), root=root, check=False)
        assert r.returncode == 1 and r.stderr.splitlines() == [
            f"error: secret key file '{pub}': secret key 'test-key-1' decodes to 32 bytes, expected 64",
            "hint: 32 bytes are a public key (or only the first half of a secret key): give the whole secret key, as 'pure key generate' writes it"], r.stderr


def test_a_malformed_trusted_key_is_an_error_even_with_nothing_to_fetch(tmp_path):
    root = tmp_path / "a"
    with open_store(root) as store:
        lib, _app = make_closure(store)
    (tmp_path / "cache").mkdir()
    r = run_pure("copy", "--from", f"file://{tmp_path / 'cache'}", "--trusted-public-keys", "not-a-key",
                 store.print_path(lib), root=root, check=False)
    assert r.returncode == 2, r.stderr  # a bad option value: a usage error, naming the option
    assert r.stderr.startswith("error: --trusted-public-keys: public key 'not-a-key' is not of the form"), r.stderr


def test_fetch_failure_names_what_failed_in_the_closure_too(tmp_path, keyfile):
    """app's NAR corrupt and lib's (its reference) missing: the error names both, each with its
    reason (lib's was only in --json's `failed`: fixing app, the user met lib's next)."""
    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, app = make_closure(store)
        app_p, lib_p = store.print_path(app), store.print_path(lib)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p, root=root)

    def nar(p):
        text = (cache / f"{p.hash_part}.narinfo").read_text()
        return cache / next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
    nar(lib).unlink()
    nar(app).write_bytes(b"junk")
    r = run_pure("copy", "--from", f"file://{cache}", "--trusted-public-keys", PUB, app_p, root=tmp_path / "b",
                 check=False)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"error: cannot substitute '{app_p}': ") and "corrupt zstd data" in lines[0], lines
    assert lines[1].startswith(f"cannot substitute '{lib_p}' (a reference): ") and "is missing from the cache" in lines[1]
    assert len(lines) == 2, lines


@pytest.mark.parametrize("kind", ["not a cache", "no such directory", "unreachable", "other store dir"])
def test_fetch_from_an_unusable_cache_is_one_error_naming_the_paths(tmp_path, kind):
    """`pure copy --from` a cache that cannot be used at all: one `error:` line naming the
    wanted paths and what is wrong with the cache (no warning before it), nothing registered."""
    root = tmp_path / "a"
    with open_store(root) as store:
        lib, app = make_closure(store)
    paths = [f"/pure/store/{lib.base_name}", f"/pure/store/{app.base_name}"]
    cache = tmp_path / "cache"
    cache.mkdir()
    url, reason = f"file://{cache}", "has no nix-cache-info (is it a cache?)"
    port = contextlib.ExitStack()
    if kind == "unreachable":  # (a port held closed while the copy runs: one found free and
        # released could be taken by another program meanwhile, which answered or did not)
        url, reason = f"http://127.0.0.1:{port.enter_context(closed_port())}/", "cannot connect"
    elif kind == "no such directory":
        url, reason = f"file://{cache}-typo", f"directory '{cache}-typo' does not exist"
    elif kind == "other store dir":
        (cache / "nix-cache-info").write_text("StoreDir: /nix/store\n")
        reason = "is for store dir '/nix/store', but this store's dir is '/pure/store'"
    dst = tmp_path / "dst"
    with port:
        r = run_pure("copy", "--from", url, "--trusted-public-keys", PUB, *paths, root=dst, check=False)
    assert r.returncode == 1, r.stderr
    first, *rest = r.stderr.splitlines()
    assert first.startswith(f"error: cannot substitute {', '.join(repr(p) for p in sorted(paths))}: ")
    assert reason in first
    assert rest == (["hint: use a cache made for the same --store-dir"] if kind == "other store dir" else [])
    with open_store(dst) as st:
        assert st.valid_paths() == []


def test_serve_writes_an_access_log_in_the_combined_format(tmp_path, keyfile):
    root, cache = tmp_path / "a", tmp_path / "served"
    with open_store(root) as store:
        lib, app = make_closure(store)
        app_p = store.print_path(app)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p, root=root)
    log = tmp_path / "access.log"
    proc, url = start_server(cache, "--access-log", log)
    try:
        run_pure("copy", "--from", url, "--trusted-public-keys", PUB, app_p, root=tmp_path / "b")
        import httpx
        assert httpx.get(url + "missing.narinfo", headers={"User-Agent": 'probe "1"'}).status_code == 404
        assert httpx.head(url + "nix-cache-info").status_code == 200
    finally:
        stop_server(proc)
    lines = log.read_text().splitlines()
    line = re.compile(r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                      r'"(GET|HEAD) (/\S*) HTTP/1\.1" (\d{3}) (\d+|-) "[^"]*" "([^"]*)"$')
    parsed = [line.match(x) for x in lines]
    assert all(parsed), lines
    got = {(m.group(2), m.group(3)) for m in parsed}
    assert ("/nix-cache-info", "200") in got
    assert (f"/{app.hash_part}.narinfo", "200") in got and (f"/{lib.hash_part}.narinfo", "200") in got
    assert sum(1 for m in parsed if m.group(2).startswith("/nar/") and m.group(3) == "200") == 2
    # a client's quotes cannot break the line; a HEAD sends no body bytes
    assert parsed[-2].group(2, 3, 5) == ("/missing.narinfo", "404", "probe \\x221\\x22")
    assert parsed[-1].group(1, 2, 3, 4) == ("HEAD", "/nix-cache-info", "200", "0")
    r = run_pure("cache", "serve", cache, "--access-log", tmp_path / "no" / "such.log", check=False)
    assert r.returncode == 1 and "cannot open access log" in r.stderr


def test_serve_logs_a_download_cut_short_as_499_and_stops_reading(tmp_path):
    """A client that closes half way through a big file is logged as nginx logs it, 499, with
    the bytes handed out until then, not as a whole 200; the server stops reading the file."""
    import socket
    import time
    cache = tmp_path / "served"
    (cache / "nar").mkdir(parents=True)
    size = 64 << 20
    with open(cache / "nar" / "big.nar", "wb") as f:
        f.truncate(size)
    log = tmp_path / "access.log"
    proc, url = start_server(cache, "--access-log", log)
    try:
        host, port = url.split("//")[1].rstrip("/").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET /nar/big.nar HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200" in s.recv(1024)
            time.sleep(0.3)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        deadline = time.monotonic() + 10
        while "/nar/big.nar" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_server(proc)
    [line] = [x for x in log.read_text().splitlines() if "/nar/big.nar" in x]
    status, sent = re.search(r'" (\d{3}) (\d+) "', line).groups()
    assert status == "499" and int(sent) < size, line


def test_serve_logs_a_client_gone_in_a_file_s_last_chunk_as_499_and_one_that_had_it_all_as_200(tmp_path):
    """A file of one chunk (900 KiB): a client that reads the head and resets the connection
    while the server is still sending is logged 499, as one that leaves earlier in a big file
    (it was logged 200 with every byte: the end of the body counted as sent once its send was
    begun); clients that read it all and close at once (curl's way) are logged 200."""
    import socket
    import time
    cache = tmp_path / "served"
    (cache / "nar").mkdir(parents=True)
    size = 900 << 10
    (cache / "nar" / "one.nar").write_bytes(os.urandom(size))
    log = tmp_path / "access.log"
    proc, url = start_server(cache, "--access-log", log)
    host, port = url.split("//")[1].rstrip("/").split(":")
    request = b"GET /nar/one.nar HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    def logged(n: int) -> list[tuple[str, str]]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = [x for x in (log.read_text() if log.exists() else "").splitlines() if "/nar/one.nar" in x]
            if len(lines) >= n:
                return [re.search(r'" (\d{3}) (\d+) "', x).groups() for x in lines]
            time.sleep(0.05)
        raise AssertionError(f"not logged: {log.read_text() if log.exists() else ''}")
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((host, int(port)))
            s.sendall(request)
            assert b" 200 " in s.recv(64)
            time.sleep(0.3)  # the server is stuck in the middle of the body
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        assert logged(1)[0][0] == "499", log.read_text()
        for _ in range(20):
            with socket.create_connection((host, int(port))) as s:
                s.sendall(request)
                got = b""
                while chunk := s.recv(1 << 20):
                    got += chunk
                    if len(got.partition(b"\r\n\r\n")[2]) == size:
                        break  # every byte: close at once
        assert logged(21)[1:] == [("200", str(size))] * 20, log.read_text()
    finally:
        stop_server(proc)


def test_serve_errors_are_clear(tmp_path):
    r = run_pure("cache", "serve", tmp_path / "missing", "--listen", "127.0.0.1:0", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_pure("cache", "serve", "https://cache.example.org/", "--listen", "127.0.0.1:0", check=False)
    assert r.returncode == 2 and "serves a directory (or a file:// URL) on this machine" in r.stderr
    for bad, said in (("127.0.0.1:99999", "port 99999 is out of range"), ("127.0.0.1:\u00b2", "expected HOST:PORT")):
        r = run_pure("cache", "serve", tmp_path, "--listen", bad, check=False)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr
    proc, url = start_server(tmp_path)
    try:
        port = url.rstrip("/").rsplit(":", 1)[1]
        r = run_pure("cache", "serve", tmp_path, "--listen", f"127.0.0.1:{port}", check=False, timeout=60)
        assert r.returncode == 1 and "Address already in use" in r.stderr and "Traceback" not in r.stderr
    finally:
        stop_server(proc)


def test_push_removes_stale_temporary_files_only(tmp_path, keyfile):
    root, cache = tmp_path / "a", tmp_path / "cache"
    (cache / "nar").mkdir(parents=True)
    old, fresh = cache / "nar" / ".tmp-push-old.nar", cache / "nar" / ".tmp-push-fresh.nar"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (1, 1))
    with open_store(root) as store:
        lib, _app = make_closure(store)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, store.print_path(lib), root=root)
    assert not old.exists() and fresh.exists()
    # a push over HTTP makes its NAR files in the temporary directory: the same clean-up there,
    # of its own files only
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    mine, theirs, recent = tmp / ".tmp-push-0123.nar", tmp / ".tmp-other", tmp / ".tmp-push-4567.nar"
    # named by a process that is gone (a killed push), fresh: removed; by a live one: kept
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = this_machine()
    gone, alive = tmp / f".tmp-push-{dead.pid}-{here}-89ab.nar", tmp / f".tmp-push-{os.getpid()}-{here}-cdef.nar"
    elsewhere = tmp / f".tmp-push-{dead.pid}-elsewhere.0123abcd-89ab.nar"  # another machine's (shared)
    for f in (mine, theirs, recent, gone, alive, elsewhere):
        f.write_bytes(b"x")
    os.utime(mine, (1, 1))
    os.utime(theirs, (1, 1))
    (tmp_path / "served").mkdir()
    proc, url = start_server(tmp_path / "served", token_file=_token(tmp_path))
    try:
        run_pure("copy", "--to", f"{url}?token-file={_token(tmp_path)}", "--secret-key-file", keyfile,
                 store.print_path(lib), root=root, env={"TMPDIR": str(tmp)})
    finally:
        stop_server(proc)
    assert not mine.exists() and theirs.exists() and recent.exists()
    assert not gone.exists() and alive.exists() and elsewhere.exists()


@pytest.mark.parametrize("served", [False, True])
def test_big_files_round_trip_into_a_flushing_store(tmp_path, keyfile, served):
    """Into a store that flushes before it registers (the default), files of 64 KiB and more are
    written with O_DIRECT (store/fstree.py): sizes around its block and buffer edges, from a
    file:// cache (restored in place) and over HTTP (a NAR over 1 MiB streams to the restore)."""
    from purestore.store.fstree import DIRECT_MIN
    sizes = [DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, (1 << 20) + 4097, (2 << 20) + 1, 3 << 20]
    files = {f"f{i}": os.urandom(n) for i, n in enumerate(sizes)}
    src_root, dst_root, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    with open_store(src_root) as store:
        p = make_path(store, "big", files)
        path = store.print_path(p)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, path, root=src_root)
    proc, url = start_server(cache) if served else (None, f"file://{cache}")
    try:
        run_pure("copy", "--from", url, "--trusted-public-keys", PUB, path, root=dst_root)
    finally:
        if proc is not None:
            stop_server(proc)
    real = dst_root / "pure/store" / p.base_name
    assert {f.name: f.read_bytes() for f in real.iterdir()} == files
    assert run_pure("store", "verify", "--check-contents", root=dst_root).returncode == 0


@pytest.mark.parametrize("direction", ["--to", "--from", "both"])
def test_jobs_below_one_is_a_usage_error(tmp_path, direction):
    urls = {"--to": ["--to", f"file://{tmp_path}/c"], "--from": ["--from", f"file://{tmp_path}/c"],
            "both": ["--from", f"file://{tmp_path}/c", "--to", f"file://{tmp_path}/d"]}[direction]
    for n in ("0", "-3"):
        r = run_pure("copy", *urls, "-j", n, "/pure/store/" + "a" * 32 + "-x", root=tmp_path / "s", check=False)
        assert r.returncode == 2 and r.stderr.startswith(f"error: --jobs must be at least 1, got {n}"), r.stderr


def test_a_compression_level_out_of_range_is_a_usage_error(tmp_path):
    """As -j 0 is: the option's value is wrong (status 2), found before the store is read."""
    missing = "/pure/store/" + "a" * 32 + "-x"
    for url, level, said in ((f"file://{tmp_path}/c", "23",
                              "zstd compression level must be -131072..22 (-1 or 0: the default, 3), got 23"),
                             (f"file://{tmp_path}/c?compression=xz", "10",
                              "xz compression level must be 0..9 (-1: the default, 6), got 10")):
        r = run_pure("copy", "--to", url, "--compression-level", level, missing, root=tmp_path / "s", check=False)
        assert r.returncode == 2 and r.stderr.startswith(f"error: --compression-level: {said}"), r.stderr


def test_cache_url_mistakes_get_a_hint(tmp_path):
    """A directory given without file://, two URLs in one argument, a file to serve."""
    with open_store(tmp_path / "a") as store:
        p = store.print_path(make_path(store, "x", {"": b"x\n"}))
    r = run_pure("copy", "--to", str(tmp_path / "c"), p, root=tmp_path / "a", check=False)
    assert r.returncode == 1 and f"error: unsupported cache URL '{tmp_path}/c'" in r.stderr
    assert f"hint: a cache directory is given as a file URL: file://{tmp_path}/c" in r.stderr
    r = run_pure("copy", "--to", "127.0.0.1:8080", p, root=tmp_path / "a", check=False)
    assert r.returncode == 1 and "hint: an HTTP cache is given with its scheme: http://127.0.0.1:8080" in r.stderr
    r = run_pure("copy", "--to", f"file://{tmp_path}/c file://{tmp_path}/d", p, root=tmp_path / "a", check=False)
    assert r.returncode == 1 and "contains white space" in r.stderr and "hint: give one URL here" in r.stderr
    assert not list(tmp_path.glob("c*"))
    (tmp_path / "k.sec").write_text(SEC)
    r = run_pure("cache", "serve", tmp_path / "k.sec", "--listen", "127.0.0.1:0", check=False)
    assert r.returncode == 1 and f"error: cache directory '{tmp_path}/k.sec' is not a directory" in r.stderr


def test_a_path_the_one_cache_lacks_names_that_cache(tmp_path, keyfile):
    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, app = make_closure(store)
        lib_p, app_p = store.print_path(lib), store.print_path(app)
    run_pure("copy", "--to", f"file://{cache}", "-k", keyfile, lib_p, root=root)
    r = run_pure("copy", "--from", f"file://{cache}", "--trusted-public-keys", PUB, app_p,
                 root=tmp_path / "b", check=False)
    assert r.returncode == 1
    assert f"error: cannot substitute '{app_p}': binary cache 'file://{cache}' does not have it" in r.stderr


def test_a_second_copy_of_the_same_paths_waits_for_the_first_instead_of_downloading_again(tmp_path, keyfile):
    """Two `pure copy --from` of one closure into one store at once: the second waits on the
    path locks the first holds until it has registered the paths, then reports them as there
    ("skipped"), without reading their NARs (Nix's path locks).  The first is held up on a NAR
    fed by the test through a FIFO, so the second surely comes while it is under way."""
    import threading

    src, cache, dst = tmp_path / "a", tmp_path / "cache", tmp_path / "dst"
    with open_store(src) as store:
        lib = make_path(store, "lib-1.0", {"big": os.urandom(2 << 20)})
        app = make_path(store, "app-2.0", {"bin/app": b"uses " + store.print_path(lib).encode()}, refs=[lib])
        lib_p, app_p = store.print_path(lib), store.print_path(app)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p, root=src)
    nar = cache / re.search(r"^URL: (\S+)$", (cache / f"{lib.hash_part}.narinfo").read_text(), re.M)[1]
    data = nar.read_bytes()
    nar.unlink()
    os.mkfifo(nar)
    cmd = [sys.executable, "-m", "purestore.cli.main", "copy", "--json", "--from", f"file://{cache}",
           "--trusted-public-keys", PUB, app_p]
    env = pure_env(dst, None, None)
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        with open(nar, "wb") as fifo:  # returns once the first copy opened the NAR to restore it
            second = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(second.stderr), daemon=True)
            reader.start()
            deadline = time.monotonic() + 60
            while not any("waiting for another process to finish" in line for line in lines):
                assert second.poll() is None and time.monotonic() < deadline, lines
                time.sleep(0.05)
            fifo.write(data)
        out1, err1 = first.communicate(timeout=60)
        out2, _ = second.communicate(timeout=60)
        reader.join(10)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert first.returncode == 0, err1
    assert json.loads(out1)["fetched"] == sorted([lib_p, app_p])
    assert second.returncode == 0, lines
    rep = json.loads(out2)
    assert rep["fetched"] == [] and rep["skipped"] == sorted([lib_p, app_p]) and rep["narBytes"] == 0, rep
    assert "waiting for another process to finish " + repr(lib_p) in "".join(lines) or \
        "waiting for another process to finish " + repr(app_p) in "".join(lines), lines
    run_pure("store", "verify", "--check-contents", root=dst)
    assert os.listdir(dst / "pure/store/.tmp") == []


def test_a_cache_file_that_is_no_file_is_refused_and_a_fifo_not_waited_on_forever(tmp_path, keyfile, monkeypatch):
    """Someone put a directory, device or FIFO where a NAR should be: readers say so instead of
    failing strangely or waiting forever for a FIFO's writer (a FIFO that is fed is read)."""
    import threading

    from purestore.cache import _files
    from purestore.cache.nar_jobs import restore_file
    from purestore.errors import CacheError
    from purestore.formats.narinfo import NarInfo

    root, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(root) as store:
        lib, _app = make_closure(store)
        lib_p = store.print_path(lib)
    run_pure("copy", "--to", f"file://{cache}?compression=none", "--secret-key-file", keyfile, lib_p, root=root)
    info = cache / f"{lib.hash_part}.narinfo"
    ni = NarInfo.parse(info.read_bytes(), "/pure/store")
    nar = cache / ni.url
    data = nar.read_bytes()
    nar.unlink()
    nar.mkdir()
    r = run_pure("copy", "--from", f"file://{cache}", "--trusted-public-keys", PUB, lib_p,
                 root=tmp_path / "b", check=False, timeout=60)
    assert r.returncode == 1 and "not a regular file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    v = run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{cache}",
                 check=False, timeout=60)
    assert v.returncode == 1 and "not a regular file" in v.stdout + v.stderr, v.stdout + v.stderr
    with pytest.raises(OSError, match="not a regular file"):
        _files.open_regular("/dev/null")
    nar.rmdir()
    os.mkfifo(nar)
    monkeypatch.setattr(_files, "FIFO_WAIT", 0.3)
    with pytest.raises(CacheError, match="a FIFO that nothing was written to in 0.3 s"):
        restore_file(str(nar), ni, str(nar), str(tmp_path / "out"))

    def feed():
        with open(nar, "wb") as w:
            w.write(data)
    t = threading.Thread(target=feed)
    t.start()
    restore_file(str(nar), ni, str(nar), str(tmp_path / "out"))
    t.join()
    assert (tmp_path / "out").read_bytes() == (root / lib_p.lstrip("/")).read_bytes()


def _token(tmp_path):
    f = tmp_path / "upload.tok"
    if not f.exists():
        f.write_text("s3cret\n")
    return f


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root to mount a small tmpfs")
def test_a_database_that_cannot_be_written_fails_the_substitution_cleanly(tmp_path, keyfile):
    """The NAR restores (the store dir has room) but registering it fails: the state dir is a
    tmpfs that fills up while the NAR comes in (its cache file is a FIFO fed by the test).
    SQLite rolls the transaction back by itself on a full disk; that must not turn into a
    traceback ("cannot rollback - no transaction is active").  The error names the database
    and the full file system, --json still reports, and the restored tree is not left behind."""
    import shlex

    cache = tmp_path / "cache"
    with open_store(tmp_path / "a") as store:
        lib, app = (store.print_path(p) for p in make_closure(store))
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, app, root=tmp_path / "a")
    root = tmp_path / "dst"
    run_pure("copy", "--from", f"file://{cache}", "--trusted-public-keys", PUB, lib, root=root)
    nar = cache / re.search(r"^URL: (\S+)$", (cache / (app.split("/")[-1][:32] + ".narinfo")).read_text(), re.M)[1]
    state = root / "pure" / "var" / "pure" / "db"  # the database's own directory
    assert (state / "db.sqlite").is_file()
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    pure = f"{shlex.quote(sys.executable)} -m purestore.cli.main --store {q(root)}"
    script = f"""
        cp -a {q(state)} {q(tmp_path / 'saved')}
        mount -t tmpfs -o size=4m tmpfs {q(state)} && cp -a {q(tmp_path / 'saved')}/. {q(state)} || exit 9
        mv {q(nar)} {q(nar)}.real && mkfifo {q(nar)}
        {pure} copy --json --from file://{q(cache)} --trusted-public-keys {shlex.quote(PUB)} {app} \
            > {q(tmp_path / 'out')} 2> {q(tmp_path / 'err')} &
        pid=$!
        exec 3> {q(nar)}
        cat {q(nar)}.real >&3
        sleep 0.5
        dd if=/dev/zero of={q(state)}/fill bs=4k 2>/dev/null
        exec 3>&-
        wait $pid; echo $? > {q(tmp_path / 'rc')}
        rm -f {q(state)}/fill
        {pure} store verify --check-contents > {q(tmp_path / 'vout')} 2>&1; echo $? >> {q(tmp_path / 'rc')}
    """
    subprocess.run(["unshare", "-m", "sh", "-c", script], env=pure_env(None), check=True, timeout=120)
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().split() == ["1", "0"], (err, (tmp_path / "vout").read_text())
    assert "Traceback" not in err and "no transaction is active" not in err, err
    assert "error: " in err and "store database" in err and "no space left" in err, err
    report = json.loads((tmp_path / "out").read_text())
    assert report["fetched"] == [] and list(report["failed"]) == [app], report
    real = root / "pure" / "store"
    assert sorted(os.listdir(real)) == sorted([".tmp", lib.split("/")[-1]])  # no unregistered app
    assert os.listdir(real / ".tmp") == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root to mount a small tmpfs")
def test_a_push_to_a_cache_that_fills_up_stops_even_with_a_referrer_waiting(tmp_path, keyfile):
    """The biggest NAR is compressed first, so a referrer can be uploaded and wait for a
    reference not started yet.  When the cache's disk then fills up (on the next path), the push
    ends, naming each path, instead of waiting for that reference for ever; the referrer gets
    no narinfo, and the cache stays consistent."""
    import shlex

    root = tmp_path / "a"
    with open_store(root) as store:
        small = make_path(store, "small", {"f": os.urandom(10_000)})
        middle = make_path(store, "middle", {"f": os.urandom(1_200_000)})
        big = make_path(store, "big", {"f": os.urandom(1_500_000)}, refs=[small])
        big_p, middle_p, small_p = (store.print_path(p) for p in (big, middle, small))
    cache = tmp_path / "cache"
    cache.mkdir()
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    pure = f"{shlex.quote(sys.executable)} -m purestore.cli.main --store {q(root)}"
    script = f"""
        mount -t tmpfs -o size=2600k tmpfs {q(cache)} || exit 9
        timeout 60 {pure} copy -j 1 --json --to 'file://{cache}?compression=none' --secret-key-file {q(keyfile)} \
            {big_p} {middle_p} > {q(tmp_path / 'out')} 2> {q(tmp_path / 'err')}
        echo $? > {q(tmp_path / 'rc')}
        ls -a {q(cache)} {q(cache / 'nar')} > {q(tmp_path / 'ls')}
        cat {q(cache)}/*.narinfo > {q(tmp_path / 'narinfos')} 2>/dev/null
        true
    """
    subprocess.run(["unshare", "-m", "sh", "-c", script], env=pure_env(None), check=True, timeout=120,
                   cwd=REPO)
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", err
    assert "Traceback" not in err
    failed = json.loads((tmp_path / "out").read_text())["failed"]
    assert set(failed) == {big_p, middle_p, small_p}, failed
    assert "No space left on device" in failed[middle_p] and failed[small_p].startswith("not started")
    assert failed[big_p].startswith(f"its reference '{small_p}' was not copied")
    assert (tmp_path / "narinfos").read_text() == ""  # no narinfo at all
    assert ".tmp-push" not in (tmp_path / "ls").read_text()


def test_a_gc_during_a_substitution_keeps_the_valid_references_it_relies_on(tmp_path, keyfile):
    """`pure gc` while a substitution waits on a NAR (fed through a FIFO): the valid reference
    it relies on (not rooted otherwise) was temp-rooted first, so the collection spares it and
    the substitution succeeds."""
    import threading

    src, dst, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    with open_store(src) as store:
        lib, app = make_closure(store)
        lib_p, app_p = store.print_path(lib), store.print_path(app)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, app_p, root=src)
    run_pure("copy", "--from", f"file://{cache}", "--trusted-public-keys", PUB, lib_p, root=dst)  # unrooted
    nar = cache / re.search(r"^URL: (\S+)$", (cache / f"{app.hash_part}.narinfo").read_text(), re.M)[1]
    real = nar.with_name(nar.name + ".real")
    os.rename(nar, real)
    os.mkfifo(nar)
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "copy", "--from", f"file://{cache}",
                             "--trusted-public-keys", PUB, app_p], env=pure_env(dst),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    opened, gc_done = threading.Event(), threading.Event()

    def feed():
        with open(nar, "wb") as w:  # blocks until the copy opens it to read
            opened.set()
            gc_done.wait(60)
            w.write(real.read_bytes())
    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        assert opened.wait(60), proc.communicate(timeout=60)
        gc = run_pure("gc", "--json", root=dst)
        gc_done.set()
        out, err = proc.communicate(timeout=60)
    finally:
        gc_done.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert lib_p not in json.loads(gc.stdout)["deleted"]
    with open_store(dst) as store:
        assert store.is_valid(lib) and store.is_valid(app)
    run_pure("store", "verify", "--check-contents", root=dst)


def test_a_gc_during_a_push_keeps_the_closure_being_pushed(tmp_path, keyfile):
    """`pure gc` while a push compresses (stopped with SIGSTOP once its first temporary NAR
    file appears): the closure was temp-rooted before the push relied on it, so the collection
    spares it and the push completes."""
    import signal

    src, cache = tmp_path / "a", tmp_path / "cache"
    with open_store(src) as store:
        lib = make_path(store, "lib-1.0", {f"f{i}": os.urandom(200_000) for i in range(40)})
        app = make_path(store, "app-2.0", {f"f{i}": os.urandom(200_000) for i in range(40)}, refs=[lib])
        app_p = store.print_path(app)
    (cache / "nar").mkdir(parents=True)
    (cache / "nix-cache-info").write_text("StoreDir: /pure/store\n")
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "copy", "-j", "1", "--to",
                             f"file://{cache}?compression=xz", "--secret-key-file", str(keyfile), app_p],
                            env=pure_env(src), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(n.startswith(".tmp-push") for n in os.listdir(cache / "nar")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            gc = run_pure("gc", "--json", root=src)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(gc.stdout)["deleted"] == []
    run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{cache}", app_p)


def test_a_url_parameter_and_an_option_that_disagree_are_refused(tmp_path, keyfile):
    with open_store(tmp_path / "a") as store:
        p = store.print_path(make_path(store, "x", {"": b"x\n"}))
    for url, opts, msg in (
            (f"file://{tmp_path}/c?compression=xz", ["--compression", "zstd"],
             "asks for compression=xz, the option for zstd"),
            (f"file://{tmp_path}/c?compression-level=9", ["--compression-level", "3"],
             "asks for compression-level=9, the option for 3"),
            (f"file://{tmp_path}/c?priority=abc", [], "priority must be a whole number, got 'abc'"),
            (f"file://{tmp_path}/c?parallel-compression=false", ["--parallel-compression"],
             "asks for parallel-compression=false, the option for true")):
        r = run_pure("copy", "--to", url, *opts, p, root=tmp_path / "a", check=False)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "c").exists()
    r = run_pure("copy", "--to", f"file://{tmp_path}/c?compression=xz&compression-level=03", "--compression", "xz",
                 "--compression-level", "3", p, root=tmp_path / "a")  # the same, written differently
    assert list((tmp_path / "c" / "nar").glob("*.nar.xz"))


def test_cache_files_are_0644_and_directories_0755_whatever_the_umask_as_nix_s(tmp_path, keyfile):
    """Nix 2.8 sets umask 022 at start-up: its cache files are 0644 and its directories 0755 even
    under umask 077, so a web server running as another user can serve them.  A cache pushed by
    pure under umask 077 was unreadable to nginx's workers (403)."""
    import stat as st_

    with open_store(tmp_path / "a") as store:
        p = store.print_path(make_path(store, "x", {"": b"x\n"}))
    for umask, cache in ((0o022, tmp_path / "open"), (0o077, tmp_path / "strict" / "c")):
        env = pure_env(tmp_path / "a", None, None)
        r = subprocess.run(["sh", "-c", f"umask {umask:03o} && exec \"$@\"", "sh", sys.executable, "-m",
                            "purestore.cli.main", "copy", "--to", f"file://{cache}", "--secret-key-file",
                            str(keyfile), p], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        files = [f for f in cache.rglob("*") if f.is_file() and not f.name.startswith(".")]
        dirs = [cache, *(f for f in cache.rglob("*") if f.is_dir())]
        assert files and {st_.S_IMODE(f.stat().st_mode) for f in files} == {0o644}, (umask, files)
        assert {st_.S_IMODE(d.stat().st_mode) for d in dirs} == {0o755}, (umask, dirs)
    assert st_.S_IMODE((tmp_path / "strict").stat().st_mode) == 0o755
