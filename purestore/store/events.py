"""What happened in a store: builds, reproducibility checks, substitutions, sandbox refusals.

The builder records here; the hermeticity report (and ``pure`` commands) read it back.  Tables are
created on first use with ``CREATE TABLE IF NOT EXISTS`` through the store's database::

    BuildEvents(id, drv, name, start, finish, status, fixed_output, network, kind, round,
                outputs, error)
        -- one row per build attempt.  status: 'running' | 'built' | 'failed' | 'interrupted'
    BuildProcesses(event, pid, identity)
        -- the process recording a build still 'running' (BuildEvents.id; the row goes when the
        -- build's end is recorded).  identity: "BOOT_ID START_TICKS PID_NAMESPACE", which tells
        -- that process from a later one given the same pid
        -- kind: 'build' | 'check' | 'round'; round: 1-based round number (1 for a plain build)
        -- fixed_output/network: 0/1; outputs: JSON {output name: [path, "sha256:<nix32>"]}
    CheckEvents(id, drv, time, kind, rounds, reproducible, differences)
        -- differences: JSON list of {"output", "file", "change", ...} (empty when reproducible)
    SubstitutionEvents(id, path, cache, time, nar_size, drv)
        -- drv: the deriver of the path as its narinfo gave it (NULL: none, or a row recorded
        -- before the column was added to an existing database)
    SandboxRefusals(id, drv, time, what)
        -- something the sandbox refused that could be detected (e.g. setup failures,
        -- suspicious output permissions)

Every ``record_*`` function takes the store (or its :class:`~purestore.store.db.StoreDB`) and
returns the new row id; every ``query_*`` function returns plain dicts, newest first.

A build whose process was killed outright (SIGKILL, a crash, a power cut) never has its end
recorded: its row stays 'running'.  :func:`query_builds` reads such a row back as 'abandoned'
once the process that recorded it is gone (its pid no longer names a live process started at the
same moment of the same boot).  A row recorded in another pid namespace (a container) cannot be
judged from here and stays 'running', as do rows recorded before processes were (no
``BuildProcesses`` row).
Raises :class:`~purestore.errors.StoreError` when the database cannot be written or read.
"""

from __future__ import annotations

import json
import os
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
CREATE TABLE IF NOT EXISTS BuildProcesses (
    event    INTEGER PRIMARY KEY,
    pid      INTEGER NOT NULL,
    identity TEXT NOT NULL
);
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
    nar_size INTEGER,
    drv      TEXT
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
        _add_columns(db)
        _ready.add(db)
    return db


def _columns(db, table: str) -> set[str]:
    return {r[1] for r in db.query(f"PRAGMA table_info({table})")}


def _add_columns(db) -> None:
    """Columns added since a table was first made, added to a database made before."""
    if db.read_only or "drv" in _columns(db, "SubstitutionEvents"):
        return
    with db.transaction() as c:  # (checked again under the write lock: another process may have)
        if "drv" not in {r[1] for r in c.execute("PRAGMA table_info(SubstitutionEvents)")}:
            c.execute("ALTER TABLE SubstitutionEvents ADD COLUMN drv TEXT")


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
    """A build began (``drv`` is the full .drv path), in this process.  Returns the event id for
    :func:`record_build_finish`."""
    db = _db(store)
    identity = process_identity(os.getpid())
    with db.transaction() as c:
        event = c.execute(
            "INSERT INTO BuildEvents(drv, name, start, status, fixed_output, network, kind, round)"
            " VALUES (?, ?, ?, 'running', ?, ?, ?, ?)",
            (drv, name, time.time() if start is None else start, int(fixed_output), int(network),
             kind, round)).lastrowid
        if identity is not None:
            c.execute("INSERT OR REPLACE INTO BuildProcesses(event, pid, identity) VALUES (?, ?, ?)",
                      (event, os.getpid(), identity))
        return event


def record_build_finish(store, event_id: int, status: str, outputs: dict[str, tuple[str, str]] | None = None,
                        error: str | None = None, finish: float | None = None) -> None:
    """A build ended: ``status`` 'built', 'failed' or 'interrupted'; ``outputs`` name -> (path, nar hash)."""
    db = _db(store)
    with db.transaction() as c:
        c.execute("UPDATE BuildEvents SET finish = ?, status = ?, outputs = ?, error = ? WHERE id = ?",
                  (time.time() if finish is None else finish, status,
                   json.dumps({k: list(v) for k, v in (outputs or {}).items()}, sort_keys=True),
                   error, event_id))
        c.execute("DELETE FROM BuildProcesses WHERE event = ?", (event_id,))


def query_builds(store, drv: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Build events (optionally of one .drv), newest first.

    ``status`` is as recorded, except that a 'running' build whose process has gone without
    recording its end is 'abandoned' (see the module docstring); ``pid`` is the process of a
    build still running (None otherwise, or when it was not recorded).
    """
    db = _db(store)
    sql = ("SELECT id, drv, name, start, finish, status, fixed_output, network, kind, round, outputs, error,"
           " pid, identity FROM BuildEvents LEFT JOIN BuildProcesses ON BuildProcesses.event = BuildEvents.id")
    params: tuple = ()
    if drv is not None:
        sql += " WHERE drv = ?"
        params = (drv,)
    sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
    out = []
    for r in db.query(sql, params):
        status, pid = r[5], None
        if status == "running" and r[12] is not None:
            if process_running(r[12], r[13]) is False:
                status = "abandoned"
            else:
                pid = r[12]
        out.append({"id": r[0], "drv": r[1], "name": r[2], "start": r[3], "finish": r[4], "status": status,
                    "fixed_output": bool(r[6]), "network": bool(r[7]), "kind": r[8], "round": r[9],
                    "outputs": json.loads(r[10]) if r[10] else {}, "error": r[11], "pid": pid})
    return out


# -- which process recorded a build ------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _start_ticks(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process ``pid`` from /proc, if it shows it."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    if len(fields) < 20:
        return None
    return fields[0], fields[19]


def _boot_and_namespace() -> tuple[str, str] | None:
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return None if boot is None else (boot.strip(), ns)


def process_identity(pid: int) -> str | None:
    """``"BOOT_ID START_TICKS PID_NAMESPACE"`` of live process ``pid`` (of this pid namespace):
    no other process of any boot has it.  None where /proc does not tell."""
    here, started = _boot_and_namespace(), _start_ticks(pid)
    if here is None or started is None:
        return None
    return f"{here[0]} {started[1]} {here[1]}"


def process_running(pid: int, identity: str) -> bool | None:
    """Whether the process :func:`process_identity` described as ``identity`` still runs: False
    once it has ended (also as a zombie, or when the machine has restarted since), None when it
    cannot be told from here (recorded in another pid namespace, /proc hiding it)."""
    here = _boot_and_namespace()
    parts = identity.split(" ")
    if here is None or len(parts) != 3:
        return None
    boot, ticks, ns = parts
    if boot != here[0]:
        return False  # recorded before the machine restarted
    if ns != here[1]:
        return None  # another pid namespace's pid
    started = _start_ticks(pid)
    if started is None:  # gone, or hidden (/proc mounted with hidepid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # EPERM: it exists, someone else's
            return None
        return None
    state, start = started
    return start == ticks and state not in ("Z", "X")


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


def record_substitution(store, path: str, cache: str, nar_size: int | None = None,
                        drv: str | None = None) -> int:
    """A path was substituted from binary cache ``cache`` (its URL); ``drv``: its deriver."""
    return _insert(store, "INSERT INTO SubstitutionEvents(path, cache, time, nar_size, drv) VALUES (?, ?, ?, ?, ?)",
                   (path, cache, time.time(), nar_size, drv))


def record_substitutions(store, rows: Iterable[tuple]) -> None:
    """:func:`record_substitution` of each (path, cache, nar_size[, drv]) of ``rows``, in one
    transaction (a commit each cost more than the insert)."""
    db = _db(store)
    now = time.time()
    with db.transaction() as c:
        c.executemany("INSERT INTO SubstitutionEvents(path, cache, time, nar_size, drv) VALUES (?, ?, ?, ?, ?)",
                      [(r[0], r[1], now, r[2], r[3] if len(r) > 3 else None) for r in rows])


def query_substitutions(store, path: str | None = None) -> list[dict[str, Any]]:
    """Each substitution, newest first: ``drv`` is the path's deriver as recorded (None when
    unknown: a source, a ``.drv``, a narinfo without one, or a row older than the column)."""
    db = _db(store)
    drv = "drv" if "drv" in _columns(db, "SubstitutionEvents") else "NULL"  # (a read-only old database)
    sql = f"SELECT id, path, cache, time, nar_size, {drv} FROM SubstitutionEvents"
    params: tuple = ()
    if path is not None:
        sql += " WHERE path = ?"
        params = (path,)
    return [{"id": r[0], "path": r[1], "cache": r[2], "time": r[3], "nar_size": r[4], "drv": r[5]}
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
