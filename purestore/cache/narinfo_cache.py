"""A small on-disk memory of negative narinfo lookups (``<state_dir>/narinfo-cache.sqlite``).

When a cache says it does not have ``<hash>.narinfo``, that answer is remembered for
``narinfo-cache-negative-ttl`` seconds (setting; default 300, 0 disables), so a build that asks
again soon does not query every cache again.  Positive answers are not cached: a narinfo is
always fetched fresh and verified, and a cache found to have it forgets that it had not (also
in a run that remembers nothing, as ``pure copy --from``'s: the next build within the TTL would
otherwise not ask that cache for the path).  Answers older than the TTL, and than a day, are
removed when the memory is opened.  Any error with the file just disables the memory.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time


KEPT_AT_LEAST = 24 * 3600  # seconds an answer stays in the file (a later run may have a longer TTL)


class NegativeCache:
    def __init__(self, state_dir: str | None, ttl: int):
        self.ttl = ttl
        self._mem: dict[tuple[str, str], float] = {}
        self._found: set[tuple[str, str]] = set()  # (cache, hash part) found there: forgotten at close
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        path = os.path.join(state_dir, "narinfo-cache.sqlite") if state_dir else None
        if path is not None and (ttl > 0 or os.path.exists(path)):  # (ttl 0: only to forget)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                db = sqlite3.connect(path, timeout=5, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS Negative (cache TEXT NOT NULL, hash TEXT NOT NULL,"
                           " time REAL NOT NULL, PRIMARY KEY (cache, hash)) WITHOUT ROWID")
                if ttl > 0:
                    db.execute("DELETE FROM Negative WHERE time < ?", (time.time() - max(ttl, KEPT_AT_LEAST),))
                self._db = db
            except sqlite3.Error:
                self._db = None

    def is_negative(self, cache: str, hash_part: str) -> bool:
        if self.ttl <= 0:
            return False
        now = time.time()
        with self._lock:
            t = self._mem.get((cache, hash_part))
            if t is None and self._db is not None:
                try:
                    row = self._db.execute("SELECT time FROM Negative WHERE cache = ? AND hash = ?",
                                           (cache, hash_part)).fetchone()
                except sqlite3.Error:
                    row = None
                t = row[0] if row else None
        return t is not None and now - t < self.ttl

    def add(self, cache: str, hash_part: str) -> None:
        if self.ttl <= 0:
            return
        now = time.time()
        with self._lock:
            self._mem[(cache, hash_part)] = now
            if self._db is not None:
                try:
                    self._db.execute("INSERT OR REPLACE INTO Negative VALUES (?, ?, ?)", (cache, hash_part, now))
                except sqlite3.Error:
                    pass

    def found(self, cache: str, hash_part: str) -> None:
        """``cache`` has the path: what was remembered of it there is forgotten (all at once,
        when the memory is closed)."""
        with self._lock:
            self._mem.pop((cache, hash_part), None)
            if self._db is not None:
                self._found.add((cache, hash_part))

    def forget(self, cache: str, hash_part: str) -> None:
        with self._lock:
            self._mem.pop((cache, hash_part), None)
            if self._db is not None:
                try:
                    self._db.execute("DELETE FROM Negative WHERE cache = ? AND hash = ?", (cache, hash_part))
                except sqlite3.Error:
                    pass

    @staticmethod
    def forget_pushed(state_dir: str | None, hash_parts) -> None:
        """Paths just pushed to a cache are in a cache now: whatever "not in this cache" was
        remembered of them (for any cache: the one pushed to may be named otherwise, with other
        URL parameters, as a substituter) is forgotten, so that the next build asks again (as
        Nix records a push).  Nothing is made where no memory was kept."""
        hash_parts = list(hash_parts)
        if not state_dir or not hash_parts:
            return
        path = os.path.join(state_dir, "narinfo-cache.sqlite")
        if not os.path.exists(path):
            return
        try:
            db = sqlite3.connect(path, timeout=5, isolation_level=None)
            try:
                db.executemany("DELETE FROM Negative WHERE hash = ?", [(h,) for h in hash_parts])
            finally:
                db.close()
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self._db is not None:
            if self._found:
                try:
                    with self._db:  # (one transaction)
                        self._db.execute("BEGIN")
                        self._db.executemany("DELETE FROM Negative WHERE cache = ? AND hash = ?", sorted(self._found))
                except sqlite3.Error:
                    pass
                self._found.clear()
            self._db.close()
            self._db = None
