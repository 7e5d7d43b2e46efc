"""Output files named on the command line: written whole or not at all, without ever replacing
what is not a regular file.

A file is written to a temporary name next to it and renamed into place, so a reader never
sees half of it.  A rename over ``/dev/null``, ``/dev/stdout`` or a FIFO would replace that
device or link with a regular file, for every program of the machine: such a target is written
through instead, as a shell's ``>`` writes, and ``/dev/stdout``, ``/dev/stderr`` and
``/dev/fd/N`` through the descriptor the process already has (so ``>> log`` keeps appending).
A symlink to a regular file keeps being a link: the file it points to is the one replaced.
"""

from __future__ import annotations

import os
import re
import stat

_STD = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


def file_name(text: str) -> str:
    """argparse type of an option naming an output file: an empty name (``--secret-out
    "$UNSET"``) is an error, never taken for the option left out (that would print a secret
    key on stdout instead)."""
    if not text:
        import argparse
        raise argparse.ArgumentTypeError("empty file name (is a variable unset?)")
    return text


def _own_fd(path: str) -> int | None:
    """The descriptor ``path`` names (/dev/stdout, /dev/fd/N, /proc/self/fd/N), if any."""
    full = os.path.abspath(path)
    if full in _STD:
        return _STD[full]
    m = re.fullmatch(r"/(?:dev/fd|proc/self/fd)/(\d+)", full)
    return int(m[1]) if m else None


def written_through(path: str) -> bool:
    """Whether ``path`` is an existing target that is not a regular file or a directory (a
    device, a FIFO, a socket, or a symlink to one), or a name in ``/dev`` or ``/proc``
    (``/dev/stdout`` → ``/proc/self/fd/1`` → a file the shell opened): it is written into,
    never replaced."""
    if _own_fd(path) is not None:
        return True
    try:
        st = os.stat(path)  # through symlinks: a link to /dev/null is /dev/null
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode):
        return False
    return not stat.S_ISREG(st.st_mode) or os.path.realpath(path).startswith(("/dev/", "/proc/"))


def write_through(path: str, text: str) -> None:
    """Write ``text`` into the existing special file ``path`` (see :func:`written_through`)."""
    fd = _own_fd(path)
    if fd is not None:
        data = text.encode()
        with memoryview(data) as view:
            done = 0
            while done < len(data):
                done += os.write(fd, view[done:])
        return
    with open(path, "w") as f:
        f.write(text)


def final_path(path: str) -> str:
    """Where a file named ``path`` really goes: through symlinks, so that a link stays a link."""
    return os.path.realpath(path) if os.path.islink(path) else path


def replace_file(path: str, text: str) -> None:
    """Write ``text`` to ``path``: through it when it is a device or the like, else to a
    temporary name renamed into place (next to the file a symlink points to)."""
    if written_through(path):
        write_through(path, text)
        return
    path = final_path(path)
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
