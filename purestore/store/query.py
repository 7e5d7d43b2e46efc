"""Reading the store database: validity, path infos, references and referrers, closures and
their sizes, topological order, derivers and recorded derivation outputs.

:class:`StoreQueries` holds these read-only methods of :class:`~purestore.store.local.LocalStore`
(which inherits them); they use only the store's ``db``, ``store_dir``, ``real_store_dir`` and
``print_path``.  Writing (registering paths, signatures, derivation outputs) stays in
:mod:`.local`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Iterable, Iterator

from ..errors import PathNotValid, StoreError
from ..formats.hash import Hash
from ..formats.path_info import PathInfo
from ..formats.store_path import StorePath

if TYPE_CHECKING:
    from .db import StoreDB

_SQL_CHUNK = 900  # bound parameters per IN (...) query


def _chunks(seq: list, n: int = _SQL_CHUNK) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


class StoreQueries:
    """The read-only queries of :class:`~purestore.store.local.LocalStore`."""

    db: "StoreDB"
    store_dir: str
    real_store_dir: str

    def is_valid(self, sp: StorePath) -> bool:
        return bool(self.db.query("SELECT 1 FROM ValidPaths WHERE path = ?", (sp.base_name,)))

    def query_valid_paths(self, paths: Iterable[StorePath]) -> set[StorePath]:
        """Those of ``paths`` that are valid (Nix's ``queryValidPaths``): one query for up to
        500 paths instead of one each."""
        by_name = {p.base_name: p for p in paths}
        names = list(by_name)
        valid: set[StorePath] = set()
        for i in range(0, len(names), 500):
            part = names[i:i + 500]
            rows = self.db.query(f"SELECT path FROM ValidPaths WHERE path IN ({','.join('?' * len(part))})", part)
            valid.update(by_name[r[0]] for r in rows)
        return valid

    def _require_valid(self, sp: StorePath) -> int:
        rows = self.db.query("SELECT id FROM ValidPaths WHERE path = ?", (sp.base_name,))
        if not rows:
            raise PathNotValid(f"path {self.print_path(sp)!r} is not valid in the store "
                               f"at {self.real_store_dir!r}")
        return rows[0][0]

    def query_path_info(self, sp: StorePath) -> PathInfo | None:
        """The path info of ``sp``, or None when it is not valid."""
        rows = self.db.query(
            "SELECT id, hash, narSize, registrationTime, deriver, sigs, ca FROM ValidPaths WHERE path = ?",
            (sp.base_name,))
        if not rows:
            return None
        id_, h, size, rtime, deriver, sigs, ca = rows[0]
        refs = self.db.query(
            "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?", (id_,))
        return PathInfo(
            path=sp, nar_hash=Hash.parse(h, "sha256"), nar_size=size,
            references=frozenset(StorePath.from_base_name(r[0]) for r in refs),
            deriver=StorePath.from_base_name(deriver) if deriver else None,
            sigs=frozenset(sigs.split()) if sigs else frozenset(), ca=ca, registration_time=rtime,
        )

    def query_path_from_hash_part(self, hash_part: str) -> StorePath | None:
        """The valid path whose hash part is ``hash_part`` (what a binary cache's
        ``<hash part>.narinfo`` asks for), or None."""
        rows = self.db.query("SELECT path FROM ValidPaths WHERE path >= ? AND path < ? LIMIT 1",
                             (hash_part + "-", hash_part + "."))  # "." sorts just after "-"
        return StorePath.from_base_name(rows[0][0]) if rows else None

    def valid_paths(self) -> list[StorePath]:
        """Every valid path, sorted."""
        return sorted(StorePath.from_base_name(r[0]) for r in self.db.query("SELECT path FROM ValidPaths"))

    def query_references(self, sp: StorePath) -> set[StorePath]:
        """What ``sp`` refers to (raises :class:`PathNotValid` if it is not valid)."""
        id_ = self._require_valid(sp)
        rows = self.db.query(
            "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?", (id_,))
        return {StorePath.from_base_name(r[0]) for r in rows}

    def query_referrers(self, sp: StorePath) -> set[StorePath]:
        """Valid paths that refer to ``sp`` (``sp`` itself if self-referencing)."""
        id_ = self._require_valid(sp)
        rows = self.db.query(
            "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.referrer WHERE r.reference = ?", (id_,))
        return {StorePath.from_base_name(r[0]) for r in rows}

    def query_closure(self, paths: Iterable[StorePath]) -> set[StorePath]:
        """``paths`` and everything they refer to, transitively.

        Raises :class:`PathNotValid` if one of ``paths`` is not valid.
        """
        names = sorted({p.base_name for p in paths})
        if not names:
            return set()
        start = json.dumps(names)
        with self.db.lock:  # one read snapshot for both queries (no write lock taken)
            with self.db.read_transaction() as c:
                found = c.execute("SELECT path FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))",
                                  (start,)).fetchall()
                if len(found) != len(names):
                    missing = sorted(set(names) - {r[0] for r in found})[0]
                    raise PathNotValid(f"path {self.store_dir + '/' + missing!r} is not valid in the store "
                                       f"at {self.real_store_dir!r}")
                rows = c.execute("""
                    WITH RECURSIVE closure(id) AS (
                        SELECT id FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))
                        UNION
                        SELECT r.reference FROM Refs r JOIN closure ON r.referrer = closure.id)
                    SELECT v.path FROM closure JOIN ValidPaths v ON v.id = closure.id""", (start,)).fetchall()
        return {StorePath.from_base_name(r[0]) for r in rows}

    def closure_size(self, paths: Iterable[StorePath]) -> int:
        """Sum of the NAR sizes of the closure of ``paths``."""
        total = 0
        names = [p.base_name for p in self.query_closure(paths)]
        for chunk in _chunks(names):
            total += self.db.query(
                f"SELECT COALESCE(SUM(narSize), 0) FROM ValidPaths WHERE path IN ({','.join('?' * len(chunk))})",
                chunk)[0][0]
        return total

    def _references_of(self, names: list[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {n: set() for n in names}
        for chunk in _chunks(names):
            rows = self.db.query(
                "SELECT a.path, b.path FROM Refs r JOIN ValidPaths a ON a.id = r.referrer "
                f"JOIN ValidPaths b ON b.id = r.reference WHERE a.path IN ({','.join('?' * len(chunk))})",
                chunk)
            for a, b in rows:
                out[a].add(b)
        return out

    def topo_sort(self, paths: Iterable[StorePath]) -> list[StorePath]:
        """``paths`` ordered so that every path comes after the paths it refers to.

        Only references among ``paths`` count; ties are broken by name, so the order is stable.
        """
        names = sorted({p.base_name for p in paths})
        refs = self._references_of(names)
        inset = set(names)
        order: list[str] = []
        state: dict[str, int] = {}
        for root in names:
            if root in state:
                continue
            stack = [(root, iter(sorted((refs[root] & inset) - {root})))]
            state[root] = 1
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    stack.pop()
                    state[node] = 2
                    order.append(node)
                elif nxt not in state:
                    state[nxt] = 1
                    stack.append((nxt, iter(sorted((refs[nxt] & inset) - {nxt}))))
                elif state[nxt] == 1:
                    raise StoreError(f"reference cycle between {self.store_dir}/{node} and {self.store_dir}/{nxt}")
        return [StorePath.from_base_name(n) for n in order]

    def query_deriver(self, sp: StorePath) -> StorePath | None:
        rows = self.db.query("SELECT deriver FROM ValidPaths WHERE path = ?", (sp.base_name,))
        return StorePath.from_base_name(rows[0][0]) if rows and rows[0][0] else None

    def query_derivation_outputs(self, drv: StorePath) -> dict[str, StorePath]:
        """Output name -> path recorded for derivation ``drv`` (empty if none)."""
        rows = self.db.query("SELECT id, path FROM DerivationOutputs WHERE drv = ?", (drv.base_name,))
        return {name: StorePath.from_base_name(p) for name, p in rows}

    def query_derivers_of(self, sp: StorePath) -> list[StorePath]:
        """Derivations recorded as having ``sp`` as an output."""
        rows = self.db.query("SELECT drv FROM DerivationOutputs WHERE path = ? ORDER BY drv", (sp.base_name,))
        return [StorePath.from_base_name(r[0]) for r in rows]
