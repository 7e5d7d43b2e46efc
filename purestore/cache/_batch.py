"""Blocking calls of many tasks run together, one worker thread hop for each batch of them.

A hop to a worker thread and back costs ~0.1-0.3 ms, most of it handing the GIL over, where
renaming or writing a small file into a local cache directory takes a few dozen microseconds: a
push of 200 small paths spent more time hopping than writing.  :class:`BatchedCalls` gathers the
calls that tasks make while one batch is under way and runs them, in order, in the next hop.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import trio


class _Call:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn
        self.done = False
        self.result: object = None
        self.error: BaseException | None = None


class BatchedCalls:
    """``await run(fn)`` runs the blocking ``fn()`` in a worker thread and returns its result or
    raises its exception, as ``trio.to_thread.run_sync(fn)`` would; but the calls made while a
    batch runs wait, and run one after the other in a single hop: the first of them to be woken
    runs the batch for all.  One batch runs at a time, inside ``hold()`` (an async context
    manager, held for the whole batch: a lock) when it is given.

    A call whose task is cancelled before its batch started is dropped; once started, the batch
    runs to its end (as ``run_sync`` does) and the task is cancelled after that."""

    def __init__(self, hold: Callable[[], contextlib.AbstractAsyncContextManager] | None = None):
        self._hold = hold
        self._queue: list[_Call] = []
        self._running = False
        self._ended = trio.Event()  # set when the running batch ends (then replaced)
        self.hops = 0  # batches run (for tests)

    async def run(self, fn: Callable[[], object]):
        call = _Call(fn)
        self._queue.append(call)
        try:
            while not call.done:
                if self._running:
                    await self._ended.wait()
                else:
                    await self._run_batch()
        except BaseException:
            if call in self._queue:  # (never started)
                self._queue.remove(call)
            raise
        if call.error is not None:
            try:
                raise call.error
            finally:
                call.error = None
        return call.result

    async def _run_batch(self) -> None:
        self._running = True
        batch, self._queue = self._queue, []

        def work() -> None:
            for c in batch:
                try:
                    c.result = c.fn()
                except BaseException as e:
                    c.error = e
                c.done = True
        try:
            async with (self._hold() if self._hold is not None else contextlib.nullcontext()):
                self.hops += 1
                await trio.to_thread.run_sync(work)
        finally:
            # (cancelled while waiting for hold: those not run go back, for the next batch)
            self._queue[:0] = [c for c in batch if not c.done]
            self._running = False
            ended, self._ended = self._ended, trio.Event()
            ended.set()
