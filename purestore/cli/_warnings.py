"""Warnings logged by the library (``log.warning`` under ``purestore``), shown by a command
through its progress display, so that a warning and a status line never share a line."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable


class _To(logging.Handler):
    def __init__(self, write: Callable[[str], None]):
        super().__init__(logging.WARNING)
        self.write = write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(record.getMessage())
        except Exception:  # a warning must never break the work
            self.handleError(record)


@contextlib.contextmanager
def warnings_to(write: Callable[[str], None] | None, logger: str = "purestore"):
    """Within: warnings logged under ``logger`` are shown with ``write(text)`` (a progress
    display's way to print a line of its own); None: as without (straight to stderr)."""
    if write is None:
        yield
        return
    handler = _To(write)
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


def warn_missing_search_dirs(include_paths) -> None:
    """``warning: …`` on stderr for each ``-I`` (or ``PURE_PATH``) root that is not a directory;
    called once by each command that evaluates, before it does."""
    from ..expr.loader import missing_search_dirs
    for text in missing_search_dirs(include_paths):
        print(f"warning: {text}", file=sys.stderr, flush=True)
