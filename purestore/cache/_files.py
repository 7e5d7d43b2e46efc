"""Opening a local cache's files for reading.

A cache directory may hold anything its owner (or anyone who can write there) put in it.
Opening a FIFO for reading blocks until someone writes to it, so a reader would hang; a device
or a directory is no NAR either.  :func:`open_regular` opens without blocking, then refuses
anything but a regular file with an ``OSError`` whose text says so.
"""

from __future__ import annotations

import errno
import os
import stat


def open_regular(path: str):
    """``open(path, "rb")`` for a regular file; OSError(EINVAL, "not a regular file") for a
    FIFO, device, socket or directory (FileNotFoundError and the like as ``open`` raises them)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
