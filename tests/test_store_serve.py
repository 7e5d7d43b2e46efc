"""`pure store serve`: the local store served as a binary cache over HTTP, as nix-serve does.

A real server process on 127.0.0.1, real clients (`pure copy --from`, Nix's `nix copy --from`
where installed, and plain HTTP requests): narinfos made and signed on request, NARs dumped as
they are sent and checked against the registered hash, corrupt paths refused."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from conftest import HAVE_NIX, needs_nix, run_pure
from test_cache_support import (PUB, SEC, keep_build_log, make_closure, make_path, nix_copy_from, open_store,
                                start_store_server, stop_server)

STORE_DIR = "/nix/store" if HAVE_NIX else "/pure/store"


def request(url: str, path: str, method: str = "GET", headers=None) -> tuple[int, dict, bytes]:
    """One raw HTTP request (the path sent as it is, unnormalised); (status, headers, body)."""
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def populate(tmp_path) -> dict:
    """Store A with lib, app (refers to lib), app2 (the same with a deriver that has a build
    log) and a 3 MiB path; the test key in k.sec.  Returns the store paths by name."""
    (tmp_path / "k.sec").write_text(SEC)
    with open_store(tmp_path / "a", STORE_DIR) as store:
        drv = make_path(store, "app-2.0.drv", {"": b"Derive(...)"})
        keep_build_log(store, drv, b"building app\nok\n")
        lib, app = make_closure(store)
        app2 = make_path(store, "app-2.1", {"bin/app": b"#!/bin/sh\n"}, refs=[lib], deriver=drv)
        big = make_path(store, "big", {"data": os.urandom(3 << 20) + b"compressible " * 100_000})
        return {"lib": lib, "app": app, "app2": app2, "big": big, "drv": drv}


@pytest.fixture
def served(tmp_path):
    """:func:`populate`'s store served signed by the test key; yields (url, store paths by
    name, process)."""
    paths = populate(tmp_path)
    proc, url = start_store_server(tmp_path / "a", STORE_DIR, "--secret-key-file", tmp_path / "k.sec")
    try:
        yield url, paths, proc
    finally:
        stop_server(proc)


def fetch(tmp_path, url, root, *paths, keys=PUB, check=False, attempts=None):
    env = None
    if attempts:  # fewer tries of a download that fails (a corrupt path fails every time)
        (tmp_path / "attempts.conf").write_text(f"download-attempts = {attempts}\n")
        env = {"PURE_CONFIG": str(tmp_path / "attempts.conf")}
    return run_pure("copy", "--json", "--from", url, "--trusted-public-keys", keys,
                    *(f"{STORE_DIR}/{p.base_name}" for p in paths),
                    root=tmp_path / root, store_dir=STORE_DIR, check=check, env=env)


def test_a_served_store_is_substituted_and_checks_out(tmp_path, served):
    url, paths, _proc = served
    r = fetch(tmp_path, url, "b", paths["app2"], paths["big"], check=True)
    assert sorted(json.loads(r.stdout)["fetched"]) == sorted(
        f"{STORE_DIR}/{paths[n].base_name}" for n in ("lib", "app2", "big"))
    r = run_pure("store", "verify", "--check-contents", root=tmp_path / "b", store_dir=STORE_DIR)
    assert "no problems" in r.stdout + r.stderr
    with open_store(tmp_path / "a", STORE_DIR) as a, open_store(tmp_path / "b", STORE_DIR) as b:
        for n in ("lib", "app2", "big"):
            ia, ib = a.query_path_info(paths[n]), b.query_path_info(paths[n])
            assert (ib.nar_hash, ib.nar_size, ib.references) == (ia.nar_hash, ia.nar_size, ia.references)
            assert any(s.startswith("test-key-1:") for s in ib.sigs)
            assert Path(b.real_path(paths[n])).exists()


def test_narinfo_cache_info_and_log_as_served(tmp_path, served):
    from purestore.formats.narinfo import NarInfo
    from purestore.formats.signing import PublicKey, Signature

    url, paths, _proc = served
    status, hdrs, body = request(url, "/nix-cache-info")
    assert status == 200 and hdrs["content-type"] == "text/x-nix-cache-info"
    assert body.decode() == f"StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: 30\n"

    app2 = paths["app2"]
    status, hdrs, body = request(url, f"/{app2.hash_part}.narinfo")
    assert status == 200 and hdrs["content-type"] == "text/x-nix-narinfo"
    ni = NarInfo.parse(body.decode(), STORE_DIR)
    with open_store(tmp_path / "a", STORE_DIR) as a:
        info = a.query_path_info(app2)
    assert ni.compression == "none" and ni.file_hash == ni.nar_hash == info.nar_hash
    assert ni.file_size == ni.nar_size == info.nar_size
    assert ni.url == f"nar/{app2.hash_part}-{info.nar_hash.nix32}.nar"
    assert set(ni.references) == {paths["lib"]} and ni.deriver == paths["drv"]
    assert PublicKey.parse(PUB).verify(ni.fingerprint(STORE_DIR), Signature.parse(ni.sigs[0]))

    status, hdrs, body = request(url, "/" + ni.url, "HEAD")
    assert status == 200 and int(hdrs["content-length"]) == info.nar_size and body == b""
    status, _h, body = request(url, "/" + ni.url)
    assert status == 200 and len(body) == info.nar_size
    assert body.startswith(b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1")

    status, hdrs, body = request(url, f"/log/{paths['drv'].base_name}")
    assert status == 200 and body == b"building app\nok\n" and hdrs["content-type"].startswith("text/plain")
    # `pure log` on another machine finds the log through the server
    r = run_pure("--substituters", url, "log", f"{STORE_DIR}/{app2.base_name}", root=tmp_path / "b",
                 store_dir=STORE_DIR, check=False)
    assert "building app" in r.stdout, r.stderr


def test_what_the_server_does_not_have_or_do(tmp_path, served):
    url, paths, _proc = served
    lib = paths["lib"]
    with open_store(tmp_path / "a", STORE_DIR) as a:
        info = a.query_path_info(lib)
    other = "1" * 52
    for path in (f"/{'0' * 32}.narinfo",                       # no such path
                 f"/nar/{lib.hash_part}-{other}.nar",           # the path, but not those contents
                 f"/nar/{'0' * 32}-{info.nar_hash.nix32}.nar",  # those contents, another path
                 f"/{lib.hash_part}.ls", "/log/nothing", "/log/" + "a" * 33 + "-x.drv",
                 "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", f"/{lib.hash_part}.narinfo/x"):
        status, _h, _b = request(url, path)
        assert status == 404, path
    status, hdrs, _b = request(url, f"/{lib.hash_part}.narinfo", "PUT")
    assert status == 405 and hdrs["allow"] == "GET, HEAD"
    status, _h, body = request(url, "/")
    assert status == 200 and body == b"purestore store server\n"


@pytest.mark.parametrize("method", ["zstd", "xz"])
def test_nars_compressed_as_they_are_sent(tmp_path, method):
    from purestore.formats.narinfo import NarInfo
    paths = populate(tmp_path)
    proc, url = start_store_server(tmp_path / "a", STORE_DIR, "-k", tmp_path / "k.sec", "--compression", method,
                                   *(["--compression-level", "1"] if method == "xz" else []))
    try:
        big = paths["big"]
        ni = NarInfo.parse(request(url, f"/{big.hash_part}.narinfo")[2].decode(), STORE_DIR)
        ext = {"zstd": ".nar.zst", "xz": ".nar.xz"}[method]
        assert ni.compression == method and ni.url.endswith(ext)
        assert ni.file_hash is None and ni.file_size is None
        status, hdrs, body = request(url, "/" + ni.url, "HEAD")
        assert status == 200 and "content-length" not in hdrs and body == b""
        status, _h, body = request(url, "/" + ni.url)
        assert status == 200 and len(body) < ni.nar_size
        assert request(url, "/" + ni.url.removesuffix(ext) + ".nar")[0] == 404  # not the plain NAR
        fetch(tmp_path, url, "b", paths["app2"], big, check=True)
        r = run_pure("store", "verify", "--check-contents", root=tmp_path / "b", store_dir=STORE_DIR)
        assert "no problems" in r.stdout + r.stderr
        if HAVE_NIX:
            for n in ("app2", "big"):
                nix_copy_from(tmp_path, url, f"{STORE_DIR}/{paths[n].base_name}", check=True)
        # a corrupt big path is cut short, compressed too
        _corrupt(tmp_path / "a", paths["big"], "data")
        r = fetch(tmp_path, url, "c", big, attempts=2)
        assert r.returncode == 1 and f"{STORE_DIR}/{big.base_name}" in r.stderr
        with open_store(tmp_path / "c", STORE_DIR) as c:
            assert not c.is_valid(big)
    finally:
        stop_server(proc)
    r = run_pure("store", "serve", "--compression", method, "--compression-level", "42", root=tmp_path / "a",
                 store_dir=STORE_DIR, check=False)
    assert r.returncode == 1 and f"error: {method} compression level must be" in r.stderr


def test_unsigned_paths_need_a_signature_the_client_trusts(tmp_path):
    """Without --secret-key-file only the store's own signatures are served: a client trusting
    none of them refuses the paths; signed in the store (no restart), they come through."""
    (tmp_path / "k.sec").write_text(SEC)
    with open_store(tmp_path / "a", STORE_DIR) as store:
        lib = make_path(store, "lib", {"": b"lib\n"})
    proc, url = start_store_server(tmp_path / "a", STORE_DIR, "--priority", "42")
    try:
        assert request(url, "/nix-cache-info")[2].endswith(b"Priority: 42\n")
        r = fetch(tmp_path, url, "b", lib)
        assert r.returncode == 1
        assert f"{STORE_DIR}/{lib.base_name}" in r.stderr and "signature" in r.stderr
        with open_store(tmp_path / "b", STORE_DIR) as b:
            assert not b.is_valid(lib)
        run_pure("store", "sign", "--key-file", tmp_path / "k.sec", f"{STORE_DIR}/{lib.base_name}",
                 root=tmp_path / "a", store_dir=STORE_DIR)
        fetch(tmp_path, url, "b", lib, check=True)
    finally:
        stop_server(proc)


def _corrupt(root, sp, rel: str = "") -> None:
    """Flip the first byte of a file of a store path (same size, other contents)."""
    with open_store(root, STORE_DIR) as store:
        f = Path(store.real_path(sp), rel) if rel else Path(store.real_path(sp))
    os.chmod(f.parent, 0o755)
    os.chmod(f, 0o644)
    data = bytearray(f.read_bytes())
    data[0] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["lib", "big"])
def test_a_corrupt_path_is_not_served_whole(tmp_path, served, which):
    """A path whose files no longer match the registered hash: a small NAR gets 500 before any
    byte is sent, a big one is cut short before its end; the client installs nothing and says
    why, and the server's log names the path."""
    url, paths, proc = served
    sp = paths[which]
    _corrupt(tmp_path / "a", sp, "data" if which == "big" else "")
    with open_store(tmp_path / "a", STORE_DIR) as a:
        info = a.query_path_info(sp)
    nar = f"/nar/{sp.hash_part}-{info.nar_hash.nix32}.nar"
    if which == "lib":
        status, _h, body = request(url, nar)
        assert status == 500 and body.startswith(f"path '{STORE_DIR}/{sp.base_name}' is corrupt on this server".encode())
    else:
        with pytest.raises(http.client.IncompleteRead):
            request(url, nar)
    r = fetch(tmp_path, url, "b", sp, attempts=2)
    assert r.returncode == 1
    assert f"{STORE_DIR}/{sp.base_name}" in r.stderr
    if which == "lib":  # the client says what the server said, and does not ask again
        assert f"is corrupt on this server" in r.stderr, r.stderr
        assert "retrying" not in r.stderr and "attempts" not in r.stderr, r.stderr
    with open_store(tmp_path / "b", STORE_DIR) as b:
        assert not b.is_valid(sp)
    r = run_pure("store", "verify", "--check-contents", root=tmp_path / "b", store_dir=STORE_DIR)
    assert "no problems" in r.stdout + r.stderr
    stop_server(proc)
    err = proc.stderr.read()
    assert f"error: path '{STORE_DIR}/{sp.base_name}' is corrupt: its NAR hash is" in err
    assert "Traceback" not in err


def test_a_private_store_server_wants_its_token(tmp_path):
    (tmp_path / "k.sec").write_text(SEC)
    (tmp_path / "read.tok").write_text("s3cret\n")
    with open_store(tmp_path / "a", STORE_DIR) as store:
        lib = make_path(store, "lib", {"": b"lib\n"})
    proc, url = start_store_server(tmp_path / "a", STORE_DIR, "-k", tmp_path / "k.sec",
                                   "--read-token-file", tmp_path / "read.tok")
    try:
        status, hdrs, _b = request(url, "/nix-cache-info")
        assert status == 401 and hdrs["www-authenticate"] == "Bearer"
        assert request(url, "/nix-cache-info", headers={"Authorization": "Bearer s3cret"})[0] == 200
        r = fetch(tmp_path, url, "b", lib)
        assert r.returncode == 1 and "401" in r.stderr
        fetch(tmp_path, f"{url}?token-file={tmp_path / 'read.tok'}", "b", lib, check=True)
    finally:
        stop_server(proc)


def test_bad_options_get_clear_errors(tmp_path):
    (tmp_path / "bad.sec").write_text("not a key\n")
    r = run_pure("store", "serve", "--secret-key-file", tmp_path / "bad.sec", root=tmp_path / "a", check=False)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "bad.sec" in r.stderr
    r = run_pure("store", "serve", "--secret-key-file", tmp_path / "missing.sec", root=tmp_path / "a", check=False)
    assert r.returncode != 0 and "missing.sec" in r.stderr and "Traceback" not in r.stderr
    r = run_pure("store", "serve", "--listen", "nowhere", root=tmp_path / "a", check=False)
    assert r.returncode != 0 and "expected HOST:PORT" in r.stderr
    r = run_pure("store", "serve", "--tls-key", tmp_path / "k.pem", root=tmp_path / "a", check=False)
    assert r.returncode == 2 and "--tls-cert and --tls-key go together" in r.stderr
    r = run_pure("store", "serve", "--compression-level", "9", root=tmp_path / "a", check=False)
    assert r.returncode == 2 and "--compression-level needs --compression zstd or xz" in r.stderr


@needs_nix
def test_nix_substitutes_from_a_served_store(tmp_path, served):
    url, paths, _proc = served
    target = f"{STORE_DIR}/{paths['app2'].base_name}"
    nix_copy_from(tmp_path, url, target, check=True)
    nix_copy_from(tmp_path, url, f"{STORE_DIR}/{paths['big'].base_name}", check=True)
    r = subprocess.run(["nix-store", "--store", str(tmp_path / "nixroot"), "--verify-path", target],
                       capture_output=True, text=True, env={**os.environ, "NIX_CONFIG": "substituters ="})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "nixroot" / STORE_DIR.lstrip("/") / paths["lib"].base_name).exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_a_store_served_over_https_with_an_access_log(tmp_path):
    (tmp_path / "k.sec").write_text(SEC)
    key, cert = tmp_path / "tls.key", tmp_path / "tls.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    with open_store(tmp_path / "a", STORE_DIR) as store:
        lib = make_path(store, "lib", {"": b"lib\n"})
    access = tmp_path / "access.log"
    proc, url = start_store_server(tmp_path / "a", STORE_DIR, "-k", tmp_path / "k.sec", "--tls-cert", cert,
                                   "--tls-key", key, "--access-log", access)
    try:
        assert url.startswith("https://127.0.0.1:")
        (tmp_path / "pure.conf").write_text(f"ssl-cert-file = {cert}\n")
        run_pure("copy", "--from", url, "--trusted-public-keys", PUB, f"{STORE_DIR}/{lib.base_name}",
                 root=tmp_path / "b", store_dir=STORE_DIR, env={"PURE_CONFIG": str(tmp_path / "pure.conf")})
    finally:
        stop_server(proc)
    lines = access.read_text().splitlines()
    assert any(f'"GET /{lib.hash_part}.narinfo HTTP/1.1" 200 ' in ln for ln in lines), lines
    assert any('"GET /nar/' in ln and '" 200 ' in ln for ln in lines), lines
    r = run_pure("store", "serve", "--tls-cert", tmp_path / "nothing.pem", "--tls-key", key,
                 "--access-log", tmp_path / "never.log", root=tmp_path / "a", check=False)
    assert r.returncode == 1 and "nothing.pem" in r.stderr and not (tmp_path / "never.log").exists()


def test_a_path_being_sent_is_kept_from_the_garbage_collector(tmp_path):
    """A collection while a NAR is on its way keeps the path (the server holds a temporary root
    for each download); once the download is over, the path is collectable again."""
    import hashlib
    import socket
    import time

    with open_store(tmp_path / "a", STORE_DIR) as store:
        sp = make_path(store, "big", {"data": os.urandom(24 << 20)})  # (more than socket buffers hold)
        info = store.query_path_info(sp)
    proc, url = start_store_server(tmp_path / "a", STORE_DIR)
    full = f"{STORE_DIR}/{sp.base_name}"
    try:
        u = urllib.parse.urlsplit(url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client reads slowly
        sock.connect((u.hostname, u.port))
        sock.sendall(f"GET /nar/{sp.hash_part}-{info.nar_hash.nix32}.nar HTTP/1.1\r\n"
                     f"Host: {u.netloc}\r\n\r\n".encode())
        got = b""
        while b"\r\n\r\n" not in got:
            got += sock.recv(4096)
        head, body = got.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200")
        r = run_pure("gc", root=tmp_path / "a", store_dir=STORE_DIR)
        assert full not in r.stdout.split()
        assert full in run_pure("gc", "--print-roots", root=tmp_path / "a", store_dir=STORE_DIR).stdout
        h = hashlib.sha256(body)
        n = len(body)
        while n < info.nar_size:
            data = sock.recv(1 << 16)
            assert data, "the download was cut short"
            h.update(data)
            n += len(data)
        sock.close()
        assert h.digest() == info.nar_hash.digest
        deadline = time.monotonic() + 10  # the server drops the root as the response ends
        while full in run_pure("gc", "--print-roots", root=tmp_path / "a", store_dir=STORE_DIR).stdout:
            assert time.monotonic() < deadline, "the server kept its temporary root"
            time.sleep(0.1)
        assert full in run_pure("gc", root=tmp_path / "a", store_dir=STORE_DIR).stdout.split()
        status, _h, _b = request(url, f"/nar/{sp.hash_part}-{info.nar_hash.nix32}.nar")
        assert status == 404
    finally:
        stop_server(proc)
    assert "Traceback" not in proc.stderr.read()


def test_a_store_that_does_not_exist_is_not_served(tmp_path):
    """A mistyped --store would otherwise make a new, empty store and serve only 404s."""
    r = run_pure("store", "serve", "--listen", "127.0.0.1:0", root=tmp_path / "typo", store_dir=STORE_DIR,
                 check=False)
    assert r.returncode == 2 and f"error: there is no store at '{tmp_path}/typo' to serve" in r.stderr
    assert not (tmp_path / "typo").exists()


def test_a_store_of_another_store_dir_names_the_store_dir_to_give(tmp_path):
    with open_store(tmp_path / "a", "/nix/store") as store:
        make_path(store, "lib", {"": b"lib\n"})
    r = run_pure("store", "serve", "--listen", "127.0.0.1:0", root=tmp_path / "a", store_dir="/pure/store",
                 check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: the store at '{tmp_path}/a' is for store dir '/nix/store', not '/pure/store'" in r.stderr
    assert "hint: give --store-dir /nix/store" in r.stderr
    assert not (tmp_path / "a" / "pure").exists()


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_download_the_client_abandons_stops_its_dump_and_is_logged_499(tmp_path, compression):
    """A client that goes away in the middle of a big NAR: the server stops dumping (and
    compressing) it and logs 499 with the bytes handed out until then, not a whole 200."""
    import re
    import socket
    import time

    with open_store(tmp_path / "a", STORE_DIR) as store:
        sp = make_path(store, "big", {"data": os.urandom(16 << 20)})
        info = store.query_path_info(sp)
    access = tmp_path / "access.log"
    proc, url = start_store_server(tmp_path / "a", STORE_DIR, "--access-log", access, "--compression", compression)
    ext = ".nar" if compression == "none" else ".nar.zst"
    try:
        u = urllib.parse.urlsplit(url)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client reads slowly
            sock.connect((u.hostname, u.port))
            sock.sendall(f"GET /nar/{sp.hash_part}-{info.nar_hash.nix32}{ext} HTTP/1.1\r\n"
                         f"Host: {u.netloc}\r\n\r\n".encode())
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        deadline = time.monotonic() + 10
        while "/nar/" not in (access.read_text() if access.exists() else ""):
            assert time.monotonic() < deadline, "no line logged"
            time.sleep(0.05)
    finally:
        stop_server(proc)
    [line] = [x for x in access.read_text().splitlines() if "/nar/" in x]
    status, sent = re.search(r'" (\d{3}) (\d+) "', line).groups()
    assert status == "499" and int(sent) < info.nar_size // 2, line
    assert "Traceback" not in proc.stderr.read()
