"""The caches' HTTP/1.1 client (purestore/cache/http.py) against real sockets on 127.0.0.1:
keep-alive reuse, a server that drops idle connections, chunked bodies, stalls, truncation,
refused connections; and against the cache server (hypercorn)."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest
import trio

from conftest import closed_port
from purestore.cache.http import Broken, ConnectFailed, HttpClient, NotHttp, Stalled
from purestore.cache.server import serve_cache
from test_cache_support import read_http_request


class Scripted:
    """A raw TCP server answering each request with ``respond(request_bytes)``: bytes to send,
    None to close the connection without answering, or an async ``out(stream)`` that answers
    itself (returning False: close the connection after).  Counts connections and requests."""

    def __init__(self, respond, *, close_after: int | None = None):
        self.respond = respond
        self.close_after = close_after  # close each connection after this many responses
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream):
        self.connections += 1
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                await self._serve(stream)

    async def _serve(self, stream):
        buf = b""
        served = 0
        while True:
            got = await read_http_request(stream, buf)
            if got is None:
                return
            head, body, buf = got
            self.requests.append(head + b"\r\n\r\n" + body)
            out = self.respond(head + b"\r\n\r\n" + body)
            if out is None:
                return
            if callable(out):
                if await out(stream) is False:
                    return
            else:
                await stream.send_all(out)
            served += 1
            if self.close_after is not None and served >= self.close_after:
                return


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


async def with_server(server, fn):
    async with trio.open_nursery() as n:
        await n.start(server.run)
        try:
            await fn(server.port)
        finally:
            n.cancel_scope.cancel()


async def test_requests_reuse_one_keep_alive_connection():
    server = Scripted(lambda req: ok(b"hello " + req.split(b" ")[1]))

    async def go(port):
        c = HttpClient("http", "127.0.0.1", port, max_connections=4)
        for i in range(20):
            r, body = await c.request("GET", f"/x{i}")
            assert (r.status, body) == (200, f"hello /x{i}".encode())
        await c.aclose()
    await with_server(server, go)
    assert server.connections == 1 and len(server.requests) == 20
    assert b"host: 127.0.0.1:" in server.requests[0].lower()


async def test_parallel_requests_use_at_most_max_connections():
    async def slow(stream):
        await trio.sleep(0.05)
        await stream.send_all(ok(b"x"))
    server = Scripted(lambda req: slow)

    async def go(port):
        c = HttpClient("http", "127.0.0.1", port, max_connections=3)
        async with trio.open_nursery() as n:
            for i in range(12):
                n.start_soon(c.request, "GET", f"/{i}")
        await c.aclose()
    await with_server(server, go)
    assert server.connections == 3 and len(server.requests) == 12


async def test_a_connection_the_server_closed_while_idle_is_replaced():
    server = Scripted(lambda req: ok(b"fine"), close_after=1)

    async def go(port):
        c = HttpClient("http", "127.0.0.1", port)
        for _ in range(3):
            r, body = await c.request("GET", "/a")  # checked at once, within FRESH
            assert body == b"fine"
            await trio.sleep(0.05)
        await c.aclose()
    await with_server(server, go)
    assert server.connections == 3


async def test_a_reused_connection_closed_without_an_answer_is_retried_once():
    answered = []

    def respond(req):
        if len(answered) == 1 and not hasattr(respond, "dropped"):
            respond.dropped = True
            return None  # hang up instead of answering the second request
        answered.append(req)
        return ok(b"ok")
    server = Scripted(respond)

    async def go(port):
        c = HttpClient("http", "127.0.0.1", port)
        assert (await c.request("GET", "/1"))[1] == b"ok"
        assert (await c.request("GET", "/2"))[1] == b"ok"
        await c.aclose()
    await with_server(server, go)
    assert len(answered) == 2 and server.connections == 2


async def test_a_fresh_connection_closed_without_an_answer_is_an_error():
    server = Scripted(lambda req: None)

    async def go(port):
        c = HttpClient("http", "127.0.0.1", port)
        with pytest.raises(Broken, match="closed the connection"):
            await c.request("GET", "/x")
        await c.aclose()
    await with_server(server, go)


async def test_chunked_bodies_and_connection_close_responses():
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye"
    replies = iter([chunked, closing, ok(b"again")])
    server = Scripted(lambda req: next(replies))

    async def go(port):
        c = HttpClient("http", "127.0.0.1", port)
        assert (await c.request("GET", "/c"))[1] == b"hello world"
        assert (await c.request("GET", "/d"))[1] == b"bye"
        assert (await c.request("GET", "/e"))[1] == b"again"
        await c.aclose()
    await with_server(server, go)
    assert server.connections == 2  # the Connection: close reply ended the first one


async def test_a_truncated_body_is_broken_and_the_next_request_connects_afresh():
    replies = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", ok(b"whole")])
    server = Scripted(lambda req: next(replies), close_after=1)

    async def go(port):
        c = HttpClient("http", "127.0.0.1", port)
        with pytest.raises(Broken):
            await c.request("GET", "/t")
        assert (await c.request("GET", "/u"))[1] == b"whole"
        await c.aclose()
    await with_server(server, go)
    assert server.connections == 2


async def test_a_stalled_server_times_out_mid_body():
    async def stall(stream):
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await trio.sleep(30)
    server = Scripted(lambda req: stall)

    async def go(port):
        c = HttpClient("http", "127.0.0.1", port, stall_timeout=0.3)
        with trio.fail_after(10):
            async with c.stream("GET", "/s") as (r, body):
                assert r.status == 200
                with pytest.raises(Stalled):
                    async for _ in body:
                        pass
        await c.aclose()
    await with_server(server, go)


async def test_head_has_no_body_and_put_sends_an_async_body():
    def respond(req):
        if req.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
        return b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    server = Scripted(respond)

    async def body():
        for part in (b"abc", b"def"):
            yield part

    async def go(port):
        c = HttpClient("http", "127.0.0.1", port, headers={"Authorization": "Bearer t"})
        r, data = await c.request("HEAD", "/h")
        assert (r.status, r.headers["content-length"], data) == (200, "1234", b"")
        r, _ = await c.request("PUT", "/p", headers={"Content-Length": "6"}, body=body())
        assert r.status == 201
        await c.aclose()
    await with_server(server, go)
    assert server.connections == 1
    assert server.requests[1].endswith(b"\r\n\r\nabcdef")
    assert b"authorization: bearer t" in server.requests[1].lower()


async def test_refused_connection_is_connect_failed():
    with closed_port() as port:  # (held: a port released could be taken by another program)
        c = HttpClient("http", "127.0.0.1", port, connect_timeout=2)
        with pytest.raises(ConnectFailed):
            await c.request("GET", "/")


async def test_against_the_cache_server(tmp_path):
    (tmp_path / "nix-cache-info").write_text("StoreDir: /pure/store\n")
    (tmp_path / "nar").mkdir()
    big = bytes(range(256)) * 8192  # 2 MiB: streamed by the server in chunks
    (tmp_path / "nar" / "big.nar").write_bytes(big)
    async with trio.open_nursery() as n:
        (url,) = await n.start(lambda task_status: serve_cache(str(tmp_path), "127.0.0.1:0",
                                                               task_status=task_status))
        port = int(url.rsplit(":", 1)[1])
        c = HttpClient("http", "127.0.0.1", port)
        for _ in range(3):
            r, data = await c.request("GET", "/nix-cache-info")
            assert (r.status, data) == (200, b"StoreDir: /pure/store\n")
            r, data = await c.request("GET", "/nar/big.nar")
            assert data == big
            r, data = await c.request("GET", "/missing.narinfo")
            assert r.status == 404
        # neither a FIFO nor a directory in the cache is served, and neither hangs the server
        os.mkfifo(tmp_path / "fifo.narinfo")
        (tmp_path / "dir.narinfo").mkdir()
        with trio.fail_after(10):
            for name in ("fifo.narinfo", "dir.narinfo"):
                r, _ = await c.request("GET", "/" + name)
                assert r.status == 404
        await c.aclose()
        n.cancel_scope.cancel()


async def test_error_messages_say_what_the_server_did():
    replies = iter([None, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", b"garbage\r\n\r\n"])
    server = Scripted(lambda req: next(replies), close_after=1)

    async def go(port):
        c = HttpClient("http", "127.0.0.1", port)
        with pytest.raises(Broken, match="before sending a response"):
            await c.request("GET", "/1")
        with pytest.raises(Broken, match="before sending the whole body"):
            await c.request("GET", "/2")
        with pytest.raises(NotHttp, match=r"^the answer is not HTTP \(illegal status line: b'garbage'\)$"):
            await c.request("GET", "/3")
        await c.aclose()
    await with_server(server, go)


async def test_an_answer_sent_before_the_upload_ended_is_read():
    """A server that answers 401 to the head of a big upload and hangs up without reading the
    body: the client's sending breaks, and the client reports the server's answer, not the
    broken connection."""
    async def refuse(stream):
        await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n"
                              b"WWW-Authenticate: Bearer\r\n\r\nnope\n")
        return False  # closed with the body unread: the kernel resets the connection
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen = []

    async def handle(stream):
        async with stream:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(65536)
            seen.append(buf.split(b"\r\n", 1)[0])
            await refuse(stream)

    async def body():
        for _ in range(64):  # 32 MiB, far more than the sockets' buffers hold
            yield b"x" * (512 << 10)
            await trio.sleep(0)

    async with trio.open_nursery() as n:
        n.start_soon(trio.serve_listeners, handle, listeners)
        c = HttpClient("http", "127.0.0.1", port)
        with trio.fail_after(20):
            r, data = await c.request("PUT", "/nar/x.nar", headers={"Content-Length": str(32 << 20)}, body=body())
        assert (r.status, data) == (401, b"nope\n")
        assert seen == [b"PUT /nar/x.nar HTTP/1.1"]
        # the connection was not kept: the next request works on a new one
        r, _ = await c.request("PUT", "/y", headers={"Content-Length": "5"}, body=b"small")
        assert r.status == 401
        await c.aclose()
        n.cancel_scope.cancel()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_https_verifies_the_certificate(tmp_path):
    import ssl
    import subprocess

    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(stream):
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                more = await stream.receive_some(4096)
                if not more:
                    return
                data += more
            await stream.send_all(ok(b"secure"))
            await stream.receive_some(4096)
        except (trio.BrokenResourceError, ssl.SSLError):
            pass

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_ssl_over_tcp, handler, 0, server_ctx)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        c = HttpClient("https", "127.0.0.1", port, connect_timeout=5)
        with pytest.raises(ConnectFailed, match="certificate verify failed"):
            await c.request("GET", "/")  # self-signed: not trusted by default
        c = HttpClient("https", "127.0.0.1", port, connect_timeout=5,
                       ssl_context=ssl.create_default_context(cafile=str(cert)))
        for _ in range(2):
            r, body = await c.request("GET", "/")
            assert (r.status, body) == (200, b"secure")
        await c.aclose()
        n.cancel_scope.cancel()


async def test_a_file_read_whole_is_not_read_past_its_limit():
    """A server that sends a narinfo (or a small NAR) without end: the client stops at the
    limit for that kind of file and says so, instead of filling the memory."""
    from purestore.cache.backend import open_backend
    from purestore.cache.http_response import MAX_SMALL_FILE
    from purestore.errors import CacheError

    sent = {"bytes": 0}

    def respond(req):
        async def endless(stream):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"10000\r\n" + b"X" * 0x10000 + b"\r\n"
            while sent["bytes"] < 4 * MAX_SMALL_FILE:  # the test's own bound
                await stream.send_all(chunk)
                sent["bytes"] += 0x10000
            return False
        return endless

    server = Scripted(respond)

    async def check(port):
        async with open_backend(f"http://127.0.0.1:{port}/", attempts=3) as b:
            with pytest.raises(CacheError, match=r"cannot get 'x\.narinfo': the answer is longer than "
                                                 rf"{MAX_SMALL_FILE} bytes, too long for what it should be$"):
                await b.get("x.narinfo")
            assert sent["bytes"] < 2 * MAX_SMALL_FILE
            sent["bytes"] = 0
            with pytest.raises(CacheError, match=r"the answer is longer than 5000 bytes"):
                await b.get("nar/x.nar.zst", limit=5000)
            assert len(server.requests) == 2  # not retried
    await with_server(server, check)


async def test_a_streamed_upload_on_a_connection_the_server_closed_is_sent_again_on_another(tmp_path):
    """A server may close an idle keep-alive connection at any moment (here: right after each
    response, without saying so).  A NAR file uploaded as a stream is then sent again, from
    its start, on a new connection, without counting as a failed attempt."""
    from purestore.cache.backend import open_backend

    server = Scripted(lambda req: b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", close_after=1)
    files = []
    for i in range(6):
        f = tmp_path / f"n{i}.nar"
        f.write_bytes(os.urandom(300_000 + i))
        files.append(f)

    async def check(port):
        async with open_backend(f"http://127.0.0.1:{port}/", attempts=1) as b:
            for f in files:
                await b.put_file(f"nar/{f.name}", str(f))
        bodies = sorted(len(r.partition(b"\r\n\r\n")[2]) for r in server.requests if r.startswith(b"PUT"))
        assert bodies == sorted(f.stat().st_size for f in files)  # each whole, once
    await with_server(server, check)


async def test_an_answer_that_is_not_http_is_not_asked_again_and_is_quoted_plainly():
    """Garbage (another protocol) instead of a status line: one request, an error quoting the
    first bytes."""
    from purestore.cache.backend import open_backend
    from purestore.errors import CacheError

    answered = []

    def respond(req):
        if b"nix-cache-info" in req and not answered:
            answered.append(True)
            return ok(b"StoreDir: /pure/store\n")
        return b"THIS IS NOT HTTP\r\n\r\n"

    server = Scripted(respond, close_after=1)

    async def check(port):
        async with open_backend(f"http://127.0.0.1:{port}/", attempts=5) as b:
            b.retry_delay = 0.01
            assert await b.get("nix-cache-info") == b"StoreDir: /pure/store\n"
            with pytest.raises(CacheError) as e:
                await b.get("x.narinfo")
        assert str(e.value).endswith("cannot get 'x.narinfo': the answer is not HTTP "
                                     "(illegal status line: b'THIS IS NOT HTTP')"), str(e.value)
        assert len(server.requests) == 2
        async with open_backend(f"http://127.0.0.1:{port}/", attempts=5) as fresh:  # never answered
            with pytest.raises(CacheError, match=r"\(illegal status line: b'THIS IS NOT HTTP'\)$"):
                await fresh.get("nix-cache-info")  # (not a TLS record: no https hint)
    await with_server(server, check)


async def test_the_https_hint_is_only_for_a_server_that_never_answered_plain_http():
    """Plain http that gets no response at all may be an https server; one that answered a
    moment ago and then hangs up is not."""
    from purestore.cache.backend import open_backend
    from purestore.errors import CacheError

    first = []

    def respond(req):
        if not first:
            first.append(True)
            return ok(b"StoreDir: /pure/store\n")
        return None  # hang up without a word

    server = Scripted(respond, close_after=1)

    async def check(port):
        async with open_backend(f"http://127.0.0.1:{port}/", attempts=1) as b:
            await b.get("nix-cache-info")
            with pytest.raises(CacheError, match=r"before sending a response\)$"):
                await b.get("x.narinfo")
        async with open_backend(f"http://127.0.0.1:{port}/", attempts=1) as fresh:
            with pytest.raises(CacheError, match=r"if it serves https, the URL must start with https://\)$"):
                await fresh.get("nix-cache-info")
    await with_server(server, check)
