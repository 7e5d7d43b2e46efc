"""The HTTP plumbing both cache servers share (``pure cache serve``, :mod:`.server`, and
``pure store serve``, :mod:`.store_server`), on ASGI.

- :func:`asgi_app` wraps a request handler into the ASGI application (the lifespan protocol,
  and an access log line per request in nginx's "combined" format, :func:`access_logger`);
- :func:`respond` sends a whole short answer; :func:`presented_token` and :func:`read_check`
  judge a request's bearer token or basic password (:data:`CHALLENGE` asks for one);
- :func:`parse_range` reads a ``Range`` header;
- :func:`until_disconnect` and :func:`send_end` stream a big body so that a client that
  leaves before the end of it was handed over is seen gone (logged 499), and one that had every
  byte is not.

Where and how a server listens (address, TLS, hypercorn) is :mod:`.listen`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import math

import trio

from ..errors import CacheError


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _log_time(t: float) -> str:
    """``[26/Nov/2026:23:54:19 +0000]``, in local time and whatever the locale."""
    import time
    lt = time.localtime(t)
    off = lt.tm_gmtoff // 60
    return (f"[{lt.tm_mday:02d}/{_MONTHS[lt.tm_mon - 1]}/{lt.tm_year}:{lt.tm_hour:02d}:{lt.tm_min:02d}:"
            f"{lt.tm_sec:02d} {'+' if off >= 0 else '-'}{abs(off) // 60:02d}{abs(off) % 60:02d}]")


def _quoted(b: bytes) -> str:
    """A request field for a log line: latin-1, with quotes, backslashes and control
    characters escaped (a client cannot forge or break a line)."""
    out = []
    for ch in b.decode("latin-1"):
        out.append(f"\\x{ord(ch):02x}" if ch in '"\\' or ord(ch) < 32 or ord(ch) == 127 else ch)
    return "".join(out)


class _Logged:
    """Wraps an ASGI ``send`` to see the status and count the body bytes of the response."""

    def __init__(self, send):
        self._send = send
        self.status: int | None = None
        self.sent = 0
        self.done = False  # the whole response was handed to the server
        self.failed = False  # the handler raised

    async def __call__(self, message) -> None:
        kind = message["type"]
        body = message.get("body", b"")
        last = kind == "http.response.body" and not message.get("more_body", False)
        if last and not body:
            # nothing left to send (a HEAD, an empty body): the client has the whole response,
            # and may close the connection before the server is told it ended
            self.done = True
        await self._send(message)
        if kind == "http.response.start":
            self.status = message["status"]
        elif kind == "http.response.body":
            self.sent += len(body)
            self.done = last


def _access_line(scope, logged: _Logged, t: float) -> str:
    client = scope.get("client")
    host = client[0] if client else "-"
    path = scope.get("raw_path") or scope["path"].encode("latin-1", "replace")
    if scope.get("query_string"):
        path += b"?" + scope["query_string"]
    headers = dict(scope["headers"])
    status = logged.status
    if not logged.done:
        # 499: the client went away before the whole response was sent (nginx's code for it);
        # 500: the server failed before it could answer (the client gets hypercorn's 500)
        status = 500 if logged.failed and status is None else 499
    return (f'{host} - - {_log_time(t)} "{scope["method"]} {_quoted(path)} HTTP/{scope.get("http_version", "1.1")}" '
            f'{status} {logged.sent} "{_quoted(headers.get(b"referer", b"-"))}" '
            f'"{_quoted(headers.get(b"user-agent", b"-"))}"')


async def respond(send, status: int, body: bytes = b"", headers=(), head=False) -> None:
    """Send a whole short response (``head``: its headers only)."""
    hdrs = [(b"content-length", str(len(body)).encode()), (b"content-type", b"text/plain")]
    hdrs.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": b"" if head else body})


def presented_token(scope) -> bytes:
    """The token a request carries: ``Authorization: Bearer TOKEN``, or HTTP basic
    authentication with the token as the password (Nix 2.8 can only send a netrc login);
    ``b""`` without either."""
    auth = dict(scope["headers"]).get(b"authorization", b"")
    scheme, _, value = auth.partition(b" ")
    scheme = scheme.lower()
    if scheme == b"bearer":
        return value.strip()
    if scheme == b"basic":
        try:
            return base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return b""
    return b""


# (pure's client keeps the last of repeated headers: Bearer, for its hint about token files)
CHALLENGE = [(b"www-authenticate", b'Basic realm="pure cache"'), (b"www-authenticate", b"Bearer")]


def read_check(read_token: str | None, *others: str | None):
    """The check of a request's token for reads: None when anyone may read (no ``read_token``),
    else a function of the ASGI scope, true for the read token or one of ``others`` (as a
    bearer token or a basic password; compared with all of them: the time taken says
    nothing)."""
    if not read_token:
        return None
    readers = [t.encode() for t in (read_token, *others) if t]

    def may_read(scope) -> bool:
        given = presented_token(scope)
        ok = False
        for r in readers:
            ok |= hmac.compare_digest(given, r)
        return ok and bool(given)
    return may_read


def _origin_form(scope):
    """``scope`` with the path of a request whose target is in absolute form (``GET
    http://host/nix-cache-info``, as sent to a proxy), which a server must accept (RFC 9112,
    3.2.2): the handlers take the path of the URL, not the URL as a file name."""
    raw = scope.get("raw_path") or b""
    scheme, sep, rest = raw.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return scope
    import urllib.parse
    path = b"/" + rest.partition(b"/")[2]
    return {**scope, "raw_path": path, "path": urllib.parse.unquote(path.decode("ascii", "replace"))}


def asgi_app(handle, access_log: logging.Logger | None = None):
    """The ASGI application around ``handle(scope, receive, send)``, which gets HTTP requests
    only: answers the lifespan protocol, and with ``access_log`` logs a line per request in
    nginx's "combined" format once its response is sent (status 499 when the client went away
    first)."""

    async def lifespan(receive, send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return
        asked = _origin_form(scope)  # (the log shows the request as it came)
        if access_log is None:
            return await handle(asked, receive, send)
        import time
        t = time.time()
        logged = _Logged(send)
        try:
            await handle(asked, receive, logged)
        except BaseException:
            logged.failed = True
            raise
        finally:
            access_log.info(_access_line(scope, logged, t))

    return app


def _digits(s: str) -> bool:
    """ASCII digits only: ``"²".isdigit()`` is true, and ``int("²")`` raises."""
    return s.isascii() and s.isdigit()


MAX_RANGE_DIGITS = 20  # a byte position of more digits than 2**64 has is no file's


def parse_range(value: bytes | None, size: int) -> tuple[int, int] | None | str:
    """``Range`` header → (first, last) byte to send; None: send the whole file (no header, or a
    form this server does not do: several ranges, suffix ranges, other units, or a position of
    more than :data:`MAX_RANGE_DIGITS` digits); "unsatisfiable" when the range starts at or
    beyond the end."""
    if value is None:
        return None
    unit, _, spec = value.decode("latin-1").strip().partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or not dash or "," in spec or not _digits(first) \
            or not (last == "" or _digits(last)) or max(len(first), len(last)) > MAX_RANGE_DIGITS:
        return None
    a = int(first)
    b = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < a:
        return None  # invalid: ignored
    if a >= size:
        return "unsatisfiable"
    return a, b


LAST = 64 << 10  # bytes at a body's end sent on their own (see send_end)


async def send_end(send, data: bytes) -> bool:
    """Send ``data``, the end of a body streamed under :func:`until_disconnect`; True when its
    last :data:`LAST` bytes were handed to the server before the client was seen gone: the
    response is whole (a client that has every byte may close at once, as curl does, before the
    server is told the body ended); False when it was seen gone first (499, as for a client
    that leaves earlier in the body).

    The server (hypercorn) writes to the socket what it is given, or drops it without a word
    once the client has gone, and says so only through ``receive``, which the watch reads.  So:
    the bytes before the last :data:`LAST` go as any others; then a checkpoint, where a
    disconnect reported during them stops the response before the last bytes (their send is
    cancelled before it writes anything); then the last bytes, a small send that goes out at
    once to a client still reading, not cut short by the watch.  (A client that leaves with the
    last bytes already in the sockets' buffers cannot be told from one that read them: as in
    nginx, what was handed over counts.)"""
    if len(data) > LAST:
        await send({"type": "http.response.body", "body": data[:-LAST], "more_body": True})
        data = data[-LAST:]
        await trio.lowlevel.checkpoint()
    with trio.CancelScope(shield=True):
        await send({"type": "http.response.body", "body": data, "more_body": True})
    # (under until_disconnect, a client seen gone has cancelled this task's scope: no deadline
    # left.  No scheduling round more here: one let curl's close after a whole download be seen
    # first for 15 % of 80 downloads, against none without)
    return trio.current_effective_deadline() != -math.inf


async def until_disconnect(receive, sending) -> bool:
    """``await sending()`` (the rest of a response but its end, which the caller sends when
    this returns False), stopped when the client goes away; True if it did.

    The server takes the body of a response whose client has gone and drops it without a
    word: a big file was read to its end for nobody, and logged as sent whole.  The request
    (without a body: a GET) has been read, so ``receive`` has nothing more to say than the
    disconnect."""
    gone = False
    async with trio.open_nursery() as n:
        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            n.cancel_scope.cancel()
        n.start_soon(watch)
        await sending()
        n.cancel_scope.cancel()
    return gone


def access_logger(target: str) -> logging.Logger:
    """A logger writing one line per request in the Common Log Format with the referrer and
    user agent (what nginx and Apache call "combined") to ``target``: a file (appended to) or
    ``-`` (stdout).  Raises :class:`CacheError` when the file cannot be opened."""
    import sys
    logger = logging.getLogger("purestore.cache.server.access")
    try:
        handler = logging.StreamHandler(sys.stdout) if target == "-" else logging.FileHandler(target)
    except OSError as e:
        raise CacheError(f"cannot open access log {target!r}: {e.strerror}") from e
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger
