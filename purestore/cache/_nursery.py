"""trio helpers of the cache layer: a nursery that hands back a single purestore error instead of
an exception group, and a worker thread that can be told to stop.

trio wraps everything raised in a nursery in an ``ExceptionGroup``.  The CLI prints
:class:`PurestoreError` as ``error: ...``; a group of them would show as a traceback.  When every
leaf of the group is a :class:`PurestoreError` the first one is raised (the group chained as
its cause); a ``KeyboardInterrupt`` leaf is re-raised as such; anything else stays a group.
"""

from __future__ import annotations

import contextlib
import threading

import trio

from .._run import group_leaves
from ..errors import PurestoreError




@contextlib.asynccontextmanager
async def open_nursery():
    try:
        async with trio.open_nursery() as n:
            yield n
    except BaseExceptionGroup as eg:
        leaves = list(group_leaves(eg))
        for e in leaves:
            if isinstance(e, KeyboardInterrupt):
                raise KeyboardInterrupt from eg
        if leaves and all(isinstance(e, PurestoreError) for e in leaves):
            raise leaves[0] from None
        raise


async def run_stoppable(fn, *args, discard=None):
    """``fn(*args, stop=event)`` in a worker thread, stopped when this task is cancelled.

    ``trio.to_thread.run_sync`` waits for its thread to finish whatever happens, and a thread
    that compresses a big NAR (xz, or zstd at a high level) takes minutes: Ctrl-C would wait for
    it.  Here the task gives up waiting at once when cancelled, sets ``event`` (which ``fn``
    checks between chunks of its work, raising when it is set) and waits, shielded, until the
    thread has ended: its clean-up (removing its temporary file) is done when this raises.  A
    result the thread returned all the same (it finished as the cancellation came) is handed
    to ``discard`` (say, to remove the file it made).
    """
    stop, started, ended = threading.Event(), threading.Event(), threading.Event()
    result: list = []

    def work():
        started.set()
        try:
            if stop.is_set():  # cancelled before this thread got going: nothing to do
                return None
            result.append(fn(*args, stop=stop))
            return result[0]
        finally:
            ended.set()
    try:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except trio.Cancelled:
        stop.set()
        # A cancellation can also come before the thread is started (or ever will be): then
        # there is nothing to wait for.  ``stop`` is set before ``started`` is read here, and
        # the thread sets ``started`` before it reads ``stop``: either it is seen started (and
        # waited for) or it sees ``stop`` and does nothing.
        if started.is_set():
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(ended.wait)
            if result and discard is not None:
                discard(result[0])
        raise
