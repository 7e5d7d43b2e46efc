"""A small HTTP/1.1 client for binary caches: trio streams, h11 for the protocol, a keep-alive pool.

Why not a general-purpose client: substituting many small paths is a stream of tiny GETs
(``<hash>.narinfo``, then a NAR of a few hundred bytes), and the per-request bookkeeping of a
general client (its pool scans every connection for every request) cost more CPU than the
transfers.  A cache needs little: GET, HEAD and PUT against one origin, ``Content-Length`` or
chunked bodies, no redirects, no cookies, no proxies.

:class:`HttpClient` keeps up to ``max_connections`` connections to its origin.  A request takes
an idle connection (most recently used first, dropping any the server has closed meanwhile) or
opens one.  A request on a reused connection that fails before any byte of the response arrived
is retried once on a fresh connection when it can be replayed (GET, HEAD, or a PUT of bytes):
servers close idle keep-alive connections whenever they like.

Timeouts: ``connect_timeout`` for the TCP (and TLS) connect; ``stall_timeout`` for every wait
for bytes from the server, so a server that stops sending fails the request however large the
body.  Errors raised: :class:`ConnectFailed`, :class:`Stalled`, :class:`Broken` (all
:class:`HttpError`); callers turn them into their own messages.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from typing import AsyncIterable, AsyncIterator, Callable

import attrs
import h11
import trio

RECEIVE = 1 << 20  # bytes asked of the socket per read
FRESH = 1.0  # seconds an idle connection is trusted without checking it is still open
EARLY_ANSWER_WAIT = 2.0  # seconds to wait for the answer of a server that broke off an upload


class HttpError(Exception):
    """A request failed below HTTP (no status to report)."""


class ConnectFailed(HttpError):
    pass


class Stalled(HttpError):
    """No byte came (or could be sent) for ``stall_timeout`` seconds.  ``unanswered``: the
    server had not begun its response (not even its status line): it did not answer at all."""

    def __init__(self, message: str, *, unanswered: bool = False):
        super().__init__(message)
        self.unanswered = unanswered


class Broken(HttpError):
    """The connection broke or the server spoke malformed HTTP."""


class NotHttp(HttpError):
    """The server's answer is not an HTTP response (another protocol, garbage)."""


class TooLarge(HttpError):
    """A body read whole went past the limit the caller set."""


@attrs.define
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value


class _Conn:
    __slots__ = ("stream", "h", "socket", "received", "idle_since", "first_bytes")

    def __init__(self, stream: trio.abc.Stream, socket):
        self.stream = stream
        self.socket = socket
        self.h = h11.Connection(h11.CLIENT)
        self.received = 0  # bytes read from the server so far
        self.first_bytes = b""  # the first few of them (a TLS record instead of HTTP?)
        self.idle_since = 0.0

    def reusable(self) -> bool:
        return self.h.our_state is h11.DONE and self.h.their_state is h11.DONE

    def server_hung_up(self) -> bool:
        """An idle connection with something to read has been closed by the server (or is
        out of step with it): either way it must not carry another request."""
        try:
            return self.socket.is_readable()
        except OSError:
            return True


_RETRYABLE = (Broken, trio.BrokenResourceError, trio.ClosedResourceError)


class _NothingReceived(Exception):
    """A request on a reused connection failed before any response byte (may be retried)."""

    def __init__(self, cause: BaseException):
        self.cause = cause


class HttpClient:
    """Requests to one origin (``scheme://host:port``) over pooled HTTP/1.1 connections."""

    def __init__(self, scheme: str, host: str, port: int, *, connect_timeout: float = 10,
                 stall_timeout: float = 30, max_connections: int = 16,
                 headers: dict[str, str] | None = None, ssl_context: ssl.SSLContext | None = None):
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        self.scheme, self.host, self.port = scheme, host, port
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self._limit = trio.Semaphore(max_connections)
        self._idle: list[_Conn] = []
        self._ssl = ssl_context  # https: the system's trusted CAs unless given
        default_port = 443 if scheme == "https" else 80
        hosthdr = f"[{host}]" if ":" in host else host
        self._host_header = (hosthdr if port == default_port else f"{hosthdr}:{port}").encode()
        self.host_header = self._host_header.decode()  # what requests send as Host (signers need it)
        self._headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self._closed = False
        self.answered = False  # a response has come (on any connection)

    # -- connections ------------------------------------------------------------------------

    async def _connect(self) -> _Conn:
        try:
            with trio.fail_after(self.connect_timeout):
                if self.scheme == "https":
                    if self._ssl is None:
                        self._ssl = ssl.create_default_context()
                    stream = await trio.open_ssl_over_tcp_stream(
                        self.host, self.port, ssl_context=self._ssl, https_compatible=True)
                    await stream.do_handshake()
                    sock = stream.transport_stream.socket
                else:
                    stream = await trio.open_tcp_stream(self.host, self.port)
                    sock = stream.socket
        except trio.TooSlowError:
            raise ConnectFailed(f"no connection within {self.connect_timeout:g} s") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as e:
            raise ConnectFailed(_describe(e)) from e
        return _Conn(stream, sock)

    def _take_idle(self) -> _Conn | None:
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()
            # A server does not drop a connection it used a moment ago: skip the poll then (a
            # lost race is retried anyway, see stream()).
            if now - conn.idle_since < FRESH or not conn.server_hung_up():
                return conn
            _close_now(conn)
        return None

    def _release(self, conn: _Conn) -> None:
        if not self._closed and conn.reusable():
            try:
                conn.h.start_next_cycle()
            except h11.LocalProtocolError:
                _close_now(conn)
                return
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            _close_now(conn)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            _close_now(conn)

    # -- requests ---------------------------------------------------------------------------

    async def _receive_event(self, conn: _Conn):
        h = conn.h
        while True:
            state = h.their_state
            try:
                ev = h.next_event()
            except h11.RemoteProtocolError as e:
                if h.trailing_data[1]:  # the server hung up
                    what = "a response" if state is h11.SEND_RESPONSE else "the whole body"
                    raise Broken(f"server closed the connection before sending {what}"
                                 f"{self._tls_hint(conn, state)}") from e
                if state is h11.SEND_RESPONSE:  # not a word of HTTP: asking again will not mend it
                    raise NotHttp(f"the answer is not HTTP ({_h11_words(e)}){self._tls_hint(conn, state)}") from e
                raise Broken(_h11_words(e)) from e
            if ev is not h11.NEED_DATA:
                return ev
            try:
                with trio.fail_after(self.stall_timeout):
                    data = await conn.stream.receive_some(RECEIVE)
            except trio.TooSlowError:
                if state is h11.SEND_RESPONSE:
                    raise Stalled(f"no answer within {self.stall_timeout:g} s", unanswered=True) from None
                raise Stalled(f"no data for {self.stall_timeout:g} s") from None
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as e:
                raise Broken(f"{_describe(e)}{self._tls_hint(conn, state)}") from e
            if conn.received < 3:
                conn.first_bytes += data[:3 - conn.received]
            conn.received += len(data)
            try:
                h.receive_data(data)  # b"" is the end of the stream
            except h11.RemoteProtocolError as e:
                raise Broken(f"{_h11_words(e)}{self._tls_hint(conn, state)}") from e

    def _tls_hint(self, conn: _Conn, state) -> str:
        """What to add when plain HTTP got no response at all, or a TLS record for one: the
        usual cause is an ``http://`` URL for an https server (which hangs up, as hypercorn
        does, or answers with a TLS alert)."""
        if self.scheme != "http" or state is not h11.SEND_RESPONSE or self.answered:
            return ""  # (a server that answered plain HTTP before is not an https one)
        first = conn.first_bytes
        if first and not (first[:1] in (b"\x15", b"\x16") and first[1:2] == b"\x03"):
            return ""
        return "; if it serves https, the URL must start with https://"

    async def _send(self, conn: _Conn, data: bytes) -> None:
        try:
            with trio.fail_after(self.stall_timeout):
                await conn.stream.send_all(data)
        except trio.TooSlowError:
            raise Stalled(f"could not send for {self.stall_timeout:g} s") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as e:
            raise Broken(_describe(e)) from e

    async def _exchange(self, conn: _Conn, reused: bool, method: str, target: str,
                        headers: list, body) -> Response:
        """Send the request and read the response head."""
        h = conn.h
        start = conn.received
        try:
            head = h.send(h11.Request(method=method, target=target,
                                      headers=[(b"host", self._host_header), *self._headers, *headers]))
            if body is None:
                await self._send(conn, head + h.send(h11.EndOfMessage()))
            else:
                try:
                    if isinstance(body, (bytes, bytearray, memoryview)):
                        await self._send(conn, head + h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage()))
                    else:
                        await self._send(conn, head)
                        async for chunk in body:
                            await self._send(conn, h.send(h11.Data(data=chunk)))
                        await self._send(conn, h.send(h11.EndOfMessage()))
                except Broken:
                    early = await self._early_response(conn)
                    if early is None:
                        raise
                    return early
            ev = await self._receive_event(conn)
        except h11.LocalProtocolError as e:
            raise Broken(f"request not sent: {e}") from e
        except _RETRYABLE as e:
            if reused and conn.received == start:
                raise _NothingReceived(e) from e
            raise
        except NotHttp as e:  # on a reused connection: maybe bytes left over from before
            if reused:
                raise _NothingReceived(e) from e
            raise
        while isinstance(ev, h11.InformationalResponse):  # 100 Continue and the like
            ev = await self._receive_event(conn)
        if isinstance(ev, h11.ConnectionClosed):
            if reused and conn.received == start:
                raise _NothingReceived(Broken("server closed the connection"))
            raise Broken("server closed the connection without a response")
        if not isinstance(ev, h11.Response):
            raise Broken(f"unexpected {type(ev).__name__} instead of a response")
        self.answered = True
        return _response(ev)

    async def _early_response(self, conn: _Conn) -> Response | None:
        """The answer a server sent before it closed the connection on a request body it did
        not want (401 or 405 for an upload, say), if it can still be read; else None.  The
        connection is not reused afterwards (the request was never sent whole)."""
        try:
            with trio.move_on_after(min(self.stall_timeout, EARLY_ANSWER_WAIT)):
                ev = await self._receive_event(conn)
                while isinstance(ev, h11.InformationalResponse):
                    ev = await self._receive_event(conn)
                if isinstance(ev, h11.Response):
                    return _response(ev)
        except (*_RETRYABLE, Stalled):
            pass
        return None

    @contextlib.asynccontextmanager
    async def stream(self, method: str, target: str, *, headers: dict[str, str] | None = None,
                     body: bytes | AsyncIterable[bytes] | Callable[[], AsyncIterable[bytes]] | None = None
                     ) -> AsyncIterator[tuple[Response, AsyncIterator[bytes]]]:
        """Make a request; yield the response head and an iterator over the body's chunks.

        The connection returns to the pool when the body was read to its end; leaving early
        closes it.  ``target`` is the path (and query), already percent-encoded.  ``body``: a
        stream is read once; a function that makes the stream afresh lets a request whose
        reused connection turned out closed be sent again on another (an HTTP/1.1 server may
        close an idle connection at any moment).
        """
        hdrs = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        replayable = body is None or callable(body) or isinstance(body, (bytes, bytearray, memoryview))
        async with self._limit:
            conn: _Conn | None = None
            try:
                while True:
                    reused = False
                    conn = self._take_idle()
                    if conn is None:
                        conn = await self._connect()
                    else:
                        reused = True
                    this_body = body() if callable(body) else body
                    try:
                        resp = await self._exchange(conn, reused, method, target, hdrs, this_body)
                    except _NothingReceived as e:
                        _close_now(conn)
                        conn = None
                        if not replayable:
                            raise e.cause from None
                        continue  # the next round takes another idle one or connects afresh
                    finally:
                        if this_body is not body and hasattr(this_body, "aclose"):
                            await this_body.aclose()  # (an async generator: its file is closed)
                    break
                yield resp, self._body(conn)
            finally:
                if conn is not None:
                    self._release(conn)

    async def _body(self, conn: _Conn) -> AsyncIterator[bytes]:
        while True:
            ev = await self._receive_event(conn)
            if isinstance(ev, h11.Data):
                yield bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return
            elif isinstance(ev, h11.ConnectionClosed):
                raise Broken("server closed the connection in the middle of the body")

    async def request(self, method: str, target: str, *, headers: dict[str, str] | None = None,
                      body: bytes | AsyncIterable[bytes] | Callable[[], AsyncIterable[bytes]] | None = None,
                      limit: int | None = None) -> tuple[Response, bytes]:
        """Make a request and read the whole response body: :class:`TooLarge` past ``limit``
        bytes (a server sending without end must not fill the memory)."""
        async with self.stream(method, target, headers=headers, body=body) as (resp, chunks):
            parts, size = [], 0
            async for c in chunks:
                size += len(c)
                if limit is not None and size > limit:
                    raise TooLarge(f"the answer is longer than {limit} bytes")
                parts.append(c)
        return resp, b"".join(parts)


def _h11_words(e: h11.RemoteProtocolError) -> str:
    """h11's message without Python's reprs: ``illegal status line: bytearray(b'X')`` →
    ``illegal status line: b'X'`` (at most 80 characters of it)."""
    text = re.sub(r"bytearray\((b(['\"]).*?\2)\)", r"\1", str(e))
    return text if len(text) <= 80 else text[:77] + "..."


def _response(ev: h11.Response) -> Response:
    return Response(ev.status_code, ev.reason.decode("latin-1", "replace"),
                    {k.decode("latin-1"): v.decode("latin-1") for k, v in ev.headers})


def _describe(e: BaseException) -> str:
    for x in (e, e.__cause__):  # trio raises BrokenResourceError from the ssl module's error
        if isinstance(x, ssl.SSLCertVerificationError):
            return f"TLS certificate verify failed: {x.verify_message}"
        if isinstance(x, ssl.SSLError):
            return f"TLS: {ssl_message(x)}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    cause = e.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(e) or type(e).__name__


def ssl_message(e: ssl.SSLError) -> str:
    """OpenSSL's words for ``e``, without the library tag and the source line:
    ``[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found (_ssl.c:4154)`` → ``no
    certificate or crl found``."""
    text = e.strerror or str(e)
    return re.sub(r"^\[[^]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", text) or text


def _close_now(conn: _Conn) -> None:
    """Close without waiting (no TLS goodbye: the connection is being abandoned)."""
    try:
        conn.socket.close()
    except OSError:
        pass
