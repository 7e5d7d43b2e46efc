"""What happened in a store: builds, reproducibility checks, substitutions, sandbox refusals.

The builder records here; the hermeticity report (and ``pure`` commands) read it back.  Tables are
created on first use with ``CREATE TABLE IF NOT EXISTS`` through the store's database::

    BuildEvents(id, drv, name, start, finish, status, fixed_output, network, kind, round,
                outputs, error)
        -- one row per build attempt.  status: 'running' | 'built' | 'failed' | 'interrupted'
        -- kind: 'build' | 'check' | 'round'; round: 1-based round number (1 for a plain build)
        -- fixed_output/network: 0/1; outputs: JSON {output name: [path, "sha256:<nix32>"]}
    CheckEvents(id, drv, time, kind, rounds, reproducible, differences)
        -- differences: JSON list of {"output", "file", "change", ...} (empty when reproducible)
    SubstitutionEvents(id, path, cache, time, nar_size)
    SandboxRefusals(id, drv, time, what)
        -- something the sandbox refused that could be detected (e.g. setup failures,
        -- suspicious output permissions)

Every ``record_*`` function takes the store (or its :class:`~purestore.store.db.StoreDB`) and
returns the new row id; every ``query_*`` function returns plain dicts, newest first.
Raises :class:`~purestore.errors.StoreError` when the database cannot be written or read.
"""

from __future__ import annotations

import json
import time
import weakref
from typing import Any, Iterable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS BuildEvents (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    drv          TEXT NOT NULL,
    name         TEXT NOT NULL,
    start        REAL NOT NULL,
    finish       REAL,
    status       TEXT NOT NULL,
    fixed_output INTEGER NOT NULL,
    network      INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    round        INTEGER NOT NULL,
    outputs      TEXT,
    error        TEXT
);
CREATE INDEX IF NOT EXISTS IndexBuildEventsDrv ON BuildEvents(drv);
CREATE TABLE IF NOT EXISTS CheckEvents (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    drv          TEXT NOT NULL,
    time         REAL NOT NULL,
    kind         TEXT NOT NULL,
    rounds       INTEGER NOT NULL,
    reproducible INTEGER NOT NULL,
    differences  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS IndexCheckEventsDrv ON CheckEvents(drv);
CREATE TABLE IF NOT EXISTS SubstitutionEvents (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    path     TEXT NOT NULL,
    cache    TEXT NOT NULL,
    time     REAL NOT NULL,
    nar_size INTEGER
);
CREATE INDEX IF NOT EXISTS IndexSubstitutionEventsPath ON SubstitutionEvents(path);
CREATE TABLE IF NOT EXISTS SandboxRefusals (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    drv   TEXT NOT NULL,
    time  REAL NOT NULL,
    what  TEXT NOT NULL
);
"""

_ready: "weakref.WeakSet" = weakref.WeakSet()


def _db(store_or_db):
    db = getattr(store_or_db, "db", store_or_db)
    if db not in _ready:
        db.ensure_schema(_SCHEMA)
        _ready.add(db)
    return db


def ensure_tables(store_or_db) -> None:
    """Create the event tables if missing (call outside a transaction; idempotent)."""
    _db(store_or_db)


def _insert(store_or_db, sql: str, params: tuple) -> int:
    db = _db(store_or_db)
    with db.transaction() as c:
        return c.execute(sql, params).lastrowid


# -- builds ------------------------------------------------------------------------------------


def record_build_start(store, drv: str, name: str, *, fixed_output: bool, network: bool,
                       kind: str = "build", round: int = 1, start: float | None = None) -> int:
    """A build began (``drv`` is the full .drv path).  Returns the event id for :func:`record_build_finish`."""
    return _insert(store, "INSERT INTO BuildEvents(drv, name, start, status, fixed_output, network, kind, round)"
                          " VALUES (?, ?, ?, 'running', ?, ?, ?, ?)",
                   (drv, name, time.time() if start is None else start, int(fixed_output), int(network),
                    kind, round))


def record_build_finish(store, event_id: int, status: str, outputs: dict[str, tuple[str, str]] | None = None,
                        error: str | None = None, finish: float | None = None) -> None:
    """A build ended: ``status`` 'built', 'failed' or 'interrupted'; ``outputs`` name -> (path, nar hash)."""
    db = _db(store)
    with db.transaction() as c:
        c.execute("UPDATE BuildEvents SET finish = ?, status = ?, outputs = ?, error = ? WHERE id = ?",
                  (time.time() if finish is None else finish, status,
                   json.dumps({k: list(v) for k, v in (outputs or {}).items()}, sort_keys=True),
                   error, event_id))


def query_builds(store, drv: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Build events (optionally of one .drv), newest first."""
    db = _db(store)
    sql = ("SELECT id, drv, name, start, finish, status, fixed_output, network, kind, round, outputs, error"
           " FROM BuildEvents")
    params: tuple = ()
    if drv is not None:
        sql += " WHERE drv = ?"
        params = (drv,)
    sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
    out = []
    for r in db.query(sql, params):
        out.append({"id": r[0], "drv": r[1], "name": r[2], "start": r[3], "finish": r[4], "status": r[5],
                    "fixed_output": bool(r[6]), "network": bool(r[7]), "kind": r[8], "round": r[9],
                    "outputs": json.loads(r[10]) if r[10] else {}, "error": r[11]})
    return out


# -- checks ------------------------------------------------------------------------------------


def record_check(store, drv: str, *, kind: str, rounds: int, reproducible: bool,
                 differences: Iterable[dict] = ()) -> int:
    """The outcome of ``--check`` (kind 'check') or ``--rounds N`` (kind 'rounds')."""
    return _insert(store, "INSERT INTO CheckEvents(drv, time, kind, rounds, reproducible, differences)"
                          " VALUES (?, ?, ?, ?, ?, ?)",
                   (drv, time.time(), kind, rounds, int(reproducible), json.dumps(list(differences))))


def query_checks(store, drv: str | None = None) -> list[dict[str, Any]]:
    db = _db(store)
    sql = "SELECT id, drv, time, kind, rounds, reproducible, differences FROM CheckEvents"
    params: tuple = ()
    if drv is not None:
        sql += " WHERE drv = ?"
        params = (drv,)
    return [{"id": r[0], "drv": r[1], "time": r[2], "kind": r[3], "rounds": r[4],
             "reproducible": bool(r[5]), "differences": json.loads(r[6])}
            for r in db.query(sql + " ORDER BY id DESC", params)]


# -- substitutions -----------------------------------------------------------------------------


def record_substitution(store, path: str, cache: str, nar_size: int | None = None) -> int:
    """A path was substituted from binary cache ``cache`` (its URL)."""
    return _insert(store, "INSERT INTO SubstitutionEvents(path, cache, time, nar_size) VALUES (?, ?, ?, ?)",
                   (path, cache, time.time(), nar_size))


def query_substitutions(store, path: str | None = None) -> list[dict[str, Any]]:
    db = _db(store)
    sql = "SELECT id, path, cache, time, nar_size FROM SubstitutionEvents"
    params: tuple = ()
    if path is not None:
        sql += " WHERE path = ?"
        params = (path,)
    return [{"id": r[0], "path": r[1], "cache": r[2], "time": r[3], "nar_size": r[4]}
            for r in db.query(sql + " ORDER BY id DESC", params)]


# -- sandbox refusals --------------------------------------------------------------------------


def record_sandbox_refusal(store, drv: str, what: str) -> int:
    return _insert(store, "INSERT INTO SandboxRefusals(drv, time, what) VALUES (?, ?, ?)",
                   (drv, time.time(), what))


def query_sandbox_refusals(store, drv: str | None = None) -> list[dict[str, Any]]:
    db = _db(store)
    sql = "SELECT id, drv, time, what FROM SandboxRefusals"
    params: tuple = ()
    if drv is not None:
        sql += " WHERE drv = ?"
        params = (drv,)
    return [{"id": r[0], "drv": r[1], "time": r[2], "what": r[3]}
            for r in db.query(sql + " ORDER BY id DESC", params)]
