"""BatchedCalls: blocking calls of many tasks, one worker thread hop for each batch."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from purestore.cache._batch import BatchedCalls


async def test_calls_made_while_a_batch_runs_share_the_next_hop_and_each_gets_its_own_outcome():
    """The first call runs alone (nothing else was waiting); the 30 made meanwhile run in one
    hop, in the order they were made, each in a worker thread, and each caller gets its own result or exception."""
    batches = BatchedCalls()
    release = threading.Event()
    ran: list[int] = []
    got: dict[int, object] = {}
    made: list[int] = []

    def first():
        release.wait(10)
        return "first"

    def job(i):
        assert threading.current_thread() is not threading.main_thread()
        ran.append(i)
        if i % 7 == 0:
            raise ValueError(f"job {i}")
        return i * 2

    async def call(i):
        made.append(i)
        try:
            got[i] = await batches.run(lambda: job(i))
        except ValueError as e:
            got[i] = e

    async with trio.open_nursery() as n:
        n.start_soon(lambda: batches.run(first))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(30):
            n.start_soon(call, i)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert batches.hops == 2 and ran == made and sorted(made) == list(range(30))
    for i in range(30):
        if i % 7 == 0:
            assert isinstance(got[i], ValueError) and str(got[i]) == f"job {i}"
        else:
            assert got[i] == i * 2


async def test_a_call_cancelled_before_its_batch_is_dropped_and_the_batch_holds_its_lock():
    """A call whose task is cancelled while it waits for the running batch never runs; the
    others do, each batch inside ``hold()``."""
    held = []
    lock = trio.Lock()

    class Hold:
        async def __aenter__(self):
            await lock.acquire()
            held.append(True)

        async def __aexit__(self, *exc):
            lock.release()

    batches = BatchedCalls(Hold)
    release = threading.Event()
    ran: list[str] = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: batches.run(lambda: release.wait(10)))
        await trio.testing.wait_all_tasks_blocked()
        dropped = trio.CancelScope()

        async def cancelled():
            with dropped:
                await batches.run(lambda: ran.append("dropped"))
        n.start_soon(cancelled)
        n.start_soon(lambda: batches.run(lambda: ran.append("kept")))
        await trio.testing.wait_all_tasks_blocked()
        dropped.cancel()
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert ran == ["kept"] and batches.hops == 2 and len(held) == 2


async def test_a_leader_cancelled_while_it_waits_for_the_lock_leaves_the_batch_to_the_others():
    """The task that was to run the batch is cancelled while it waits for ``hold()``: its call is
    dropped, the others' run in a batch of their own."""
    lock = trio.Lock()
    batches = BatchedCalls(lambda: lock)
    ran: list[str] = []
    async with trio.open_nursery() as n:
        await lock.acquire()  # (someone else holds it)
        scope = trio.CancelScope()

        async def leader():
            with scope:
                await batches.run(lambda: ran.append("leader"))
        n.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(lambda: batches.run(lambda: ran.append("other")))
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        lock.release()
    assert ran == ["other"] and batches.hops == 1
