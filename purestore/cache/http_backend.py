"""The ``http(s)://HOST[:PORT][/PREFIX]`` cache backend (see :mod:`.backend` for what a backend
does): GET/HEAD to read, PUT to write, over :mod:`.http`'s pooled HTTP/1.1 client.

- Retries: a transient failure (a broken or stalled connection, HTTP 408, 429, 500, 502, 503,
  504) is retried up to ``attempts`` times in all, after 0.25 s, 0.5 s, 1 s, ... or what the
  server's ``Retry-After`` asks (as Nix's ``download-attempts``); a download broken half way
  resumes where it stopped (``Range``).
- Logins: the cache URL's token (``?token-file=FILE``) is sent as a bearer token with every
  request to that cache; ``PURE_CACHE_TOKEN`` (an environment variable, so it would reach every
  cache configured) only with uploads; otherwise the login for the host in the netrc file
  (``netrc-file``), with basic authentication.
- TLS: the system's CAs, or those of ``ssl-cert-file``.
- Redirects (GET and HEAD; caches that hand NAR downloads to a CDN or object store): followed
  up to :data:`MAX_REDIRECTS` times, never from https to http, and no token or login is sent to
  another origin than the cache's.

The tokens, logins and CAs are found by :mod:`.http_auth`; what an answer's status and headers
say is read by :mod:`.http_response`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import random
import time
import urllib.parse

import trio

from ..errors import CacheError
from .backend import CHUNK, Backend, CacheMissing, CacheNotAnswering, CacheURL, _unlink, check_name, file_url
from .content_encoding import decode, is_identity
from .http_auth import _ssl_context, netrc_login, read_token_file, token_problem
from .http_response import _no_chunks, _retry_after_header, _server_says, _small, _status_line, whole_limit

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Sent by `pure store serve` with a 500 that another attempt cannot mend (a corrupt path)
NO_RETRY_HEADER = "x-pure-retry"
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5  # redirects followed for one request (curl's default is 50; a cache needs one)
RETRY_DELAY = 0.25  # seconds before the second attempt; doubled for each further one
DISABLED_FOR = 60.0  # seconds a cache that failed (unreachable, stalled, 5xx) is not asked, as in Nix

log = logging.getLogger("purestore.cache")


def open_http_backend(cu: CacheURL, *, connect_timeout: float, stall_timeout: float, max_connections: int,
                      token: str | None, attempts: int, netrc_file: str | None,
                      ssl_cert_file: str | None) -> "HttpBackend":
    """:func:`.backend.open_backend` for an HTTP cache: finds its tokens and login, and its TLS
    context.  ``token`` (given, or read from the URL's ``token-file``) goes with every request;
    ``PURE_CACHE_TOKEN`` with uploads only."""
    if cu.param("token-file") == "":  # `?token-file=$FILE` with FILE unset: not "no token"
        raise CacheError(f"cache URL {cu.url!r}: token-file is empty, expected the path of the file that "
                         "holds the cache's token")
    if token is None and cu.param("token-file"):
        token, _mode = read_token_file(cu.param("token-file"), "the cache's")  # type: ignore[arg-type]
    upload_token = os.environ.get("PURE_CACHE_TOKEN") or None
    if upload_token is not None:
        raw = os.fsencode(upload_token).strip()
        problem = token_problem(raw)
        if problem:
            raise CacheError(f"the token in the environment variable PURE_CACHE_TOKEN {problem}")
        upload_token = raw.decode("ascii")
    u = urllib.parse.urlsplit(cu.base)
    if u.username or u.password:  # (not "http://@host/": no login)
        # http://NAME:PASSWORD@HOST/ (percent-encoded): curl sends it, and so Nix does; it comes
        # before the netrc file's, as in curl
        login: tuple[str, str] | None = (urllib.parse.unquote(u.username or ""), urllib.parse.unquote(u.password or ""))
        login_from: str | None = "the cache's URL"
    else:
        login, login_from = netrc_login(netrc_file, u.hostname or ""), netrc_file
    return HttpBackend(cu, connect_timeout=connect_timeout, stall_timeout=stall_timeout,
                       max_connections=max_connections, token=token, attempts=attempts,
                       upload_token=upload_token,
                       login=login, netrc_file=netrc_file, login_from=login_from,
                       ssl_context=_ssl_context(ssl_cert_file) if cu.scheme == "https" else None)


class _Transient(CacheError):
    """A failure worth another attempt (see :data:`TRANSIENT_STATUS`); ``wait``: the seconds the
    server asked for (``Retry-After``), if any."""

    wait: float = 0.0
    cache_wide: bool = False  # the server's trouble (no connection, a stall, 5xx), not one file's
    unreachable: bool = False  # no connection at all
    name: str = ""  # the file asked for


# OpenSSL's words for a certificate signed by a CA the client does not know
_UNKNOWN_CA = ("self-signed certificate", "self signed certificate", "unable to get local issuer certificate",
               "unable to get issuer certificate", "certificate not trusted", "unable to verify the first certificate")


class HttpBackend(Backend):
    """A cache behind an HTTP server: GET/HEAD to read, PUT (with a bearer token) to write.

    Authorization: ``token`` (bearer) on every request; else ``upload_token`` (bearer) on
    uploads; else ``login`` (basic authentication: the URL's user and password, else the netrc file's)
    when there is one.

    One pooled :class:`~purestore.cache.http.HttpClient` (HTTP/1.1 keep-alive) per backend.  A
    connection that delivers no bytes for ``stall_timeout`` seconds fails with :class:`CacheError`.

    Retries: a request that fails in a way that may pass (the connection broke or stalled, or the
    server answered 408, 429 or 5xx other than 501 and 505) is made again, up to ``attempts`` in
    all, after a pause that doubles each time (0.25 s, 0.5 s, 1 s, ..., with some jitter so that
    many clients do not come back at once), or as long as the server's ``Retry-After`` asks (at
    most a minute) when that is longer; each retry is logged as a warning.  A cache that has
    not answered once yet is not retried when it cannot be connected to (nothing listens there,
    and a build should not wait seconds to learn it) nor when it stalls (a server that accepts
    connections and never answers would cost five stall timeouts).  A NAR download broken half way goes on
    where it stopped: the next request asks for the rest (``Range: bytes=N-``), and a server that
    sends the whole file instead has the part already received skipped.
    """

    def __init__(self, cu: CacheURL, *, connect_timeout: float, stall_timeout: float,
                 max_connections: int, token: str | None, attempts: int = 5,
                 retry_delay: float | None = None, login: tuple[str, str] | None = None,
                 netrc_file: str | None = None, ssl_context=None, upload_token: str | None = None,
                 login_from: str | None = None):
        from . import http
        self._http = http
        self.cache_url = cu
        self.token = token
        self.upload_token = upload_token
        self.login = login  # (name, password) sent with basic authentication
        self.netrc_file = netrc_file
        # where the login comes from, for a message when it is refused: the URL, or netrc_file
        self.login_from = login_from if login_from is not None else netrc_file
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.attempts = attempts
        self.retry_delay = RETRY_DELAY if retry_delay is None else retry_delay
        self._answered = False  # the server has answered a request of this backend
        # trio.current_time() of the last answer: a server that answered others while a request
        # waited is busy, not hung (see _err)
        self._last_answer: float | None = None
        self._failing = False  # a request used up its attempts, and none has succeeded since
        self._gave_up_on: set[str] = set()  # files whose requests gave up since the last answer
        self._gave_up: trio.Event | None = None  # set when a request gives up (others waiting to retry stop)
        self._disabled_until = 0.0  # time.monotonic() until which nothing is asked (it failed)
        u = urllib.parse.urlsplit(cu.base)
        try:
            port = u.port
        except ValueError:  # not digits, or past 65535
            given = u.netloc.rpartition("@")[2].rpartition(":")[2]
            raise CacheError(f"cache URL {cu.url!r}: the port must be a number from 1 to 65535, got {given!r}",
                             hint="leave the port out for the scheme's default (80 for http, 443 for https)"
                             ) from None
        if port == 0:  # not the default port: no server listens on port 0
            raise CacheError(f"cache URL {cu.url!r}: port 0 is not a port a server can listen on",
                             hint="leave the port out for the scheme's default (80 for http, 443 for https)")
        port = port or (443 if u.scheme == "https" else 80)
        if not u.hostname:
            raise CacheError(f"cache URL {cu.url!r}: missing host")
        self._prefix = u.path  # ends with '/'
        self.client = http.HttpClient(u.scheme, u.hostname, port, connect_timeout=connect_timeout,
                                      stall_timeout=stall_timeout, max_connections=max_connections,
                                      headers={"User-Agent": "purestore"}, ssl_context=ssl_context)
        self.custom_ca = ssl_context is not None
        self._base = f"{u.scheme}://{u.netloc.rpartition('@')[2]}"  # (for redirects' URLs: no login)
        # clients for the other origins redirects lead to, by (scheme, host, port)
        self._others: dict[tuple[str, str, int], object] = {}
        self._client_args = dict(connect_timeout=connect_timeout, stall_timeout=stall_timeout,
                                 max_connections=max_connections, headers={"User-Agent": "purestore"},
                                 ssl_context=ssl_context)

    def _auth(self, method: str, headers: dict[str, str] | None = None, target: str = "/") -> dict[str, str]:
        """``headers`` with the Authorization this request (for ``target``, the path and query
        sent) gets (see the class)."""
        out = dict(headers or {})
        token = self.token or (self.upload_token if method == "PUT" else None)
        if token:
            out["Authorization"] = f"Bearer {token}"
        elif self.login:
            out["Authorization"] = "Basic " + base64.b64encode(":".join(self.login).encode()).decode()
        return out

    def _headers(self, client, method: str, headers: dict[str, str] | None, target: str = "/") -> dict[str, str]:
        """The request's headers: with its Authorization only for the cache's own origin."""
        return self._auth(method, headers, target) if client is self.client else dict(headers or {})

    def _redirect(self, r, method: str, what: str, name: str, hops: int, url: str):
        """Where a redirect answer ``r`` to a request for ``url`` leads: (client, target, URL);
        None when ``r`` is not one to follow."""
        if r.status not in REDIRECT_STATUS or method not in ("GET", "HEAD"):
            return None
        where = f"cache {self.url!r}: cannot {what} {name!r}"
        location = r.headers.get("location", "").strip()
        if not location:
            raise CacheError(f"{where}: {_status_line(r)} without a Location")
        if hops >= MAX_REDIRECTS:
            raise CacheError(f"{where}: more than {MAX_REDIRECTS} redirects (the last to {location!r})")
        new = urllib.parse.urljoin(url, location)
        u = urllib.parse.urlsplit(new)
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            port = None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise CacheError(f"{where}: redirected to {new!r}, which is not an http(s) URL")
        if port is None:
            raise CacheError(f"{where}: redirected to {new!r}, whose port is not valid")
        if self.client.scheme == "https" and u.scheme == "http":
            raise CacheError(f"{where}: redirected from https to {new!r}: refused (plain http)")
        key = (u.scheme, u.hostname, port)
        if key == (self.client.scheme, self.client.host, self.client.port):
            client = self.client
        else:
            client = self._others.get(key)
            if client is None:
                client = self._others[key] = self._http.HttpClient(u.scheme, u.hostname, port, **self._client_args)
        return client, (u.path or "/") + (f"?{u.query}" if u.query else ""), new

    # A NAR's URL with a query, `nar/<NAR hash>.nar?hash=<path hash>` (what Harmonia's narinfos
    # say), is that file asked with that query, as Nix's curl asks it; the '?' was sent quoted,
    # as part of the file's name, and the file was not found.  Only under nar/: a build log's
    # name may hold a '?' of its own (`log/…-q?x.drv`).  Not in a bucket, whose keys Nix takes
    # as they are.
    _nar_query = True

    def _target(self, name: str) -> str:
        check_name(name, self.url)
        path, sep, query = name.partition("?") if self._nar_query and name.startswith("nar/") else (name, "", "")
        return self._prefix + urllib.parse.quote(path) + (sep + urllib.parse.quote(query, safe="=") if sep else "")

    def _err(self, what: str, name: str, e: Exception, via: str | None = None, *,
             retry_unanswered: bool = True) -> CacheError:
        """The :class:`CacheError` for a failed request (``via``: the URL a redirect led to):
        :class:`_Transient` when another attempt may succeed; :class:`CacheNotAnswering` for a
        request the server did not answer at all, when it is not to be made again (the server
        never answered, or ``retry_unanswered`` is false)."""
        http = self._http
        transient = True
        if isinstance(e, http.Stalled) and e.unanswered:
            reason = f"timed out: {e} (stalled-download-timeout)"
            # a server hung from the start: one wait, not five.  Without retry_unanswered, one
            # that answered nothing else while this request waited: it has stopped answering.
            # One that did is busy, not hung (the request waited its turn): asked again.
            if not (self._answered and (retry_unanswered or self._answered_lately())):
                if via:
                    reason += f" (redirected to {via})"
                return CacheNotAnswering(f"cache {self.url!r}: cannot {what} {name!r}: {reason}", name=name,
                                         timeout=self.client.stall_timeout,
                                         hint="a cache slower than that needs a longer stalled-download-timeout "
                                              "in pure.conf")
        elif isinstance(e, http.Stalled):
            reason = f"timed out (server stalled: {e})"
            transient = self._answered  # a server hung from the start: one wait, not five
        elif isinstance(e, http.Broken):
            reason = f"connection broken ({e})"
        elif isinstance(e, http.NotHttp):
            reason = str(e)
            transient = False
        elif isinstance(e, http.TooLarge):
            reason = f"{e}, too long for what it should be"
            transient = False
        elif isinstance(e, http.ConnectFailed):
            reason = f"cannot connect ({e})"
            if "certificate verify failed" in str(e) and any(m in str(e) for m in _UNKNOWN_CA):
                reason += (" (the certificate is not signed by the CAs of ssl-cert-file)" if self.custom_ca else
                           " (a cache with a certificate of its own CA needs that CA's certificate in a file "
                           "named by the ssl-cert-file setting)")
            transient = self._answered
        else:
            reason = str(e) or type(e).__name__
            transient = False
        if via:
            reason += f" (redirected to {via})"
        err = (_Transient if transient else CacheError)(f"cache {self.url!r}: cannot {what} {name!r}: {reason}")
        err.cache_wide = isinstance(e, (http.ConnectFailed, http.Stalled))
        err.unreachable = isinstance(e, http.ConnectFailed)
        err.name = name
        return err

    def _answered_lately(self) -> bool:
        """Whether the server answered a request within the last stall timeout."""
        return self._last_answer is not None and \
            trio.current_time() - self._last_answer < self.client.stall_timeout

    def _status(self, what: str, name: str, r, said: str = "") -> CacheError:
        """The error for answer ``r`` (``said``: what its body says, see :func:`_server_says`)."""
        msg = f"cache {self.url!r}: cannot {what} {name!r}: {_status_line(r)}{said}"
        if r.status == 401:  # said in the message, which a build's warning shows, not in a hint
            host = self.client.host
            if self.token:
                msg += " (the cache refused the token of the URL's token-file)"
            elif self.login:  # sent, and refused (whatever else the server would take)
                msg += f" (the cache refused the login {self.login[0]!r} for {host} in {self.login_from})"
            elif r.headers.get("www-authenticate", "").lower().startswith("bearer"):
                msg += " (the cache wants a token: give its file with ?token-file=FILE in the cache's URL)"
            elif self.netrc_file:
                msg += (f" (the cache wants a login: put 'machine {host} login NAME password SECRET' "
                        f"in {self.netrc_file}, the netrc-file setting)")
            else:
                msg += " (the cache wants a login: set netrc-file)"
        if r.status not in TRANSIENT_STATUS or r.headers.get(NO_RETRY_HEADER) == "no":
            return CacheError(msg)
        e = _Transient(msg)
        e.wait = _retry_after_header(r)
        e.cache_wide = True
        e.name = name
        return e

    def _ok(self) -> None:
        """An answer that was no transient failure came."""
        self._failing = False
        self._gave_up_on.clear()

    async def _retry_after(self, e: _Transient, attempt: int) -> None:
        """After failed attempt number ``attempt``: raise the final error, or warn and wait.

        Once a request has used up its attempts, the cache is taken to be failing: later
        requests get one attempt each until one succeeds again; and when the cache cannot be
        reached, or requests for two files have given up (a stall, 5xx) with no answer in
        between, nothing is asked for a minute (as Nix disables such a cache), so that a cache
        answering 500 to everything costs a build seconds, not minutes.  One file that fails
        while the cache answers the others is that file's trouble: the others (NARs whose
        narinfo came) are still fetched from it."""
        if attempt >= (1 if self._failing else self.attempts):
            self._failing = True
            self._gave_up_on.add(e.name)
            if e.cache_wide and (e.unreachable or len(self._gave_up_on) > 1):
                self._disabled_until = time.monotonic() + DISABLED_FOR
                if self._gave_up is not None:
                    self._gave_up.set()
                    self._gave_up = None
            tries = f" ({attempt} attempts)" if attempt > 1 else ""
            raise CacheError(f"{e}{tries}", hint=e.hint) from None
        delay = max(self.retry_delay * 2 ** (attempt - 1 + random.uniform(0, 0.5)), e.wait)
        log.warning("warning: %s; retrying in %.1f s (attempt %d of %d)", e, delay, attempt + 1, self.attempts)
        # A server that went away fails every request in flight: once one of them has used up
        # its attempts to connect, the others waiting to try again give up too, rather than each
        # going on through its own attempts.
        if self._gave_up is None:
            self._gave_up = trio.Event()
        gave_up = self._gave_up
        with trio.move_on_after(delay):
            await gave_up.wait()
            tries = f"{attempt} attempt" + ("s" if attempt > 1 else "")
            raise CacheError(f"{e} ({tries}; the cache failed other requests meanwhile)", hint=e.hint) from None

    def _check_enabled(self, what: str, name: str) -> None:
        """Refuse at once a request to a cache that failed a moment ago (see _retry_after)."""
        if self._disabled_until and time.monotonic() < self._disabled_until:
            raise CacheError(f"cache {self.url!r}: cannot {what} {name!r}: not asked, since the cache failed "
                             f"other requests less than {DISABLED_FOR:g} s ago")

    async def _retrying(self, once):
        """``await once()`` until it does not fail transiently (or the attempts are used up)."""
        attempt = 1
        while True:
            try:
                return await once()
            except _Transient as e:
                await self._retry_after(e, attempt)
                attempt += 1

    async def _request(self, what: str, name: str, method: str, *, query: str = "",
                       retry_unanswered: bool = True, **kw):
        """One request, retried while it fails transiently; returns (response, body).  A
        callable ``body`` is called for each attempt (a stream is read once).  ``query``: the
        query string sent after the file's name (without the ``?``).  ``retry_unanswered``:
        see :meth:`~.backend.Backend.get`."""
        body = kw.pop("body", None)
        headers = kw.pop("headers", None)

        async def once():
            self._check_enabled(what, name)
            client, target, via = self.client, self._target(name) + (f"?{query}" if query else ""), None
            for hops in range(MAX_REDIRECTS + 1):
                try:
                    r, data = await client.request(method, target, headers=self._headers(client, method, headers, target),
                                                   body=body, **kw)  # (a function: made afresh for each send)
                except self._http.HttpError as e:
                    raise self._err(what, name, e, via, retry_unanswered=retry_unanswered) from e
                self._answered, self._last_answer = True, trio.current_time()
                nxt = self._redirect(r, method, what, name, hops, via or self._base + target)
                if nxt is None:
                    break
                client, target, via = nxt
            if r.status in TRANSIENT_STATUS:
                raise self._status(what, name, r, _server_says(r, data))  # (may be final: see there)
            self._ok()
            return r, data
        return await self._retrying(once)

    async def exists(self, name: str) -> bool:
        return await self.size(name) is not None

    async def size(self, name: str) -> int | None:
        r, _ = await self._request("query", name, "HEAD")
        if r.status in (404, 403, 410):
            return None
        if r.status != 200:
            raise self._status("query", name, r)
        length = r.headers.get("content-length", "")
        return int(length) if length.isascii() and length.isdigit() and is_identity(r.headers.get("content-encoding")) else -1

    async def get(self, name: str, limit: int | None = None, *, retry_unanswered: bool = True) -> bytes | None:
        r, data = await self._request("get", name, "GET", limit=whole_limit(name) if limit is None else limit,
                                      retry_unanswered=retry_unanswered)
        if r.status in (404, 403, 410):
            return None
        if r.status != 200:
            raise self._status("get", name, r)
        return self._decoded(name, r, data)

    def _decoded(self, name: str, r, data: bytes) -> bytes:
        """The body of a whole file as the cache meant it: its Content-Encoding undone (as Nix
        does; S3 caches may store narinfos, listings and logs compressed).  NAR files are
        refused so, small or big alike."""
        encoding = r.headers.get("content-encoding")
        if is_identity(encoding):
            return data
        if name.startswith("nar/"):
            raise self._nar_encoded(name, r)
        return decode(encoding, data, f"cache {self.url!r}: {name!r}")

    def _nar_encoded(self, name: str, r) -> CacheError:
        return CacheError(f"cache {self.url!r}: {name!r} is sent with Content-Encoding "
                          f"{r.headers.get('content-encoding')!r}: a NAR file must come as it is stored "
                          "(its FileHash is that of the stored bytes)",
                          hint="serve NAR files without a Content-Encoding (their compression is part "
                               "of the file)")

    @contextlib.asynccontextmanager
    async def open_read(self, name: str):
        http = self._http
        current = contextlib.AsyncExitStack()  # the response being read (one at a time)
        via: str | None = None  # where a redirect led the response being read

        async def respond(offset: int):
            """Request the file from ``offset`` on; return (body chunks, bytes to skip)."""
            nonlocal via
            self._check_enabled("download", name)
            client, target, via = self.client, self._target(name), None
            for hops in range(MAX_REDIRECTS + 1):
                await current.aclose()
                headers = self._headers(client, "GET", {"Range": f"bytes={offset}-"} if offset else None, target)
                try:
                    r, body = await current.enter_async_context(client.stream("GET", target, headers=headers))
                    self._answered, self._last_answer = True, trio.current_time()
                    nxt = self._redirect(r, "GET", "download", name, hops, via or self._base + target)
                    if nxt is None:
                        break
                    if _small(r):  # read a redirect's few bytes: the connection goes back to the pool
                        async for _ in body:
                            pass
                except http.HttpError as e:
                    raise self._err("download", name, e, via) from e
                client, target, via = nxt
            if r.status in (404, 410):
                raise CacheMissing(f"{file_url(self.url, name)} is missing from the cache")
            if r.status in (200, 206) and not is_identity(r.headers.get("content-encoding")):
                raise self._nar_encoded(name, r)
            if offset and r.status == 206:
                first = r.headers.get("content-range", "").partition(" ")[2].partition("-")[0]
                if first != str(offset):
                    raise CacheError(f"cache {self.url!r}: cannot download {name!r}: asked for the rest "
                                     f"from byte {offset}, got Content-Range "
                                     f"{r.headers.get('content-range')!r}")
                self._ok()
                return body, 0
            if offset and r.status == 416:
                total = r.headers.get("content-range", "").rpartition("/")[2]
                if total == str(offset):
                    # every byte had come; only the end of the response was lost (a chunked
                    # body cut before its last mark): the checks of the whole file decide
                    self._ok()
                    return _no_chunks(), 0
                raise CacheError(f"cache {self.url!r}: cannot download {name!r}: asked for the rest "
                                 f"from byte {offset}, got {_status_line(r)} (the file has "
                                 f"{total or 'an unknown number of'} bytes)")
            if r.status != 200:
                raise self._status("download", name, r)
            self._ok()
            return body, offset  # the whole file again: skip what was received

        async def chunks(body, attempt: int):
            received = 0
            skip = 0
            while True:
                try:
                    try:
                        async for c in body:
                            if skip:
                                if len(c) <= skip:
                                    skip -= len(c)
                                    continue
                                c, skip = c[skip:], 0
                            received += len(c)
                            yield c
                        return
                    except http.HttpError as e:
                        raise self._err("download", name, e, via) from e
                except _Transient as e:
                    failure = e
                    while True:  # ask for the rest; a request that fails counts as an attempt
                        await self._retry_after(failure, attempt)
                        attempt += 1
                        try:
                            body, skip = await respond(received)
                            break
                        except _Transient as again:
                            failure = again

        try:
            body, _ = await self._retrying(lambda: respond(0))
            yield chunks(body, 1)
        finally:
            await current.aclose()

    async def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        await self._put(name, lambda: data, content_type, len(data))

    async def put_file(self, name: str, local: str, content_type: str = "application/octet-stream",
                       *, move: bool = False) -> None:
        size = os.path.getsize(local)

        async def body():
            f = await trio.to_thread.run_sync(open, local, "rb")
            try:
                while chunk := await trio.to_thread.run_sync(f.read, CHUNK):
                    yield chunk
            finally:
                f.close()
        await self._put(name, body, content_type, size)
        if move:
            _unlink(local)

    async def _put(self, name, content, content_type, size, extra: dict[str, str] | None = None) -> None:
        """PUT ``content()`` (bytes, or an async iterator made afresh for each attempt), with the
        ``extra`` headers."""
        headers = {"Content-Type": content_type, "Content-Length": str(size), **(extra or {})}
        r, data = await self._request("upload", name, "PUT", headers=headers, body=content)
        if r.status not in (200, 201, 204):
            raise self._upload_refused(name, r, data)

    def _upload_refused(self, name: str, r, data: bytes) -> CacheError:
        """The error for an upload the server did not take (``data``: its answer's body, quoted
        when it is a short line of text)."""
        said = _server_says(r, data)
        if r.status in REDIRECT_STATUS:  # not followed: a body would have to be sent again elsewhere
            location = r.headers.get("location", "").strip()
            return CacheError(f"cache {self.url!r}: upload of {name!r} refused ({_status_line(r)}"
                              f"{f' to {location!r}' if location else ''}): uploads are not redirected",
                              hint="give the URL uploads are to go to" + (f" (perhaps {location!r})" if location else ""))
        if r.status == 403 and said:
            # a reason given (a quota, a read-only bucket): not necessarily the token
            return CacheError(f"cache {self.url!r}: upload of {name!r} refused ({_status_line(r)}{said})")
        if r.status in (401, 403):
            msg = f"cache {self.url!r}: upload of {name!r} refused ({_status_line(r)}{said})"
            if self.token or self.upload_token:
                given = "the URL's token-file" if self.token else "PURE_CACHE_TOKEN"
                return CacheError(msg, hint=f"the server refused the upload token of {given}: check that it is "
                                            "the one the server was started with")
            return CacheError(msg, hint="give the server's upload token with ?token-file=FILE or PURE_CACHE_TOKEN")
        return self._status("upload", name, r, said)

    async def aclose(self) -> None:
        await self.client.aclose()
        for c in self._others.values():
            await c.aclose()
