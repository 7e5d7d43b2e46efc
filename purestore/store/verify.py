"""``pure store verify``: every valid path exists, optionally with the NAR hash and size the
database recorded, and no reference dangles."""

from __future__ import annotations

import os

import attrs

from ..formats.hash import Hash


@attrs.frozen
class VerifyProblem:
    """One thing :meth:`LocalStore.verify` found wrong: ``kind`` is ``missing``, ``hash``,
    ``size``, ``dangling-reference`` or ``unreadable``."""

    path: str
    kind: str
    message: str


@attrs.frozen
class VerifyReport:
    checked: int
    problems: tuple[VerifyProblem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(store, check_contents: bool = False) -> VerifyReport:
    """Check the valid paths of ``store`` (a :class:`~.local.LocalStore`); see the module doc."""
    from . import fsnar

    problems: list[VerifyProblem] = []
    rows = store.db.query("SELECT path, hash, narSize FROM ValidPaths ORDER BY path")
    for base, h, size in rows:
        logical = f"{store.store_dir}/{base}"
        real = f"{store.real_store_dir}/{base}"
        if not os.path.lexists(real):
            problems.append(VerifyProblem(logical, "missing", f"path {logical!r} is valid but {real!r} does not exist"))
            continue
        if check_contents:
            try:
                got, got_size = fsnar.hash_path(real)
            except (OSError, ValueError) as e:
                problems.append(VerifyProblem(logical, "unreadable", f"cannot read {real!r}: {e}"))
                continue
            want = Hash.parse(h, "sha256")
            if got != want:
                problems.append(VerifyProblem(
                    logical, "hash", f"path {logical!r} was modified: expected NAR hash {want.typed()}, got {got.typed()}"))
            elif got_size != size:
                problems.append(VerifyProblem(
                    logical, "size", f"path {logical!r} has NAR size {got_size}, expected {size}"))
    dangling = store.db.query(
        "SELECT a.path, r.reference FROM Refs r JOIN ValidPaths a ON a.id = r.referrer "
        "WHERE r.reference NOT IN (SELECT id FROM ValidPaths)")
    for base, ref in dangling:
        problems.append(VerifyProblem(f"{store.store_dir}/{base}", "dangling-reference",
                                      f"path {store.store_dir}/{base!r} refers to a path that is not valid (id {ref})"))
    return VerifyReport(checked=len(rows), problems=tuple(problems))
