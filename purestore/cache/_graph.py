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


def cycle_problems(items: Iterable[T], refs: Callable[[T], Iterable[T]]) -> dict[T, T | None]:
    """The ``items`` no order of references first can place (only a hostile or broken cache
    has them): each that is part of a reference cycle (through ``refs``, among ``items``; a
    self-reference does not count) → None, and each that refers to such a one, directly or not
    → a reference of it that is one of them."""
    pool = set(items)
    deps = {x: {r for r in refs(x) if r in pool and r != x} for x in pool}
    users: dict[T, set[T]] = {x: set() for x in pool}
    for x, ds in deps.items():
        for d in ds:
            users[d].add(x)
    remaining = {x: len(ds) for x, ds in deps.items()}
    ready = [x for x, n in remaining.items() if n == 0]
    while ready:  # (Kahn: what is left over is in a cycle or above one)
        for u in users[ready.pop()]:
            remaining[u] -= 1
            if remaining[u] == 0:
                ready.append(u)
    left = {x for x, n in remaining.items() if n > 0}

    def on_a_cycle(x: T) -> bool:
        todo, seen = list(deps[x] & left), set()
        while todo:
            y = todo.pop()
            if y == x:
                return True
            if y not in seen:
                seen.add(y)
                todo.extend(deps[y] & left)
        return False
    members = {x for x in left if on_a_cycle(x)}
    return {x: None if x in members else min(deps[x] & left) for x in left}
