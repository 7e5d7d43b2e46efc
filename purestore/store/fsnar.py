"""File trees -> NARs: the module that walks file trees to serialise them (DESIGN.md, FORMATS.md 3 and 6).

- :func:`dump_path` writes the NAR of a file, symlink or directory to a sink;
  :func:`stream_path` hands it to a callback as views of reused buffers (no copy).
- :func:`hash_path` gives its NAR hash and size; :func:`scan_path` the references in it;
  :func:`nar_hash_and_scan` both in one pass.
- :func:`copy_and_hash` copies a tree into the store reading every file once, hashing, scanning
  and giving the copy canonical metadata on the way.

The other direction (a NAR restored as a tree), canonical metadata for an existing tree and tree
removal are in :mod:`.fstree`.

Canonical metadata: mtime 1 on everything (symlinks too), files 0444 or 0555 when the owner x bit
was set, directories 0555, no setuid/setgid/sticky bits, no extended attributes.

Speed matters (``pure hash path`` is benchmarked against ``nix hash path``): paths are handled as
bytes, names sorted as bytes, the NAR framing and small files are batched into one buffer before
it is handed to the hash, big files are read in 1 MiB chunks into a reused buffer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import Callable, Iterable

from ..errors import BadHash, StoreError
from ..formats import nar as _nar
from ..formats.hash import ALGOS, Hash
from ..formats.refscan import RefScanner

_BUFSIZE = 1 << 20  # pooled buffers; must hold _FLUSH + _SMALL + 256 levels of framing
_POOL = 4  # buffers in flight at most (4 MiB)
_FLUSH = 1 << 19  # hand a buffer to the consumer once it holds this much
_SMALL = 1 << 18  # files up to this size are read in one go into the batch buffer
_CHUNK = 1 << 20
# Buffers of finished dumps, taken by the next ones: a fresh 1 MiB buffer costs zeroing and page
# faults, which showed in profiles of pushes (a dump per store path).  Used from any thread
# with single list operations (atomic under the GIL); holds at most _SPARE_MAX buffers.
_SPARE: list[bytearray] = []
_SPARE_MAX = 2 * _POOL

_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_NODE_REGULAR = _nar.NODE_REGULAR
_NODE_REGULAR_X = _nar.NODE_REGULAR + _nar.EXECUTABLE
_CONTENTS = _nar.CONTENTS
_NODE_SYMLINK = _nar.NODE_SYMLINK
_NODE_DIRECTORY = _nar.NODE_DIRECTORY
_ENTRY_NAME = _nar.ENTRY_NAME
_NODE = _nar.NODE
_CLOSE = _nar.CLOSE
_CLOSE2 = _nar.CLOSE + _nar.CLOSE
_ZEROS = bytes(8)
_pack = _nar._pack
_HEAD = _NODE_REGULAR + _CONTENTS
_HEAD_X = _NODE_REGULAR_X + _CONTENTS
_TAILS = [_ZEROS[: (-k) & 7] + _CLOSE for k in range(8)]  # after a file's contents
_TAILS_ENTRY = [t + _CLOSE for t in _TAILS]  # ... that is a directory entry
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_open, _fstat, _readv, _close, _S_ISREG = os.open, os.fstat, os.readv, os.close, stat.S_ISREG

_KIND = {
    stat.S_IFSOCK: "a socket",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _show(p: bytes) -> str:
    return os.fsdecode(p)


def _unsupported(p: bytes, mode: int) -> StoreError:
    kind = _KIND.get(stat.S_IFMT(mode), f"of unknown type {stat.S_IFMT(mode):o}")
    return StoreError(
        f"{_show(p)!r} is {kind}: only regular files, directories and symlinks can be archived"
    )


def _oserror(what: str, p: bytes, e: OSError) -> StoreError:
    return StoreError(f"cannot {what} {_show(p)!r}: {e.strerror or e}")


class _Consumer:
    """Hands filled buffers to ``emit`` in a worker thread, so that hashing (which releases the
    GIL) overlaps with reading the next files.  Order is kept; buffers go back to ``free``; an
    exception in ``emit`` is re-raised in the producer at the next ``put`` or at ``close``."""

    def __init__(self, emit: Callable[[memoryview], object], free):
        import queue
        import threading

        self.emit = emit
        self.free = free
        self.q: "queue.SimpleQueue" = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="nar-consumer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        get, emit, free = self.q.get, self.emit, self.free.put
        while True:
            item = get()
            if item is None:
                return
            buf, n = item
            if self.error is None:
                try:
                    with memoryview(buf) as mv, mv[:n] as data:
                        emit(data)
                except BaseException as e:  # handed to the producer
                    self.error = e
            free(buf)

    def put(self, buf, n: int) -> None:
        if self.error is not None:
            self.close()
        self.q.put((buf, n))

    def close(self) -> None:
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()
        if self.error is not None:
            e, self.error = self.error, None
            raise e


class _Dumper:
    """Serialises a tree as NAR bytes into ``emit``, optionally copying it to a destination.

    NAR bytes are written into pooled 1 MiB buffers (``buf`` up to ``pos``): framing and small
    files are batched; big files are read straight into fresh pool buffers.  A buffer holding
    ``_FLUSH`` bytes or more goes to the consumer: a worker thread (started only once the NAR
    outgrows one buffer) calls ``emit`` with a memoryview valid during the call, then recycles it.
    """

    __slots__ = ("buf", "mv", "pos", "size", "emit", "consumer", "free", "nbufs")

    def __init__(self, emit: Callable[[memoryview], object]):
        self.free = None  # the pool's free list, made with the consumer (small NARs need neither)
        self.nbufs = 0
        self.size = 0
        self.emit = emit
        self.consumer: _Consumer | None = None
        self._new_buffer()
        h = _nar.HEADER
        self.buf[: len(h)] = h
        self.pos = len(h)

    def _new_buffer(self) -> None:
        free = self.free
        if free is not None and (self.nbufs >= _POOL or not free.empty()):
            buf = free.get()
        else:
            self.nbufs += 1
            try:
                buf = _SPARE.pop()
            except IndexError:
                buf = bytearray(_BUFSIZE)
        self.buf = buf
        self.mv = memoryview(buf)
        self.pos = 0

    def _hand_over(self, n: int) -> None:
        c = self.consumer
        if c is None:
            import queue

            self.free = queue.SimpleQueue()
            c = self.consumer = _Consumer(self.emit, self.free)
        self.mv.release()
        c.put(self.buf, n)
        self.size += n
        self._new_buffer()

    def flush(self) -> None:
        if self.pos:
            self._hand_over(self.pos)

    def add(self, data: bytes) -> None:
        pos = self.pos
        end = pos + len(data)
        self.buf[pos:end] = data
        self.pos = end

    def finish(self) -> None:
        if self.consumer is None:
            self.size += self.pos
            with self.mv[: self.pos] as data:
                self.emit(data)
        else:
            self.flush()
            self.consumer.close()  # the thread is gone: every other buffer is back in free
        self.mv.release()
        spare = [self.buf]
        free = self.free
        if free is not None:
            while not free.empty():
                spare.append(free.get())
        _SPARE.extend(spare)
        del _SPARE[_SPARE_MAX:]  # one operation under the GIL: never more than _SPARE_MAX kept

    def abort(self) -> None:
        self.mv.release()
        if self.consumer is not None:
            try:
                self.consumer.close()
            except BaseException:
                pass

    # -- nodes --------------------------------------------------------------------------------

    def node(self, p: bytes, dst: bytes | None, depth: int) -> None:
        """The root: a file, directory or symlink given by path."""
        try:
            st = os.lstat(p)
        except OSError as e:
            raise _oserror("read", p, e) from e
        mode = st.st_mode
        if stat.S_ISREG(mode):
            self.regular(None, p, b"", dst, b"", _TAILS)
        elif stat.S_ISDIR(mode):
            self.directory(p, dst, depth)
        elif stat.S_ISLNK(mode):
            self.symlink(None, p, p, dst, b"", _CLOSE)
        else:
            raise _unsupported(p, mode)

    def symlink(self, at, name: bytes, p: bytes, dst: bytes | None, prefix: bytes, suffix: bytes) -> None:
        try:
            target = os.readlink(name, dir_fd=at)
        except OSError as e:
            raise _oserror("read symlink", p, e) from e
        n = len(target)
        self.add(prefix + _NODE_SYMLINK + _pack(n) + target + _ZEROS[: (-n) & 7] + suffix)
        if dst is not None:
            try:
                os.symlink(target, dst)
                os.utime(dst, (1, 1), follow_symlinks=False)
            except OSError as e:
                raise _oserror("create symlink", dst, e) from e

    def regular(self, at, name: bytes, parent: bytes, dst: bytes | None, prefix: bytes, tails) -> None:
        """A regular file ``name`` in directory ``parent`` whose fd is ``at`` (or, when ``at`` is
        None, the path ``name``), framed by ``prefix`` and ``tails[size % 8]``."""
        try:
            fd = _open(name, _O_READ, dir_fd=at)
        except OSError as e:
            p = name if at is None else parent + b"/" + name
            if e.errno == errno.ELOOP:  # replaced by a symlink under our feet
                raise StoreError(f"{_show(p)!r} changed while it was being archived") from e
            raise _oserror("open", p, e) from e
        wfd = -1
        p = None
        try:
            st = _fstat(fd)
            mode = st.st_mode
            if not _S_ISREG(mode):
                p = name if at is None else parent + b"/" + name
                raise _unsupported(p, mode)
            size = st.st_size
            x = mode & 0o100
            head = prefix + (_HEAD_X if x else _HEAD) + _pack(size)
            pos = self.pos
            end = pos + len(head)
            self.buf[pos:end] = head
            if dst is not None:
                try:
                    wfd = os.open(dst, _O_CREATE, 0o600)
                except OSError as e:
                    raise _oserror("create", dst, e) from e
            if size <= _SMALL:
                mv = self.mv
                start = end
                stop = start + size
                # Ask for one byte more than the size: a regular file gives a short read only at
                # its end, so one read normally gets the whole file and proves it did not grow.
                while True:
                    n = _readv(fd, [mv[end : stop + 1]])
                    end += n
                    if not n or end >= stop:
                        break
                if end != stop:
                    p = name if at is None else parent + b"/" + name
                    raise StoreError(f"{_show(p)!r} changed size while it was being archived")
                if wfd >= 0 and size:
                    _write_all(wfd, mv[start:stop], dst)
                tail = tails[size & 7]
                self.buf[end : end + len(tail)] = tail
                self.pos = end + len(tail)
            else:
                self.pos = end
                self.flush()
                self.big(fd, size, name if at is None else parent + b"/" + name, wfd, dst)
                self.add(tails[size & 7])
            if wfd >= 0:
                os.fchmod(wfd, 0o555 if x else 0o444)
                os.utime(wfd, (1, 1))
        except StoreError:
            raise
        except OSError as e:
            raise _oserror("read", name if at is None else parent + b"/" + name, e) from e
        finally:
            _close(fd)
            if wfd >= 0:
                _close(wfd)
        if self.pos >= _FLUSH:
            self.flush()

    def big(self, fd: int, size: int, p: bytes, wfd: int, dst) -> None:
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
        left = size
        readv = os.readv
        while left:
            mv = self.mv
            want = left if left < _BUFSIZE else _BUFSIZE
            n = readv(fd, [mv[:want]])
            if not n:
                raise StoreError(f"{_show(p)!r} changed size while it was being archived")
            if wfd >= 0:
                _write_all(wfd, mv[:n], dst)
            left -= n
            self._hand_over(n)
        if os.read(fd, 1):
            raise StoreError(f"{_show(p)!r} changed size while it was being archived")

    def directory(self, p: bytes, dst: bytes | None, depth: int) -> None:
        if depth >= _nar.MAX_DEPTH:
            raise StoreError(f"{_show(p)!r} is nested more than {_nar.MAX_DEPTH} directories deep")
        try:
            dfd = os.open(p, _O_DIR)
        except OSError as e:
            raise _oserror("open directory", p, e) from e
        try:
            try:
                with os.scandir(p) as it:
                    entries = sorted((e.name, e) for e in it)
            except OSError as e:
                raise _oserror("list directory", p, e) from e
            if dst is not None:
                try:
                    os.mkdir(dst, 0o700)
                except OSError as e:
                    raise _oserror("create directory", dst, e) from e
            self.add(_NODE_DIRECTORY)
            regular = self.regular
            for name, e in entries:
                n = len(name)
                prefix = _ENTRY_NAME + _pack(n) + name + _ZEROS[: (-n) & 7] + _NODE
                subdst = dst + b"/" + name if dst is not None else None
                try:
                    if e.is_file(follow_symlinks=False):
                        regular(dfd, name, p, subdst, prefix, _TAILS_ENTRY)
                    elif e.is_dir(follow_symlinks=False):
                        self.add(prefix)
                        self.directory(p + b"/" + name, subdst, depth + 1)
                        self.add(_CLOSE)
                    elif e.is_symlink():
                        self.symlink(dfd, name, p + b"/" + name, subdst, prefix, _CLOSE2)
                    else:
                        sub = p + b"/" + name
                        raise _unsupported(sub, os.lstat(sub).st_mode)
                except StoreError:
                    raise
                except OSError as ex:
                    raise _oserror("read", p + b"/" + name, ex) from ex
                if self.pos >= _FLUSH:
                    self.flush()
            self.add(_CLOSE)
        finally:
            os.close(dfd)
        if dst is not None:
            try:
                os.chmod(dst, 0o555)
                os.utime(dst, (1, 1))
            except OSError as ex:
                raise _oserror("set metadata of", dst, ex) from ex


def _write_all(fd: int, data, dst) -> None:
    try:
        n = os.write(fd, data)
        while n < len(data):
            n += os.write(fd, memoryview(data)[n:])
    except OSError as e:
        raise _oserror("write", dst, e) from e


def _run(path: str, emit, dst: str | None = None) -> int:
    p = os.fsencode(path)
    d = _Dumper(emit)
    try:
        d.node(p, os.fsencode(dst) if dst is not None else None, 0)
    except BaseException:
        d.abort()
        raise
    d.finish()
    return d.size


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def dump_path(path: str, sink) -> None:
    """Write the NAR of ``path`` (file, directory or symlink, not followed) to ``sink.write``.

    ``sink.write`` gets ``bytes`` chunks in order; for big NARs it is called from a worker
    thread (while the caller's thread reads the next files), so it must not depend on running
    in the caller's thread.  An exception from it is re-raised here.  Raises
    :class:`StoreError` for unreadable files and for sockets, FIFOs and devices.
    """
    write = sink.write
    _run(path, lambda data: write(bytes(data)))


def stream_path(path: str, emit: Callable[[memoryview], object]) -> int:
    """Like :func:`dump_path` without a copy of every byte: ``emit`` gets the NAR of ``path``
    in order as memoryviews valid only during the call (their buffers are reused afterwards),
    for big NARs from a worker thread; an exception from it is re-raised here.  Returns the
    NAR size."""
    return _run(path, emit)


def hash_path(path: str, algo: str = "sha256") -> tuple[Hash, int]:
    """The NAR hash (with ``algo``) and NAR size of ``path``."""
    if algo not in ALGOS:
        raise BadHash(f"unknown hash algorithm {algo!r}, expected one of {', '.join(ALGOS)}")
    h = hashlib.new(algo)
    size = _run(path, h.update)
    return Hash(algo, h.digest()), size


def scan_path(path: str, hash_parts: Iterable[str]) -> set[str]:
    """The hash parts among ``hash_parts`` that occur in the NAR serialisation of ``path``."""
    s = RefScanner(hash_parts)
    _run(path, s.feed)
    return s.found


def nar_hash_and_scan(path: str, hash_parts: Iterable[str]) -> tuple[Hash, int, set[str]]:
    """sha256 NAR hash, NAR size and references of ``path``, reading it once."""
    h = hashlib.sha256()
    s = RefScanner(hash_parts)
    update, feed = h.update, s.feed

    def emit(data):
        update(data)
        feed(data)

    size = _run(path, emit)
    return Hash("sha256", h.digest()), size, s.found


def copy_and_hash(src: str, dst: str, *, scan: Iterable[str] = ()) -> tuple[Hash, int, set[str]]:
    """Copy the tree at ``src`` to ``dst`` (which must not exist), reading each file once.

    Returns the sha256 NAR hash, NAR size and the hash parts of ``scan`` found in the NAR.  The
    copy has canonical metadata.  Raises :class:`StoreError` when ``dst`` exists, for unreadable
    files and for sockets, FIFOs and devices (``dst`` may then hold a partial copy).
    """
    if os.path.lexists(dst):
        raise StoreError(f"cannot copy to {dst!r}: it already exists")
    h = hashlib.sha256()
    s = RefScanner(scan)
    update = h.update
    if s._wanted:
        feed = s.feed

        def emit(data):
            update(data)
            feed(data)
    else:
        emit = update
    size = _run(src, emit, dst)
    return Hash("sha256", h.digest()), size, s.found


def hash_file(path: str, algo: str = "sha256") -> Hash:
    """The flat hash of the contents of the file at ``path`` (symlinks followed)."""
    if algo not in ALGOS:
        raise BadHash(f"unknown hash algorithm {algo!r}, expected one of {', '.join(ALGOS)}")
    h = hashlib.new(algo)
    p = os.fsencode(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(p):  # (the link is there, its target is not)
            raise StoreError(f"cannot open {_show(p)!r}: it is a symlink to {_show(os.readlink(p))!r}, "
                             f"which does not exist") from e
        raise _oserror("open", p, e) from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{path!r} is a directory: use 'hash path' for trees")
        buf = bytearray(_CHUNK)
        mv = memoryview(buf)
        while True:
            n = os.readv(fd, [buf])
            if not n:
                break
            h.update(mv[:n])
    except StoreError:
        raise
    except OSError as e:
        raise _oserror("read", p, e) from e
    finally:
        os.close(fd)
    return Hash(algo, h.digest())
