"""``run_trio``: ``trio.run`` for the commands, with SIGTERM stopping them as Ctrl-C does.

SIGTERM normally reaches trio through SIGINT: the handler of :mod:`.cli.main` raises SIGINT, and
trio's own Ctrl-C handling cancels the run, so that every clean-up runs.  Where SIGINT is
ignored, that road is closed: a background job of a non-interactive shell (``pure copy … &``
in a script, or under ``timeout`` started from one) inherits SIGINT ignored, so that Ctrl-C at
the terminal leaves it alone, and trio then installs no handler.  Such a run listens for
SIGTERM itself and, when it comes, stops the command the same way, with :class:`Terminated`.
A command that works outside trio and has clean-up to run (``pure gc``: its trash) does the same
with :func:`sigterm_interrupts`.
"""

from __future__ import annotations

import contextlib
import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as Ctrl-C would be: the command's clean-up has run."""


def group_leaves(eg: BaseExceptionGroup):
    """The exceptions of a group and of the groups in it, in order."""
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from group_leaves(e)
        else:
            yield e


def run_trio(fn, *args):
    """``trio.run(fn, *args)``; see the module docstring."""
    import trio

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return trio.run(fn, *args)
    result: list = []

    async def watch(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as received:
            task_status.started()
            async for _ in received:
                raise Terminated

    async def guarded() -> None:
        async with trio.open_nursery() as n:
            await n.start(watch)
            result.append(await fn(*args))
            n.cancel_scope.cancel()

    try:
        trio.run(guarded)
    except BaseExceptionGroup as eg:
        leaves = list(group_leaves(eg))
        if any(isinstance(e, Terminated) for e in leaves):
            raise Terminated from eg
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    return result[0]


@contextlib.contextmanager
def sigterm_interrupts():
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread even where
    SIGINT is ignored (see the module docstring; where it is not, the CLI's handler already
    makes SIGTERM a Ctrl-C).  Outside the main thread it changes nothing."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return

    def on_term(signum, frame):
        raise Terminated

    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
