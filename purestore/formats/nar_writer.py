"""The NAR writer (FORMATS.md 3): :class:`NarWriter` writes a NAR node by node to a *sink*
(anything with ``write(bytes)``), checking that calls nest as the grammar says;
:func:`nar_of_bytes` and :func:`nar_of_symlink` build whole one-node NARs;
:func:`write_events` writes a NAR from reader events (``formats/nar_reader.py``).
"""

from __future__ import annotations

from typing import Iterable

from ..errors import NarError
from .nar_framing import (
    CLOSE,
    CONTENTS,
    ENTRY_NAME,
    EXECUTABLE,
    HEADER,
    MAX_CONTENTS,
    MAX_DEPTH,
    NODE,
    NODE_DIRECTORY,
    NODE_REGULAR,
    NODE_SYMLINK,
    _pack,
    check_name,
    check_target,
    nar_str,
    padding,
    render_path,
)
from .nar_reader import NarDirectory, NarEvent, NarSymlink


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

