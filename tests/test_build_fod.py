"""Fixed-output derivations: builtin fetchurl (http, file), hash checks, network only for FODs."""

from __future__ import annotations

import hashlib
import base64
import http.server
import json
import threading

import pytest

from test_build import build, expr, needs_sandbox, open_store  # noqa: F401 - fixtures

pytestmark = needs_sandbox

PAYLOAD = b"fetched content\n"
SRI = "sha256-" + base64.b64encode(hashlib.sha256(PAYLOAD).digest()).decode()


@pytest.fixture
def http_server():
    """A real HTTP server on 127.0.0.1 serving PAYLOAD at /file.txt (404 elsewhere)."""
    hits = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path == "/file.txt":
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                self.wfile.write(PAYLOAD)
            else:
                self.send_error(404)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()
    srv.server_close()


def test_builtin_fetchurl_over_http(pure, expr, tmp_path, store_root, http_server):
    url, hits = http_server
    f = expr(f'default = fetchurl(url="{url}/file.txt", hash="{SRI}")\n')
    p = build(pure, tmp_path, f)
    out = p.stdout.strip()
    assert (store_root / out.lstrip("/")).read_bytes() == PAYLOAD
    assert hits == ["/file.txt"]
    info = json.loads(pure("store", "path-info", "--json", out).stdout)[0]
    assert info["ca"].startswith("fixed:sha256:") and info["references"] == []
    st = open_store(store_root)
    try:
        from purestore.store import events
        b = events.query_builds(st)[0]
        assert b["fixed_output"] and b["network"] and b["status"] == "built"
    finally:
        st.close()


def test_builtin_fetchurl_file_url(pure, expr, tmp_path, store_root):
    src = tmp_path / "local.txt"
    src.write_bytes(PAYLOAD)
    f = expr(f'default = fetchurl(url="file://{src}", hash="{SRI}", name="local")\n')
    out = build(pure, tmp_path, f).stdout.strip()
    assert (store_root / out.lstrip("/")).read_bytes() == PAYLOAD


def test_fetchurl_wrong_hash_registers_nothing_and_shows_both_hashes(pure, expr, tmp_path, store_root, http_server):
    url, _ = http_server
    wrong = "sha256-" + base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    f = expr(f'default = fetchurl(url="{url}/file.txt", hash="{wrong}")\n')
    p = build(pure, tmp_path, f, check=False)
    assert p.returncode == 1
    assert "hash mismatch" in p.stderr and wrong in p.stderr and SRI in p.stderr
    st = open_store(store_root)
    try:
        assert [x for x in st.valid_paths() if x.name == "file.txt"] == []
    finally:
        st.close()


def test_fetchurl_404_fails_cleanly(pure, expr, tmp_path, http_server):
    url, _ = http_server
    f = expr(f'default = fetchurl(url="{url}/missing", hash="{SRI}")\n')
    p = build(pure, tmp_path, f, check=False)
    assert p.returncode == 1 and "could not download" in p.stderr and "404" in p.stderr
    assert "Traceback" not in p.stderr


def test_sandboxed_fod_gets_network_and_hash_is_checked(pure, expr, tmp_path, store_root, http_server):
    url, hits = http_server
    port = url.rsplit(":", 1)[1]
    # busybox nc speaks HTTP well enough; strip the headers
    script = (f"printf 'GET /file.txt HTTP/1.0\\\\r\\\\n\\\\r\\\\n' | $B nc 127.0.0.1 {port} > /build/resp; "
              "$B sed '1,/^\\\\r$/d' /build/resp > $out")
    f = expr(f'''\
fod = sh("netfod", "{script}", outputHash="{SRI}", outputHashAlgo="", outputHashMode="flat")
nonfod = sh("netplain", "{script}; [ -s $out ] || exit 9")
''')
    p = build(pure, tmp_path, f, "-A", "fod")
    assert (store_root / p.stdout.strip().lstrip("/")).read_bytes() == PAYLOAD
    n = len(hits)
    p = build(pure, tmp_path, f, "-A", "nonfod", check=False)
    assert p.returncode == 1 and len(hits) == n  # the plain derivation never reached the server


def test_sandboxed_fod_with_wrong_output_registers_nothing(pure, expr, tmp_path, store_root):
    f = expr(f'default = sh("fodwrong", "echo not-it > $out", outputHash="{SRI}", outputHashAlgo="", '
             f'outputHashMode="flat")\n')
    p = build(pure, tmp_path, f, check=False)
    assert p.returncode == 1 and "specified: " + SRI in p.stderr and "got: sha256-" in p.stderr
    st = open_store(store_root)
    try:
        assert [x for x in st.valid_paths() if x.name == "fodwrong"] == []
    finally:
        st.close()


@pytest.fixture
def raw_http_server():
    """A TCP server on 127.0.0.1 that answers every request with the bytes set in
    ``reply[0]`` and closes the connection: malformed HTTP, which http.server cannot send."""
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    reply = [b""]
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                c.recv(65536)
                c.sendall(reply[0])
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}", reply
    stop.set()
    srv.close()
    t.join(5)


@pytest.mark.parametrize("response, said", [
    (b"garbage garbage\r\n\r\n", "malformed HTTP response (BadStatusLine: 'garbage garbage"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + PAYLOAD,
     f"the connection ended before the end of the download ({1000 - len(PAYLOAD)} more bytes were expected)"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + PAYLOAD,
     "the connection ended before the end of the download"),
], ids=["bad status line", "body shorter than its length", "bad chunk"])
def test_fetchurl_of_a_malformed_response_is_a_download_error(pure, expr, tmp_path, store_root, raw_http_server,
                                                              response, said):
    """A malformed HTTP response was a traceback from http.client (BadStatusLine, IncompleteRead)
    that ended the whole build; a body cut short of its Content-Length was taken as complete,
    then called a hash mismatch with a hint to declare the truncated file's hash."""
    url, reply = raw_http_server
    reply[0] = response
    f = expr(f'default = fetchurl(url="{url}/file.txt", hash="{SRI}")\n')
    p = build(pure, tmp_path, f, check=False)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and "hash mismatch" not in p.stderr
    assert f"could not download file.txt:\n  {url}/file.txt: {said}" in p.stderr
    st = open_store(store_root)
    try:
        assert [x for x in st.valid_paths() if x.name == "file.txt"] == []
    finally:
        st.close()


@pytest.fixture
def stalling_http_server():
    """A real HTTP server on 127.0.0.1 that answers with headers and the first bytes of a body,
    then sends nothing more until the test ends; ``started`` is set once it has answered,
    ``closed`` once the client has closed that connection (its process ended)."""
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    started, closed, stop = threading.Event(), threading.Event(), threading.Event()
    conns = []

    def serve():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                return
            conns.append(c)
            c.recv(65536)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + PAYLOAD)
            started.set()
            try:
                while c.recv(65536):
                    pass
            except OSError:
                pass
            closed.set()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}", started, closed
    stop.set()
    srv.shutdown(socket.SHUT_RDWR)  # (wakes the accept)
    srv.close()
    for c in conns:
        c.close()
    t.join(5)


@pytest.mark.parametrize("limit, said", [
    ("--timeout", "timed out after 1 second (setting timeout)"),
    ("--max-silent-time", "timed out after 1 second of silence (setting max-silent-time)"),
])
def test_build_limits_bound_a_builtin_fetch(pure, expr, tmp_path, store_root, stalling_http_server, limit, said):
    """`timeout` and `max-silent-time` end a builtin:fetchurl whose server stalls, as they end a
    sandboxed builder, with the same error (they did not apply to builtin builders: the fetch
    waited for the socket's own 60 s timeout, and a server trickling bytes held it forever)."""
    url, _, _ = stalling_http_server
    f = expr(f'default = fetchurl(url="{url}/file.txt", hash="{SRI}")\n')
    p = pure(limit, "1", "build", f, cwd=tmp_path, check=False, timeout=50)
    assert p.returncode == 1, p.stderr
    assert "error: builder for /pure/store/" in p.stderr and f"-file.txt.drv {said}" in p.stderr
    assert f"> downloading '{url}/file.txt'..." in p.stderr  # the log's tail, as for any builder
    assert "Traceback" not in p.stderr
    st = open_store(store_root)
    try:
        assert [x for x in st.valid_paths() if x.name == "file.txt"] == []
        assert events_status(st) == ["failed"]
        assert st.verify(check_contents=True).ok
    finally:
        st.close()


def events_status(st):
    from purestore.store import events
    return [b["status"] for b in events.query_builds(st)]


def test_interrupting_a_stalled_builtin_fetch_ends_it_at_once(expr, tmp_path, store_root, stalling_http_server):
    """SIGINT while builtin:fetchurl waits on a stalled server: `pure build` exits 130 at once,
    the fetch ended and recorded as interrupted (it waited for the fetch's 60 s socket timeout)."""
    import signal
    import subprocess
    import sys
    from conftest import pure_env
    url, started, _ = stalling_http_server
    f = expr(f'default = fetchurl(url="{url}/file.txt", hash="{SRI}")\n')
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "build", str(f)], cwd=tmp_path,
                            env=pure_env(store_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert started.wait(30), "the fetch never reached the server"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    st = open_store(store_root)
    try:
        assert events_status(st) == ["interrupted"]
        assert st.verify(check_contents=True).ok
    finally:
        st.close()


def test_a_builtin_fetch_dies_with_a_killed_pure(expr, tmp_path, store_root, stalling_http_server):
    """`pure build` killed outright (SIGKILL) while builtin:fetchurl waits on a stalled server: the
    fetch ends with it (its connection closes), as a sandboxed builder does."""
    import signal
    import subprocess
    import sys
    from conftest import pure_env
    url, started, closed = stalling_http_server
    f = expr(f'default = fetchurl(url="{url}/file.txt", hash="{SRI}")\n')
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "build", str(f)], cwd=tmp_path,
                            env=pure_env(store_root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert started.wait(30), "the fetch never reached the server"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert closed.wait(30), "the fetch went on after pure was killed"
