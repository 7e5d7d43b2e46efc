"""Build logs: every build's output stored zstd-compressed in ``<state_dir>/log/``.

Layout and reading: :mod:`purestore.store.build_logs`.  A log is written to a temporary file and
renamed into place when the build ends, so a reader never sees half a log; the newest build of a
derivation wins.
"""

from __future__ import annotations

import collections
import os
from typing import Callable

import zstandard

from ..errors import StoreError
from ..store.build_logs import log_path

TAIL_LINES = 25
TAIL_LINE_MAX = 4096  # characters of a line kept in the tail (errors, --json); the log keeps all


def _cut(text: str) -> str:
    """A tail line cut to :data:`TAIL_LINE_MAX` characters, saying how much was left out."""
    if len(text) <= TAIL_LINE_MAX:
        return text
    return f"{text[:TAIL_LINE_MAX]} … ({len(text) - TAIL_LINE_MAX} more characters: see `pure log`)"


class BuildLog:
    """Collects one build's output: compressed to disk, last lines kept in memory.

    ``echo`` (optional) gets every complete line as text (for ``--print-build-logs``).
    """

    def __init__(self, state_dir: str, drv_base: str, echo: Callable[[str], None] | None = None,
                 variant: str | None = None):
        self.path = log_path(state_dir, drv_base, variant)
        self.variant = variant
        self._tmp = f"{self.path}.tmp-{os.getpid()}-{id(self)}"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._file = open(self._tmp, "wb")
        except OSError as e:
            raise StoreError(f"cannot create the build log {self.path!r}: {e.strerror}") from e
        self._z = zstandard.ZstdCompressor(level=3).stream_writer(self._file, closefd=False)
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._partial = b""
        self._echo = echo
        self.size = 0

    def write(self, data: bytes) -> None:
        try:
            self._z.write(data)
        except OSError as e:  # a full disk, a quota: the build cannot go on unlogged
            self.discard()
            raise StoreError(f"cannot write the build log {self.path!r}: {e.strerror}") from e
        self.size += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            if line.endswith(b"\r"):  # a CRLF line end (shown: the stored log keeps it)
                line = line[:-1]
            text = line.decode(errors="replace")
            self._tail.append(_cut(text))
            if self._echo:
                self._echo(text)
        if len(self._partial) > 65536:  # a very long line: keep its end only
            self._partial = self._partial[-65536:]

    def line(self, text: str) -> None:
        """Add a line of our own (e.g. a builtin builder's messages)."""
        self.write(text.encode() + b"\n")

    def tail(self) -> list[str]:
        lines = list(self._tail)
        if self._partial:
            lines.append(_cut(self._partial.decode(errors="replace")))
        return lines[-TAIL_LINES:]

    def close(self) -> None:
        """Finish the log and move it into place (idempotent)."""
        if self._file.closed:
            return
        if self._partial and self._echo:
            self._echo(self._partial.decode(errors="replace"))
        try:
            self._z.close()
            self._file.close()
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.discard()
            raise StoreError(f"cannot store the build log {self.path!r}: {e.strerror}") from e

    def discard(self) -> None:
        """Drop the log: close it (ignoring a failure to flush) and remove the temporary file."""
        if not self._file.closed:
            try:
                self._z.close()
            except (OSError, zstandard.ZstdError):
                pass
            try:
                self._file.close()
            except OSError:
                pass
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
