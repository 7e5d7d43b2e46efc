"""The strict streaming NAR reader (FORMATS.md 3): :func:`parse_nar` reads a NAR from a
*source* (anything with ``read(n)``) and yields events in NAR order (a directory before its
entries, entries sorted); :func:`read_nar_bytes` parses a small NAR in memory into tuples.

Events (``path`` is a tuple of ``bytes`` names relative to the root; ``()`` is the root):

- :class:`NarDirectory` ``(path)``
- :class:`NarRegular` ``(path, executable, size, chunks, offset)``: ``chunks`` iterates over the
  contents; it must be consumed before asking for the next event, or it is skipped (read and
  discarded) automatically.  ``offset`` is where the contents start in the NAR.
- :class:`NarSymlink` ``(path, target)``

Every malformation raises :class:`~purestore.errors.NarError` with the byte offset of the bad
token.
"""

from __future__ import annotations

from typing import Iterator

import attrs

from ..errors import NarError
from .nar_framing import (
    CLOSE,
    CONTENTS,
    EXECUTABLE,
    MAGIC,
    MAX_CONTENTS,
    MAX_DEPTH,
    MAX_NAME,
    MAX_TARGET,
    NODE,
    OPEN,
    _CHUNK,
    _TOKEN_MAX,
    _ZEROS,
    _unpack,
    _where,
    check_name,
    check_target,
    nar_str,
    render_path,
)


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
_MAGIC_FRAME = nar_str(MAGIC)
# the first bytes of the compressed files a NAR is often kept as (binary caches' nar/*.nar.*)
_COMPRESSED = ((b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b", "gzip"),
               (b"BZh", "bzip2"), (b"\x04\x22\x4d\x18", "lz4"), (b"LZIP", "lzip"))


def _compressed(head: bytes) -> str:
    """``head`` (the first bytes of the input) as a note of the compression it shows, or ''."""
    for magic, name in _COMPRESSED:
        if head.startswith(magic):
            return f" (it is {name}-compressed: decompress it first)"
    return ""


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
        at = self.src.offset
        head = self.src.take(8)
        if head != _MAGIC_FRAME[:8]:
            # not even the length of the magic: some other file (a compressed NAR, text...)
            raise NarError(f"not a NAR: it does not start with {MAGIC.decode()!r}{_compressed(head)}", at)
        tok = self._padded(len(MAGIC), at)
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
