"""Ctrl-C while ``pure`` starts: its modules load and its arguments are parsed.

Nothing is open then and nothing is to be undone, so pure ends at once, as an interrupted
command does (``error: interrupted``, status 130; ``error: terminated (SIGTERM)``, 143, for the
SIGTERM that :mod:`purestore.cli.main` turns into SIGINT).  With Python's own handler the
KeyboardInterrupt came out of whatever import or argparse call was running, as a traceback.
The command gets Python's handler back as it starts (:func:`end`), for its clean-up.

Uses ``_signal``, not ``signal``: importing ``signal`` builds its enums, a while in which Ctrl-C
had no handler of pure's yet.
"""

import _signal
import os

terminated = False  # set by main's SIGTERM handler


def _interrupted(signum, frame) -> None:
    os.write(2, b"error: terminated (SIGTERM)\n" if terminated else b"error: interrupted\n")
    os._exit(143 if terminated else 130)


def begin() -> None:
    """Ctrl-C ends pure quietly from now on, until :func:`end` (only where SIGINT has Python's
    handler: ignored, as in a background job of a script, it stays ignored)."""
    try:
        if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
            _signal.signal(_signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread (main() called by a library user)
        pass


def end() -> None:
    """Ctrl-C is Python's KeyboardInterrupt again (if :func:`begin` had changed it)."""
    if _signal.getsignal(_signal.SIGINT) is _interrupted:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
