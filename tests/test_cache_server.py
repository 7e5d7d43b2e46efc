"""`pure cache serve` (purestore/cache/server.py) against clients that misbehave or that a plain
client library would not be: raw HTTP/1.x over trio sockets to an in-process server, with its
timeouts made short."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import trio

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
