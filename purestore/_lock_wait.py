"""``wait_lock_released``: wait in a trio run, without blocking the trio thread, for a path lock
that another process holds.

The wait blocks a worker thread (``flock`` cannot be waited on otherwise), outside trio's default
thread limiter (40 threads): waits for many paths that another process holds would otherwise take
every thread of the run, and nothing of it needing a thread (restoring, registering, removing
temporary trees, even on Ctrl-C) could go on; when that other process waits for paths of this one
the same way, neither ever ends (two `pure build`s fetching one closure of a thousand paths into
one store did).  The waiting threads of a run are bounded all the same (:data:`WAIT_THREADS`): a
thread for each such path made a run waiting for 200 paths fail with ``can't start new thread``
where processes are limited (a container's pids limit).  Beyond that bound a wait polls instead;
it never waits for a thread to be free, which could wait for good (those threads' paths held by a
process that waits, holding its own, for one of ours).
"""

from __future__ import annotations

import trio

WAIT_THREADS = 64  # threads of one run blocked in a lock wait, at most
POLL = 0.1  # seconds between tries of a wait that found no thread free

_limiter = trio.lowlevel.RunVar("purestore_lock_wait_threads")


def _threads() -> trio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(WAIT_THREADS)
        _limiter.set(limiter)
        return limiter


async def wait_lock_released(locks, name: str) -> None:
    """Return once nobody holds the path lock ``name`` (:meth:`purestore.store.lock.PathLocks.
    wait_released`), or after :data:`POLL` seconds when :data:`WAIT_THREADS` waits are already
    under way: the caller tries to take the lock again, and waits again while it is busy.

    A cancelled wait is abandoned: its thread ends once the lock is released, holding nothing of
    the process meanwhile but its place among the :data:`WAIT_THREADS`."""
    threads = _threads()
    if threads.available_tokens < 1:
        await trio.sleep(POLL)
        return
    await trio.to_thread.run_sync(locks.wait_released, name, abandon_on_cancel=True, limiter=threads)
