"""The store database: SQLite in WAL mode at ``<state_dir>/db/db.sqlite``.

Schema (version 1)::

    Config(key PRIMARY KEY, value)                      -- schema version, store dir
    ValidPaths(id INTEGER PRIMARY KEY, path UNIQUE,     -- path is the base name <hash>-<name>
               hash, narSize, registrationTime,         -- hash is "sha256:<base16>" like Nix
               deriver, sigs, ca)                       -- deriver a base name; sigs space-separated
    Refs(referrer, reference)                           -- ValidPaths ids; cascade on delete
    DerivationOutputs(drv, id, path)                    -- base names; id is the output name

One connection per :class:`StoreDB`, shared between threads behind a lock (the builder calls in
from worker threads).  :meth:`StoreDB.transaction` nests: only the outermost one commits.
Other modules may add their own tables with :meth:`StoreDB.ensure_schema`.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
from typing import Iterator

from ..errors import StoreError

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS Config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ValidPaths (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    path             TEXT UNIQUE NOT NULL,
    hash             TEXT NOT NULL,
    narSize          INTEGER NOT NULL,
    registrationTime INTEGER NOT NULL,
    deriver          TEXT,
    sigs             TEXT,
    ca               TEXT
);
CREATE TABLE IF NOT EXISTS Refs (
    referrer  INTEGER NOT NULL REFERENCES ValidPaths(id) ON DELETE CASCADE,
    reference INTEGER NOT NULL REFERENCES ValidPaths(id) ON DELETE RESTRICT,
    PRIMARY KEY (referrer, reference)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS IndexReferrer ON Refs(reference);
CREATE TABLE IF NOT EXISTS DerivationOutputs (
    drv  TEXT NOT NULL,
    id   TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (drv, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS IndexDerivationOutputs ON DerivationOutputs(path);
"""


class StoreDB:
    """The SQLite database of one store.

    Raises :class:`StoreError` when the database cannot be opened or belongs to another store
    dir or schema version.
    """

    def __init__(self, path: str, store_dir: str, *, busy_timeout_ms: int = 60_000,
                 read_only: str | None = None):
        """``read_only``: open for reading only (the database is not writable for this user);
        the text says why, for the error of any write (:meth:`transaction`)."""
        self.path = path
        self.read_only = read_only
        self.lock = threading.RLock()
        self._depth = 0
        if read_only:
            self.conn = self._connect_read_only(path, busy_timeout_ms)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.conn = self._connect(path, busy_timeout_ms)
            self.ensure_schema(_SCHEMA)
        self._check_config(store_dir)

    @staticmethod
    def _connect_read_only(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
        """Open the database for reading.  While a writer has it open (its ``-wal`` and
        ``-shm`` files exist) SQLite reads it as usual, its latest commits included; when none
        has, SQLite cannot make the ``-shm`` file in a directory this user may not write, and
        the file is read as it is (``immutable``: it holds every commit then)."""
        from urllib.parse import quote
        uri = "file:" + quote(path)
        try:
            if not os.path.exists(path):
                raise sqlite3.OperationalError("unable to open database file")
            try:
                conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=busy_timeout_ms / 1000,
                                       isolation_level=None, check_same_thread=False)
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            except sqlite3.OperationalError:
                if os.path.exists(path + "-wal"):
                    raise
                conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return conn
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the store database {path!r} for reading: {e}") from e

    @staticmethod
    def _connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
        """Open the database and switch it to WAL, retrying while another process holds it.

        SQLite returns "database is locked" without calling its busy handler when two processes
        race to create a fresh database or to switch it to WAL (the mode change needs an
        exclusive lock), so the busy timeout alone does not cover opening; retry here with a
        short growing sleep until the same timeout has passed.
        """
        deadline = time.monotonic() + busy_timeout_ms / 1000
        delay = 0.002
        while True:
            conn = None
            try:
                conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None,
                                       check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                # NORMAL in WAL mode: a commit is atomic and survives a process crash; a power
                # loss may drop the last commits but never leaves a torn database.
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
                return conn
            except sqlite3.Error as e:
                if conn is not None:
                    conn.close()
                transient = isinstance(e, sqlite3.OperationalError) and (
                    "locked" in str(e) or "busy" in str(e))
                if not transient or time.monotonic() + delay > deadline:
                    raise StoreError(f"cannot open the store database {path!r}: {e}{_full(path)}") from e
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.1)

    def _check_config(self, store_dir: str) -> None:
        try:
            rows = dict(self.query("SELECT key, value FROM Config"))
        except StoreError:
            if not self.read_only:
                raise
            raise StoreError(f"{self.path!r} is not a store database (no Config table)") from None
        if not rows:
            with self.transaction() as c:
                rows = dict(c.execute("SELECT key, value FROM Config").fetchall())
                if not rows:
                    c.executemany("INSERT INTO Config(key, value) VALUES (?, ?)",
                                  [("schema", SCHEMA_VERSION), ("storeDir", store_dir)])
                    return
        if rows.get("schema") != SCHEMA_VERSION:
            raise StoreError(f"store database {self.path!r} has schema version {rows.get('schema')!r}, "
                             f"this purestore reads version {SCHEMA_VERSION!r}")
        if rows.get("storeDir") != store_dir:
            raise StoreError(f"store database {self.path!r} belongs to store dir {rows.get('storeDir')!r}, "
                             f"not {store_dir!r}", hint="pass the matching --store-dir")

    def ensure_schema(self, sql: str) -> None:
        """Run ``CREATE … IF NOT EXISTS`` statements (idempotent) in one transaction.

        Tried first as a deferred transaction, which takes no write lock when everything
        exists already (the common case: every ``pure`` command opens the store).
        """
        if self.read_only:
            return  # (tables it lacks: the queries on them fail, saying so)
        with self.lock:
            if self._depth:
                raise StoreError("ensure_schema cannot be called inside a transaction")
            for begin in ("BEGIN", "BEGIN IMMEDIATE"):
                try:
                    # executescript commits any open transaction first; none is open here.
                    self.conn.executescript(f"{begin};\n{sql}\nCOMMIT;")
                    return
                except sqlite3.OperationalError as e:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    if begin == "BEGIN" and ("locked" in str(e) or "busy" in str(e)):
                        continue  # lost a race for the write lock: wait for it properly
                    raise StoreError(f"cannot create tables in {self.path!r}: {e}{_full(self.path)}") from e
                except sqlite3.Error as e:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise StoreError(f"cannot create tables in {self.path!r}: {e}{_full(self.path)}") from e

    @contextlib.contextmanager
    def read_transaction(self) -> Iterator[sqlite3.Connection]:
        """A read snapshot (deferred transaction, no write lock) for consistent multi-query reads."""
        with self.lock:
            if self._depth:
                yield self.conn
                return
            try:
                self.conn.execute("BEGIN")
            except sqlite3.Error as e:
                raise StoreError(f"cannot start a read transaction on {self.path!r}: {e}") from e
            self._depth = 1
            try:
                yield self.conn
            finally:
                self._depth = 0
                self.conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``); commits on success, rolls back on error.

        Nested calls join the outer transaction.  Holds the connection lock throughout.
        Raises :class:`StoreError` at once when the database was opened read-only.
        """
        if self.read_only:
            raise StoreError(self.read_only)
        with self.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self.conn
                finally:
                    self._depth -= 1
                return
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreError(f"cannot start a transaction on {self.path!r}: {e}") from e
            self._depth = 1
            try:
                yield self.conn
            except BaseException as e:
                self._depth = 0
                self._rollback()
                if isinstance(e, sqlite3.Error):  # a statement failed: a full disk, a broken file
                    raise StoreError(f"cannot write to the store database {self.path!r}: {e}"
                                     f"{_full(self.path)}") from e
                raise
            self._depth = 0
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"cannot commit to the store database {self.path!r}: {e}{_full(self.path)}") from e

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not already done so: after some errors
        (a full disk) it rolls back by itself, and a ROLLBACK then fails with "no transaction is
        active", which must not hide the error that caused it."""
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def query(self, sql: str, params=()) -> list[tuple]:
        """Run a read query and return all rows."""
        with self.lock:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"store database query failed: {e}") from e

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def _full(path: str) -> str:
    """A note on why SQLite failed on ``path`` when the file system says more than SQLite does:
    no space left (SQLite reports "disk I/O error" or "database or disk is full", which does not
    say which), or a directory that cannot be written (SQLite: "unable to open database file",
    or "attempt to write a readonly database")."""
    d = os.path.dirname(path) or "."
    try:
        st = os.statvfs(d)
    except OSError:
        return ""
    if st.f_bavail == 0 and st.f_blocks:
        return " (the file system holding it has no space left)"
    if st.f_flag & os.ST_RDONLY:
        return " (the file system holding it is mounted read-only)"
    if os.path.isdir(d) and not os.access(d, os.W_OK):
        return f" (its directory {d!r} is not writable for this user)"
    return ""
