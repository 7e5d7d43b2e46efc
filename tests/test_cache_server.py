"""`pure cache serve` (purestore/cache/server.py) against clients that misbehave or that a plain
client library would not be: raw HTTP/1.x over trio sockets to an in-process server, with its
timeouts made short."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import trio
import trio.testing

from purestore.cache.server import make_app, run_app


@asynccontextmanager
async def serving(directory, **options):
    """Serve ``directory`` on 127.0.0.1 in this trio run (``options``: :func:`make_app`'s);
    yields the port."""
    app = make_app(str(directory), **options)
    async with trio.open_nursery() as n:
        (url,) = await n.start(lambda task_status: run_app(app, "127.0.0.1:0", task_status=task_status))
        yield int(url.rstrip("/").rsplit(":", 1)[1])
        n.cancel_scope.cancel()


async def exchange(port: int, request: bytes, *, within: float = 5) -> bytes:
    """Send ``request`` and read until the server closes the connection, which it must do
    ``within`` seconds (else :class:`trio.TooSlowError`)."""
    out = bytearray()
    with trio.fail_after(within):
        async with await trio.open_tcp_stream("127.0.0.1", port) as s:
            await s.send_all(request)
            while data := await s.receive_some(1 << 20):
                out += data
    return bytes(out)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def test_a_streamed_file_on_a_connection_to_close_is_sent_and_the_connection_closed(tmp_path):
    """A file big enough to be streamed (over 256 KiB), asked for over HTTP/1.0 or with
    `Connection: close`: the whole body, then the server closes the connection (it used to stay
    open for good, a descriptor lost per request)."""
    (tmp_path / "nar").mkdir()
    data = os.urandom(300 << 10)
    (tmp_path / "nar" / "x.nar").write_bytes(data)
    async with serving(tmp_path) as port:
        for request in (b"GET /nar/x.nar HTTP/1.0\r\n\r\n",
                        b"GET /nar/x.nar HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
            for _ in range(3):
                out = await exchange(port, request)
                assert status_of(out) == 200 and out.endswith(data)


async def test_a_range_with_a_huge_number_is_ignored_not_a_server_error(tmp_path):
    """A position of thousands of digits (past what int() converts) is a form the server does
    not do: the whole file, as for other malformed ranges; more than 20 digits likewise."""
    (tmp_path / "nix-cache-info").write_bytes(b"StoreDir: /pure/store\n")
    async with serving(tmp_path) as port:
        for rng in ("bytes=1" + "0" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=0-" + "9" * 21):
            out = await exchange(port, f"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nRange: {rng}\r\n"
                                       f"Connection: close\r\n\r\n".encode())
            assert status_of(out) == 200 and out.endswith(b"\r\n\r\nStoreDir: /pure/store\n"), rng


async def test_a_request_target_in_absolute_form_is_taken_by_its_path(tmp_path):
    """``GET http://host/nix-cache-info`` (the form a client sends to a proxy, which a server
    must accept too: RFC 9112, 3.2.2) gets the file, as nginx answers it; it got 400 "bad path".
    Its path is checked as any other: a way out of the directory is still refused."""
    (tmp_path / "nix-cache-info").write_bytes(b"StoreDir: /pure/store\n")
    (tmp_path / "nar").mkdir()
    (tmp_path / "nar" / "a+b.nar").write_bytes(b"nar")
    async with serving(tmp_path) as port:
        async def get(target: str, method: str = "GET") -> bytes:
            return await exchange(port, f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                  .encode())
        for target in (f"http://127.0.0.1:{port}/nix-cache-info", "HTTPS://cache.example/nix-cache-info?x=1"):
            out = await get(target)
            assert status_of(out) == 200 and out.endswith(b"\r\n\r\nStoreDir: /pure/store\n"), out
        assert status_of(await get("http://h/nix-cache-info", "HEAD")) == 200
        assert (await get("http://h/nar/a%2Bb.nar")).endswith(b"\r\n\r\nnar")
        assert status_of(await get("http://h/nar/%2e%2e/nix-cache-info")) == 400
        assert status_of(await get("http://h/missing")) == 404
        assert status_of(await get("http://h")) == 200  # the root: what the server is


TOKEN = "s3cret"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"


def put_request(name: str, headers: str = "", body: bytes = b"") -> bytes:
    return f"PUT /{name} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + body


async def test_an_upload_that_stalls_is_given_up_with_408(tmp_path):
    """A token holder's upload that sends nothing for the body timeout: 408, the connection
    closed, no file stored nor temporary file left (it used to wait for good)."""
    async with serving(tmp_path, upload_token=TOKEN, body_timeout=0.3) as port:
        out = await exchange(port, put_request("nar/x.nar", AUTH + "Content-Length: 1000000\r\n", b"x" * 1000))
    assert status_of(out) == 408
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


async def test_a_refused_upload_that_trickles_is_answered_and_closed(tmp_path):
    """Without the token (or without uploads), a body sent a byte at a time is not waited for:
    the answer, then the connection closed after the lingering time, though the client is still
    sending (descriptors were held for good by clients that never end their body)."""
    for token in (TOKEN, None):
        async with serving(tmp_path, upload_token=token, linger=0.3) as port:
            out = bytearray()
            with trio.fail_after(5):
                async with await trio.open_tcp_stream("127.0.0.1", port) as s:
                    await s.send_all(put_request("nar/x.nar", "Content-Length: 1000000000\r\n", b"x"))

                    async def trickle():
                        while True:
                            await trio.sleep(0.05)
                            await s.send_all(b"x")
                    async with trio.open_nursery() as n:
                        n.start_soon(trickle)
                        try:
                            while data := await s.receive_some(1 << 16):
                                out += data
                        except trio.BrokenResourceError:
                            pass
                        n.cancel_scope.cancel()
        assert status_of(out) == (401 if token else 405), out
        assert b"\r\nconnection: close\r\n" in out.lower()
    assert not list(tmp_path.rglob("*"))


async def test_a_refused_small_upload_keeps_the_connection_open(tmp_path):
    """A body within the first 64 KiB is read whole before the 401: the next request on the
    connection is answered."""
    (tmp_path / "nix-cache-info").write_bytes(b"StoreDir: /pure/store\n")
    async with serving(tmp_path, upload_token=TOKEN) as port:
        out = await exchange(port, put_request("x.narinfo", "Content-Length: 5\r\n", b"hello")
                             + b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(out) == 401 and out.endswith(b"StoreDir: /pure/store\n")
    assert not (tmp_path / "x.narinfo").exists()


async def test_an_upload_without_a_length_is_411_and_stores_nothing(tmp_path):
    """Neither Content-Length nor chunked: 411 Length Required (an empty file used to be stored
    with 201); with either, stored."""
    async with serving(tmp_path, upload_token=TOKEN) as port:
        out = await exchange(port, put_request("log/a", AUTH + "Connection: close\r\n"))
        assert status_of(out) == 411 and not (tmp_path / "log" / "a").exists()
        out = await exchange(port, put_request("log/a", AUTH + "Connection: close\r\nContent-Length: 2\r\n", b"ok"))
        assert status_of(out) == 201 and (tmp_path / "log" / "a").read_bytes() == b"ok"
        out = await exchange(port, put_request("log/b", AUTH + "Connection: close\r\nTransfer-Encoding: chunked\r\n",
                                               b"2\r\nok\r\n0\r\n\r\n"))
        assert status_of(out) == 201 and (tmp_path / "log" / "b").read_bytes() == b"ok"


async def test_uploads_waiting_for_a_prune_do_not_stall_downloads(tmp_path):
    """While a prune holds the cache's lock, 45 uploads wait to be put in place (more than the
    40 threads of trio's default pool, which also reads big files): a download of a big file is
    still sent at once, and the uploads are stored when the lock is released."""
    import fcntl
    from purestore.cache.prune import open_dir_lock

    (tmp_path / "nar").mkdir()
    data = os.urandom(600 << 10)
    (tmp_path / "nar" / "big.nar").write_bytes(data)
    uploads = 45
    async with serving(tmp_path, upload_token=TOKEN) as port:
        lock = open_dir_lock(str(tmp_path))
        fcntl.flock(lock, fcntl.LOCK_EX)  # what `pure cache prune` holds
        try:
            async with trio.open_nursery() as n:
                answers = []

                async def upload(i):
                    answers.append(await exchange(port, put_request(
                        f"log/l{i}", AUTH + "Connection: close\r\nContent-Length: 3\r\n", b"abc"), within=30))
                for i in range(uploads):
                    n.start_soon(upload, i)
                with trio.fail_after(10):  # every upload received and waiting for the lock
                    while len(list((tmp_path / "log").glob(".tmp-upload-*"))) < uploads:
                        await trio.sleep(0.01)
                    await trio.testing.wait_all_tasks_blocked(0.1)
                out = await exchange(port, b"GET /nar/big.nar HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                     within=5)
                assert status_of(out) == 200 and out.endswith(data)
                assert not answers
                fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)
    assert len(answers) == uploads and all(status_of(a) == 201 for a in answers)
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == sorted(f"l{i}" for i in range(uploads))


async def test_names_and_methods_the_server_does_not_take_get_4xx_not_500(tmp_path):
    """A name over 255 bytes: 404 to read, 400 to write; an upload onto a directory, or under
    a file: 409; OPTIONS, TRACE, CONNECT (whatever their target): 405 with Allow (these were
    500s with a traceback, or 400 "bad path")."""
    (tmp_path / "nix-cache-info").write_bytes(b"StoreDir: /pure/store\n")
    (tmp_path / "nar").mkdir()
    long = "a" * 300
    async with serving(tmp_path, upload_token=TOKEN) as port:
        async def status(request: bytes) -> int:
            out = await exchange(port, request)
            if status_of(out) == 405:
                assert b"\r\nallow: GET, HEAD, PUT\r\n" in out, out
            return status_of(out)

        async def put(name: str) -> int:
            return await status(put_request(name, AUTH + "Connection: close\r\nContent-Length: 5\r\n", b"hello"))
        assert await status(f"GET /nar/{long} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()) == 404
        assert await status(f"HEAD /{long}/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()) == 404
        assert await put(f"log/{long}") == 400
        assert await put(f"{long}/x") == 400
        assert await put("nar") == 409
        assert await put("nix-cache-info/x") == 409
        assert await put("nix-cache-info/x/y") == 409
        for request in (b"OPTIONS * HTTP/1.1", b"TRACE / HTTP/1.1", b"CONNECT 127.0.0.1:22 HTTP/1.1",
                        b"DELETE /nix-cache-info HTTP/1.1", b"POST /log/x HTTP/1.1"):
            assert await status(request + b"\r\nHost: x\r\nConnection: close\r\n\r\n") == 405, request
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["nar", "nix-cache-info"]


async def test_uploads_do_not_follow_links_out_of_the_cache(tmp_path, caplog):
    """A symbolic link in the served directory that leads out of it is not written through
    (403, logged): only one at the top named as a cache directory of its own (`nar`, `log`,
    ...), which its owner made to keep those files elsewhere, and links that stay inside."""
    cache, outside, nars = tmp_path / "cache", tmp_path / "outside", tmp_path / "nars"
    for d in (cache / "log", cache / "real", outside, nars):
        d.mkdir(parents=True)
    (cache / "linkdir").symlink_to(outside)
    (cache / "log" / "deep").symlink_to(outside)
    (cache / "nar").symlink_to(nars)
    (cache / "alias").symlink_to("real")
    (cache / "nix-cache-info").symlink_to(outside / "info")  # a file, not a directory: replaced
    async with serving(cache, upload_token=TOKEN) as port:
        async def put(name: str, body: bytes = b"ok") -> int:
            return status_of(await exchange(port, put_request(
                name, AUTH + f"Connection: close\r\nContent-Length: {len(body)}\r\n", body)))
        assert await put("linkdir/x") == 403
        assert await put("linkdir/sub/x") == 403
        assert await put("log/deep/x") == 403
        assert await put("nar/x.nar") == 201
        assert await put("alias/x") == 201
        assert await put("nix-cache-info", b"StoreDir: /pure/store\n") == 201
    assert not list(outside.iterdir())
    assert (nars / "x.nar").read_bytes() == (cache / "real" / "x").read_bytes() == b"ok"
    assert not (cache / "nix-cache-info").is_symlink()
    assert caplog.text.count("a symbolic link takes its directory out of") == 3


async def _get_while_the_client_leaves(tmp_path, leaves, *, after: bool = False):
    """Serve a 600 KiB file (one chunk) through ``_get`` to a client that goes away while the
    send for which ``leaves(messages so far, data)`` is true is under way (``after``: just after
    that send returned); returns (messages, data).  The send is hypercorn's as the server sees
    it: one made after the watch saw the client gone is stopped before it writes anything, and
    one under way is not cut short (hypercorn writes to the socket shielded, and drops what it
    cannot send without a word)."""
    from purestore.cache.server import _get, respond
    data = os.urandom(600 << 10)
    (tmp_path / "x.nar").write_bytes(data)
    msgs = []
    gone = trio.Event()

    async def send(m):
        await trio.lowlevel.checkpoint_if_cancelled()  # (hypercorn's send lock)
        msgs.append(m)
        if not gone.is_set() and leaves(msgs, data):
            if after:
                gone.set()
                return
            with trio.CancelScope(shield=True):
                gone.set()
                await trio.sleep(0.1)  # the disconnect is seen while this send is under way

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}
    await _get(send, str(tmp_path / "x.nar"), "x.nar", head=False, respond=respond, receive=receive)
    return msgs, data


def _handed_over(msgs, data) -> bool:
    return sum(len(m.get("body", b"")) for m in msgs) == len(data)


async def test_a_download_the_client_has_whole_is_logged_as_sent_not_499(tmp_path):
    """A client that has every byte of a streamed file (its Content-Length) may close before the
    server sends the end of the response: that is a whole response, so the end is still given
    to the server (which drops it), and the access log says 200 with the size.  Most such
    downloads were logged 499 by curl's timing while the client had it all.  Here the client
    goes as soon as the server has handed over the last bytes."""
    msgs, data = await _get_while_the_client_leaves(tmp_path, _handed_over, after=True)
    assert msgs[-1] == {"type": "http.response.body", "body": b""}
    assert b"".join(m.get("body", b"") for m in msgs) == data


async def test_a_client_that_leaves_during_the_last_bytes_is_not_logged_as_sent(tmp_path):
    """A client seen gone while the server hands over the last 64 KiB of the body did not have
    them all: no end of the response, so the log says 499, as for a client that leaves earlier
    (it said 200: a disconnect during the last send was taken for a client that had it all)."""
    from purestore.cache.http_server import LAST
    msgs, data = await _get_while_the_client_leaves(tmp_path, _handed_over)
    bodies = [m for m in msgs if m["type"] == "http.response.body"]
    assert [len(m["body"]) for m in bodies] == [len(data) - LAST, LAST]  # no end


async def test_a_client_that_leaves_during_a_file_s_one_chunk_is_not_logged_as_sent(tmp_path):
    """A file of one chunk (under 1 MiB) whose client leaves while the server sends all but its
    last 64 KiB: those are not sent, nor the end of the response, so the log says 499 (it said
    200: the last bytes counted as sent once their send was begun, even when the watch had
    stopped it before it wrote anything)."""
    from purestore.cache.http_server import LAST
    msgs, data = await _get_while_the_client_leaves(
        tmp_path, lambda msgs, data: msgs[-1]["type"] == "http.response.body" and msgs[-1]["body"])
    bodies = [m for m in msgs if m["type"] == "http.response.body"]
    assert [len(m["body"]) for m in bodies] == [len(data) - LAST], [len(m["body"]) for m in bodies]


async def test_a_small_upload_is_written_without_a_thread_hop_a_big_one_s_rest_in_threads(tmp_path, monkeypatch):
    """A narinfo or a small NAR (most of what a push of small paths sends) is written in the
    event loop, into a directory that is there: each upload made three thread hops (the
    directory, the body, the rename into place), and the server, at one core's full use,
    limited a push of 2000 small paths (8.3 s of its CPU; 6.4-7.2 s with one).  Past the
    first 256 KiB a big NAR's writes go to worker threads (they may wait for the disk); only
    the rename into place (which may wait for a prune's lock) is always in one."""
    from purestore.cache import server_upload
    hops: list[str] = []
    run_sync = trio.to_thread.run_sync

    async def counting(fn, *args, **kw):
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await run_sync(fn, *args, **kw)
    monkeypatch.setattr(server_upload.trio.to_thread, "run_sync", counting)
    (tmp_path / "nar").mkdir()
    big = os.urandom(server_upload.SMALL_UPLOAD + (300 << 10))
    async with serving(tmp_path, upload_token=TOKEN) as port:
        out = await exchange(port, put_request("nar/small.nar", AUTH + "Connection: close\r\nContent-Length: 5\r\n",
                                               b"small"))
        assert status_of(out) == 201 and hops == ["_publish"]
        hops.clear()
        out = await exchange(port, put_request("log/x", AUTH + "Connection: close\r\nContent-Length: 2\r\n", b"ok"))
        assert status_of(out) == 201 and hops == ["make_dirs", "_publish"]  # log/ made first
        hops.clear()
        out = await exchange(port, put_request("nar/big.nar", AUTH + f"Connection: close\r\nContent-Length: {len(big)}\r\n",
                                               big))
        assert status_of(out) == 201 and "write" in hops and hops[-1] == "_publish"
    assert (tmp_path / "nar" / "small.nar").read_bytes() == b"small"
    assert (tmp_path / "log" / "x").read_bytes() == b"ok"
    assert (tmp_path / "nar" / "big.nar").read_bytes() == big
    assert not list(tmp_path.rglob(".tmp-*"))


async def test_an_uploaded_nix_cache_info_must_be_one_for_the_cache_s_store_dir(tmp_path):
    """One upload of a `nix-cache-info` that is not one, or that names another store dir, used
    to be stored: every reader then refused the whole cache (its narinfos all name paths of
    the first dir).  It is refused (400, 409) and the file left as it was; one for the same
    dir replaces it, and a cache that has none, or one that cannot be read, takes any good one."""
    info = tmp_path / "nix-cache-info"
    info.write_bytes(b"StoreDir: /pure/store\n")

    async def put(body: bytes) -> bytes:
        return await exchange(port, put_request("nix-cache-info", AUTH + "Connection: close\r\n"
                                                f"Content-Length: {len(body)}\r\n", body))
    async with serving(tmp_path, upload_token=TOKEN) as port:
        for body, status, said in ((b"StoreDir: /nix/store\n", 409, b"this cache is for store dir '/pure/store'"),
                                   (b"\x28\xb5\x2f\xfd\x00garbage", 400, b"not a nix-cache-info"),
                                   (b"<html><body>hi</body></html>\n", 400, b"web page"),
                                   (b"Priority: 10\n", 400, b"no 'StoreDir' line"),
                                   (b"StoreDir: /pure/store\nPriority: x\n", 400, b"Priority must be a whole number")):
            out = await put(body)
            assert status_of(out) == status and said in out, out
            assert info.read_bytes() == b"StoreDir: /pure/store\n"
        assert status_of(await put(b"StoreDir: /pure/store\nPriority: 10\n")) == 201
        assert info.read_bytes() == b"StoreDir: /pure/store\nPriority: 10\n"
        info.write_bytes(b"\x00broken")
        assert status_of(await put(b"StoreDir: /nix/store\n")) == 201
        info.unlink()
        assert status_of(await put(b"StoreDir: /other/store\n")) == 201
        assert info.read_bytes() == b"StoreDir: /other/store\n"
    assert not list(tmp_path.glob(".tmp-*"))
