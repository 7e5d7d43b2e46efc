"""A cache written by `pure copy` served by a plain static web server (nginx, where installed)
is substituted by purestore (and by Nix, where installed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import HAVE_NIX, run_pure
from test_cache_support import PUB, SEC, nix_copy_from, open_store, pushed_closure

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nginx(tmp_path, request):
    """nginx serving tmp_path/cache read-only on 127.0.0.1 (single process, no daemon); with an
    indirect parameter, these directives added to its server block, or with "tls" (which needs
    openssl), over https with a new self-signed certificate, tmp_path/nginx/cert.pem, or with
    "redirect", NARs only from a second server on another port, where the first redirects."""
    extra = getattr(request, "param", "")
    cache = tmp_path / "cache"
    cache.mkdir()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    tls = extra == "tls"
    if tls:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed")
        key, cert = prefix / "key.pem", prefix / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
        extra = f"ssl_certificate {cert}; ssl_certificate_key {key};"
    # nginx is given ports found free; another process may take one before nginx binds it.  nginx
    # then exits (after 2 s of retrying), and is started again on other ports.  Its pid file is
    # written once it listens: the one answering on the port is this nginx, not another program.
    pidfile = prefix / "nginx.pid"
    for _attempt in range(5):
        proc, port = _start_nginx(prefix, cache, extra, tls)
        while not pidfile.exists() and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is None:
            break
        said = proc.stderr.read().decode() + (prefix / "error.log").read_text()
        if "Address already in use" not in said:
            raise AssertionError(f"nginx failed: {said}")
    else:
        raise AssertionError("nginx found each of the ports given to it taken")
    yield cache, f"{'https' if tls else 'http'}://127.0.0.1:{port}/"
    proc.terminate()
    proc.wait(10)


def _start_nginx(prefix, cache, extra: str, tls: bool):
    port = free_port()
    listen, second = f"127.0.0.1:{port}", ""
    if extra == "redirect":
        port2 = free_port()
        second = f"server {{ listen 127.0.0.1:{port2}; root {cache}; }}"
        extra = f"location /nar/ {{ return 302 http://127.0.0.1:{port2}$request_uri; }}"
    if tls:
        listen += " ssl"
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ text/x-nix-narinfo narinfo; }}
    default_type application/octet-stream;
    server {{
        listen {listen};
        root {cache};
        {extra}
    }}
    {second}
}}
""")
    (prefix / "error.log").write_text("")
    return subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf)], stderr=subprocess.PIPE), port


def test_cache_served_by_nginx_is_substituted(tmp_path, nginx):
    cache, url = nginx
    store_dir, app_p = pushed_closure(tmp_path, cache)
    out = run_pure("copy", "--json", "--from", url, "--trusted-public-keys", PUB, app_p,
                   root=tmp_path / "b", store_dir=store_dir)
    assert len(json.loads(out.stdout)["fetched"]) == 2
    run_pure("store", "verify", "--check-contents", root=tmp_path / "b", store_dir=store_dir)
    if HAVE_NIX:
        nix_copy_from(tmp_path, url, app_p, check=True)


async def test_a_download_from_nginx_cut_half_way_resumes_with_a_range(tmp_path, nginx, monkeypatch):
    """nginx answers the resume of a broken big NAR download (``Range: bytes=N-``) with 206."""
    import trio
    from purestore.cache import http_backend
    from test_cache_retry import CuttingProxy, fetch_all
    from test_cache_support import make_path
    monkeypatch.setattr(http_backend, "RETRY_DELAY", 0.01)
    cache, url = nginx
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    with open_store(tmp_path / "a") as store:
        big = make_path(store, "big", {"blob": os.urandom(3 << 20)})
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", key, store.print_path(big),
             root=tmp_path / "a")
    proxy = CuttingProxy(int(url.rstrip("/").rsplit(":", 1)[1]))
    async with trio.open_nursery() as n:
        await n.start(proxy.run)
        rep, _root = await fetch_all(tmp_path, proxy, [big], attempts=2)
        n.cancel_scope.cancel()
    assert rep.fetched == [big] and proxy.resumed()


@pytest.mark.parametrize("nginx", ["auth_basic cache; auth_basic_user_file users;"], indirect=True)
def test_a_private_cache_behind_nginx_is_read_with_the_netrc_login(tmp_path, nginx):
    """nginx asks for a login (basic authentication); `pure copy --from` gives the one in the
    netrc file of the netrc-file setting, and so does Nix with the same file."""
    cache, url = nginx
    (tmp_path / "nginx" / "users").write_text("alice:{PLAIN}s3cret\n")
    store_dir, app_p = pushed_closure(tmp_path, cache)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password s3cret\n")
    conf = tmp_path / "pure.conf"

    conf.write_text(f"netrc-file = {tmp_path / 'nowhere'}\n")
    r = run_pure("copy", "--from", url, "--trusted-public-keys", PUB, app_p, root=tmp_path / "b",
                 store_dir=store_dir, env={"PURE_CONFIG": str(conf)}, check=False)
    assert r.returncode == 1
    assert (f"HTTP 401 Unauthorized (the cache wants a login: put 'machine 127.0.0.1 login NAME password "
            f"SECRET' in {tmp_path / 'nowhere'}, the netrc-file setting)") in r.stderr

    conf.write_text(f"netrc-file = {netrc}\n")
    out = run_pure("copy", "--json", "--from", url, "--trusted-public-keys", PUB, app_p, root=tmp_path / "b",
                   store_dir=store_dir, env={"PURE_CONFIG": str(conf)})
    assert len(json.loads(out.stdout)["fetched"]) == 2
    run_pure("store", "verify", "--check-contents", root=tmp_path / "b", store_dir=store_dir)
    if HAVE_NIX:
        p = nix_copy_from(tmp_path, url, app_p)
        assert p.returncode != 0  # Nix 2.8 says only "... does not appear to be a binary cache"
        nix_copy_from(tmp_path, url, app_p, "--option", "netrc-file", str(netrc), check=True)


@pytest.mark.parametrize("nginx", ["tls"], indirect=True)
def test_an_https_cache_with_its_own_ca_is_read_with_ssl_cert_file(tmp_path, nginx):
    """Over TLS the cache's certificate is checked: against the system's CAs by default (a
    self-signed one fails, saying what to do), or against the ssl-cert-file setting's."""
    cache, url = nginx
    assert url.startswith("https://")
    store_dir, app_p = pushed_closure(tmp_path, cache)
    conf = tmp_path / "pure.conf"
    cert = tmp_path / "nginx" / "cert.pem"

    def copy_from(check=True):
        return run_pure("copy", "--json", "--from", url, "--trusted-public-keys", PUB, app_p, root=tmp_path / "b",
                        store_dir=store_dir, env={"PURE_CONFIG": str(conf)}, check=check)

    conf.write_text("")
    r = copy_from(check=False)
    assert r.returncode == 1
    assert ("cannot connect (TLS certificate verify failed: self-signed certificate) (a cache with a certificate "
            "of its own CA needs that CA's certificate in a file named by the ssl-cert-file setting)") in r.stderr
    conf.write_text(f"ssl-cert-file = {tmp_path / 'nowhere.pem'}\n")
    r = copy_from(check=False)
    assert r.returncode == 1
    assert f"CA certificate file '{tmp_path / 'nowhere.pem'}' (ssl-cert-file) does not exist" in r.stderr
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    conf.write_text(f"ssl-cert-file = {tmp_path / 'junk.pem'}\n")
    r = copy_from(check=False)
    assert r.returncode == 1
    assert f"cannot load CA certificates from '{tmp_path / 'junk.pem'}' (ssl-cert-file)" in r.stderr

    conf.write_text(f"ssl-cert-file = {cert}\n")
    # the certificate is for 127.0.0.1: asked by another name, the CA is not the trouble
    r = run_pure("copy", "--from", url.replace("127.0.0.1", "localhost"), "--trusted-public-keys", PUB, app_p,
                 root=tmp_path / "b", store_dir=store_dir, env={"PURE_CONFIG": str(conf)}, check=False)
    assert r.returncode == 1
    assert "(TLS certificate verify failed: Hostname mismatch, certificate is not valid for 'localhost'.)\n" in r.stderr
    assert len(json.loads(copy_from().stdout)["fetched"]) == 2
    run_pure("store", "verify", "--check-contents", root=tmp_path / "b", store_dir=store_dir)
    if HAVE_NIX:
        # Nix 2.8 takes the CA file from NIX_SSL_CERT_FILE only (its ssl-cert-file setting is not used)
        nix_copy_from(tmp_path, url, app_p, env={"NIX_SSL_CERT_FILE": str(cert)}, check=True)


@pytest.mark.parametrize("nginx", ["redirect"], indirect=True)
def test_nars_behind_a_redirect_to_another_server_are_fetched(tmp_path, nginx):
    """The cache's server sends every NAR request elsewhere (302), as caches that hand downloads
    to a CDN or an object store do; pure follows, as Nix does."""
    cache, url = nginx
    store_dir, app_p = pushed_closure(tmp_path, cache)
    out = run_pure("copy", "--json", "--from", url, "--trusted-public-keys", PUB, app_p, root=tmp_path / "b",
                   store_dir=store_dir)
    assert len(json.loads(out.stdout)["fetched"]) == 2
    run_pure("store", "verify", "--check-contents", root=tmp_path / "b", store_dir=store_dir)
    if HAVE_NIX:
        nix_copy_from(tmp_path, url, app_p, check=True)
