"""The process a builtin builder (``builtin:fetchurl``, the registry fetchers) runs in.

:func:`purestore.build.running.run_builtin` starts it as ``python -c … BUILDER OUT PID`` in a
session of its own, with the derivation's ATerm on stdin, so that a limit of the settings
(``timeout``, ``max-silent-time``, ``max-build-log-size``) or an interrupt can end it at any
moment, as a sandboxed builder is ended: by SIGKILL to its process group (the ``pip`` or
``apt-get`` it runs goes too).  A thread in ``pure`` could not be stopped in a blocking read.

It dies with ``pure`` even when ``pure`` is killed outright (PR_SET_PDEATHSIG; a registry
client it runs then ends at its next write, to a pipe nobody reads).  Protocol: stdout is the
build log (the builder's lines, written as they come); stderr carries a ``.`` whenever a
download makes progress (so that a download that goes on is not silent for
``max-silent-time``), and, on failure, a last line ``ERROR_MARK`` + JSON ``{"kind", "message"}``
(``kind``: ``HashMismatch`` or ``BuildError``).  Exit status 0: the output was made; 1: the
builder failed as that line says; anything else (a traceback on stderr): a bug.
"""

from __future__ import annotations

import json
import os
import sys
import time

ERROR_MARK = "\x00error "


class ChildLog:
    """The ``log`` a builtin builder is given: calling it adds a line to the build log;
    :meth:`alive` says the builder made progress without writing a line (a downloaded chunk)."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, line: str) -> None:
        _write_all(1, line.encode(errors="surrogateescape") + b"\n")

    def alive(self) -> None:
        now = time.monotonic()
        if now - self._last >= 0.5:
            self._last = now
            _write_all(2, b".")


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _die_with(parent: int) -> None:
    """Be killed when ``pure`` dies, even outright (SIGKILL), as a sandboxed builder is."""
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that
        os._exit(1)


def main(argv: list[str]) -> int:
    builder, out, parent = argv
    _die_with(int(parent))
    from ..errors import BuildError, HashMismatch
    from ..formats.derivation import parse_aterm
    from .builtins import BUILTIN_BUILDERS
    drv = parse_aterm(sys.stdin.buffer.read(), where="the derivation of a builtin builder")
    try:
        BUILTIN_BUILDERS[builder](drv, out, ChildLog())
    except BuildError as e:
        kind = "HashMismatch" if isinstance(e, HashMismatch) else "BuildError"
        _write_all(2, ("\n" + ERROR_MARK + json.dumps({"kind": kind, "message": str(e)}) + "\n").encode())
        return 1
    return 0
