"""``syncfs``: flush the file system that holds a path (before registering what was written there)."""

from __future__ import annotations

import ctypes
import os

from ..errors import StoreError

_libc = ctypes.CDLL(None, use_errno=True)  # libc is already loaded; find_library would fork ldconfig


def syncfs(path: str) -> None:
    """Flush the file system holding ``path`` (so files are on disk before they are registered)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise StoreError(f"cannot sync the file system of {path!r}: {os.strerror(e)}")
    finally:
        os.close(fd)
