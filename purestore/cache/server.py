"""``pure cache serve``: an HTTP/1.1 server for a binary cache directory (hypercorn on trio).

The cache is plain files, so any static web server can serve it too; this one adds nothing a
client depends on.  It answers:

- ``GET``/``HEAD`` of a file in the cache (``nix-cache-info``, ``*.narinfo``, ``nar/…``, ``log/…``,
  ``*.ls``), with ``Content-Length`` and a content type; 404 when absent; names that could leave
  the directory (``..``, hidden files, absolute) are refused with 400.  One byte range
  (``Range: bytes=N-`` or ``bytes=N-M``) gets ``206 Partial Content``: a client resumes a broken
  download that way; other range forms get the whole file, as RFC 9110 allows.
- ``PUT`` only when started with an upload token, and only with ``Authorization: Bearer TOKEN``
  (or HTTP basic authentication whose password is the token, any user name: what Nix sends
  from a netrc file);
  the body is written to a temporary file and renamed into place (under the directory's shared
  lock, which ``cache prune`` takes exclusively), so readers never see partial files.  Uploads
  never need a signing key: clients sign before they upload.
- With a read token (a private cache), ``GET``/``HEAD`` too only with that token (or the upload
  token), as a bearer token or a basic password; 401 otherwise.
- Over TLS when given a certificate and its key (``https://``).

:func:`make_app` returns the ASGI application; :func:`serve_cache` runs it (``task_status``
reports the bound URLs, which is how tests learn an ephemeral port).
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import logging
import os
import re
import stat
import tempfile

import trio

from ..errors import CacheError
from ._files import read_if_regular
from .backend import CHUNK, check_name, file_mode, make_dirs
from .prune import cache_lock, mark_used, narinfo_lock

log = logging.getLogger("purestore.cache.server")

MAX_UPLOAD = 1 << 40

_TYPES = {
    ".narinfo": b"text/x-nix-narinfo",
    ".ls": b"application/json",
    "nix-cache-info": b"text/x-nix-cache-info",
}


def _content_type(name: str) -> bytes:
    for suffix, t in _TYPES.items():
        if name.endswith(suffix):
            return t
    if name.startswith("log/"):
        return b"text/plain; charset=utf-8"
    return b"application/octet-stream"


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
        if access_log is None:
            return await handle(scope, receive, send)
        import time
        t = time.time()
        logged = _Logged(send)
        try:
            await handle(scope, receive, logged)
        except BaseException:
            logged.failed = True
            raise
        finally:
            access_log.info(_access_line(scope, logged, t))

    return app


BODY_TIMEOUT = 60.0  # seconds an upload may send nothing before it is given up (nginx's client_body_timeout)
LINGER = 5.0  # seconds the body of a refused upload is read for, before and after the answer
NAME_MAX = 255  # bytes of a file name (every Linux file system's limit)
PUBLISHERS = 4  # uploads put in place at once (each holds a thread while it waits for the cache's lock)


def make_app(directory: str, upload_token: str | None = None, read_token: str | None = None,
             access_log: logging.Logger | None = None, *, body_timeout: float = BODY_TIMEOUT,
             linger: float = LINGER):
    """The ASGI app serving ``directory`` (PUT allowed only when ``upload_token`` is set; reads
    only with ``read_token`` or ``upload_token`` when ``read_token`` is set).  ``access_log``
    gets a line per request (:func:`asgi_app`).  An upload that sends nothing for
    ``body_timeout`` seconds is given up (408); a refused one is answered and closed after at
    most twice ``linger`` seconds (:func:`_refuse`)."""
    directory = os.path.abspath(directory)
    token = upload_token.encode() if upload_token else None
    may_read = read_check(read_token, upload_token)
    # a thread of their own: uploads that wait for the cache's lock while `cache prune` holds
    # it would otherwise take all the threads of trio's default pool, which reads big files too
    publishing = trio.CapacityLimiter(PUBLISHERS)

    async def refuse(receive, send, status: int, message: bytes, headers=()) -> None:
        await _refuse(receive, send, status, message, headers, linger=linger)

    async def handle(scope, receive, send):
        method = scope["method"]
        name = scope["path"].lstrip("/")  # already percent-decoded by the server
        if method == "PUT":
            await upload(scope, receive, send, name)
            return
        if method not in ("GET", "HEAD"):
            await refuse(receive, send, 405, b"method not allowed\n",
                         [(b"allow", b"GET, HEAD, PUT" if token else b"GET, HEAD")])
            return
        head = method == "HEAD"
        if may_read is not None and not may_read(scope):
            await respond(send, 401, b"this cache needs a read token\n", CHALLENGE, head=head)
            return
        if name == "":
            await respond(send, 200, b"purestore binary cache\n", head=head)
            return
        try:
            check_name(name)
        except CacheError:
            await respond(send, 400, b"bad path\n", head=head)
            return
        rng = None
        for k, v in scope["headers"]:
            if k == b"range":
                rng = v
        await _get(send, os.path.join(directory, name), name, head=head, respond=respond, rng=rng, receive=receive)

    async def upload(scope, receive, send, name: str) -> None:
        if token is None:
            await refuse(receive, send, 405, b"uploads are disabled (start the server with an upload token)\n",
                         [(b"allow", b"GET, HEAD")])
            return
        if not hmac.compare_digest(presented_token(scope), token):
            await refuse(receive, send, 401, b"bad or missing upload token\n", CHALLENGE)
            return
        try:
            check_name(name)
        except CacheError:
            await refuse(receive, send, 400, b"bad path\n")
            return
        if any(len(os.fsencode(seg)) > NAME_MAX for seg in name.split("/")):
            await refuse(receive, send, 400, f"a name in {name} is over {NAME_MAX} bytes\n".encode())
            return
        if not _has_body(scope):
            # (without either, the request has no body: an empty file would be stored)
            await respond(send, 411, b"an upload needs Content-Length or chunked transfer encoding\n")
            return
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            await refuse(receive, send, 409, f"{name} is a directory\n".encode())
            return
        if not _may_write(directory, name):
            log.error("error: refused %s: a symbolic link takes its directory out of %r", name, directory)
            await refuse(receive, send, 403, f"{name}: a symbolic link takes its directory out of the cache\n"
                         .encode())
            return
        await _put(receive, send, directory, path, name, refuse=refuse, body_timeout=body_timeout,
                   publishing=publishing)

    return asgi_app(handle, access_log)


def _check_tls(cert: str, key: str) -> None:
    """Load the certificate and key as the server will, for an error that names them and says
    what is wrong with which (OpenSSL itself only says ``PEM lib``)."""
    import ssl

    def no_password():
        raise _EncryptedKey

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=no_password)
    except FileNotFoundError as e:
        raise CacheError(f"TLS certificate or key file {e.filename or cert!r} does not exist") from None
    except _EncryptedKey:
        raise CacheError(f"the TLS key {key!r} is encrypted with a passphrase; the server cannot ask for it",
                         hint=f"write it out unencrypted: openssl pkey -in {key} -out KEYFILE") from None
    except ssl.SSLError as e:
        raise CacheError(f"cannot use the TLS certificate {cert!r} with the key {key!r}: "
                         f"{_tls_problem(cert, key) or _tls_words(e)}",
                         hint="--tls-cert is a PEM certificate (chain), --tls-key its PEM private key") from None
    except OSError as e:
        raise CacheError(f"cannot read the TLS certificate {cert!r} or key {key!r}: {e.strerror or e}") from None


class _EncryptedKey(Exception):
    pass


def _tls_problem(cert: str, key: str) -> str | None:
    """Which file OpenSSL did not like, when it can be told from their PEM headers."""
    try:
        with open(cert, "rb") as f:
            cert_text = f.read(1 << 20)
        with open(key, "rb") as f:
            key_text = f.read(1 << 20)
    except OSError:
        return None
    if b"-----BEGIN CERTIFICATE-----" not in cert_text:
        return f"{cert!r} holds no PEM certificate (no '-----BEGIN CERTIFICATE-----' line)"
    if not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", key_text):
        return f"{key!r} holds no PEM private key (no '-----BEGIN … PRIVATE KEY-----' line)"
    return None


def _tls_words(e) -> str:
    from .http import ssl_message
    text = ssl_message(e)
    if "key values mismatch" in text:
        return "the key is not the certificate's (key values mismatch)"
    return text


SMALL_FILE = 1 << 18  # read in the event loop: a page-cache read is quicker than a thread hop


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


async def _get(send, path: str, name: str, *, head: bool, respond, rng: bytes | None = None,
               receive=None) -> None:
    try:
        # Opening and reading a small file from the page cache takes microseconds; doing it here
        # instead of in a worker thread roughly halves the cost of a narinfo request.
        # O_NONBLOCK: a FIFO planted in the cache directory must not hang the server.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG):
            await respond(send, 404, b"not found\n", head=head)
        else:
            await respond(send, 500, b"cannot read file\n", head=head)
        return
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        await respond(send, 404, b"not found\n", head=head)
        return
    if name.endswith(".narinfo") or name.startswith("nar/"):
        mark_used(path, fd)  # asked for: recent for `pure cache prune` (at most hourly)
    f = os.fdopen(fd, "rb")
    try:
        size = st.st_size
        part = parse_range(rng, size)
        if part == "unsatisfiable":
            await respond(send, 416, b"range not satisfiable\n", [(b"content-range", b"bytes */%d" % size)],
                          head=head)
            return
        start = {"type": "http.response.start", "status": 200, "headers": [
            (b"content-length", str(size).encode()), (b"content-type", _content_type(name)),
            (b"accept-ranges", b"bytes"),
        ]}
        offset, length, whole = 0, size, not isinstance(part, tuple)
        if not whole:
            offset, length = part[0], part[1] - part[0] + 1
            start["status"] = 206
            start["headers"][0] = (b"content-length", str(length).encode())
            start["headers"].append((b"content-range", b"bytes %d-%d/%d" % (part[0], part[1], size)))
            f.seek(offset)
        if head:
            await send(start)
            await send({"type": "http.response.body", "body": b""})
            return
        if length <= SMALL_FILE:
            data = f.read(SMALL_FILE + 1 if whole else length)  # the whole file: one more to see growth
            if len(data) == length:
                await send(start)
                await send({"type": "http.response.body", "body": data})
                return
            f.seek(offset)  # changed under us: stream what is there now
            if whole:
                length = os.fstat(f.fileno()).st_size
                start["headers"][0] = (b"content-length", str(length).encode())
        await send(start)

        sent = 0

        async def stream() -> None:
            nonlocal sent
            while sent < length:
                data = await trio.to_thread.run_sync(f.read, min(CHUNK, length - sent))
                if not data:
                    break  # truncated meanwhile: the client sees a short body and refuses it
                for piece in last_apart(data, sent + len(data) == length):
                    sent += len(piece)  # (handed over: a client gone during this send may have it)
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
        # the end of the body is sent once the watch for a disconnect is over: on a connection
        # the server closes after this response (HTTP/1.0, "Connection: close"), the server says
        # the client is gone while it sends the end, and the watch would cancel that send half
        # way, before the server closed the connection: it then stayed open for good
        gone = False
        if receive is None:
            await stream()
        else:
            gone = await until_disconnect(receive, stream)
        if not gone or sent == length:
            # (a client that has every byte may close before it is told the end: the end is
            # then dropped by the server, and the response logged as sent, not as 499)
            await send({"type": "http.response.body", "body": b""})
    finally:
        f.close()


LAST = 64 << 10  # bytes of a body's end sent on their own (see last_apart)


def last_apart(data: bytes, last: bool) -> tuple[bytes, ...]:
    """``data`` as the pieces to send: the last :data:`LAST` bytes of a body apart from the
    rest.  A client that closes the moment it has every byte (curl does) may be seen gone while
    the server still sends; with a small last send, done at once, "gone during the last send"
    means it had the whole body (logged 200), and a client that left midway is seen gone during
    an earlier one (499)."""
    if not last or len(data) <= LAST:
        return (data,)
    return data[:-LAST], data[-LAST:]


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


class Refused(CacheError):
    """An upload the server does not take: answered with ``status`` and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _publish(directory: str, tmp: str, path: str, name: str) -> None:
    """Rename an uploaded file into place under the cache directory's shared lock, as a push
    into a directory does: a ``cache prune`` (which holds it exclusively from its plan to its
    last removal) never removes a file that an upload put back after it planned.

    A narinfo (``<hash>.narinfo``) is checked first (:func:`_check_and_merge_narinfo`): it must
    have what a reader needs (400), and when it is new, the NAR file it names must be here with
    its ``FileSize`` (a client uploads the NAR first; one that found the NAR present when it
    started may find it pruned since: it is told so, with 409, instead of leaving a narinfo
    without its NAR).  It keeps the signatures of the narinfo it replaces (for
    the same contents: two pushes or signings of one path at once keep both keys' signatures)."""
    with cache_lock(directory, exclusive=False):
        if name.endswith(".narinfo") and "/" not in name:
            with narinfo_lock(directory):
                _check_and_merge_narinfo(directory, tmp, path, name)
                os.chmod(tmp, file_mode())
                os.replace(tmp, path)
            return
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)


def _check_and_merge_narinfo(directory: str, tmp: str, path: str, name: str) -> None:
    """Refuse the narinfo uploaded to ``tmp`` (raise :class:`Refused`), or merge into it the
    signatures of the one at ``path`` it replaces.  Read leniently (any compression, any field
    Nix writes): only what a reader needs is checked."""
    from ..formats.narinfo import MAX_SIZE, first_fields, merge_sigs, narinfo_fields, same_contents
    with open(tmp, "rb") as f:
        data = f.read(MAX_SIZE + 1)
    if len(data) > MAX_SIZE:
        raise Refused(413, f"{name} is over {MAX_SIZE >> 20} MiB: not a narinfo")
    fields = narinfo_fields(data)
    first = first_fields(fields or [])
    if fields is None or not {b"StorePath", b"URL", b"NarHash", b"NarSize"} <= first.keys():
        raise Refused(400, f"{name} is not a narinfo ('Key: value' lines with StorePath, URL, "
                           f"NarHash and NarSize)")
    base = os.path.basename(first[b"StorePath"]).decode("utf-8", "replace")
    if base[:32] != name[:-len(".narinfo")] or base[32:33] != "-":
        raise Refused(400, f"{name} describes {first[b'StorePath'].decode('utf-8', 'replace')!r}, another path")
    url = first[b"URL"].decode("utf-8", "replace")
    try:
        nar = os.path.join(directory, check_name(url, name))
    except CacheError:
        raise Refused(400, f"{name}: its URL {url!r} points outside the cache") from None
    old = read_if_regular(path, MAX_SIZE)
    if not same_contents(fields, narinfo_fields(old) if old else None):
        # a new narinfo (not one signed again): its NAR must be here, as its client left it
        try:
            size: int | None = os.stat(nar).st_size
        except OSError:
            size = None
        want = first.get(b"FileSize", b"")
        want_size = int(want) if want.isascii() and want.isdigit() else None
        if size is None or (want_size is not None and size != want_size):
            raise Refused(409, f"its NAR {url} is "
                               f"{'not in the cache' if size is None else f'{size} bytes, not {want_size}'}"
                               f" (a push uploads it first; pruned since the push found it?): run the push again")
    if old is None:
        return
    merged = merge_sigs(data, old)
    if merged is not data:
        with open(tmp, "wb") as f:
            f.write(merged)


LAYOUT = ("nar", "log", "debuginfo", "realisations")  # a cache's own directories


def _may_write(directory: str, name: str) -> bool:
    """Whether an upload of ``name`` may go into the directory it names: with the symbolic
    links on the way resolved, that must be in the served ``directory``, or in what a link at
    its top named as one of the cache's own directories (:data:`LAYOUT`: its owner may keep the
    NARs on another disk) points to.  Any other link would let a client write anywhere the
    server may (reads follow links, as a static web server's do)."""
    parent = os.path.realpath(os.path.dirname(os.path.join(directory, name)))
    roots = [os.path.realpath(directory)]
    top, sep, _ = name.partition("/")
    if sep and top in LAYOUT:
        roots.append(os.path.realpath(os.path.join(directory, top)))
    return any(parent == r or parent.startswith(r.rstrip("/") + "/") for r in roots)


def _has_body(scope) -> bool:
    """Whether a request says how long its body is: ``Content-Length`` or chunked transfer
    encoding (the server has refused any other transfer encoding)."""
    return any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])


PEEK = 1 << 16  # bytes of a refused upload's body read before the answer


async def _refuse(receive, send, status: int, message: bytes, headers=(), *, linger: float) -> None:
    """Answer ``status`` to a request whose body is not wanted (a refused upload), reading
    little of that body: up to :data:`PEEK` bytes for up to ``linger`` seconds first.  A body
    read whole that way (a narinfo) leaves the connection open for the next request.  Else the
    answer says ``Connection: close``, and what the client still sends is read and dropped
    for up to ``linger`` seconds more before the connection is closed (nginx's "lingering
    close"): a server that closes a connection with bytes unread resets it, which can destroy
    its answer before the client reads it, and a client still sending a NAR of a few MB when
    the answer comes would see only a broken connection instead of, say, 401.  A client that
    sends slowly, or not at all, holds the connection no longer than that."""
    more, total = True, 0
    with trio.move_on_after(linger):
        while more and total <= PEEK:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            total += len(msg.get("body", b""))
            more = msg.get("more_body", False)
    if not more:
        await respond(send, status, message, headers)
        return
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-length", str(len(message)).encode()), (b"content-type", b"text/plain"), *headers,
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": message, "more_body": True})
    with trio.move_on_after(linger):  # the whole answer is out: the client may close at once
        while (msg := await receive())["type"] != "http.disconnect" and msg.get("more_body", False):
            pass
    await send({"type": "http.response.body", "body": b""})  # the server closes the connection


def _status_of(e: Exception) -> int:
    """The answer to an upload that the file system refused with ``e``: 409 where the name is
    taken by a directory or its directory by a file (``PUT /nar``, ``PUT /nix-cache-info/x``),
    400 for a name too long, else 500 (the server's trouble: a full disk, a read-only one)."""
    code = getattr(e, "errno", None)
    if code in (errno.EISDIR, errno.EEXIST, errno.ENOTDIR):
        return 409
    return 400 if code == errno.ENAMETOOLONG else 500


async def _put(receive, send, directory: str, path: str, name: str, *, refuse, body_timeout: float,
               publishing: trio.CapacityLimiter) -> None:
    parent = os.path.dirname(path)
    try:
        await trio.to_thread.run_sync(make_dirs, parent)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-upload-", dir=parent)
    except OSError as e:
        log.error("error: cannot store %s: cannot create a file in %r: %s", name, parent, e.strerror or e)
        await refuse(receive, send, _status_of(e), f"cannot create a file for {name}: {e.strerror or e}\n".encode())
        return
    ok = False
    try:
        complete = False  # the whole body received
        try:
            with os.fdopen(fd, "wb") as f:
                total = 0
                while True:
                    msg = None
                    with trio.move_on_after(body_timeout):
                        msg = await receive()
                    if msg is None:
                        log.error("error: upload of %s given up: nothing received for %g s (%d bytes so far)",
                                  name, body_timeout, total)
                        await respond(send, 408, b"nothing received for too long\n", [(b"connection", b"close")])
                        return
                    if msg["type"] == "http.disconnect":
                        return
                    body = msg.get("body", b"")
                    total += len(body)
                    if total > MAX_UPLOAD:
                        await refuse(receive, send, 413, b"upload too large\n")
                        return
                    complete = not msg.get("more_body", False)
                    if body:
                        await trio.to_thread.run_sync(f.write, body)
                    if complete:
                        break
        except OSError as e:  # the disk is full, or the file system failed: said, not a traceback
            log.error("error: cannot store %s: %s", name, e.strerror or e)
            message = f"cannot store {name}: {e.strerror or e}\n".encode()
            if complete:
                await respond(send, 500, message)
            else:
                await refuse(receive, send, 500, message)
            return
        try:
            await trio.to_thread.run_sync(_publish, directory, tmp, path, name, limiter=publishing)
        except Refused as e:
            log.error("error: refused %s: %s", name, e)
            await respond(send, e.status, f"{e}\n".encode())
            return
        except (OSError, CacheError) as e:
            log.error("error: cannot store %s: %s", name, getattr(e, "strerror", None) or e)
            await respond(send, _status_of(e), f"cannot store {name}: {getattr(e, 'strerror', None) or e}\n".encode())
            return
        ok = True
        log.info("stored %s (%d bytes)", name, total)
        await respond(send, 201, b"stored\n")
    finally:
        if not ok:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → (host, port); raise :class:`CacheError`."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not _digits(port):
        raise CacheError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    if host.startswith("["):
        host = host[1:-1] if host.endswith("]") else ""
    if not host or "[" in host or "]" in host:
        raise CacheError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080",
                         hint="an IPv6 address is written between '[' and ']': [::1]:8080")
    if int(port) > 65535:
        raise CacheError(f"--listen {listen!r}: port {int(port)} is out of range (0 to 65535)")
    return host, int(port)


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


async def serve_cache(directory: str, listen: str, *, upload_token: str | None = None,
                      read_token: str | None = None, tls: tuple[str, str] | None = None,
                      access_log: str | None = None,
                      task_status=trio.TASK_STATUS_IGNORED, shutdown_trigger=None) -> None:
    """Serve ``directory`` on ``listen`` until cancelled; ``task_status.started(urls)``.
    ``tls``: (certificate file, key file) to serve https.  ``access_log``: a file, or ``-``
    for stdout, that gets a line per request (:func:`access_logger`)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CacheError(f"cache directory {directory!r} is not a directory")
    if not os.path.isdir(directory):
        raise CacheError(f"cache directory {directory!r} does not exist",
                         hint="create it with 'pure copy --to file://DIR ...' first")
    check_listen_and_tls(listen, tls)  # before the access log is opened
    app = make_app(directory, upload_token, read_token,
                   access_log=access_logger(access_log) if access_log else None)
    await run_app(app, listen, tls=tls, task_status=task_status, shutdown_trigger=shutdown_trigger)


def check_listen_and_tls(listen: str, tls: tuple[str, str] | None) -> None:
    """Raise :class:`CacheError` for an address or a TLS certificate and key that cannot be used."""
    parse_listen(listen)
    if tls:
        _check_tls(*tls)


async def run_app(app, listen: str, *, tls: tuple[str, str] | None = None,
                  task_status=trio.TASK_STATUS_IGNORED, shutdown_trigger=None) -> None:
    """Run the ASGI ``app`` with hypercorn on ``listen`` (``HOST:PORT``) until cancelled;
    ``task_status.started(urls)``.  Raises :class:`CacheError` when the address or the TLS
    certificate cannot be used."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    host, port = parse_listen(listen)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # the app logs requests itself (asgi_app's access_log)
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    config.h11_max_incomplete_size = 64 * 1024
    config.include_server_header = False
    if tls:
        _check_tls(*tls)
        config.certfile, config.keyfile = tls
    try:
        await serve(app, config, task_status=task_status, shutdown_trigger=shutdown_trigger)
    except OSError as e:
        raise CacheError(f"cannot listen on {listen!r}: {e.strerror}") from e
    except BaseExceptionGroup as eg:  # hypercorn binds inside its own nursery
        bind = eg.subgroup(lambda e: isinstance(e, OSError))
        if bind is None:
            raise
        while isinstance(bind, BaseExceptionGroup):
            bind = bind.exceptions[0]
        raise CacheError(f"cannot listen on {listen!r}: {bind.strerror or bind}") from eg
