"""The CPU-heavy halves of pushing and substituting, free of trio: they run in worker threads.

- :class:`VerifyingReader` turns compressed chunks into NAR bytes while checking FileSize,
  FileHash, NarSize and NarHash (never decompressing beyond NarSize); :class:`_Ahead` runs it
  in a thread of its own ahead of the restore;
- :func:`restore_stream` restores a NAR from such chunks into a temporary name in the store,
  :func:`restore_file` from a ``file://`` cache's NAR file;
- :func:`compress_path` dumps a store path's NAR, checks it against the registered hash, and
  compresses it into a temporary file, hashing both (:class:`_CompressSink`);
- :func:`nar_listing` gives the ``.ls`` listing of a NAR.

They take and return plain values (paths, :class:`NarInfo`, :class:`Hash`) and raise
:class:`CacheError`/:class:`StoreError`.  Worker processes instead of threads were tried for
them (a forkserver pool): on two cores the pool's start-up (~0.2 s of CPU) cost more than the
GIL contention it removed, pushes got slower and substitutions no faster, so threads stayed.
"""

from __future__ import annotations

import hashlib
import os
import queue
import secrets
import tempfile
import threading
from typing import Callable

from ..errors import CacheError, NarError, StoreError
from ..formats.hash import Hash
from ..formats.narinfo import NarInfo
from ._files import open_regular
from ._temps import temp_prefix
from .compression import compress_to, compressor, flush_to
from .decompression import open_reader
from .progress import Progress


class _Source:
    """A file whose ``read`` is a function (what a decompressor pulls compressed bytes from)."""

    def __init__(self, read: Callable[..., bytes]):
        self.read = read


class VerifyingReader:
    """A file-like NAR source over compressed chunks that checks sizes and hashes on the way.

    ``next_chunk()`` returns compressed bytes, ``b""`` at the end.  Raises :class:`CacheError`
    when the compressed file exceeds FileSize, ends early, or decompresses beyond NarSize; each
    step decompresses at most :data:`STEP` bytes, so a bomb (a few KiB of zstd standing for
    gigabytes) is stopped at NarSize before it is in memory.
    """

    STEP = 1 << 21  # NAR bytes decompressed at most in one step

    def __init__(self, next_chunk: Callable[[], bytes], ni: NarInfo, where: str, progress: Progress | None):
        self._next = next_chunk
        self.ni = ni
        self.where = where
        self.file_h = hashlib.sha256()
        self.file_n = 0
        self.nar_h = hashlib.sha256()
        self.nar_n = 0
        self.ended = False
        self.progress = progress
        # no FileSize: no compressor expands a NAR by more than this, so stop a bottomless stream
        self.max_file = ni.file_size if ni.file_size is not None else ni.nar_size + ni.nar_size // 64 + (1 << 20)
        self.dec = open_reader(ni.compression, _Source(self._compressed))

    def _compressed(self, _n: int = -1) -> bytes:
        """The next chunk of the compressed file, hashed and counted (the decompressor's source)."""
        if self.ended:
            return b""
        c = self._next()
        if not c:
            self.ended = True
            if self.ni.file_size is not None and self.file_n < self.ni.file_size:
                raise CacheError(f"download of {self.where} is truncated: got {self.file_n} of "
                                 f"{self.ni.file_size} bytes (FileSize)")
            return b""
        self.file_h.update(c)
        self.file_n += len(c)
        if self.file_n > self.max_file:
            if self.ni.file_size is not None:
                raise CacheError(f"{self.where} is larger than its FileSize {self.ni.file_size}")
            raise CacheError(f"{self.where} is much larger than its NarSize {self.ni.nar_size} "
                             f"(and its narinfo gives no FileSize)")
        return c

    def read(self, _n: int = -1) -> bytes:
        """The next NAR bytes (at most :data:`STEP`), ``b""`` at the end."""
        try:
            out = self.dec.read(self.STEP)
        except CacheError as e:
            if str(e).startswith(("corrupt ", "bytes after")):
                raise CacheError(f"{self.where}: {e}") from e
            raise
        if out:
            self.nar_h.update(out)
            self.nar_n += len(out)
            if self.nar_n > self.ni.nar_size:
                raise CacheError(f"{self.where} decompresses to more than its NarSize {self.ni.nar_size}")
            if self.progress is not None:
                self.progress.add_bytes(len(out))
            return out
        if self.dec.complete is False:
            raise CacheError(f"compressed NAR {self.where} is truncated")
        if self.dec.complete is None and self.nar_n < self.ni.nar_size:  # (zstd does not say)
            raise CacheError(f"NAR {self.where} ends after {self.nar_n} bytes, NarSize says {self.ni.nar_size} "
                             f"(the file is truncated, or another NAR)")
        return b""

    def verify(self) -> None:
        """Check FileSize, FileHash, NarSize and NarHash, all read."""
        ni = self.ni
        if ni.file_size is not None and self.file_n != ni.file_size:
            raise CacheError(f"{self.where} has {self.file_n} bytes, FileSize says {ni.file_size}")
        if ni.file_hash is not None:
            got = Hash("sha256", self.file_h.digest())
            if got != ni.file_hash:
                raise CacheError(f"{self.where} has hash {got.typed()}, FileHash says {ni.file_hash.typed()}")
        if self.nar_n != ni.nar_size:
            raise CacheError(f"NAR {self.where} has {self.nar_n} bytes, NarSize says {ni.nar_size}")
        got = Hash("sha256", self.nar_h.digest())
        if got != ni.nar_hash:
            raise CacheError(f"NAR {self.where} has hash {got.typed()}, NarHash says {ni.nar_hash.typed()}")


AHEAD_MIN = 1 << 20  # NARs from this size on are read by a thread of their own


class _Ahead:
    """The verifying reader run in a thread of its own, a few chunks ahead of the restore.

    Reading, decompressing and both hashes are C work that releases the GIL; parsing the NAR
    and creating the files is Python work between system calls.  One thread for each keeps both
    busy, where several restoring threads mostly wait for each other's GIL.
    """

    def __init__(self, reader: VerifyingReader, depth: int = 4):
        self._q: queue.Queue = queue.Queue(depth)
        self._stop = False
        self._done = False
        self._t = threading.Thread(target=self._run, args=(reader,), name="pure-nar-reader", daemon=True)
        self._t.start()

    def _run(self, reader: VerifyingReader) -> None:
        try:
            while not self._stop:
                c = reader.read()
                self._q.put(c)
                if not c:
                    return
        except BaseException as e:  # handed to the restoring thread
            self._q.put(e)

    def read(self, _n: int = -1) -> bytes:
        if self._done:
            return b""
        item = self._q.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if not item:
            self._done = True
        return item

    def close(self) -> None:
        """Stop the reading thread (it may be waiting to hand over a chunk) and wait for it."""
        self._stop = True
        while self._t.is_alive():
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass
        self._t.join()


def restore_stream(next_chunk, ni: NarInfo, where: str, tmp: str, progress: Progress | None = None, *,
                   direct: bool = False, umask: int | None = None) -> None:
    """Stream, verify and restore into ``tmp``, with canonical metadata; when anything fails,
    ``tmp`` is removed and the error raised.  ``direct``: big files are written with ``O_DIRECT``
    (for a store that flushes before it registers), ``umask``: the process's umask if the caller
    read it already (both: :func:`..store.fstree.restore_nar`)."""
    from ..store.fstree import remove_tree, restore_nar

    reader = VerifyingReader(next_chunk, ni, where, progress)
    # a thread of its own pays off for big NARs only (starting one costs ~0.1 ms and GIL hops)
    ahead = _Ahead(reader) if ni.nar_size >= AHEAD_MIN else reader

    def read_to_end_and_verify() -> None:
        while ahead.read():
            pass
        reader.verify()

    try:
        try:
            restore_nar(ahead, tmp, canonical=True, direct=direct, umask=umask)
        except NarError as e:
            # corrupt data explains a bad NAR better: read on and report a size or hash mismatch first
            try:
                read_to_end_and_verify()
            except CacheError as mismatch:
                raise CacheError(f"{mismatch} (and it is not a valid NAR: {e})") from e
            raise CacheError(f"NAR {where} is invalid: {e}") from e
        try:
            read_to_end_and_verify()
        except BaseException:
            remove_tree(tmp)  # restored completely, but not what the narinfo promised
            raise
    finally:
        if ahead is not reader:
            ahead.close()


def read_checked(reader: "VerifyingReader", *, listing: bool = False) -> bytes | None:
    """Read the NAR of ``reader`` to its end, parsed (as a substitution parses it), then check
    its sizes and hashes; the ``.ls`` listing of it with ``listing``.  A NAR that does not parse
    is a :class:`CacheError` naming it, unless its size or hash explains it better (then that)."""
    from ..formats import nar as _nar
    made = None
    try:
        if listing:
            made = nar_listing(reader)
        else:
            for ev in _nar.parse_nar(reader):
                if isinstance(ev, _nar.NarRegular):
                    for _ in ev.chunks:
                        pass
    except NarError as e:
        while reader.read():  # a size or hash mismatch explains a bad NAR better
            pass
        reader.verify()
        raise CacheError(f"NAR {reader.where} is invalid: {e}") from e
    while reader.read():
        pass
    reader.verify()
    return made


def nar_listing(nar_source) -> bytes:
    """The ``.ls`` JSON listing of a NAR read from ``nar_source`` (as Nix writes it)."""
    from ..formats import nar as _nar

    root: dict | None = None
    dirs: dict[tuple, dict] = {}
    for ev in _nar.parse_nar(nar_source):
        if isinstance(ev, _nar.NarDirectory):
            node: dict = {"type": "directory", "entries": {}}
            dirs[ev.path] = node
        elif isinstance(ev, _nar.NarSymlink):
            node = {"type": "symlink", "target": ev.target.decode("utf-8", "surrogateescape")}
        else:
            node = {"type": "regular", "size": ev.size}
            if ev.executable:
                node["executable"] = True
            node["narOffset"] = ev.offset
            for _ in ev.chunks:
                pass
        if not ev.path:
            root = node
        else:
            dirs[ev.path[:-1]]["entries"][ev.path[-1].decode("utf-8", "surrogateescape")] = node
    # names that are not UTF-8 keep their bytes, as in Nix's listing (surrogateescape both ways)
    from ..formats import nix_json
    return nix_json.dumps({"version": 1, "root": root}, separators=(",", ":")).encode("utf-8", "surrogateescape")


class Stopped(Exception):
    """A job was told to stop (its caller was cancelled); what it wrote is removed."""


class Oversized(Exception):
    """:func:`compress_path` met more NAR than its ``limit`` (the path is not what the store
    registered): its output is removed, and the caller does the job again where a big NAR is
    done, to report what the path really holds."""


INLINE_NAR_MAX = 64 << 10  # see compressed_inline


def compressed_inline(nar_size: int, method: str, level: int | None, parallel: bool) -> bool:
    """Whether a NAR of ``nar_size`` bytes is compressed in the caller's own thread rather than
    in a worker thread or the forked worker: a small one with zstd up to its default level 3,
    or with none, takes 0.1-0.3 ms, less than the hop to a worker and back with its GIL
    hand-overs.  Not with xz (1.7 ms for 300 bytes, most of it setting up the encoder) or zstd
    from level 9 (1-40 ms): those keep the other cores busy."""
    if parallel or nar_size > INLINE_NAR_MAX:
        return False
    return method == "none" or (method == "zstd" and (level is None or level <= 3))


class _CompressSink:
    """NAR bytes in: hashed and counted, compressed to a file whose bytes are hashed and counted.

    Works on views: the NAR chunks are the dumper's buffers and the compressed output the
    compressor's buffer, hashed and written with ``os.write`` straight from there."""

    def __init__(self, fd: int, path: str, method: str, level: int | None, progress: Progress | None,
                 parallel: bool = False, stop: threading.Event | None = None, limit: int | None = None):
        self.stop = stop
        self.limit = limit
        self.fd = fd
        self.path = path
        self.comp = compressor(method, level, parallel)
        self.nar = hashlib.sha256()
        self.nar_size = 0
        self.file = hashlib.sha256()
        self.file_size = 0
        self.progress = progress

    def _emit(self, c) -> None:
        self.file.update(c)
        n = len(c)
        self.file_size += n
        fd = self.fd
        try:
            done = os.write(fd, c)
            if done < n:
                with memoryview(c) as mv:
                    while done < n:
                        done += os.write(fd, mv[done:])
        except OSError as e:
            raise CacheError(f"cannot write {self.path!r}: {e.strerror}") from e

    def write(self, data) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped(f"stopped while compressing into {self.path!r}")
        if self.limit is not None and self.nar_size + len(data) > self.limit:
            raise Oversized(f"the NAR compressed into {self.path!r} has more than {self.limit} bytes")
        self.nar.update(data)
        self.nar_size += len(data)
        compress_to(self.comp, data, self._emit)
        if self.progress is not None:
            self.progress.add_bytes(len(data))

    def finish(self) -> None:
        flush_to(self.comp, self._emit)


def push_temp_name(tmp_dir: str | None) -> str:
    """A fresh name for :func:`compress_path`'s output in ``tmp_dir`` (None: the system's)."""
    # named by this process and machine: removed once it is gone (_temps.remove_leftovers)
    name = f"{temp_prefix('.tmp-push-')}{secrets.token_hex(8)}.nar"
    return os.path.join(tempfile.gettempdir() if tmp_dir is None else tmp_dir, name)


def compress_path(real: str, nar_hash: Hash, nar_size: int, method: str, level: int | None,
                  parallel: bool, tmp: str, listing: bool, progress: Progress | None = None, *,
                  stop: threading.Event | None = None, limit: int | None = None):
    """NAR of the path at ``real`` compressed (on all cores if ``parallel``) into the new file ``tmp`` (see
    :func:`push_temp_name`; removed again on failure), its NAR hash and size checked against the
    registered ones; returns (tmp, file hash, file size, listing).  ``stop``: when it is set,
    the work stops at the next chunk (at most 1 MiB of NAR later) with :class:`Stopped`.
    ``limit``: more NAR bytes than this (a chunk of at most 1 MiB read past it) raise
    :class:`Oversized` (for a caller that runs small jobs in its own thread)."""
    from ..store.fsnar import dump_path, stream_path

    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise CacheError(f"cannot create {tmp!r}: {e.strerror}") from e
    try:
        try:
            sink = _CompressSink(fd, tmp, method, level, progress, parallel, stop, limit)
            stream_path(real, sink.write)
            sink.finish()
        finally:
            os.close(fd)
        got = Hash("sha256", sink.nar.digest())
        if got != nar_hash or sink.nar_size != nar_size:
            raise StoreError(
                f"path {real!r} is corrupt: its NAR hash is {got.typed()} ({sink.nar_size} bytes), "
                f"but the store registered {nar_hash.typed()} ({nar_size} bytes)",
                hint="run 'pure store verify --check-contents --repair'")
        ls = None
        if listing:
            import io
            buf = io.BytesIO()
            dump_path(real, buf)
            buf.seek(0)
            ls = nar_listing(buf)
        return tmp, Hash("sha256", sink.file.digest()), sink.file_size, ls
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def restore_file(nar_file: str, ni: NarInfo, where: str, tmp: str, progress: Progress | None = None, *,
                 direct: bool = False, stop: threading.Event | None = None, umask: int | None = None) -> None:
    """Restore the NAR file of a ``file://`` cache (read in place) into ``tmp``.  ``stop``:
    when it is set, the restore raises :class:`Stopped` at its next MiB (``tmp`` removed).
    ``direct``, ``umask``: see :func:`restore_stream`."""
    try:
        f = open_regular(nar_file)
    except FileNotFoundError:
        raise CacheError(f"{where} is missing from the cache") from None
    except OSError as e:
        raise CacheError(f"cannot read {where}: {e.strerror}") from e
    def next_chunk() -> bytes:
        if stop is not None and stop.is_set():
            raise Stopped(f"the restore of {where} was stopped")
        return f.read(1 << 20)

    with f:
        restore_stream(next_chunk, ni, where, tmp, progress, direct=direct, umask=umask)
