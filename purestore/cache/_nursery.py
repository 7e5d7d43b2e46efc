"""A trio nursery that hands back a single purestore error instead of an exception group.

trio wraps everything raised in a nursery in an ``ExceptionGroup``.  The CLI prints
:class:`PurestoreError` as ``error: ...``; a group of them would show as a traceback.  When every
leaf of the group is a :class:`PurestoreError` the first one is raised (the group chained as
its cause); a ``KeyboardInterrupt`` leaf is re-raised as such; anything else stays a group.
"""

from __future__ import annotations

import contextlib

import trio

from ..errors import PurestoreError


def _leaves(eg: BaseExceptionGroup):
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


@contextlib.asynccontextmanager
async def open_nursery():
    try:
        async with trio.open_nursery() as n:
            yield n
    except BaseExceptionGroup as eg:
        leaves = list(_leaves(eg))
        for e in leaves:
            if isinstance(e, KeyboardInterrupt):
                raise KeyboardInterrupt from eg
        if leaves and all(isinstance(e, PurestoreError) for e in leaves):
            raise leaves[0] from None
        raise
