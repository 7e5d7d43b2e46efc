"""Transient failures of an HTTP cache are retried (``download-attempts``), and a NAR download
broken half way resumes where it stopped (``Range``): against a file server on 127.0.0.1 that
fails on purpose, and against ``pure cache serve``'s own Range support."""

from __future__ import annotations

import base64
import logging
import os

import pytest
import trio

from test_cache_support import PUB, SEC, make_closure, make_path, open_store, settings_for
from test_http_client import Scripted
from purestore.cache.backend import open_backend
from purestore.errors import CacheError


class FlakyCache(Scripted):
    """An HTTP/1.1 file server over a cache directory that fails on purpose.

    ``faults`` maps a name prefix or suffix (``"nar/"``, ``".narinfo"``) to the faults for the
    next requests of such files, used up one per request:

    - ``"cut"``: the head and half of the body asked for, then the connection is closed;
    - ``"stall"``: the same, then nothing more (the client's stall timeout ends it);
    - ``"silent"``: no answer at all, not even a status line (a hung server);
    - ``"503"``: HTTP 503 Service Unavailable; ``"429-wait-1"``: 429 with ``Retry-After: 1``;
    - ``"bad-range"``: a ``206`` whose Content-Range starts elsewhere than asked.
    - ``"all-but-the-end"``: the whole body under a Content-Length 100 bytes too long, then the
      connection is closed (as a chunked body cut before its last mark).

    A range that starts at or past the end gets ``416`` with ``Content-Range: bytes */SIZE``.

    ``ranges=False``: ``Range`` headers are ignored (the whole file is sent, as RFC 9110 allows).
    ``login=(name, password)``: a request without that HTTP basic login gets 401.
    ``redirects``: name prefix → where such files are (a URL or a path on this server, the
    name appended), answered with ``302 Found``; ``"!nolocation"``: a 302 without a Location.
    ``asked`` records (method, name, Range header or None, status sent).
    """

    def __init__(self, directory, faults: dict[str, list[str]] | None = None, *, ranges: bool = True,
                 overlap: int = 0, login: tuple[str, str] | None = None):
        super().__init__(self._respond)
        self.login = login
        self.redirects: dict[str, str] = {}
        self.dir = directory
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.ranges = ranges
        # overlap=N: a NAR's body is finished only once N NAR requests have come (or 5 s passed)
        self.overlap = overlap
        self.nar_asked = 0
        self.overlapped: list[bool] = []
        self._nar_came = trio.Event()
        self.asked: list[tuple[str, str, str | None, int]] = []

    def _fault(self, name: str) -> str | None:
        for key, left in self.faults.items():
            if left and (name.startswith(key) or name.endswith(key)):
                return left.pop(0)
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _respond(self, request: bytes):
        return lambda stream: self._answer(stream, request.partition(b"\r\n\r\n")[0].decode("latin-1"))

    async def _answer(self, stream, head: str) -> bool:
        """Answer one request; False: the connection is to be closed."""
        lines = head.split("\r\n")
        method, target, _ = lines[0].split(" ")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        name = target.lstrip("/")
        rng = headers.get("range")
        path = os.path.join(self.dir, name)
        if self.login and headers.get("authorization") != "Basic " + base64.b64encode(":".join(self.login).encode()).decode():
            self.asked.append((method, name, rng, 401))
            await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"cache\"\r\n"
                                  b"Content-Length: 0\r\n\r\n")
            return True
        for prefix, to in self.redirects.items():
            if name.startswith(prefix):
                self.asked.append((method, name, rng, 302))
                location = b"" if to == "!nolocation" else b"Location: %s\r\n" % (to + name).encode()
                await stream.send_all(b"HTTP/1.1 302 Found\r\n%sContent-Length: 5\r\n\r\nmoved" % location)
                return True
        fault = self._fault(name)
        if fault == "silent":
            self.asked.append((method, name, rng, 0))
            await trio.sleep_forever()
        if fault in ("503", "429-wait-1"):
            status = int(fault[:3])
            self.asked.append((method, name, rng, status))
            reason = b"Service Unavailable" if status == 503 else b"Too Many Requests\r\nRetry-After: 1"
            await stream.send_all(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n\r\n" % (status, reason))
            return True
        if not os.path.isfile(path):
            self.asked.append((method, name, rng, 404))
            await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return True
        with open(path, "rb") as f:
            data = f.read()
        status, first, extra = 200, 0, b""
        if rng and self.ranges:
            first = int(rng.removeprefix("bytes=").rstrip("-"))
            if first >= len(data):
                self.asked.append((method, name, rng, 416))
                await stream.send_all(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */%d\r\n"
                                      b"Content-Length: 0\r\n\r\n" % len(data))
                return True
            status = 206
            shown = first + 1 if fault == "bad-range" else first
            extra = b"Content-Range: bytes %d-%d/%d\r\n" % (shown, len(data) - 1, len(data))
        body = data[first:]
        self.asked.append((method, name, rng, status))
        if name.startswith("nar/"):
            self.nar_asked += 1
            self._nar_came.set()
            self._nar_came = trio.Event()
        reason = b"OK" if status == 200 else b"Partial Content"
        out = b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n%s\r\n" % (status, reason, len(body), extra)
        if method == "HEAD":
            await stream.send_all(out)
            return True
        if fault == "all-but-the-end":
            await stream.send_all(out.replace(b"Content-Length: %d" % len(body),
                                              b"Content-Length: %d" % (len(body) + 100)) + body)
            return False
        if fault in ("cut", "stall"):
            await stream.send_all(out + body[: len(body) // 2])
            if fault == "stall":
                await trio.sleep_forever()
            return False
        if self.overlap and name.startswith("nar/"):
            await stream.send_all(out + body[: len(body) // 2])
            with trio.move_on_after(30):  # (only a failing test waits this long)
                while self.nar_asked < self.overlap:
                    await self._nar_came.wait()
            self.overlapped.append(self.nar_asked >= self.overlap)
            body = body[len(body) // 2:]
            out = b""
        await stream.send_all(out + body)
        return True


@pytest.fixture
def cache(tmp_path):
    """A file:// cache holding a small closure (lib, app) and a 3 MiB path (streamed: big)."""
    from purestore.cache import copy_to
    from purestore.formats.signing import SecretKey
    root = tmp_path / "src"
    with open_store(root) as store:
        lib, app = make_closure(store)
        big = make_path(store, "big-1.0", {"blob": os.urandom(3 << 20), "README": b"big\n"}, refs=[lib])
        trio.run(lambda: copy_to(store, settings_for(root), f"file://{tmp_path}/cache", [app, big],
                                 secret_keys=[SecretKey.parse(SEC)]))
    return tmp_path / "cache", lib, app, big


@pytest.fixture
def bigs(tmp_path):
    """A file:// cache holding three unrelated 2 MiB paths."""
    from purestore.cache import copy_to
    from purestore.formats.signing import SecretKey
    root = tmp_path / "src"
    with open_store(root) as store:
        paths = [make_path(store, f"big-{i}", {"blob": os.urandom(2 << 20)}) for i in range(3)]
        trio.run(lambda: copy_to(store, settings_for(root), f"file://{tmp_path}/cache", paths,
                                 secret_keys=[SecretKey.parse(SEC)]))
    return tmp_path / "cache", paths


async def fetch_all(tmp_path, server, paths, *, attempts=3, stall=30, fork_worker=False, **settings):
    """``copy_from`` the server's cache into a fresh store; returns (report, store root)."""
    from purestore.cache import substituter
    root = tmp_path / "dst"
    s = settings_for(root, download_attempts=attempts, stalled_download_timeout=stall, **settings)
    with open_store(root) as store:
        with trio.fail_after(60):
            rep = await substituter.copy_from(store, s, server.url, paths, trusted_keys=[PUB],
                                              fork_worker=fork_worker)
        assert store.verify(check_contents=True).ok
        assert set(paths) <= set(store.valid_paths())
    return rep, root


def nar_requests(server):
    return [(m, n, r, st) for m, n, r, st in server.asked if n.startswith("nar/")]


@pytest.fixture
def retry_fast(monkeypatch):
    """Backends wait 10 ms before a retry (not 0.25 s)."""
    from purestore.cache import http_backend
    monkeypatch.setattr(http_backend, "RETRY_DELAY", 0.01)


@pytest.mark.parametrize("forked", [False, True], ids=["in-process", "forked-worker"])
@pytest.mark.parametrize("ranges", [True, False], ids=["range-honoured", "range-ignored"])
async def test_a_download_cut_half_way_resumes_where_it_stopped(cache, tmp_path, retry_fast, caplog,
                                                                ranges, forked):
    """Every NAR's first request breaks half way; each is fetched whole on the second: a big
    (streamed) one asking only for the rest, or skipping what it had when the server sends the
    whole file again; a small one (fetched in one piece) asking for it all again."""
    c, lib, app, big = cache
    # one cut for each NAR by its name: the order of the requests varies with the machine's load
    server = FlakyCache(c, {f"nar/{name}": ["cut"] for name in os.listdir(c / "nar")}, ranges=ranges)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        with caplog.at_level(logging.WARNING, "purestore.cache"):
            rep, _root = await fetch_all(tmp_path, server, [app, big], fork_worker=forked)
        n.cancel_scope.cancel()
    assert sorted(rep.fetched) == sorted([lib, app, big])
    reqs = nar_requests(server)
    assert len(reqs) == 6
    for name in {n for _m, n, _r, _s in reqs}:
        first, second = [(r, st) for _m, n, r, st in reqs if n == name]
        size = os.path.getsize(c / name)
        assert first == (None, 200)
        if size > (1 << 20):
            assert second == (f"bytes={size // 2}-", 206 if ranges else 200)
        else:
            assert second == (None, 200)
    assert any(r for _m, _n, r, _s in reqs)
    warnings = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(warnings) == 3 and all("(attempt 2 of 3)" in w and "connection broken" in w for w in warnings)


async def test_a_download_that_lost_only_its_end_is_complete(cache, tmp_path, retry_fast):
    """Every byte came but the response was cut before its end: asking for the rest gets 416
    (nothing is left), which completes the download; the checks of the whole NAR pass."""
    c, lib, app, big = cache
    big_nar = next(ln[5:] for ln in (c / f"{big.hash_part}.narinfo").read_text().splitlines()
                   if ln.startswith("URL: "))
    server = FlakyCache(c, {big_nar: ["all-but-the-end"]})
    async with trio.open_nursery() as n:
        await n.start(server.run)
        rep, _root = await fetch_all(tmp_path, server, [big])
        n.cancel_scope.cancel()
    assert big in rep.fetched
    assert [st for _m, name, _r, st in server.asked if name == big_nar] == [200, 416]


async def test_a_stalled_download_resumes(cache, tmp_path, retry_fast):
    c, lib, app, big = cache
    big_nar = next(ln[5:] for ln in (c / f"{big.hash_part}.narinfo").read_text().splitlines()
                   if ln.startswith("URL: "))
    server = FlakyCache(c, {big_nar: ["stall"]})  # by name: lib's NAR may be asked for first
    async with trio.open_nursery() as n:
        await n.start(server.run)
        rep, _root = await fetch_all(tmp_path, server, [big], stall=1)
        n.cancel_scope.cancel()
    assert sorted(rep.fetched) == sorted([lib, big])
    assert sorted(st for _m, _n, _r, st in nar_requests(server)) == [200, 200, 206]


async def test_service_unavailable_is_retried_for_narinfos_and_nars(cache, tmp_path, retry_fast):
    c, lib, app, big = cache
    server = FlakyCache(c, {".narinfo": ["503", "503"], "nar/": ["503"]})
    async with trio.open_nursery() as n:
        await n.start(server.run)
        rep, _root = await fetch_all(tmp_path, server, [app])
        n.cancel_scope.cancel()
    assert sorted(rep.fetched) == sorted([lib, app])
    assert [st for _m, n, _r, st in server.asked if n.endswith(".narinfo")].count(503) == 2
    assert [st for _m, _n, _r, st in nar_requests(server)].count(503) == 1


@pytest.mark.parametrize("fault,reason", [("503", "HTTP 503 Service Unavailable (3 attempts)"),
                                          ("cut", "connection broken"),
                                          ("bad-range", "asked for the rest from byte")])
async def test_giving_up_leaves_nothing_behind(cache, tmp_path, retry_fast, fault, reason):
    """A cache that keeps failing (or answers a resume with the wrong part) gets a clear error
    after the attempts, naming the path; nothing is registered and no temporary tree is left."""
    from purestore.cache import substituter
    c, lib, app, big = cache
    big_nar = next(ln[5:] for ln in (c / f"{big.hash_part}.narinfo").read_text().splitlines()
                   if ln.startswith("URL: "))
    server = FlakyCache(c, {big_nar: ["cut"] + ["bad-range"] * 5 if fault == "bad-range" else [fault] * 9})
    root = tmp_path / "dst"
    s = settings_for(root, download_attempts=3)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        with open_store(root) as store:
            with pytest.raises(CacheError) as e:
                with trio.fail_after(60):
                    await substituter.copy_from(store, s, server.url, [big], trusted_keys=[PUB])
            assert store.valid_paths() == [lib] and store.verify(check_contents=True).ok
        n.cancel_scope.cancel()
    msg = str(e.value)
    assert f"cannot substitute '/pure/store/{big.base_name}'" in msg and reason in msg, msg
    assert len([1 for _m, n, _r, _s in nar_requests(server) if n == big_nar]) == (2 if fault == "bad-range" else 3)
    assert [n for n in os.listdir(root / "pure/store") if n != ".tmp"] == [lib.base_name]


async def test_not_found_is_not_retried(cache, tmp_path, retry_fast):
    c, *_ = cache
    server = FlakyCache(c)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        async with open_backend(server.url, attempts=5) as b:
            assert await b.get("0" * 32 + ".narinfo") is None
            assert not await b.exists("0" * 32 + ".narinfo")
        n.cancel_scope.cancel()
    assert [st for *_x, st in server.asked] == [404, 404]


async def test_connect_failures_are_retried_only_once_the_cache_has_answered(tmp_path):
    """Nothing listening: one attempt, at once.  A cache that answered and then went away: the
    attempts are made (a server being restarted), then the error says how many."""
    from test_http_client import Scripted, ok
    server = Scripted(lambda req: ok(b"StoreDir: /pure/store\n"), close_after=1)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        b = open_backend(f"http://127.0.0.1:{server.port}/", attempts=3)
        b.retry_delay = 0.01
        assert await b.get("nix-cache-info") == b"StoreDir: /pure/store\n"
        n.cancel_scope.cancel()
    with pytest.raises(CacheError, match=r"cannot connect .*\(3 attempts\)"):
        await b.get("nix-cache-info")
    await b.aclose()
    async with open_backend(f"http://127.0.0.1:{server.port}/", attempts=3) as fresh:
        with trio.fail_after(2):
            with pytest.raises(CacheError, match=r"cannot connect \([^)]*\)$"):
                await fresh.get("nix-cache-info")


async def test_requests_waiting_to_retry_give_up_when_another_has_used_up_its_attempts(tmp_path):
    """A server gone in the middle of a push: each request in flight would otherwise go through
    all its attempts; once one has given up, the others waiting to retry give up at once."""
    from test_http_client import Scripted, ok
    server = Scripted(lambda req: ok(b"StoreDir: /pure/store\n"), close_after=1)
    errors = {}
    async with trio.open_nursery() as n:
        await n.start(server.run)
        b = open_backend(f"http://127.0.0.1:{server.port}/", attempts=4)
        b.retry_delay = 0.2
        assert await b.get("nix-cache-info") == b"StoreDir: /pure/store\n"
        n.cancel_scope.cancel()

    async def get(name, after):
        await trio.sleep(after)
        with pytest.raises(CacheError) as e:
            await b.get(name)
        errors[name] = (str(e.value), trio.current_time())
    start = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(get, "first", 0)
        n.start_soon(get, "second", 0.5)
    await b.aclose()
    first, first_at = errors["first"]
    second, second_at = errors["second"]
    assert first.endswith("(4 attempts)")
    assert "attempts; the cache failed other requests meanwhile)" in second
    # (the message already says why it gave up; the time says it did not retry on its own)
    assert second_at - first_at < 0.3 and first_at - start < 3


async def test_a_cache_that_never_answered_and_stalls_costs_one_stall_timeout(tmp_path):
    """A server that accepts connections and never says a word: one stall timeout, not one per
    attempt; the error says it did not answer, naming the setting."""
    import socket
    from purestore.cache.backend import CacheNotAnswering
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepted by the kernel, never read nor answered
    try:
        async with open_backend(f"http://127.0.0.1:{listener.getsockname()[1]}/", attempts=5,
                                stall_timeout=1) as b:
            b.retry_delay = 0.01
            start = trio.current_time()
            with pytest.raises(CacheNotAnswering,
                               match=r"timed out: no answer within 1 s \(stalled-download-timeout\)$"):
                await b.get("nix-cache-info")
            assert trio.current_time() - start < 3  # one stall timeout, not five
    finally:
        listener.close()


async def test_an_upload_refused_for_a_while_is_retried(tmp_path):
    """PUT answered 503 twice, then stored: the push goes on (bytes and file bodies alike)."""
    from test_http_client import Scripted
    stored = []

    def respond(req: bytes):
        if len(stored) < 2 or (len(stored) in (3, 4)):
            stored.append(None)
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        stored.append(req.partition(b"\r\n\r\n")[2])
        return b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    server = Scripted(respond)
    f = tmp_path / "nar"
    f.write_bytes(b"nar bytes " * 1000)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        async with open_backend(f"http://127.0.0.1:{server.port}/", attempts=3) as b:
            b.retry_delay = 0.01
            await b.put("x.narinfo", b"narinfo text")
            await b.put_file("nar/x.nar", str(f))
        n.cancel_scope.cancel()
    assert stored == [None, None, b"narinfo text", None, None, b"nar bytes " * 1000]


async def test_uploads_refused_say_why_and_where(tmp_path):
    """A PUT answered with a redirect says where to (uploads are not redirected); a 403 with
    the server's reason quotes it, without blaming the token; a redirect of a read to a bad
    port says so."""
    from purestore.errors import CacheError
    from test_http_client import Scripted
    answers = iter([
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://upload.example/c/x.narinfo\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 15\r\n\r\nquota exceeded\n",
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:99999/x\r\nContent-Length: 0\r\n\r\n",
    ])
    server = Scripted(lambda req: next(answers))
    async with trio.open_nursery() as n:
        await n.start(server.run)
        async with open_backend(f"http://127.0.0.1:{server.port}/", attempts=1) as b:
            with pytest.raises(CacheError) as e:
                await b.put("x.narinfo", b"narinfo text")
            assert "refused (HTTP 307 Temporary Redirect to 'http://upload.example/c/x.narinfo'): uploads are " \
                   "not redirected" in str(e.value)
            with pytest.raises(CacheError) as e:
                await b.put("y.narinfo", b"narinfo text")
            assert str(e.value).endswith('refused (HTTP 403 Forbidden: "quota exceeded")') and e.value.hint is None
            with pytest.raises(CacheError, match=r"redirected to 'http://127.0.0.1:99999/x', whose port is not valid"):
                await b.get("z.narinfo")
        n.cancel_scope.cancel()


async def test_attempts_must_be_at_least_one(tmp_path):
    from purestore.errors import UsageError
    from purestore.store.settings import parse_config
    with pytest.raises(ValueError, match="at least 1"):
        open_backend("http://127.0.0.1:1/", attempts=0)
    with pytest.raises(UsageError, match="download-attempts must be at least 1"):
        parse_config("download-attempts = 0\n", "pure.conf")
    assert parse_config("download-attempts = 2\n", "pure.conf") == {"download_attempts": 2}


@pytest.mark.parametrize("key", ["connect-timeout", "stalled-download-timeout", "narinfo-cache-negative-ttl",
                                 "max-jobs", "cores"])
def test_negative_numbers_are_refused_where_they_mean_nothing(key):
    from purestore.errors import UsageError
    from purestore.store.settings import parse_config
    with pytest.raises(UsageError, match=rf"pure.conf:2: {key} must be at least 0, got '-1'"):
        parse_config(f"# a comment\n{key} = -1\n", "pure.conf")


async def test_a_timeout_of_zero_means_no_limit_as_in_nix(tmp_path):
    """Nix's connect-timeout is 0 by default, meaning none: a config carried over from Nix must
    not make every HTTP cache fail at once."""
    import math

    from purestore.cache.backend import backend_for
    from purestore.store.settings import Settings, parse_config
    settings = Settings(**parse_config("connect-timeout = 0\nstalled-download-timeout = 0\n", "pure.conf"))
    async with backend_for("http://127.0.0.1:1/", settings) as b:
        assert b.client.connect_timeout == math.inf and b.client.stall_timeout == math.inf
    async with backend_for("http://127.0.0.1:1/", Settings()) as b:
        assert (b.client.connect_timeout, b.client.stall_timeout) == (10, 30)


@pytest.mark.parametrize("size", [100, 600 << 10], ids=["small", "streamed"])
async def test_cache_serve_answers_one_byte_range(tmp_path, size):
    """`pure cache serve` sends the part asked for (206 with Content-Range), 416 for a range
    beyond the end, and the whole file for forms it does not do or invalid ones."""
    from purestore.cache.http import HttpClient
    from purestore.cache.server import serve_cache
    data = os.urandom(size)
    (tmp_path / "nar").mkdir()
    (tmp_path / "nar" / "x.nar").write_bytes(data)
    async with trio.open_nursery() as n:
        (url,) = await n.start(lambda task_status: serve_cache(str(tmp_path), "127.0.0.1:0",
                                                               task_status=task_status))
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        c = HttpClient("http", "127.0.0.1", port)

        async def get(rng, method="GET"):
            r, body = await c.request(method, "/nar/x.nar", headers={"Range": rng} if rng else None)
            return r.status, r.headers.get("content-range"), body

        assert await get(None) == (200, None, data)
        assert await get("bytes=10-") == (206, f"bytes 10-{size - 1}/{size}", data[10:])
        assert await get("bytes=2-5") == (206, f"bytes 2-5/{size}", data[2:6])
        assert await get("bytes=0-5") == (206, f"bytes 0-5/{size}", data[:6])
        assert await get("bytes=0-") == (206, f"bytes 0-{size - 1}/{size}", data)
        assert await get(f"bytes={size - 1}-{size + 50}") == (206, f"bytes {size - 1}-{size - 1}/{size}",
                                                              data[-1:])
        assert await get("bytes=3-", "HEAD") == (206, f"bytes 3-{size - 1}/{size}", b"")
        assert (await get(f"bytes={size}-"))[:2] == (416, f"bytes */{size}")
        for ignored in ("bytes=5-2", "bytes=0-1,4-5", "bytes=-10", "items=0-1", "bytes=x-", "bytes=\u00b2-",
                        "bytes=0-\u00b2"):
            assert await get(ignored) == (200, None, data), ignored
        await c.aclose()
        n.cancel_scope.cancel()


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port`` that cuts the first connection to
    relay more than 1 MiB back there (a connection lost in the middle of a big NAR).  ``seen``:
    what clients sent."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.seen: list[bytes] = []
        self.cut = False
        self.url = ""

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client):
        upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        async with client, upstream:
            async def up():
                while data := await client.receive_some(65536):
                    self.seen.append(data)
                    await upstream.send_all(data)
            async with trio.open_nursery() as n:
                n.start_soon(up)
                sent = 0
                while data := await upstream.receive_some(65536):
                    sent += len(data)
                    if sent > (1 << 20) and not self.cut:
                        self.cut = True
                        break
                    await client.send_all(data)
                n.cancel_scope.cancel()

    def resumed(self) -> bool:
        return self.cut and any(b"range: bytes=" in s.lower() for s in self.seen)


async def test_a_big_download_from_cache_serve_resumes_with_a_range(cache, tmp_path, retry_fast):
    """The client's resume against our own server: a proxy cuts the first response of the big
    NAR half way; the second request, with Range, is answered 206 by `pure cache serve`."""
    from purestore.cache.server import serve_cache
    c, lib, app, big = cache
    async with trio.open_nursery() as n:
        (url,) = await n.start(lambda task_status: serve_cache(str(c), "127.0.0.1:0", task_status=task_status))
        proxy = CuttingProxy(int(url.rstrip("/").rsplit(":", 1)[1]))
        await n.start(proxy.run)
        rep, _root = await fetch_all(tmp_path, proxy, [big], attempts=2)
        n.cancel_scope.cancel()
    assert sorted(rep.fetched) == sorted([lib, big])
    assert proxy.resumed()


@pytest.mark.parametrize("jobs", [1, 2])
async def test_a_big_nar_is_asked_for_while_it_waits_for_a_lane(bigs, tmp_path, jobs):
    """With ``jobs`` restore lanes, big NARs are requested ahead: the server holds back the rest
    of each body until one more NAR request than there are lanes has come, which happens only
    if the next NAR was asked for before a lane was free."""
    from purestore.cache import substituter
    c, paths = bigs
    server = FlakyCache(c, overlap=jobs + 1)
    root = tmp_path / "dst"
    async with trio.open_nursery() as n:
        await n.start(server.run)
        with open_store(root) as store:
            with trio.fail_after(60):
                await substituter.copy_from(store, settings_for(root), server.url, paths,
                                            trusted_keys=[PUB], jobs=jobs)
            assert sorted(store.valid_paths()) == sorted(paths)
        n.cancel_scope.cancel()
    assert server.overlapped[:jobs] == [True] * jobs, server.overlapped


@pytest.mark.parametrize("tty", [True, False])
def test_a_warning_never_shares_the_status_line(tty):
    """`pure copy` shows warnings (retries) through its progress display: on a terminal the status
    line is cleared before a warning and drawn again after it."""
    import io
    from purestore.cache.progress import TextProgress
    from purestore.cli._warnings import warnings_to

    class Stream(io.StringIO):
        def isatty(self):
            return tty
    out = Stream()
    p = TextProgress("copying", stream=out)
    with warnings_to(p.note):
        p.expect(2, 2048)
        p.add_bytes(1024)
        p.path_done("/pure/store/x")
        logging.getLogger("purestore.cache").warning("warning: cache 'X': retrying")
    logging.getLogger("purestore.cache").info("not shown")
    p.finish()
    text = out.getvalue()
    if tty:
        assert "\r\x1b[Kwarning: cache 'X': retrying\ncopying 1/2 paths, 1.0 KiB/2.0 KiB" in text, repr(text)
    else:
        assert "\nwarning: cache 'X': retrying\n" in "\n" + text, repr(text)
    assert "not shown" not in text
    assert not [h for h in logging.getLogger("purestore").handlers if type(h).__name__ == "_To"]


async def test_a_cache_that_keeps_failing_costs_one_attempt_per_request_after_the_first_gives_up(
        cache, tmp_path, retry_fast):
    """Every narinfo answered 503: the first requests use up their attempts; after that the
    cache is not asked for a minute (as Nix disables it): the other paths fail at once."""
    from purestore.cache import substituter
    from purestore.formats.store_path import StorePath
    c, *_ = cache
    wanted = [StorePath(f"{i:032d}".replace("0", "a"), f"p{i}") for i in range(60)]
    server = FlakyCache(c, {".narinfo": ["503"] * 1000})
    root = tmp_path / "dst"
    async with trio.open_nursery() as n:
        await n.start(server.run)
        with open_store(root) as store:
            with pytest.raises(CacheError) as e:
                with trio.fail_after(60):
                    await substituter.copy_from(store, settings_for(root, download_attempts=4), server.url,
                                                wanted, trusted_keys=[PUB])
        n.cancel_scope.cancel()
    asked = [n for _m, n, _r, st in server.asked if n.endswith(".narinfo")]
    # at most the 16 queries in flight used their 4 attempts (and one more started when the
    # first gave up: one file failing is not the cache failing, two are); the others were not asked
    assert len(asked) <= 16 * 4 + 1 and len(set(asked)) <= 17, len(asked)
    assert "HTTP 503 Service Unavailable" in str(e.value)
    assert "not asked, since the cache failed other requests less than 60 s ago" in str(e.value)


async def test_one_file_failing_does_not_stop_the_others_of_a_cache_that_answers(cache, tmp_path, retry_fast):
    """One narinfo answered 503 every time while the cache answers the others: only that path
    fails; the NARs of the others (fetched after it gave up, as a build asks all its narinfos
    first) still come from the cache, which is not taken for down (before, it was not asked
    for a minute, and a build built everything)."""
    from purestore.cache.substituter import Substituters, _Rejected, substitute_report
    c, lib, app, big = cache
    server = FlakyCache(c, {big.hash_part: ["503"] * 1000})
    root = tmp_path / "dst"
    async with trio.open_nursery() as n:
        await n.start(server.run)
        settings = settings_for(root, download_attempts=3)
        with open_store(root) as store, trio.fail_after(60):
            async with Substituters(settings, [server.url], [PUB]) as session:
                assert (await session.query(app))[1].store_path == app
                with pytest.raises(_Rejected, match=r"HTTP 503 Service Unavailable \(3 attempts\)"):
                    await session.query(big)
                rep = await substitute_report(store, settings, [app], session=session)
            assert rep.failures == {} and {app, lib} <= set(store.valid_paths())
        n.cancel_scope.cancel()


async def test_a_stalled_cache_of_lower_priority_does_not_hold_up_a_better_one(cache, tmp_path):
    """The first cache has the path; the second stalls on every narinfo: the path comes from the
    first at once, the second is not waited for (Nix does not ask it at all)."""
    from purestore.cache import substituter
    c, lib, app, big = cache
    server = FlakyCache(c, {".narinfo": ["stall"] * 100})
    root = tmp_path / "dst"
    async with trio.open_nursery() as n:
        await n.start(server.run)
        with open_store(root) as store:
            with trio.fail_after(10):  # the stall timeout is 30 s
                rep = await substituter.substitute_report(store, settings_for(root), [app],
                                                          urls=[f"file://{c}", server.url], trusted_keys=[PUB])
            assert rep.failures == {} and {app, lib} <= set(store.valid_paths())
        n.cancel_scope.cancel()


async def test_a_cache_that_stops_answering_lookups_is_asked_nothing_more_in_the_run(cache, tmp_path, caplog):
    """The first cache answers its nix-cache-info, then nothing at all (a hung server): the
    narinfo lookups waiting for it end after one stall timeout, without retries, and it counts
    as having none of the paths for the rest of the run (not asked for the references found
    later): everything comes from the second cache, with one warning that names the cache, the
    file and the timeout (before, each lookup waited through every attempt: five timeouts)."""
    from purestore.cache import substituter
    c, lib, app, big = cache
    server = FlakyCache(c, {".narinfo": ["silent"] * 100})
    root = tmp_path / "dst"
    s = settings_for(root, stalled_download_timeout=1, download_attempts=5)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        with open_store(root) as store, caplog.at_level(logging.WARNING, "purestore.cache"):
            # (retries are seen in server.asked below; the bound only tells the 1 s stall timeout
            # from the default 30 s, with room for a loaded machine: it was 5 s)
            with trio.fail_after(15):
                rep = await substituter.substitute_report(store, s, [app, big],
                                                          urls=[server.url, f"file://{c}"], trusted_keys=[PUB])
            assert rep.failures == {} and {lib, app, big} <= set(store.valid_paths())
        n.cancel_scope.cancel()
    asked = [name for _m, name, _r, _st in server.asked if name.endswith(".narinfo")]
    assert sorted(asked) == sorted(f"{p.hash_part}.narinfo" for p in (app, big)), server.asked
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("retrying" in w for w in warnings), warnings
    silent = [w for w in warnings if "did not answer" in w]
    assert len(silent) == 1, warnings
    assert silent[0].startswith(f"warning: binary cache {server.url!r} did not answer '")
    assert silent[0].endswith(".narinfo' within 1 s (stalled-download-timeout): not asking it for "
                              "anything more in this run"), silent[0]


class BusyCache(FlakyCache):
    """A cache server that answers every narinfo request, one at a time, each after ``delay``
    seconds (a busy server with one worker): a request waits for those before it."""

    def __init__(self, directory, delay: float):
        super().__init__(directory)
        self.delay = delay
        self.one_at_a_time = trio.Lock()

    async def _answer(self, stream, head: str) -> bool:
        if ".narinfo " not in head.partition("\r\n")[0]:
            return await super()._answer(stream, head)
        async with self.one_at_a_time:
            await trio.sleep(self.delay)
            return await super()._answer(stream, head)


async def test_a_busy_cache_that_keeps_answering_is_not_given_up(bigs, tmp_path, caplog):
    """A cache that answers every lookup, one after the other (0.9 s each, under a stall timeout
    of 2 s), is alive: a lookup that waited past the timeout for its turn while the others were
    answered is asked again, and every path comes from it.  It was taken for a cache that does
    not answer: not asked anything more in the run, and the paths it had were not fetched."""
    from purestore.cache import substituter
    c, paths = bigs
    server = BusyCache(c, delay=0.9)
    root = tmp_path / "dst"
    s = settings_for(root, stalled_download_timeout=2, download_attempts=5)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        with open_store(root) as store, caplog.at_level(logging.WARNING, "purestore.cache"):
            with trio.fail_after(30):
                rep = await substituter.substitute_report(store, s, paths, urls=[server.url], trusted_keys=[PUB])
            assert rep.failures == {} and set(paths) <= set(store.valid_paths()), rep.failures
        n.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("did not answer" in w for w in warnings), warnings


async def test_a_cache_that_does_not_answer_its_nix_cache_info_is_not_used(cache, tmp_path, caplog):
    """A server that accepts connections and never answers, first in the list: one warning
    naming it, the file and the timeout (and the setting), and the paths come from the next."""
    from purestore.cache import substituter
    c, lib, app, big = cache
    server = FlakyCache(c, {"nix-cache-info": ["silent"]})
    root = tmp_path / "dst"
    async with trio.open_nursery() as n:
        await n.start(server.run)
        with open_store(root) as store, caplog.at_level(logging.WARNING, "purestore.cache"):
            with trio.fail_after(15):  # the 1 s stall timeout, not the default 30 s (was 5 s: tight)
                rep = await substituter.substitute_report(store, settings_for(root, stalled_download_timeout=1),
                                                          [app], urls=[server.url, f"file://{c}"],
                                                          trusted_keys=[PUB])
            assert rep.failures == {} and {lib, app} <= set(store.valid_paths())
        n.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"warning: binary cache {server.url!r} did not answer 'nix-cache-info' within 1 s "
                        "(stalled-download-timeout): not using it in this run"], warnings


def test_a_warning_during_a_build_clears_the_build_status_line():
    import io
    from purestore.build.progress import Progress
    from purestore.cli._warnings import warnings_to
    out = io.StringIO()
    p = Progress(out, live=True)
    p.event("plan", will_build=["/pure/store/x.drv"])
    p.event("start", drv="/pure/store/x.drv", name="x")
    with warnings_to(p.message):
        logging.getLogger("purestore.cache").warning("warning: cache 'X': retrying")
    text = out.getvalue()
    before, _, after = text.partition("warning: cache 'X': retrying\n")
    assert before.endswith("\r\x1b[K") and after.startswith("\r\x1b[K[0:00] built 0/1, running 1"), repr(text)


async def test_a_server_asking_to_wait_is_given_the_time_it_asks(cache, tmp_path, retry_fast):
    """429 with Retry-After: 1: the retry comes a second later (not after the 10 ms pause)."""
    c, lib, app, big = cache
    server = FlakyCache(c, {".narinfo": ["429-wait-1"]})
    async with trio.open_nursery() as n:
        await n.start(server.run)
        t0 = trio.current_time()
        rep, _root = await fetch_all(tmp_path, server, [lib])
        took = trio.current_time() - t0
        n.cancel_scope.cancel()
    assert rep.fetched == [lib] and took >= 1.0, took
    assert [st for _m, n, _r, st in server.asked if n.endswith(".narinfo")] == [429, 200]


def test_retry_after_is_read_as_seconds_or_a_date_and_capped():
    import types
    from purestore.cache.http_response import MAX_RETRY_AFTER, _retry_after_header
    def r(v):
        return types.SimpleNamespace(headers={"retry-after": v} if v is not None else {})
    assert _retry_after_header(r("3")) == 3.0
    assert _retry_after_header(r("86400")) == MAX_RETRY_AFTER
    assert _retry_after_header(r(None)) == 0.0
    assert _retry_after_header(r("soon")) == 0.0
    assert _retry_after_header(r("\u00b2")) == 0.0  # a Unicode digit: unreadable, not a crash
    # more digits than int() reads (4300): as long as any other big number, not a ValueError
    assert _retry_after_header(r("9" * 5000)) == MAX_RETRY_AFTER
    assert _retry_after_header(r("0" * 5000 + "7")) == 7.0
    # the HTTP-date form: seconds from now, nothing for a date past, capped
    import email.utils
    now = 1_800_000_000.0
    assert _retry_after_header(r(email.utils.formatdate(now + 7, usegmt=True)), now) == 7.0
    assert _retry_after_header(r("Wed, 21 Oct 2026 07:28:00 GMT"), 1_792_567_680.0 - 2.5) == 2.5
    assert _retry_after_header(r(email.utils.formatdate(now - 30, usegmt=True)), now) == 0.0
    assert _retry_after_header(r(email.utils.formatdate(now + 3600, usegmt=True)), now) == MAX_RETRY_AFTER


async def test_a_resume_that_fails_counts_as_an_attempt_and_is_retried(cache, tmp_path, retry_fast):
    """The big NAR's response is cut, the request for the rest answered 503, the next one 206."""
    c, lib, app, big = cache
    big_nar = next(ln[5:] for ln in (c / f"{big.hash_part}.narinfo").read_text().splitlines()
                   if ln.startswith("URL: "))
    server = FlakyCache(c, {big_nar: ["cut", "503"]})
    async with trio.open_nursery() as n:
        await n.start(server.run)
        rep, _root = await fetch_all(tmp_path, server, [big], attempts=3)
        n.cancel_scope.cancel()
    assert sorted(rep.fetched) == sorted([lib, big])
    assert [st for _m, n, _r, st in server.asked if n == big_nar] == [200, 503, 206]
