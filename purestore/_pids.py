"""Temporary files named by the process that made them (``<prefix><pid>-<more>``): whether that
process is gone, so that the file is a leftover of a killed run and may be removed."""

from __future__ import annotations

import os


def writer_gone(name: str, prefix: str) -> bool:
    """True when ``name`` is ``<prefix><pid>-…`` and no process ``pid`` runs on this machine."""
    if not name.startswith(prefix):
        return False
    pid, dash, _ = name[len(prefix):].partition("-")
    return bool(dash) and pid.isdigit() and not os.path.exists(f"/proc/{pid}")
