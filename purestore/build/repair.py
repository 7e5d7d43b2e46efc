"""Repairing a store: fetching corrupted or missing paths again from the substituters.

:func:`repair_report` takes what :meth:`LocalStore.verify` found and, for every path whose files
are missing, unreadable or no longer match the registered NAR hash or size, downloads the path
again through the substituter (narinfo signatures by a trusted key checked, NAR hash checked
against the one registered) and puts it back in place.  What cannot be repaired stays in the
report, with the reason appended.
"""

from __future__ import annotations

from typing import Callable

import attrs

from ..errors import CacheError, FormatError, SignatureError, StoreError
from ..formats.store_path import StorePath

REPAIRABLE = ("missing", "unreadable", "hash", "size")


def repair_report(store, settings, report, info: Callable[[str], None] | None = None):
    """Repair the paths of ``report``'s problems; returns ``(remaining report, repaired paths)``.

    ``info`` receives one progress line per path.  Never raises for one path's failure: the
    problem stays in the returned report with why it could not be repaired.
    """
    from .._run import run_trio

    from ..cache.substituter import fetch_path

    targets: dict[str, StorePath] = {}
    for p in report.problems:
        if p.kind in REPAIRABLE:
            targets.setdefault(p.path, StorePath.parse(p.path, store.store_dir))
    failures: dict[str, str] = {}
    repaired: list[str] = []
    if targets and not settings.substituters:
        for path in targets:
            failures[path] = "no substituter is configured to repair it from"
    else:
        for path, sp in sorted(targets.items()):
            try:
                run_trio(lambda: fetch_path(store, settings.evolve(offline=False), sp, repair=True))
            except (CacheError, StoreError, SignatureError, FormatError) as e:
                failures[path] = str(e)
                if info:
                    info(f"cannot repair {path}: {e}")
                continue
            problem = _recheck(store, sp)
            if problem:
                failures[path] = problem
                continue
            repaired.append(path)
            if info:
                info(f"repaired {path}")
    remaining = []
    for p in report.problems:
        if p.path in repaired and p.kind in REPAIRABLE:
            continue
        if p.path in failures and p.kind in REPAIRABLE:
            p = attrs.evolve(p, message=f"{p.message} (not repaired: {failures[p.path]})")
        remaining.append(p)
    return attrs.evolve(report, problems=tuple(remaining)), repaired


def _recheck(store, sp: StorePath) -> str | None:
    """Hash the repaired path again; None if it matches the database."""
    from ..store import fsnar
    info = store.query_path_info(sp)
    try:
        got, size = fsnar.hash_path(store.real_path(sp))
    except (OSError, ValueError) as e:
        return f"still unreadable after repair: {e}"
    if info is None or got != info.nar_hash or size != info.nar_size:
        return "the repaired path still does not match its registered NAR hash"
    return None
