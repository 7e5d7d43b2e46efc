"""One order for the paths of a closure held by a cache: references before referrers."""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, TypeVar

T = TypeVar("T", bound=Hashable)


def references_first(items: Iterable[T], refs: Callable[[T], Iterable[T]]) -> list[T]:
    """``items`` with each after the ones it refers to (``refs``; only those among ``items``
    count, a self-reference does not): depth first, the items and their references taken in
    sorted order.  That is the order of `nix path-info`'s lines, and reversed the order in
    which narinfos can be removed without one left referring to a removed one."""
    pool = set(items)

    def children(x: T):
        return iter(sorted(r for r in set(refs(x)) if r in pool and r != x))

    out: list[T] = []
    seen: set[T] = set()
    for root in sorted(pool):
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, children(root))]
        while stack:
            x, it = stack[-1]
            nxt = next((r for r in it if r not in seen), None)
            if nxt is None:
                stack.pop()
                out.append(x)
            else:
                seen.add(nxt)
                stack.append((nxt, children(nxt)))
    return out
