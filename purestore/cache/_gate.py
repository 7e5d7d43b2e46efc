"""A capacity limiter that lets the biggest waiting job in first.

Substitution restores at most one big NAR per core at a time.  When a lane frees up, the
biggest NAR waiting for one goes next ("longest processing time first"): a run then does not end
with one core busy on a big path that happened to come last, which in a closure of one big
toolchain and many small paths makes most of the difference.  Among equal sizes, first come
first served.  ``pure copy --to`` orders its paths the same way (:mod:`.push`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools

import trio


class LargestFirst:
    """At most ``total`` holders at once; waiters are let in biggest ``size`` first."""

    def __init__(self, total: int):
        if total < 1:
            raise ValueError("a gate needs at least one place")
        self._free = total
        self._waiting: list[tuple[int, int, trio.Event]] = []  # heap of (-size, arrival, event)
        self._arrival = itertools.count()

    @contextlib.asynccontextmanager
    async def enter(self, size: int):
        await self.acquire(size)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, size: int) -> None:
        """Wait for a place (the biggest waiter first); give it back with :meth:`release`."""
        if self._free and not self._waiting:
            self._free -= 1
            await trio.lowlevel.checkpoint()
            return
        entry = (-size, next(self._arrival), trio.Event())
        heapq.heappush(self._waiting, entry)
        try:
            await entry[2].wait()
        except BaseException:
            if entry[2].is_set():  # handed a place just as it was cancelled: pass it on
                self.release()
            else:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            raise

    def release(self) -> None:
        if self._waiting:
            heapq.heappop(self._waiting)[2].set()  # the place goes straight to the biggest waiter
        else:
            self._free += 1
