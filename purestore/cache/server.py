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

Uploads are put in place by :mod:`.server_upload`; the HTTP plumbing this server shares with
``pure store serve`` is :mod:`.http_server`, and the listening (address, TLS) :mod:`.listen`.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import stat

import trio

from ..errors import CacheError
from ._temps import remove_leftovers
from .backend import CHUNK, check_name
from .http_server import (CHALLENGE, access_logger, asgi_app, parse_range, presented_token, read_check,
                          respond, send_end, until_disconnect)
from .listen import check_listen_and_tls, run_app
from .prune import mark_used
from .server_upload import LAYOUT, _has_body, _may_write, _put, _refuse

log = logging.getLogger("purestore.cache.server")


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


SMALL_FILE = 1 << 18  # read in the event loop: a page-cache read is quicker than a thread hop


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
        ended = False  # the body's last bytes went out before the client was seen gone

        async def stream() -> None:
            nonlocal sent, ended
            while sent < length:
                data = await trio.to_thread.run_sync(f.read, min(CHUNK, length - sent))
                if not data:
                    break  # truncated meanwhile: the client sees a short body and refuses it
                if sent + len(data) == length:
                    ended = await send_end(send, data)
                else:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                sent += len(data)
        # the end of the response is sent once the watch for a disconnect is over: on a
        # connection the server closes after this response (HTTP/1.0, "Connection: close"), the
        # server says the client is gone while it sends the end, and the watch would cancel that
        # send half way, before the server closed the connection: it then stayed open for good
        gone = False
        if receive is None:
            await stream()
        else:
            gone = await until_disconnect(receive, stream)
        if not gone or ended:
            # (a client that has every byte may close before it is told the end: the end is
            # then dropped by the server, and the response logged as sent, not as 499)
            await send({"type": "http.response.body", "body": b""})
    finally:
        f.close()


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
    # what uploads of a server killed outright (SIGKILL) left: gone before it serves again
    removed = await trio.to_thread.run_sync(lambda: [
        os.path.join(d, name) for d in ("", *LAYOUT) for name in remove_leftovers(os.path.join(directory, d))])
    if removed:
        log.info("removed %d temporary files of killed runs: %s", len(removed), " ".join(removed))
    app = make_app(directory, upload_token, read_token,
                   access_log=access_logger(access_log) if access_log else None)
    await run_app(app, listen, tls=tls, task_status=task_status, shutdown_trigger=shutdown_trigger)
