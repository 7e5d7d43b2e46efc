"""Output files named on the command line: written whole or not at all, without ever replacing
what is not a regular file.

A file is written to a temporary name next to it and renamed into place, so a reader never
sees half of it.  A rename over ``/dev/null``, ``/dev/stdout`` (a symlink) or a FIFO would
replace that device or link with a regular file, for every program of the machine: such a
target is written through instead, as a shell's ``>`` writes.
"""

from __future__ import annotations

import os
import stat


def written_through(path: str) -> bool:
    """Whether ``path`` is an existing target that is not a regular file or a directory (a
    device, a FIFO, a socket, or a symlink to one), or a name in ``/dev`` or ``/proc``
    (``/dev/stdout`` → ``/proc/self/fd/1`` → a file the shell opened): it is written into,
    never replaced."""
    try:
        st = os.stat(path)  # through symlinks: /dev/stdout → /proc/self/fd/1 → the terminal
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        return True
    full = os.path.abspath(path)
    return not stat.S_ISDIR(st.st_mode) and full.startswith(("/dev/", "/proc/"))


def write_through(path: str, text: str) -> None:
    """Write ``text`` into the existing special file ``path`` (see :func:`written_through`)."""
    with open(path, "w") as f:
        f.write(text)


def replace_file(path: str, text: str) -> None:
    """Write ``text`` to ``path``: through it when it is a device or the like, else to a
    temporary name renamed into place."""
    if written_through(path):
        write_through(path, text)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
