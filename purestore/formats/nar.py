"""NAR (Nix ARchive): a streaming writer to a sink and a strict streaming reader (FORMATS.md 3).

The grammar, where ``str(s)`` is ``u64le(len(s)) + s + zero padding to a multiple of 8``::

    nar    = str("nix-archive-1") node
    node   = str("(") str("type") body str(")")
    body   = str("regular") [str("executable") str("")] str("contents") str(data)
           | str("symlink") str("target") str(target)
           | str("directory") { entry }
    entry  = str("entry") str("(") str("name") str(name) str("node") node str(")")

Directory entries are sorted by the raw bytes of their names, each name once.  Names are 1..255
bytes and must not be ``.``, ``..`` or contain ``/`` or NUL.  Symlink targets are 1..4096 bytes
without NUL.  Nesting is at most :data:`MAX_DEPTH` directories deep.

This module knows nothing of the file system (``store/fsnar.py`` walks trees): the writer takes a
*sink* (anything with ``write(bytes)``) and the reader a *source* (anything with ``read(n)``).

Reader events (``path`` is a tuple of ``bytes`` names relative to the root; ``()`` is the root),
produced in NAR order, i.e. a directory before its entries, entries sorted:

- :class:`NarDirectory` ``(path)``
- :class:`NarRegular` ``(path, executable, size, chunks, offset)``: ``chunks`` iterates over the
  contents; it must be consumed before asking for the next event, or it is skipped (read and
  discarded) automatically.  ``offset`` is where the contents start in the NAR.
- :class:`NarSymlink` ``(path, target)``

Every malformation raises :class:`~purestore.errors.NarError` with the byte offset of the bad
token.
"""

from __future__ import annotations

import struct
from typing import Iterable, Iterator

import attrs

from ..errors import NarError

MAGIC = b"nix-archive-1"
MAX_NAME = 255
MAX_TARGET = 4096
MAX_DEPTH = 256
#: largest file contents accepted (a NAR length field above this is "absurd")
MAX_CONTENTS = 1 << 62
_CHUNK = 1 << 20
_TOKEN_MAX = 16  # longest grammar token is "nix-archive-1" (13)

_ZEROS = bytes(8)
_pack = struct.Struct("<Q").pack
_unpack = struct.Struct("<Q").unpack_from


def nar_str(s: bytes) -> bytes:
    """``str(s)`` of the grammar: length, bytes, zero padding."""
    n = len(s)
    return _pack(n) + s + _ZEROS[: (-n) & 7]


def padding(n: int) -> bytes:
    """Zero bytes that pad ``n`` content bytes to a multiple of 8."""
    return _ZEROS[: (-n) & 7]


# Precomputed framing, shared with store/fsnar.py.
HEADER = nar_str(MAGIC)
OPEN = nar_str(b"(")
CLOSE = nar_str(b")")
NODE_REGULAR = OPEN + nar_str(b"type") + nar_str(b"regular")
NODE_SYMLINK = OPEN + nar_str(b"type") + nar_str(b"symlink") + nar_str(b"target")
NODE_DIRECTORY = OPEN + nar_str(b"type") + nar_str(b"directory")
EXECUTABLE = nar_str(b"executable") + nar_str(b"")
CONTENTS = nar_str(b"contents")
ENTRY_NAME = nar_str(b"entry") + OPEN + nar_str(b"name")
NODE = nar_str(b"node")


def check_name(name: bytes, where: str = "", offset: int | None = None) -> bytes:
    """Validate a directory entry name; raise :class:`NarError` saying what is wrong."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > MAX_NAME:
        raise NarError(
            f"invalid entry name {name[:300]!r}{where}: expected 1..{MAX_NAME} bytes, not '.' or "
            f"'..', without '/' or NUL",
            offset,
        )
    return name


def check_target(target: bytes, where: str = "", offset: int | None = None) -> bytes:
    if not target or len(target) > MAX_TARGET or b"\0" in target:
        raise NarError(
            f"invalid symlink target {target[:300]!r}{where}: expected 1..{MAX_TARGET} bytes "
            f"without NUL",
            offset,
        )
    return target


def _where(path: tuple) -> str:
    shown = render_path(path)
    if len(shown) > 200:
        shown = "…" + shown[-200:]
    return f" at {shown!r}"


def render_path(path: tuple[bytes, ...]) -> str:
    """``/a/b`` for a NAR path tuple (``/`` for the root), undecodable bytes escaped."""
    return "/" + "/".join(p.decode("utf-8", "backslashreplace") for p in path)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class NarWriter:
    """Write a NAR to ``sink`` (anything with ``write``), node by node.

    Calls mirror the grammar; the writer checks that they nest properly, that names are valid and
    sorted, and that a file gets exactly the contents size it announced::

        w = NarWriter(sink)            # writes the magic
        w.directory()                  # the root is a directory
        w.entry(b"a")                  # ... with an entry "a"
        w.regular(3, executable=True)  #     a file of 3 bytes
        w.contents(b"abc")
        w.end()                        #     closes the file and the entry
        w.entry(b"b")
        w.symlink(b"a")                #     a symlink is complete at once (entry closed too)
        w.end()                        # closes the root directory
        w.close()                      # checks the NAR is complete

    ``regular_bytes`` writes a whole small file in one call.  Framing writes are small; wrap the
    sink in a buffer when that matters (``store/fsnar.py`` batches its own).
    """

    def __init__(self, sink):
        self._write = sink.write
        # open frames: ["dir", last name] | ("entry",) | ("entry-filled",) | ["file", left, size]
        self._stack: list = []
        self._started_root = False
        self._write(HEADER)

    # -- nodes --------------------------------------------------------------------------------

    def _begin_node(self) -> None:
        if self._stack:
            top = self._stack[-1]
            if top[0] != "entry":
                raise NarError("a node must be the root or follow entry()")
            self._stack.pop()
            self._stack.append(("entry-filled",))
        elif self._started_root:
            raise NarError("the NAR already has its root node")
        self._started_root = True

    def regular(self, size: int, executable: bool = False) -> None:
        """Start a regular file of ``size`` bytes; then ``contents()`` exactly that much, ``end()``."""
        if not 0 <= size <= MAX_CONTENTS:
            raise NarError(f"file size {size} out of range")
        self._begin_node()
        self._write(NODE_REGULAR + (EXECUTABLE if executable else b"") + CONTENTS + _pack(size))
        self._stack.append(["file", size, size])

    def contents(self, data) -> None:
        top = self._stack[-1] if self._stack else None
        if top is None or top[0] != "file":
            raise NarError("contents() outside a regular file")
        n = len(data)
        if n > top[1]:
            raise NarError(f"file contents exceed the announced size {top[2]}")
        top[1] -= n
        self._write(data)

    def regular_bytes(self, data: bytes, executable: bool = False) -> None:
        """A whole regular file with contents ``data`` (node and, in an entry, the entry close)."""
        self.regular(len(data), executable)
        self.contents(data)
        self.end()

    def symlink(self, target: bytes) -> None:
        check_target(target)
        self._begin_node()
        self._write(NODE_SYMLINK + nar_str(target) + CLOSE)
        self._close_entry()

    def directory(self) -> None:
        if sum(1 for f in self._stack if f[0] == "dir") >= MAX_DEPTH:
            raise NarError(f"NAR nesting exceeds {MAX_DEPTH} directories")
        self._begin_node()
        self._write(NODE_DIRECTORY)
        self._stack.append(["dir", None])

    def entry(self, name: bytes) -> None:
        """Start entry ``name`` of the current directory (names strictly increasing)."""
        top = self._stack[-1] if self._stack else None
        if top is None or top[0] != "dir":
            raise NarError("entry() outside a directory")
        check_name(name)
        if top[1] is not None and name <= top[1]:
            raise NarError(f"entry {name!r} is not after {top[1]!r}: entries must be sorted and unique")
        top[1] = name
        self._write(ENTRY_NAME + nar_str(name) + NODE)
        self._stack.append(("entry",))

    def end(self) -> None:
        """Close the current file or directory (and the entry holding it)."""
        if not self._stack:
            raise NarError("end() with nothing open")
        top = self._stack.pop()
        if top[0] == "file":
            if top[1]:
                raise NarError(f"file closed {top[1]} bytes short of its announced size {top[2]}")
            self._write(padding(top[2]) + CLOSE)
        elif top[0] == "dir":
            self._write(CLOSE)
        else:
            raise NarError("end() on an entry without a node")
        self._close_entry()

    def _close_entry(self) -> None:
        if self._stack and self._stack[-1][0] == "entry-filled":
            self._stack.pop()
            self._write(CLOSE)

    def close(self) -> None:
        """Check that the NAR is complete (the root node written and everything closed)."""
        if self._stack or not self._started_root:
            raise NarError("NAR is incomplete: nodes are still open or there is no root")


def nar_of_bytes(data: bytes, executable: bool = False) -> bytes:
    """The NAR of a single regular file with contents ``data``."""
    return b"".join(
        (HEADER, NODE_REGULAR, EXECUTABLE if executable else b"", CONTENTS, nar_str(data), CLOSE)
    )


def nar_of_symlink(target: bytes) -> bytes:
    """The NAR of a single symlink."""
    return HEADER + NODE_SYMLINK + nar_str(check_target(target)) + CLOSE


# --------------------------------------------------------------------------------------------
# Events and the reader
# --------------------------------------------------------------------------------------------


@attrs.frozen
class NarDirectory:
    path: tuple


@attrs.frozen
class NarSymlink:
    path: tuple
    target: bytes


@attrs.frozen
class NarRegular:
    path: tuple
    executable: bool
    size: int
    chunks: Iterator = attrs.field(eq=False, repr=False)
    offset: int = 0


NarEvent = NarDirectory | NarRegular | NarSymlink


class _Source:
    """Buffered exact reads from a file object, counting the offset."""

    __slots__ = ("_read", "_buf", "_pos", "offset")

    def __init__(self, source):
        self._read = source.read
        self._buf = b""
        self._pos = 0
        self.offset = 0  # offset of the next unread byte

    def _fill(self, n: int) -> None:
        """Make sure at least ``n`` bytes are buffered, or raise on end of stream."""
        have = len(self._buf) - self._pos
        parts = [self._buf[self._pos :]] if have else []
        while have < n:
            data = self._read(max(n - have, 65536))
            if not data:
                raise NarError(
                    f"NAR is truncated: expected {n - have} more bytes", self.offset + have
                )
            parts.append(data)
            have += len(data)
        self._buf = b"".join(parts) if len(parts) != 1 else parts[0]
        self._pos = 0

    def skip(self, frame: bytes) -> bool:
        """Consume ``frame`` if the stream continues with exactly these bytes; else consume
        nothing and return False (the caller then parses token by token, for the error).
        At the end of the stream this is False too, with everything read kept buffered."""
        n = len(frame)
        if len(self._buf) - self._pos < n:
            parts = [self._buf[self._pos :]]
            have = len(parts[0])
            while have < n:
                data = self._read(max(n - have, 65536))
                if not data:
                    break
                parts.append(data)
                have += len(data)
            self._buf = b"".join(parts)
            self._pos = 0
            if have < n:
                return False
        if self._buf.startswith(frame, self._pos):
            self._pos += n
            self.offset += n
            return True
        return False

    def take(self, n: int) -> bytes:
        if len(self._buf) - self._pos < n:
            self._fill(n)
        p = self._pos
        self._pos = p + n
        self.offset += n
        return self._buf[p : p + n]

    def chunk(self, n: int) -> bytes:
        """Up to ``n`` (> 0) bytes, at least one; for streaming file contents."""
        have = len(self._buf) - self._pos
        if have == 0:
            data = self._read(min(n, _CHUNK))
            if not data:
                raise NarError(f"NAR is truncated in file contents: expected {n} more bytes", self.offset)
            if len(data) > n:
                self._buf, self._pos = data, n
                self.offset += n
                return data[:n]
            self.offset += len(data)
            return data
        k = min(have, n)
        p = self._pos
        self._pos = p + k
        self.offset += k
        return self._buf[p : p + k]

    def at_eof(self) -> bool:
        if len(self._buf) - self._pos:
            return False
        data = self._read(1)
        if data:
            self._buf, self._pos = data, 0
            return False
        return True


class _Contents:
    """Iterator over one file's contents, reading straight from the source."""

    __slots__ = ("_src", "remaining", "_dead")

    def __init__(self, src: _Source, size: int):
        self._src = src
        self.remaining = size
        self._dead = False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        if self._dead:
            raise RuntimeError("NAR file contents read after the reader moved on to the next event")
        if not self.remaining:
            raise StopIteration
        data = self._src.chunk(min(self.remaining, _CHUNK))
        self.remaining -= len(data)
        return data

    def _finish(self) -> None:
        while self.remaining:
            self.remaining -= len(self._src.chunk(min(self.remaining, _CHUNK)))
        self._dead = True


_FRAMES = {t: nar_str(t) for t in (b"(", b")", b"type", b"target", b"node", b"name", b"contents")}


class _Parser:
    """Recursive-descent over the grammar; error messages are only formatted on failure."""

    def __init__(self, source):
        self.src = _Source(source)

    def length(self) -> tuple[int, int]:
        at = self.src.offset
        (n,) = _unpack(self.src.take(8))
        return n, at

    def _padded(self, n: int, at: int) -> bytes:
        """The ``n`` bytes of a string whose length field was at ``at``, padding checked."""
        p = (n + 7) & ~7
        raw = self.src.take(p)
        if p != n and raw[n:] != _ZEROS[: p - n]:
            raise NarError("non-zero padding", at + 8 + n)
        return raw[:n] if p != n else raw

    def string(self, limit: int, what: str, path: tuple) -> tuple[bytes, int]:
        n, at = self.length()
        if n > limit:
            raise NarError(f"{what}{_where(path)} of {n} bytes is too long (at most {limit})", at)
        return self._padded(n, at), at

    def token(self) -> tuple[bytes, int]:
        n, at = self.length()
        if n > _TOKEN_MAX:
            raise NarError(f"expected a NAR token, got a string of {n} bytes", at)
        return self._padded(n, at), at

    def expect(self, want: bytes, context: str, path: tuple) -> None:
        frame = _FRAMES[want]
        at = self.src.offset
        raw = self.src.take(8)
        if raw != frame[:8]:
            (n,) = _unpack(raw)
            got = f"a string of {n} bytes" if n > _TOKEN_MAX else repr(self._padded(n, at))
            raise NarError(f"expected {want.decode()!r} {context}{_where(path)}, got {got}", at)
        tok = self._padded(len(want), at)
        if tok != want:
            raise NarError(f"expected {want.decode()!r} {context}{_where(path)}, got {tok!r}", at)

    def events(self) -> Iterator:
        tok, at = self.token()
        if tok != MAGIC:
            raise NarError(f"not a NAR: wrong magic {tok!r}, expected {MAGIC.decode()!r}", at)
        yield from self.node(())
        if not self.src.at_eof():
            raise NarError("trailing bytes after the end of the NAR", self.src.offset)

    def node(self, path: tuple) -> Iterator:
        # Iterative over directories so that nesting never hits Python's recursion limit.
        # The common shapes are matched whole (``skip``), which consumes nothing when they do
        # not match; the token-by-token parse after each is what finds and words the errors.
        expect = self.expect
        skip = self.src.skip
        stack: list[list] = []  # open directories: [path, last name]
        typed = False  # the next node's "(" "type" was consumed with its entry
        while True:
            if not typed and not skip(_OPEN_TYPE):
                expect(b"(", "to open a node", path)
                expect(b"type", "in a node", path)
            typed = False
            if skip(_REGULAR):
                kind = b"regular"
                yield from self.contents(path, False)
            elif skip(_REGULAR_X):
                kind = b"regular"
                yield from self.contents(path, True)
            else:
                kind, at = self.token()
                if kind == b"regular":
                    yield from self.regular(path)
                elif kind == b"symlink":
                    expect(b"target", "in a symlink", path)
                    target, tat = self.string(MAX_TARGET, "symlink target", path)
                    if not target or b"\0" in target:
                        check_target(target, _where(path), tat)
                    expect(b")", "to close a symlink", path)
                    yield NarSymlink(path, target)
                elif kind == b"directory":
                    if len(path) >= MAX_DEPTH:
                        raise NarError(f"NAR nesting exceeds {MAX_DEPTH} directories{_where(path)}", at)
                    yield NarDirectory(path)
                    stack.append([path, None])
                else:
                    raise NarError(f"unknown node type {kind!r}{_where(path)}", at)
            # Close finished nodes and find the next entry, if any.
            while True:
                if not stack:
                    return
                top = stack[-1]
                dpath = top[0]
                if kind != b"directory" or path is not dpath:
                    # we just finished a child node: close its entry (and often open the next)
                    if skip(_CLOSE_ENTRY):
                        entry = True
                    else:
                        expect(b")", "to close an entry", path)
                        entry = skip(_ENTRY)
                else:
                    entry = skip(_ENTRY)
                if not entry:
                    tok, at = self.token()
                    if tok == b")":
                        stack.pop()
                        path, kind = dpath, b"done"
                        continue
                    if tok != b"entry":
                        raise NarError(f"expected 'entry' or ')' in directory{_where(dpath)}, got {tok!r}", at)
                    expect(b"(", "after 'entry'", dpath)
                    expect(b"name", "in an entry", dpath)
                name, nat = self.string(MAX_NAME, "entry name", dpath)
                if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
                    check_name(name, f" in directory {render_path(dpath)!r}", nat)
                last = top[1]
                if last is not None and name <= last:
                    raise NarError(
                        f"entry {name!r} in directory {render_path(dpath)!r} "
                        f"{'duplicates' if name == last else 'is out of order after'} {last!r}",
                        nat,
                    )
                top[1] = name
                path = dpath + (name,)
                if skip(_NODE_OPEN_TYPE):
                    typed = True
                else:
                    expect(b"node", "in an entry", path)
                break

    def regular(self, path: tuple) -> Iterator:
        executable = False
        tok, at = self.token()
        if tok == b"executable":
            executable = True
            flag, fat = self.token()
            if flag != b"":
                raise NarError(f"expected '' after 'executable'{_where(path)}, got {flag!r}", fat)
            tok, at = self.token()
        if tok != b"contents":
            raise NarError(f"expected 'contents' in a regular file{_where(path)}, got {tok!r}", at)
        yield from self.contents(path, executable)

    def contents(self, path: tuple, executable: bool) -> Iterator:
        """The length, contents, padding and ")" of a regular file, after its "contents"."""
        size, sat = self.length()
        if size > MAX_CONTENTS:
            raise NarError(f"absurd file size {size}{_where(path)}", sat)
        contents = _Contents(self.src, size)
        yield NarRegular(path, executable, size, contents, self.src.offset)
        contents._finish()
        if self.src.skip(_TAILS[size & 7]):
            return
        p = (-size) & 7
        if p:
            pat = self.src.offset
            if self.src.take(p) != _ZEROS[:p]:
                raise NarError("non-zero padding", pat)
        self.expect(b")", "to close a regular file", path)


# Whole frames of the common shapes, for the parser's fast paths.
_OPEN_TYPE = OPEN + nar_str(b"type")
_REGULAR = nar_str(b"regular") + CONTENTS
_REGULAR_X = nar_str(b"regular") + EXECUTABLE + CONTENTS
_ENTRY = nar_str(b"entry") + OPEN + nar_str(b"name")
_CLOSE_ENTRY = CLOSE + _ENTRY
_NODE_OPEN_TYPE = NODE + _OPEN_TYPE
_TAILS = [_ZEROS[: (-k) & 7] + CLOSE for k in range(8)]  # padding and ")" after contents


def parse_nar(source) -> Iterator[NarEvent]:
    """Read a NAR from ``source`` (``read(n)``), strictly, yielding events in NAR order.

    Raises :class:`NarError` (with the byte offset) on any deviation from the grammar, on bad
    padding, unsorted or duplicate or invalid names, too deep nesting, truncation and trailing
    bytes.  The error comes when the reader reaches the bad bytes, so a consumer may already have
    seen events before it.
    """
    return _Parser(source).events()


def write_events(sink, events: Iterable[NarEvent]) -> None:
    """Write a NAR from events (as :func:`parse_nar` yields them) to ``sink``."""
    w = NarWriter(sink)
    open_dirs: list[tuple] = []  # paths of directories open in the writer
    for ev in events:
        path = ev.path
        while open_dirs and path[: len(open_dirs[-1])] != open_dirs[-1] or (
            open_dirs and len(path) <= len(open_dirs[-1])
        ):
            open_dirs.pop()
            w.end()
        if path:
            if not open_dirs or len(path) != len(open_dirs[-1]) + 1:
                raise NarError(f"event for {render_path(path)!r} without its parent directory")
            w.entry(path[-1])
        if isinstance(ev, NarDirectory):
            w.directory()
            open_dirs.append(path)
        elif isinstance(ev, NarSymlink):
            w.symlink(ev.target)
        else:
            w.regular(ev.size, ev.executable)
            for chunk in ev.chunks:
                w.contents(chunk)
            w.end()
    while open_dirs:
        open_dirs.pop()
        w.end()
    w.close()


def read_nar_bytes(data: bytes) -> list[tuple]:
    """Parse a whole NAR in memory into a list of plain tuples (tests, small NARs):
    ``("directory", path)``, ``("regular", path, executable, contents)``, ``("symlink", path, target)``.
    """
    import io

    out: list[tuple] = []
    for ev in parse_nar(io.BytesIO(data)):
        if isinstance(ev, NarDirectory):
            out.append(("directory", ev.path))
        elif isinstance(ev, NarSymlink):
            out.append(("symlink", ev.path, ev.target))
        else:
            out.append(("regular", ev.path, ev.executable, b"".join(ev.chunks)))
    return out
