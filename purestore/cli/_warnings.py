"""Warnings logged by the library (``log.warning`` under ``purestore``), shown by a command
through its progress display, so that a warning and a status line never share a line."""

from __future__ import annotations

import contextlib
import logging
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
