"""The lanes of substitution let the biggest waiting NAR in first (purestore/cache/_gate.py)."""

import pytest
import trio
import trio.testing

from purestore.cache._gate import LargestFirst


async def _hold(gate: LargestFirst, until: trio.Event) -> None:
    """Take a place of ``gate`` and keep it until ``until`` is set."""
    async with gate.enter(0):
        await until.wait()


async def test_biggest_waiter_goes_first_equal_sizes_in_arrival_order():
    gate = LargestFirst(1)
    order: list = []
    hold = trio.Event()

    async def one(i, size):
        async with gate.enter(size):
            order.append((i, size))
            await trio.sleep(0)

    async with trio.open_nursery() as n:
        n.start_soon(_hold, gate, hold)
        await trio.testing.wait_all_tasks_blocked()
        for i, size in enumerate([3, 10, 1, 10, 7]):  # all arrive while the place is taken
            n.start_soon(one, i, size)
            await trio.testing.wait_all_tasks_blocked()
        hold.set()
    assert order == [(1, 10), (3, 10), (4, 7), (0, 3), (2, 1)]


async def test_free_places_are_taken_at_once_and_never_exceeded():
    gate = LargestFirst(2)
    inside = 0
    most = 0

    async def one(size):
        nonlocal inside, most
        async with gate.enter(size):
            inside += 1
            most = max(most, inside)
            await trio.sleep(0.01)
            inside -= 1

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            for size in (5, 1, 9, 2, 8, 3):
                n.start_soon(one, size)
    assert most == 2 and inside == 0


async def test_a_cancelled_waiter_gives_up_its_turn_and_takes_no_place():
    gate = LargestFirst(1)
    order: list = []
    hold = trio.Event()

    async def waiter(name, size, scope_box=None):
        with trio.CancelScope() as cs:
            if scope_box is not None:
                scope_box.append(cs)
            async with gate.enter(size):
                order.append(name)

    box: list = []
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(_hold, gate, hold)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(waiter, "big, cancelled", 100, box)
            n.start_soon(waiter, "small", 1)
            await trio.testing.wait_all_tasks_blocked()
            box[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            hold.set()
        async with gate.enter(5):  # the place came back
            pass
    assert order == ["small"]


def test_a_gate_needs_a_place():
    with pytest.raises(ValueError):
        LargestFirst(0)
