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

This module is the public face of the NAR format and re-exports its parts:
``formats/nar_framing.py`` (the grammar's limits, ``str()`` framing, precomputed frames, name and
target checks), ``formats/nar_writer.py`` (:class:`NarWriter`, whole small NARs, writing from
events) and ``formats/nar_reader.py`` (the events and the strict streaming parser).

The reader's events (:class:`NarDirectory`, :class:`NarRegular`, :class:`NarSymlink`) and its
errors are described in :mod:`.nar_reader`.
"""

from __future__ import annotations

from .nar_framing import (
    CLOSE as CLOSE,
    CONTENTS as CONTENTS,
    ENTRY_NAME as ENTRY_NAME,
    EXECUTABLE as EXECUTABLE,
    HEADER as HEADER,
    MAGIC as MAGIC,
    MAX_CONTENTS as MAX_CONTENTS,
    MAX_DEPTH as MAX_DEPTH,
    MAX_NAME as MAX_NAME,
    MAX_TARGET as MAX_TARGET,
    NODE as NODE,
    NODE_DIRECTORY as NODE_DIRECTORY,
    NODE_REGULAR as NODE_REGULAR,
    NODE_SYMLINK as NODE_SYMLINK,
    OPEN as OPEN,
    _pack as _pack,
    check_name as check_name,
    check_target as check_target,
    nar_str as nar_str,
    padding as padding,
    render_path as render_path,
)
from .nar_reader import (
    NarDirectory as NarDirectory,
    NarEvent as NarEvent,
    NarRegular as NarRegular,
    NarSymlink as NarSymlink,
    parse_nar as parse_nar,
    read_nar_bytes as read_nar_bytes,
)
from .nar_writer import (
    NarWriter as NarWriter,
    nar_of_bytes as nar_of_bytes,
    nar_of_symlink as nar_of_symlink,
    write_events as write_events,
)

__all__ = [
    "CLOSE", "CONTENTS", "ENTRY_NAME", "EXECUTABLE", "HEADER", "MAGIC", "MAX_CONTENTS", "MAX_DEPTH",
    "MAX_NAME", "MAX_TARGET", "NODE", "NODE_DIRECTORY", "NODE_REGULAR", "NODE_SYMLINK", "OPEN",
    "_pack", "check_name", "check_target", "nar_str", "padding", "render_path",
    "NarDirectory", "NarEvent", "NarRegular", "NarSymlink", "parse_nar", "read_nar_bytes",
    "NarWriter", "nar_of_bytes", "nar_of_symlink", "write_events",
]
