"""The uploads ``pure cache serve`` takes (``PUT``, :func:`.server.make_app`), once their token
and name have passed: the body written to a temporary file, then renamed into place under the
cache directory's shared lock (:func:`_put`, :func:`_publish`).

- A narinfo is checked before it is put in place, and keeps the signatures of the one it
  replaces (:func:`_check_and_merge_narinfo`); an upload refused there is :class:`Refused`.
- A name whose directory a symbolic link takes out of the cache is not written
  (:func:`_may_write`).
- A refused upload is answered without reading its whole body, and its connection closed
  after a bounded "lingering close" (:func:`_refuse`).
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile

import trio

from ..errors import CacheError
from ._files import read_if_regular
from ._temps import temp_prefix
from .backend import check_name, file_mode, make_dirs
from .http_server import respond
from .info import CacheInfo
from .prune import cache_lock, narinfo_lock

log = logging.getLogger("purestore.cache.server")

MAX_UPLOAD = 1 << 40
# the first bytes of an upload (a narinfo, a small NAR: most uploads) are written in the event
# loop, the rest in a worker thread (a big NAR's writes may wait for the disk)
SMALL_UPLOAD = 1 << 18


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
        if name == "nix-cache-info":
            with narinfo_lock(directory):
                _check_cache_info(tmp, path)
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


_CACHE_INFO_MAX = 1 << 16  # bytes of an uploaded nix-cache-info (Nix's has one line)


def _check_cache_info(tmp: str, path: str) -> None:
    """Refuse (raise :class:`Refused`) the ``nix-cache-info`` uploaded to ``tmp`` when a reader
    could not use it (400: not one, or without ``StoreDir``), or when it gives another store dir
    than the one at ``path`` it replaces (409): every narinfo of the cache names paths of that
    dir, and one such upload would turn the whole cache away from its readers.  A client writes
    one only where there is none (a push, Nix's too); one that cannot be read may be replaced."""
    with open(tmp, "rb") as f:
        data = f.read(_CACHE_INFO_MAX + 1)
    if len(data) > _CACHE_INFO_MAX:
        raise Refused(413, f"nix-cache-info is over {_CACHE_INFO_MAX >> 10} KiB: not a nix-cache-info")
    try:
        new = CacheInfo.parse(data, "nix-cache-info")
    except CacheError as e:
        raise Refused(400, str(e)) from None
    old = read_if_regular(path, _CACHE_INFO_MAX)
    if not old:
        return
    try:
        current = CacheInfo.parse(old, "nix-cache-info")
    except CacheError:
        return  # (a broken one: repaired)
    if current.store_dir != new.store_dir:
        raise Refused(409, f"nix-cache-info: this cache is for store dir {current.store_dir!r}, "
                           f"not {new.store_dir!r}; its narinfos name paths of {current.store_dir!r}")


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
        if not os.path.isdir(parent):  # (nearly always there: a stat is quicker than a thread hop)
            await trio.to_thread.run_sync(make_dirs, parent)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(".tmp-upload-"), dir=parent)
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
                    if body and total <= SMALL_UPLOAD:  # into the page cache: quicker than a thread hop
                        f.write(body)
                    elif body:
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
