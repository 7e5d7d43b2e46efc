"""``why-depends``: the reference chains from one store path to another.

:func:`find_chain` gives a shortest chain of references (breadth-first over the reference
graph); :func:`find_all` the sub-graph of every path that leads from the source to the
dependency; :func:`where_referenced` lists the files (and symlinks) of a referrer whose contents
or target mention the referenced path's hash part, as Nix's ``why-depends --precise`` does.
"""

from __future__ import annotations

import os
from collections import deque

from ..formats.store_path import StorePath


def find_chain(store, src: StorePath, dep: StorePath) -> list[StorePath] | None:
    """A shortest reference chain ``[src, …, dep]``, or None when ``src`` does not depend on ``dep``."""
    if src == dep:
        return [src]
    prev: dict[StorePath, StorePath | None] = {src: None}
    queue = deque([src])
    while queue:
        cur = queue.popleft()
        for r in sorted(store.query_references(cur)):
            if r in prev:
                continue
            prev[r] = cur
            if r == dep:
                chain = [r]
                while prev[chain[-1]] is not None:
                    chain.append(prev[chain[-1]])
                return list(reversed(chain))
            queue.append(r)
    return None


def find_all(store, src: StorePath, dep: StorePath) -> dict[StorePath, list[StorePath]]:
    """Edges of every reference path from ``src`` to ``dep``: node → its references on such paths.

    The nodes on such paths are those of ``src``'s closure from which ``dep`` is reached: found
    by walking the references backwards from ``dep`` (with a queue: a chain thousands of paths
    long is no RecursionError)."""
    closure = store.query_closure([src])
    if dep not in closure:
        return {}
    refs = {p: sorted(store.query_references(p) - {p}) for p in closure}
    referrers: dict[StorePath, list[StorePath]] = {}
    for p, rs in refs.items():
        for r in rs:
            referrers.setdefault(r, []).append(p)
    leads = {dep}
    queue = deque([dep])
    while queue:
        for p in referrers.get(queue.popleft(), []):
            if p not in leads:
                leads.add(p)
                queue.append(p)
    return {p: [r for r in refs[p] if r in leads] for p in closure if p in leads and p != dep}


def where_referenced(store, referrer: StorePath, ref: StorePath, limit: int = 10) -> list[str]:
    """Files inside ``referrer`` (relative, ``""`` for the path itself) that mention ``ref``'s hash."""
    needle = ref.hash_part.encode()
    root = store.real_path(referrer)
    found: list[str] = []

    def check(real: str, rel: str) -> None:
        try:
            if os.path.islink(real):
                if needle in os.fsencode(os.readlink(real)):
                    found.append(rel + " -> " + os.readlink(real))
                return
            if os.path.isfile(real):
                tail = b""
                with open(real, "rb") as f:
                    while chunk := f.read(1 << 20):
                        if needle in tail + chunk:
                            found.append(rel)
                            return
                        tail = chunk[-(len(needle) - 1):]
        except OSError:
            return

    if not os.path.isdir(root) or os.path.islink(root):
        check(root, "")
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            real = os.path.join(dirpath, n)
            check(real, os.path.relpath(real, root))
            if len(found) >= limit:
                return found
    return found


def render_chain(store, chain: list[StorePath]) -> str:
    lines = [store.print_path(chain[0])]
    for i in range(1, len(chain)):
        pad = "    " * (i - 1)
        files = where_referenced(store, chain[i - 1], chain[i])
        how = f"  (in {', '.join(files[:3])}{', …' if len(files) > 3 else ''})" if files else ""
        lines.append(f"{pad}└───{store.print_path(chain[i])}{how}")
    return "\n".join(lines) + "\n"


def render_tree(store, edges: dict[StorePath, list[StorePath]]) -> str:
    """Every route of ``edges`` (see :func:`find_all`) as a tree.  A path whose routes onwards
    were shown already is not expanded again (it says so), as in Nix: expanding it at each
    route made the output grow exponentially with the graph's shared paths."""
    if not edges:
        return ""
    roots = set(edges) - {r for rs in edges.values() for r in rs}
    lines: list[str] = []
    shown: set[StorePath] = set()
    for r in sorted(roots):
        lines.append(store.print_path(r))
        shown.add(r)
        stack = [(edges.get(r, []), 0, "")]  # (children, next index, prefix): no recursion
        while stack:
            kids, i, prefix = stack.pop()
            if i >= len(kids):
                continue
            stack.append((kids, i + 1, prefix))
            k, last = kids[i], i == len(kids) - 1
            onwards = edges.get(k, [])
            again = k in shown and bool(onwards)
            lines.append(f"{prefix}{'└───' if last else '├───'}{store.print_path(k)}"
                         + ("  (its routes onwards are shown above)" if again else ""))
            if onwards and not again:
                shown.add(k)
                stack.append((onwards, 0, prefix + ("    " if last else "│   ")))
    return "\n".join(lines) + "\n"
