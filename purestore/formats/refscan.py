"""Reference scanning: which of a set of store path hash parts occur in a byte stream.

As in Nix, a reference is any occurrence of a path's 32-character nix32 hash part in the NAR
serialisation of an object (file contents, entry names, symlink targets).  The scanner finds every
run of at least 32 nix32 characters and looks up each 32-character window of the run in the set
of wanted hash parts, so the cost does not grow with the number of candidates.

Runs are found at C speed: the chunk is translated so that nix32 characters become ``a`` and all
other bytes NUL, then ``bytes.find`` looks for 32 ``a`` in a row.  Matches split across ``feed``
calls are found: the last 31 bytes of each chunk are kept and scanned together with the start of
the next one.
"""

from __future__ import annotations

from typing import Iterable

from ..errors import InvalidStorePath
from .hash import NIX32_ALPHABET

HASH_LEN = 32
_TABLE = bytes(0x61 if chr(i) in NIX32_ALPHABET else 0 for i in range(256))
_RUN = b"a" * HASH_LEN
_VALID = frozenset(NIX32_ALPHABET)


class RefScanner:
    """Feed bytes, then read ``found``: the wanted hash parts that occurred."""

    __slots__ = ("_wanted", "found", "_tail")

    def __init__(self, hash_parts: Iterable[str]):
        wanted = set()
        for h in hash_parts:
            if len(h) != HASH_LEN or not set(h) <= _VALID:
                raise InvalidStorePath(f"{h!r} is not a 32-character nix32 store path hash part")
            wanted.add(h.encode())
        self._wanted = wanted
        self.found: set[str] = set()
        self._tail = b""

    def _scan(self, data) -> None:
        wanted = self._wanted
        if not wanted:
            return
        t = data.translate(_TABLE)
        find = t.find
        pos = find(_RUN)
        while pos >= 0:
            end = find(b"\0", pos + HASH_LEN)
            if end < 0:
                end = len(t)
            if end - pos > 256 and len(wanted) <= 64:
                # a long run (base32 blobs, long lowercase words): search each wanted hash
                run = data[pos:end]
                for w in wanted:
                    if w in run:
                        self.found.add(w.decode())
            else:
                for i in range(pos, end - HASH_LEN + 1):
                    w = data[i : i + HASH_LEN]
                    if w in wanted:
                        self.found.add(w.decode())
            pos = find(_RUN, end)

    def feed(self, data) -> None:
        """Scan the next chunk of the stream (bytes, bytearray or memoryview)."""
        if not self._wanted:
            return
        n = len(data)
        if not n:
            return
        if self._tail:
            self._scan(self._tail + bytes(data[: HASH_LEN - 1]))
        if isinstance(data, memoryview):
            data = data.tobytes()
        self._scan(data)
        if n >= HASH_LEN - 1:
            self._tail = bytes(data[n - HASH_LEN + 1 :])
        else:
            self._tail = (self._tail + bytes(data))[-(HASH_LEN - 1) :]

    def __call__(self, data) -> None:
        self.feed(data)


def scan_bytes(data: bytes, hash_parts: Iterable[str]) -> set[str]:
    """The hash parts among ``hash_parts`` that occur in ``data``."""
    s = RefScanner(hash_parts)
    s.feed(data)
    return s.found
