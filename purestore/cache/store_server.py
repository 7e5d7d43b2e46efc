"""``pure store serve``: the local store served as a binary cache over HTTP, as nix-serve does.

Nothing is written beforehand: each request is answered from the store as it is now.

- ``nix-cache-info``: the store dir, ``WantMassQuery: 1`` and a priority (30 by default, so
  that a cache of its own directory, Nix's default 50, is asked after it);
- ``<hash part>.narinfo`` of a valid path: its NAR hash and size, references, deriver, content
  address and signatures from the store, ``URL: nar/<hash part>-<nix32 NAR hash>.nar[.zst|.xz]``;
  ``Compression: none`` by default, so that ``FileHash`` and ``FileSize`` are the NAR's (with
  ``zstd`` or ``xz`` they are left out: the file is made when asked for); signed on the fly
  with the server's keys when it has any (this server holds a secret key, unlike ``pure cache
  serve``: it signs what it serves);
- ``nar/<hash part>-<nix32 NAR hash>.nar[…]``: the NAR, dumped (and compressed) as it is sent
  (uncompressed, ``Content-Length`` is the registered NarSize; compressed, chunked), checked
  against the registered hash and size on the way.  A NAR up to :data:`WHOLE` bytes is checked
  before anything is sent (a corrupt path gets 500); a bigger one holds its last chunk back
  until the check, so that a client never receives the whole body of a path that does not
  match (the connection is closed short instead).  A URL whose NAR hash is not the registered
  one is 404, as is a path that is no longer valid;
- ``log/<drv base name>``: the build log the store keeps for that derivation;
- 404 for anything else (``.ls`` listings are not made), 405 for methods other than GET/HEAD;
- with a read token, GET/HEAD only with ``Authorization: Bearer TOKEN`` (401 otherwise); TLS
  with a certificate and its key (``https://``); an access log.

A path whose NAR is being sent is kept from ``pure gc`` by a temporary root, dropped when the
response ends (:meth:`StoreCache.hold`).  Store queries run in worker threads (the store's
SQLite connection is shared and locked), so a busy database never stalls the other requests.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import threading

import trio

from ..errors import StoreError
from ..formats.hash import Hash
from ..formats.narinfo import NarInfo
from ..formats.path_info import PathInfo
from ..formats.signing import SecretKey
from ..formats.store_path import StorePath
from . import _storeapi as S
from .backend import CHUNK
from .compression import compressor, extension
from .http_server import CHALLENGE, asgi_app, read_check, respond, send_end, until_disconnect

log = logging.getLogger("purestore.cache.store_server")

DEFAULT_PRIORITY = 30
WHOLE = 1 << 20  # NARs up to this size are dumped whole and checked before they are sent
STREAMS = 32  # bigger NARs sent at once (each has a thread and up to 5 MiB in memory); others wait
_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
_NARINFO_RE = re.compile(rf"([{_NIX32}]{{32}})\.narinfo")
_NAR_RE = re.compile(rf"nar/([{_NIX32}]{{32}})-([{_NIX32}]{{52}})(\.nar(?:\.[a-z0-9]+)?)")
_LOG_RE = re.compile(r"log/([^/]+)")


class StoreCache:
    """What the server knows of the store: lookups by hash part, narinfos (signed with ``keys``)."""

    def __init__(self, store, store_dir: str, keys: list[SecretKey] = (), priority: int = DEFAULT_PRIORITY,
                 compression: str = "none", level: int | None = None):
        self.store = store
        self.store_dir = store_dir
        self.keys = list(keys)
        self.priority = priority
        self.compression = compression
        self.level = level
        self.ext = ".nar" + extension(compression)  # what a NAR file is called
        compressor(compression, level)  # check the level now

    def compressor(self):
        """A fresh compressor for one NAR, None without compression."""
        return compressor(self.compression, self.level) if self.compression != "none" else None

    def cache_info(self) -> bytes:
        return f"StoreDir: {self.store_dir}\nWantMassQuery: 1\nPriority: {self.priority}\n".encode()

    def lookup(self, hash_part: str) -> PathInfo | None:
        """The path info of the valid path with this hash part (blocking: a worker thread)."""
        sp = S.path_from_hash_part(self.store, hash_part)
        return S.path_info(self.store, sp) if sp is not None else None

    def hold(self, info: PathInfo) -> bool:
        """Keep ``info``'s path from the garbage collector while its NAR is sent (blocking: waits
        for a collection that is running); False, holding nothing, if it is gone or changed by now."""
        S.add_temp_root(self.store, info.path)
        now = S.path_info(self.store, info.path)
        if now is None or now.nar_hash != info.nar_hash:
            S.remove_temp_root(self.store, info.path)
            return False
        return True

    def release(self, info: PathInfo) -> None:
        S.remove_temp_root(self.store, info.path)

    def narinfo(self, info: PathInfo) -> bytes:
        plain = self.compression == "none"  # the file is the NAR: its hash and size are known
        ni = NarInfo(
            store_path=info.path, url=nar_url(info, self.ext), compression=self.compression,
            file_hash=info.nar_hash if plain else None, file_size=info.nar_size if plain else None,
            nar_hash=info.nar_hash, nar_size=info.nar_size,
            references=info.references, deriver=info.deriver, sigs=info.sigs, ca=info.ca)
        if self.keys:
            fp = ni.fingerprint(self.store_dir)
            ni = ni.with_sigs(k.sign(fp).render() for k in self.keys)
        return ni.render(self.store_dir).encode()

    def dump_whole(self, info: PathInfo) -> bytes:
        """The NAR file of a small path, checked, then compressed (blocking: a worker thread)."""
        parts: list[bytes] = []
        check = _Check(self.store_dir, info)
        from ..store.fsnar import stream_path

        def emit(mv) -> None:
            check.update(mv)
            parts.append(bytes(mv))
        stream_path(S.real_path(self.store, info.path), emit)
        check.finish()
        comp = self.compressor()
        if comp is None:
            return b"".join(parts)
        return b"".join([*(comp.compress(p) for p in parts), comp.flush()])


def nar_url(info: PathInfo, ext: str = ".nar") -> str:
    """Where this server has the NAR of ``info``'s path (nix-serve's form: the hash part finds
    the path, the NAR hash says which contents); ``ext``: ``.nar`` and the compression's."""
    return f"nar/{info.path.hash_part}-{info.nar_hash.nix32}{ext}"


class _Check:
    """The NAR hash and size of a dump, against the registered ones."""

    def __init__(self, store_dir: str, info: PathInfo):
        self.where = f"{store_dir}/{info.path.base_name}"
        self.info = info
        self.h = hashlib.sha256()
        self.n = 0

    def update(self, data) -> None:
        self.n += len(data)
        if self.n > self.info.nar_size:
            raise _Corrupt(f"path {self.where!r} is corrupt: its NAR is longer than the registered "
                           f"{self.info.nar_size} bytes", where=self.where,
                           hint="run 'pure store verify --check-contents --repair'")
        self.h.update(data)

    def finish(self) -> None:
        got = Hash("sha256", self.h.digest())
        if self.n != self.info.nar_size or got != self.info.nar_hash:
            raise _Corrupt(f"path {self.where!r} is corrupt: its NAR hash is {got.typed()} ({self.n} bytes), "
                           f"but the store registered {self.info.nar_hash.typed()} ({self.info.nar_size} bytes)",
                           where=self.where, hint="run 'pure store verify --check-contents --repair'")


class _Corrupt(StoreError):
    """A path whose files no longer match what the store registered: said to the client (the
    path and its hash are what the narinfo publishes anyway), not only in the server's log."""

    def __init__(self, message: str, *, where: str, **kw):
        super().__init__(message, **kw)
        self.where = where


class _Stopped(Exception):
    pass


class _NarStream:
    """A big path's NAR, dumped by a thread of its own a few chunks ahead of the sender, in
    chunks of :data:`CHUNK` bytes; the last one is handed over only once the NAR is checked."""

    def __init__(self, real: str, check: _Check, comp=None, depth: int = 4):
        self._q: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(real, check, comp), name="pure-nar-dump",
                                   daemon=True)
        self._t.start()

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _run(self, real: str, check: _Check, comp) -> None:
        from ..store.fsnar import stream_path
        buf = bytearray()

        def emit(mv) -> None:
            check.update(mv)
            buf.extend(mv if comp is None else comp.compress(mv))
            if len(buf) >= CHUNK:
                self._put(bytes(buf))
                buf.clear()
        try:
            try:
                stream_path(real, emit)
                check.finish()
                if comp is not None:
                    buf.extend(comp.flush())
                self._put(bytes(buf))
                self._put(b"")
            except _Stopped:
                raise
            except BaseException as e:  # handed to the sender
                self._put(e)
        except _Stopped:
            pass

    async def next(self) -> bytes:
        """The next chunk, ``b""`` at the end; raises what stopped the dump."""
        # abandoned when cancelled (the server stops): close() then stops the thread
        item = await trio.to_thread.run_sync(self._q.get, abandon_on_cancel=True)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the dumping thread (it may be waiting to hand over a chunk)."""
        self._stop.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break


def make_store_app(cache: StoreCache, read_token: str | None = None, access_log: logging.Logger | None = None):
    """The ASGI app serving ``cache``'s store (reads only with ``read_token`` when it is set)."""
    may_read = read_check(read_token)
    lookups = trio.CapacityLimiter(8)
    streams = trio.CapacityLimiter(STREAMS)

    async def lookup(hash_part: str) -> PathInfo | None:
        async with lookups:
            return await trio.to_thread.run_sync(cache.lookup, hash_part)

    async def handle(scope, receive, send):
        method = scope["method"]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            await respond(send, 405, b"method not allowed: this server only reads the store\n",
                          [(b"allow", b"GET, HEAD")])
            return
        if may_read is not None and not may_read(scope):
            await respond(send, 401, b"this cache needs a read token\n", CHALLENGE,
                          head=head)
            return
        name = scope["path"].lstrip("/")
        try:
            if name == "":
                await respond(send, 200, b"purestore store server\n", head=head)
            elif name == "nix-cache-info":
                await _whole(send, cache.cache_info(), b"text/x-nix-cache-info", head)
            elif m := _NARINFO_RE.fullmatch(name):
                info = await lookup(m.group(1))
                if info is None:
                    await respond(send, 404, b"no such path\n", head=head)
                else:
                    await _whole(send, cache.narinfo(info), b"text/x-nix-narinfo", head)
            elif m := _NAR_RE.fullmatch(name):
                info = await lookup(m.group(1))
                if info is None or info.nar_hash.nix32 != m.group(2) or m.group(3) != cache.ext:
                    await respond(send, 404, b"no such NAR\n", head=head)
                elif head:
                    await _send_nar(receive, send, cache, info, head, streams)
                elif not await trio.to_thread.run_sync(cache.hold, info):  # deleted meanwhile
                    await respond(send, 404, b"no such NAR\n")
                else:
                    try:
                        await _send_nar(receive, send, cache, info, head, streams)
                    finally:
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(cache.release, info)
            elif m := _LOG_RE.fullmatch(name):
                try:
                    drv = StorePath.from_base_name(m.group(1))
                except ValueError:
                    drv = None
                data = await trio.to_thread.run_sync(S.build_log, cache.store, drv) if drv else None
                if data is None:
                    await respond(send, 404, b"no such log\n", head=head)
                else:
                    await _whole(send, data, b"text/plain; charset=utf-8", head)
            else:
                await respond(send, 404, b"not found\n", head=head)
        except _Corrupt as e:
            log.error("error: %s", e)
            await respond(send, 500, f"path {e.where!r} is corrupt on this server: its NAR does not "
                                     f"match the registered hash; the server's owner must repair it\n".encode(),
                          [(b"x-pure-retry", b"no")], head=head)  # (pure's clients do not ask again)
        except StoreError as e:
            log.error("error: %s", e)
            await respond(send, 500, b"cannot read the store\n", head=head)

    return asgi_app(handle, access_log)


async def _whole(send, body: bytes, content_type: bytes, head: bool) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-length", str(len(body)).encode()), (b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": b"" if head else body})


_NAR_TYPE = (b"content-type", b"application/x-nix-nar")


async def _send_nar(receive, send, cache: StoreCache, info: PathInfo, head: bool,
                    streams: trio.CapacityLimiter) -> None:
    plain = cache.compression == "none"
    if head or info.nar_size <= WHOLE:
        # HEAD: the path exists (it was just looked up; a compressed size is not known before
        # compressing); a small NAR: checked before it is sent
        body = b"" if head else await trio.to_thread.run_sync(cache.dump_whole, info)
        size = info.nar_size if head and plain else None if head else len(body)
        await send({"type": "http.response.start", "status": 200, "headers": [
            _NAR_TYPE, *([(b"content-length", str(size).encode())] if size is not None else [])]})
        await send({"type": "http.response.body", "body": body})
        return
    async with streams:
        await _stream_nar(receive, send, cache, info)


async def _stream_nar(receive, send, cache: StoreCache, info: PathInfo) -> None:
    """Send a big NAR as it is dumped; a client that goes away stops the dump (and is logged
    with 499), a NAR that fails its check ends the response short."""
    comp = cache.compressor()
    stream = _NarStream(S.real_path(cache.store, info.path), _Check(cache.store_dir, info), comp)
    try:
        first = await stream.next()  # an unreadable path fails before the response starts
        # compressed: the size is not known before the end (chunked transfer)
        await send({"type": "http.response.start", "status": 200, "headers": [
            _NAR_TYPE, *([(b"content-length", str(info.nar_size).encode())] if comp is None else [])]})
        whole = False  # the whole NAR dumped, checked and handed to the server
        ended = False  # uncompressed: its last bytes went out before the client was seen gone
        failed = False
        sent = 0

        async def body() -> None:
            nonlocal whole, ended, failed, sent
            chunk = first
            while chunk:
                if comp is None and sent + len(chunk) == info.nar_size:
                    ended = await send_end(send, chunk)
                else:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
                try:
                    chunk = await stream.next()
                except StoreError as e:
                    # the response has started: returning without its end makes the server
                    # close the connection short, which the client sees as a truncated download
                    log.error("error: %s", e)
                    failed = True
                    return
            whole = True
        gone = await until_disconnect(receive, body)
        # a client that has every byte of a NAR of known length may close before the stream
        # has found its end: that is a whole response (its end, dropped by the server, logs it
        # as sent)
        if (whole and not gone) or (ended and not failed):
            await send({"type": "http.response.body", "body": b""})
    finally:
        stream.close()
