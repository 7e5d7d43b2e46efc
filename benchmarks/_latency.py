"""A TCP proxy on 127.0.0.1 that adds a fixed delay to everything it forwards, both ways.

Loopback has no latency, so a benchmark over it cannot show what parallel queries are for: a
binary cache is normally tens of milliseconds away.  Everything sent through the proxy arrives
``delay`` seconds later, in order, in each direction, so one request and its response take
``2 * delay`` longer, as over a link with that round-trip time (no bandwidth limit).  Opening a
connection costs no round trip here (the proxy accepts at once), which flatters a client that
opens many; both pure and Nix keep theirs alive.  Plain threads in the caller's process, two per
direction of each connection; forwarding a chunk costs them a few microseconds of CPU.

    with LatencyProxy(("127.0.0.1", 8080), delay=0.005) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/"
"""

from __future__ import annotations

import collections
import socket
import threading
import time


class _Pipe:
    """One direction of one connection: chunks read from ``src`` reach ``dst`` ``delay`` later."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float):
        self.src, self.dst, self.delay = src, dst, delay
        self.queue: collections.deque = collections.deque()  # (due time, bytes; b"" = end)
        self.ready = threading.Condition()
        for target in (self._read, self._write):
            threading.Thread(target=target, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.src.recv(1 << 16)
            except OSError:
                data = b""
            with self.ready:
                self.queue.append((time.monotonic() + self.delay, data))
                self.ready.notify()
            if not data:
                return

    def _write(self) -> None:
        while True:
            with self.ready:
                while not self.queue:
                    self.ready.wait()
                due, data = self.queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
            except OSError:
                return


class LatencyProxy:
    """Listen on a free port of 127.0.0.1 and forward each connection to ``upstream``."""

    def __init__(self, upstream: tuple[str, int], delay: float):
        self.upstream, self.delay = upstream, delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns += [client, server]
            _Pipe(client, server, self.delay)
            _Pipe(server, client, self.delay)

    def close(self) -> None:
        for s in (self._listener, *self._conns):  # shutdown wakes the threads blocked on them
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def __enter__(self) -> "LatencyProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
