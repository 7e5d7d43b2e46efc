"""Progress of pushes and substitutions: paths and bytes done of the total.

:class:`Progress` is a no-op base; :class:`TextProgress` writes one status line to a stream (a
terminal gets it rewritten in place, anything else a line every few seconds and at the end).
The methods are called from trio tasks and worker threads alike; they only add integers.
"""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    """Counters for paths and bytes; subclasses show them."""

    def __init__(self, verb: str = "copying"):
        self.verb = verb
        self.paths_total = 0
        self.paths_done = 0
        self.bytes_total = 0
        self.bytes_done = 0
        self._lock = threading.Lock()

    def expect(self, paths: int, nbytes: int) -> None:
        with self._lock:
            self.paths_total += paths
            self.bytes_total += nbytes
        self.update()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_done += n
        self.update()

    def path_done(self, path: str) -> None:
        with self._lock:
            self.paths_done += 1
        self.update(force=True)

    def message(self, text: str) -> None:
        """A line for people (e.g. 'copying path X from Y')."""

    def update(self, force: bool = False) -> None:
        pass

    def finish(self) -> None:
        pass


def format_size(n: float) -> str:
    """A byte count for people: 120 B, 88.0 KiB, 353.6 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


class TextProgress(Progress):
    def __init__(self, verb: str = "copying", stream=None, verbose: bool = False):
        super().__init__(verb)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.verbose = verbose
        # without a terminal, the first line after 5 s (the totals grow as the narinfos come:
        # at once, it would say "0/1 paths"); a quick copy prints its final line only
        self._last = 0.0 if self.tty else time.monotonic()
        self._shown = False

    def line(self) -> str:
        text = f"{self.verb} {self.paths_done}/{self.paths_total} paths"
        if self.bytes_total:  # nothing to count (say, narinfos only): paths alone
            text += f", {format_size(self.bytes_done)}/{format_size(self.bytes_total)}"
        return text

    def message(self, text: str) -> None:
        if self.verbose:
            self._write(text, final=True)

    def update(self, force: bool = False) -> None:
        if not self.paths_total:
            return
        now = time.monotonic()
        interval = 0.2 if self.tty else 5.0
        if now - self._last < interval and not (force and self.tty):
            return
        self._last = now
        self._write(self.line(), final=not self.tty)

    def _write(self, text: str, final: bool) -> None:
        try:
            if self.tty:
                self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
            self._shown = True
        except (OSError, ValueError):
            pass

    def note(self, text: str) -> None:
        """A line of its own (a warning): on a terminal the status line is cleared first and
        drawn again after it, so that the two never share a line."""
        try:
            if self.tty:
                redraw = self.line() if self._shown and self.paths_total else ""
                self.stream.write("\r\x1b[K" + text + "\n" + redraw)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def finish(self) -> None:
        if self.paths_total:
            self._write(self.line(), final=True)
