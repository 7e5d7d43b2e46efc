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
        # an empty token-file (a variable left unset) is not "no token": it was read as one,
        # and the 401 then asked for the ?token-file= that was given
        r = fetch(f"{url}?token-file=", "empty")
        assert r.returncode == 1
        assert (f"cache URL '{url}?token-file=': token-file is empty, expected the path of the file that "
                "holds the cache's token") in r.stderr, r.stderr
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
    # a token a client cannot send in a header is refused, without quoting it
    for content, said in ((b"s3cret\nmore\n", "has several lines"),
                          (b"s3cr\xfft\n", "has a character an HTTP header cannot carry")):
        (tmp_path / "bad.tok").write_bytes(content)
        r = run_pure("cache", "serve", tmp_path / "c", "--upload-token-file", tmp_path / "bad.tok",
                     "--listen", "nowhere", check=False)
        assert r.returncode == 2 and f"upload token file '{tmp_path / 'bad.tok'}' {said}" in r.stderr, r.stderr
        assert "s3" not in r.stderr and "Traceback" not in r.stderr
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
    # a token file others can read is said (the server starts all the same); a private one is not
    import os
    tok = tmp_path / "up.tok"
    tok.write_text("s3cret\n")
    for mode, warned in ((0o644, True), (0o600, False)):
        os.chmod(tok, mode)  # (a bad --listen: the command stops after reading the token)
        r = run_pure("cache", "serve", tmp_path / "c", "--upload-token-file", tok, "--listen", "nowhere",
                     check=False)
        assert r.returncode != 0 and "--listen 'nowhere'" in r.stderr, r.stderr
        assert (f"warning: upload token file '{tok}' can be read by others (mode 0644)" in r.stderr) == warned


def test_a_read_token_that_is_the_upload_token_is_warned_of(tmp_path):
    """The same token in --read-token-file and --upload-token-file lets every reader upload (the
    server took it without a word); said, and the server starts all the same.  Two tokens of
    their own are not warned of."""
    (tmp_path / "c").mkdir()
    for name, text in (("read.tok", "s3cret\n"), ("up.tok", "s3cret"), ("other.tok", "other\n")):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
    for up, warned in (("up.tok", True), ("other.tok", False)):
        r = run_pure("cache", "serve", tmp_path / "c", "--read-token-file", tmp_path / "read.tok",
                     "--upload-token-file", tmp_path / up, "--listen", "nowhere", check=False)
        assert r.returncode == 2 and "--listen 'nowhere'" in r.stderr, r.stderr  # (stops after the tokens)
        said = (f"warning: the read token ({str(tmp_path / 'read.tok')!r}) is the upload token "
                f"({str(tmp_path / up)!r}): whoever may read the cache may also upload to it")
        assert (said in r.stderr) == warned, r.stderr
        assert "s3cret" not in r.stderr


def test_a_bad_listen_is_a_usage_error_that_says_what_is_wrong(tmp_path):
    """--listen with a '[' but no ']' is refused (it was taken as host '::1'), a port past 65535
    is said to be out of range; both exit 2 (bad usage), for cache serve and store serve."""
    (tmp_path / "c").mkdir()
    for listen, said in (("[::1:80", "expected HOST:PORT"), ("::1]:80", "expected HOST:PORT"),
                         ("127.0.0.1:99999", "port 99999 is out of range (0 to 65535)"),
                         ("nowhere", "expected HOST:PORT")):
        for cmd in (("cache", "serve", tmp_path / "c"), ("store", "serve")):
            r = run_pure(*cmd, "--listen", listen, root=tmp_path / "a", check=False, timeout=60)
            assert r.returncode == 2 and f"error: --listen '{listen}': {said}" in r.stderr, (cmd, r.stderr)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_files_that_cannot_be_used_are_named_with_what_is_wrong(tmp_path):
    """OpenSSL says only "PEM lib": the error says which file is wrong and how; an encrypted key
    is refused at once (the server has no terminal to ask for its passphrase)."""
    (tmp_path / "c").mkdir()

    def pair(name):
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
        return cert, key

    cert, key = pair("a")
    cert_b, key_b = pair("b")
    enc = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", key, "-aes256", "-passout", "pass:secret", "-out", enc],
                   check=True, capture_output=True)
    for c, k, words in ((key, key, f"'{key}' holds no PEM certificate"),
                        (cert, cert, f"'{cert}' holds no PEM private key"),
                        (cert, key_b, "the key is not the certificate's (key values mismatch)"),
                        (cert, enc, f"the TLS key '{enc}' is encrypted with a passphrase")):
        r = run_pure("cache", "serve", tmp_path / "c", "--tls-cert", c, "--tls-key", k, "--listen",
                     "127.0.0.1:0", check=False, timeout=30)
        assert r.returncode == 1 and words in r.stderr, r.stderr
        assert "PEM lib" not in r.stderr and "Traceback" not in r.stderr


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
        # plain http to the https server: the server hangs up, and the error says what to check
        plain = url.replace("https://", "http://")
        r = run_pure("copy", "--from", plain, "--trusted-public-keys", PUB, app, root=tmp_path / "b",
                     store_dir=store_dir, env={"PURE_CONFIG": str(conf)}, check=False)
        assert r.returncode == 1 and "if it serves https, the URL must start with https://" in r.stderr, r.stderr
        conf.write_text(f"ssl-cert-file = {cert}\n")
        r = run_pure("copy", "--json", "--from", url, "--trusted-public-keys", PUB, app, root=tmp_path / "b",
                     store_dir=store_dir, env={"PURE_CONFIG": str(conf)})
        assert len(json.loads(r.stdout)["fetched"]) == 2
        if HAVE_NIX:
            nix_copy_from(tmp_path, url, app, env={"NIX_SSL_CERT_FILE": str(cert)}, check=True)
    finally:
        stop_server(proc)
    run_pure("store", "verify", "--check-contents", root=tmp_path / "b", store_dir=store_dir)


def test_basic_authentication_with_the_token_as_password_is_accepted(tmp_path, pushed):
    """Nix 2.8 can only send a netrc login (HTTP basic): its password is taken as the token, for
    reads and for uploads, whatever the user name; 401s offer both schemes."""
    import httpx

    cache, app, store_dir = pushed
    (tmp_path / "read.tok").write_text("reader-s3cret\n")
    (tmp_path / "upload.tok").write_text("uploader-s3cret\n")
    proc, url = start_server(cache, "--read-token-file", tmp_path / "read.tok", token_file=tmp_path / "upload.tok")
    try:
        r = httpx.get(url + "nix-cache-info")
        assert r.status_code == 401
        assert r.headers.get_list("www-authenticate") == ['Basic realm="pure cache"', "Bearer"]
        assert httpx.get(url + "nix-cache-info", auth=("anyone", "reader-s3cret")).status_code == 200
        assert httpx.get(url + "nix-cache-info", auth=("anyone", "wrong")).status_code == 401
        assert httpx.get(url + "nix-cache-info", headers={"Authorization": "Basic !!!"}).status_code == 401
        assert httpx.put(url + "log/x.drv", content=b"x", auth=("ci", "reader-s3cret")).status_code == 401
        assert httpx.put(url + "log/x.drv", content=b"x", auth=("ci", "uploader-s3cret")).status_code == 201
    finally:
        stop_server(proc)


def test_a_refused_netrc_login_is_said_even_where_a_token_would_do(tmp_path, pushed):
    """Our server offers basic and bearer (its 401 names both): a client that sent a netrc login
    is told the login was refused, not that the cache wants a token."""
    cache, app, store_dir = pushed
    (tmp_path / "read.tok").write_text("reader-s3cret\n")
    proc, url = start_server(cache, "--read-token-file", tmp_path / "read.tok")
    try:
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login alice password wrong\n")
        netrc.chmod(0o600)
        conf = tmp_path / "pure.conf"
        conf.write_text(f"netrc-file = {netrc}\n")
        r = run_pure("cache", "info", url, root=tmp_path / "b", store_dir=store_dir,
                     env={"PURE_CONFIG": str(conf)}, check=False)
        assert r.returncode == 1
        assert f"(the cache refused the login 'alice' for 127.0.0.1 in {netrc})" in r.stdout + r.stderr
        netrc.write_text("machine 127.0.0.1 login alice password reader-s3cret\n")
        run_pure("cache", "info", url, root=tmp_path / "b", store_dir=store_dir, env={"PURE_CONFIG": str(conf)})
    finally:
        stop_server(proc)


def test_a_login_in_the_url_is_sent_as_nix_sends_it(tmp_path, pushed):
    """``http://NAME:PASSWORD@HOST/`` (percent-encoded) is a login, as curl and so Nix take it,
    ahead of the netrc file's; a wrong one is said to come from the URL.  (It was dropped: the
    cache answered 401 and the message asked for a token.)"""
    cache, app, store_dir = pushed
    (tmp_path / "read.tok").write_text("reader-s3cret\n")
    proc, url = start_server(cache, "--read-token-file", tmp_path / "read.tok")
    try:
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login bob password wrong\n")
        netrc.chmod(0o600)
        conf = tmp_path / "pure.conf"
        conf.write_text(f"netrc-file = {netrc}\n")

        def fetch(u, root):
            return run_pure("copy", "--json", "--from", u, "--trusted-public-keys", PUB, app, root=tmp_path / root,
                            store_dir=store_dir, env={"PURE_CONFIG": str(conf)}, check=False)

        with_login = url.replace("http://", "http://alice:reader-s3cr%65t@")
        r = fetch(with_login, "b")
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)["fetched"]) == 2
        run_pure("store", "verify", "--check-contents", root=tmp_path / "b", store_dir=store_dir)
        # the password is not said, nor written into the store's records (it was, as given,
        # in messages and in every substitution record of the store's database)
        r = run_pure("copy", "--from", with_login, "--trusted-public-keys", PUB, app, root=tmp_path / "d",
                     store_dir=store_dir, env={"PURE_CONFIG": str(conf)})
        assert f"from {url.replace('http://', 'http://alice:***@').rstrip('/')}" in r.stderr, r.stderr
        for f in (tmp_path / "b").rglob("*"):
            assert not f.is_file() or b"s3cr" not in f.read_bytes(), f
        r = fetch(url.replace("http://", "http://alice:guess@"), "c")
        assert r.returncode == 1
        assert "(the cache refused the login 'alice' for 127.0.0.1 in the cache's URL)" in r.stderr
        assert "guess" not in r.stderr + r.stdout and "http://alice:***@127.0.0.1" in r.stderr
        if HAVE_NIX and store_dir == "/nix/store":  # the same URL works in Nix
            nix_copy_from(tmp_path, with_login.rstrip("/"), app, check=True)
    finally:
        stop_server(proc)


@pytest.mark.skipif(not HAVE_NIX, reason="needs Nix")
def test_nix_reads_a_private_cache_and_pushes_to_it_with_a_netrc_login(tmp_path, pushed):
    from test_cache_support import SEC

    cache, app, store_dir = pushed
    if store_dir != "/nix/store":
        pytest.skip("the closure is not in /nix/store")
    (tmp_path / "read.tok").write_text("reader-s3cret\n")
    (tmp_path / "upload.tok").write_text("uploader-s3cret\n")
    proc, url = start_server(cache, "--read-token-file", tmp_path / "read.tok", token_file=tmp_path / "upload.tok")
    try:
        host = url.split("//")[1].split(":")[0]
        (tmp_path / "netrc").write_text(f"machine {host} login nix password uploader-s3cret\n")
        netrc = {"NIX_CONFIG": f"substituters =\nexperimental-features = nix-command\nnetrc-file = {tmp_path / 'netrc'}"}
        r = nix_copy_from(tmp_path, url.rstrip("/"), app, env=netrc)
        assert r.returncode == 0, r.stderr
        # Nix pushes a path of its own store, signed with the test key
        import os
        (tmp_path / "k.sec").write_text(SEC)
        (tmp_path / "from-nix").write_text("pushed by nix\n")
        nenv = {**os.environ, **netrc, "XDG_CACHE_HOME": str(tmp_path / "xdg2")}
        extra = subprocess.run(["nix", "store", "add-file", "--store", str(tmp_path / "nixsrc"),
                                str(tmp_path / "from-nix")], env=nenv, capture_output=True, text=True,
                               check=True, timeout=120).stdout.strip()
        r = subprocess.run(["nix", "copy", "--store", str(tmp_path / "nixsrc"), "--to",
                            f"{url.rstrip('/')}?secret-key={tmp_path / 'k.sec'}", extra],
                           env=nenv, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        base = extra.rsplit("/", 1)[1][:32]
        assert (cache / f"{base}.narinfo").exists()
    finally:
        stop_server(proc)


@pytest.mark.skipif(__import__("os").geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root to mount a small tmpfs")
def test_an_upload_to_a_full_disk_is_refused_at_once_with_the_reason(tmp_path):
    """The server's disk fills up during an upload: 500 with "No space left on device" (the
    rest of the body read and dropped), no traceback, no partial file; the client fails at once
    instead of waiting for a server that stopped reading."""
    import os
    import re
    import shlex
    import sys
    import time

    from conftest import pure_env
    from test_cache_support import SEC, make_path

    (tmp_path / "k.sec").write_text(SEC)
    (tmp_path / "upload.tok").write_text("uploader-s3cret\n")
    with open_store(tmp_path / "a") as store:
        big = store.print_path(make_path(store, "big", {"blob": os.urandom(6 << 20)}))
    cache = tmp_path / "cache"
    cache.mkdir()
    pure = f"{shlex.quote(sys.executable)} -m purestore.cli.main"
    proc = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=2m tmpfs {cache} && exec {pure} cache serve {cache} "
                                      f"--listen 127.0.0.1:0 --upload-token-file {tmp_path / 'upload.tok'}"],
        env=pure_env(None), stderr=subprocess.PIPE, text=True)
    try:
        m = None
        for line in iter(proc.stderr.readline, ""):
            m = re.search(r"on (http://\S+)", line)
            if m:
                break
        assert m, "the server did not start"
        url = m.group(1).rstrip("/")
        t = time.monotonic()
        r = run_pure("copy", "--to", f"{url}/?token-file={tmp_path / 'upload.tok'}&compression=none",
                     "--secret-key-file", tmp_path / "k.sec", big, root=tmp_path / "a", check=False)
        took = time.monotonic() - t
    finally:
        stop_server(proc)
    err = proc.stderr.read()
    assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr
    assert took < 20, f"the client waited {took:.0f} s"
    assert "Traceback" not in err and "cannot store nar/" in err and "No space left on device" in err, err
