"""Opening a local cache's files for reading.

A cache directory may hold anything its owner (or anyone who can write there) put in it.  A
device, socket or directory is no cache file: :func:`open_regular` refuses them.  A FIFO is
read as the stream someone feeds into it (a tool streaming a NAR in, the tests), but opening one
blocks until a writer comes and reading one waits for its bytes, so a FIFO nobody writes to
would hang the reader: it is opened without blocking and given :data:`FIFO_WAIT` seconds for
its first bytes.
"""

from __future__ import annotations

import errno
import os
import select
import stat

FIFO_WAIT = 30.0  # seconds a FIFO may take to give its first bytes (as stalled-download-timeout)


def open_regular(path: str):
    """``open(path, "rb")`` for a regular file (or a FIFO that is being written to);
    ``OSError`` saying why for anything else (FileNotFoundError and the like as ``open``
    raises them)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode):
            p = select.poll()
            p.register(fd, select.POLLIN)
            if not p.poll(FIFO_WAIT * 1000):
                raise OSError(errno.ETIMEDOUT, f"a FIFO that nothing was written to in {FIFO_WAIT:g} s", path)
        elif not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_if_regular(path: str, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of the regular file at ``path`` (symlinks followed); None when
    there is none, or something else is there (a FIFO is never waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit)
    except OSError:
        return None
    finally:
        os.close(fd)
