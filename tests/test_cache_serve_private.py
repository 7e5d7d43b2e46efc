"""`pure cache serve` for a private cache across a network: reads only with a token
(--read-token-file; clients give it with ?token-file=), and https (--tls-cert, --tls-key)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import HAVE_NIX, run_pure
from test_cache_support import PUB, nix_copy_from, open_store, pushed_closure, start_server, stop_server


@pytest.fixture
def pushed(tmp_path):
    """A file cache holding lib and app (app refers to lib); returns (cache dir, app, store dir)."""
    cache = tmp_path / "cache"
    store_dir, app_p = pushed_closure(tmp_path, cache)
    return cache, app_p, store_dir


def test_a_private_cache_is_read_only_with_its_token(tmp_path, pushed):
    cache, app, store_dir = pushed
    (tmp_path / "read.tok").write_text("reader-s3cret\n")
    (tmp_path / "upload.tok").write_text("uploader-s3cret\n")
    (tmp_path / "wrong.tok").write_text("guess\n")
    proc, url = start_server(cache, "--read-token-file", tmp_path / "read.tok", token_file=tmp_path / "upload.tok")
    try:
        def fetch(u, root):
            return run_pure("copy", "--json", "--from", u, "--trusted-public-keys", PUB, app,
                            root=tmp_path / root, store_dir=store_dir, check=False)

        r = fetch(url, "none")
        assert r.returncode == 1
        assert ("HTTP 401 Unauthorized (the cache wants a token: give its file with ?token-file=FILE in the "
                "cache's URL)") in r.stderr
        r = fetch(f"{url}?token-file={tmp_path / 'wrong.tok'}", "wrong")
        assert r.returncode == 1 and "(the cache refused the token of the URL's token-file)" in r.stderr
        for tok in ("read.tok", "upload.tok"):  # the upload token reads too
            r = fetch(f"{url}?token-file={tmp_path / tok}", f"store-{tok}")
            assert r.returncode == 0, r.stderr
            assert len(json.loads(r.stdout)["fetched"]) == 2
        r = run_pure("cache", "path-info", "-r", f"{url}?token-file={tmp_path / 'read.tok'}", app)
        assert len(r.stdout.splitlines()) == 2
        # the read token does not upload
        from test_cache_support import make_path
        with open_store(tmp_path / "a", store_dir) as store:
            extra = store.print_path(make_path(store, "extra", {"": b"extra\n"}))
        r = run_pure("copy", "--to", f"{url}?token-file={tmp_path / 'read.tok'}", extra, root=tmp_path / "a",
                     store_dir=store_dir, check=False)
        assert r.returncode == 1 and "refused (HTTP 401 Unauthorized" in r.stderr
        run_pure("copy", "--to", f"{url}?token-file={tmp_path / 'upload.tok'}", extra, root=tmp_path / "a",
                 store_dir=store_dir)
    finally:
        stop_server(proc)


def test_server_token_and_tls_options_are_checked(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "empty.tok").write_text("\n")
    r = run_pure("cache", "serve", tmp_path / "c", "--read-token-file", tmp_path / "empty.tok", check=False)
    assert r.returncode == 2 and f"read token file '{tmp_path / 'empty.tok'}' is empty" in r.stderr
    r = run_pure("cache", "serve", tmp_path / "c", "--tls-cert", tmp_path / "cert.pem", check=False)
    assert r.returncode == 2 and "--tls-cert and --tls-key go together" in r.stderr
    r = run_pure("cache", "serve", tmp_path / "c", "--tls-cert", tmp_path / "cert.pem", "--tls-key",
                 tmp_path / "key.pem", check=False)
    assert r.returncode == 1
    assert f"error: TLS certificate or key file '{tmp_path / 'cert.pem'}' does not exist" in r.stderr
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    r = run_pure("cache", "serve", tmp_path / "c", "--tls-cert", tmp_path / "cert.pem", "--tls-key",
                 tmp_path / "key.pem", "--listen", "127.0.0.1:0", check=False)
    assert r.returncode == 1
    assert f"error: cannot use the TLS certificate '{tmp_path / 'cert.pem'}' with the key" in r.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_https_with_a_certificate_of_our_own(tmp_path, pushed):
    cache, app, store_dir = pushed
    key, cert = tmp_path / "tls.key", tmp_path / "tls.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    proc, url = start_server(cache, "--tls-cert", cert, "--tls-key", key)
    assert url.startswith("https://127.0.0.1:")
    conf = tmp_path / "pure.conf"
    try:
        conf.write_text("")
        r = run_pure("copy", "--from", url, "--trusted-public-keys", PUB, app, root=tmp_path / "b",
                     store_dir=store_dir, env={"PURE_CONFIG": str(conf)}, check=False)
        assert r.returncode == 1 and "TLS certificate verify failed: self-signed certificate" in r.stderr
        conf.write_text(f"ssl-cert-file = {cert}\n")
        r = run_pure("copy", "--json", "--from", url, "--trusted-public-keys", PUB, app, root=tmp_path / "b",
                     store_dir=store_dir, env={"PURE_CONFIG": str(conf)})
        assert len(json.loads(r.stdout)["fetched"]) == 2
        if HAVE_NIX:
            nix_copy_from(tmp_path, url, app, env={"NIX_SSL_CERT_FILE": str(cert)}, check=True)
    finally:
        stop_server(proc)
    run_pure("store", "verify", "--check-contents", root=tmp_path / "b", store_dir=store_dir)
