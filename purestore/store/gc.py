"""Garbage collection: which store paths are live, and deleting the rest.

Roots (:func:`find_roots`):

- every symlink under ``<state_dir>/gcroots/`` (recursively).  A link whose target is in the store
  (logical store dir or the physical one of a rooted store; a file inside a store path counts
  for the whole path) is a *direct* root.  A link whose target is elsewhere is an *indirect*
  root: its target (e.g. a ``result`` link, registered by ``pure build`` as
  ``gcroots/auto/<hash>``) is followed, link by link, until it reaches the store.  An indirect
  root whose target no longer exists is *stale*: it roots nothing, and under ``gcroots/auto/``
  the collector removes it (a deleted ``result`` link stops rooting its path);
- every symlink under ``<state_dir>/profiles/`` (profiles and their generations), but for the
  ``<name>.tmp-<pid>`` link of a profile switch killed before its rename (its process is gone):
  that one roots nothing, and the collector removes it;
- the temporary roots of running ``pure`` processes (``temproots/<pid>``, see
  :mod:`purestore.store.roots`).

The live set (:func:`live_paths`) is the closure of the valid roots under references, plus, when
``keep-derivations`` is on (the default), the deriver (``.drv``) of every live path, and, when
``keep-outputs`` is on, the valid outputs of every live derivation, repeated until nothing changes.
Every other valid path is dead.

Concurrency (``docs/gc.md``): a collection holds ``<state_dir>/gc.lock`` exclusively from before
it reads the roots until it has invalidated the dead paths.  Adding a temporary root takes the
same lock shared, so it waits while a collection runs; a process that temp-roots a path before
using it therefore either had its root read by the collector or sees the path gone afterwards and
rebuilds it.  Inside the invalidation transaction the collector checks once more that no path
outside the dead set refers to a dead path, and spares such paths with their closures.

Deletion is crash-safe: dead paths are first removed from the database in one transaction (so a
path is never valid with missing files), then renamed into a trash directory inside the store
(``.tmp/<pid>-gc-trash``), then removed by a few threads in parallel.  A crash leaves only
invalid files behind, which the next collection (or the store's leftover cleanup) removes.
KeyboardInterrupt (Ctrl-C, or SIGTERM through the CLI) stops the invalidating and the moving,
and the trash is removed before it is raised again (:func:`.gc_trash.remove_trash`).
"""

from __future__ import annotations

import os
import re
import stat
import time
from typing import Iterable

import attrs

from .._pids import process_gone
from ..errors import StoreError
from ..formats.store_path import StorePath
from . import roots as _roots
from .gc_trash import linked_inodes, remove_trash, rename_into, trash_dir, unlink_or_move, would_free

PROFILES = "profiles"
_PROFILE_TMP_RE = re.compile(r".+\.tmp-(\d+)\Z")  # a profile's link while it is switched
_MAX_LINK_DEPTH = 40


@attrs.frozen
class GcRoot:
    """One root: ``link`` roots ``path``.  ``kind`` is ``direct``, ``indirect``, ``profile`` or
    ``temp`` (then ``link`` is ``{temp:<pid>}``-like text, not a file)."""

    link: str
    path: StorePath
    kind: str


@attrs.frozen
class GcResult:
    """What a collection found and did.

    ``dead``: every dead path found (referrers before references); ``deleted``: those removed
    (none on a dry run; a prefix of ``dead`` when ``max_freed`` stopped early); ``bytes_freed``:
    what the collection really freed, as Nix counts it: the sizes of the files and symlinks whose
    last link it removed (of dead paths, invalid leftovers, and ``.links`` entries no path uses
    any more), so a file still hard-linked into a live path counts nothing; ``would_free`` (dry
    run): the same, estimated before deleting (:func:`.gc_trash.would_free`); ``pruned_links``: stale indirect roots removed;
    ``invalid_removed``: unregistered leftovers removed from the store dir.
    """

    dead: tuple[StorePath, ...]
    deleted: tuple[StorePath, ...]
    bytes_freed: int
    pruned_links: tuple[str, ...] = ()
    invalid_removed: tuple[str, ...] = ()
    dry_run: bool = False
    seconds: float = 0.0
    would_delete: tuple[StorePath, ...] = ()   # dry run: what would be deleted (respecting max_freed)
    would_free: int = 0
    links_removed: int = 0  # entries of .links (pure store optimise) no path used any more
    log_temps_removed: int = 0  # temporary files of build logs whose writer died

    def to_json(self, store_dir: str) -> dict:
        return {
            "dryRun": self.dry_run,
            "dead": [p.absolute(store_dir) for p in self.dead],
            "wouldDelete": [p.absolute(store_dir) for p in self.would_delete],
            "deleted": [p.absolute(store_dir) for p in self.deleted],
            "bytesFreed": self.bytes_freed,
            "wouldFree": self.would_free,
            "linksRemoved": self.links_removed,
            "logTempsRemoved": self.log_temps_removed,
            "prunedLinks": list(self.pruned_links),
            "invalidRemoved": list(self.invalid_removed),
        }


# --------------------------------------------------------------------------------------------
# roots


def profiles_dir(state_dir: str) -> str:
    return os.path.join(state_dir, PROFILES)


def stale_profile_temp(name: str) -> bool:
    """True when ``name`` is the ``<profile>.tmp-<pid>`` link of a profile switch whose process
    is gone (killed between making the link and renaming it over the profile's)."""
    m = _PROFILE_TMP_RE.match(name)
    return m is not None and process_gone(m.group(1))


def _store_path_of(target: str, store_dir: str, real_store_dir: str) -> StorePath | None:
    """The store path that the absolute path ``target`` is or is inside, else None.

    ``target`` may also name it with ``..`` in it or through a symlinked directory (the store's
    root reached by another name: ``--store /data/link-to-root``), as ``LocalStore.parse_path``
    understands it; such a root protected nothing before."""
    target = os.path.normpath(target)
    sp = _under(target, (store_dir, real_store_dir))
    if sp is None and target.startswith("/"):
        parent, name = os.path.split(target)
        real = os.path.join(os.path.realpath(parent), name)
        if real != target:
            sp = _under(real, (os.path.realpath(real_store_dir),))
    return sp


def _under(target: str, prefixes: tuple[str, ...]) -> StorePath | None:
    for prefix in prefixes:
        if target.startswith(prefix + "/"):
            try:
                sp, _rest = StorePath.parse_prefix(target, prefix)
            except ValueError:
                return None
            return sp
    return None


def _resolve_link(link: str, store_dir: str, real_store_dir: str) -> tuple[StorePath | None, bool]:
    """Follow ``link`` (a symlink) until it points into the store.

    Returns ``(path, exists)``: the store path reached (or None), and whether the chain ended
    somewhere that exists (False = a dangling chain, i.e. a stale root).  The store path itself is
    not required to exist on the host: in a rooted store links name the logical store dir.
    """
    cur = link
    for _ in range(_MAX_LINK_DEPTH):
        try:
            target = os.readlink(cur)
        except (FileNotFoundError, NotADirectoryError):
            return None, False
        except OSError:  # EINVAL: not a symlink (a file or directory); EACCES: cannot tell
            return None, True
        if not target.startswith("/"):
            target = os.path.normpath(os.path.join(os.path.dirname(cur), target))
        sp = _store_path_of(target, store_dir, real_store_dir)
        if sp is not None:
            return sp, True
        try:
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            return None, False  # only a link whose target is surely gone is stale
        except OSError:
            return None, True   # e.g. a directory we may not search: keep the root link
        if not stat.S_ISLNK(st.st_mode):
            return None, True
        cur = target
    return None, True


def _unlink_stale(link: str, what: str) -> None:
    """Remove ``link`` (found stale by the root scan); gone already is fine."""
    try:
        os.unlink(link)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StoreError(f"cannot remove {what} {link!r}: {e.strerror}") from e


def _walk_links(top: str) -> Iterable[str]:
    """Every symlink under ``top`` (not following symlinked directories)."""
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for e in it:
                if e.is_symlink():
                    yield e.path
                elif e.is_dir(follow_symlinks=False):
                    stack.append(e.path)


def find_roots(store, *, prune_stale: bool = True, include_temp: bool = True) -> tuple[list[GcRoot], list[str]]:
    """All roots of ``store`` and the stale root links: indirect ones under ``gcroots/auto`` and
    leftover profile switch links (:func:`stale_profile_temp`), removed when ``prune_stale``.

    Returns ``(roots, stale_links)``.  Roots naming paths that are not valid are included; the
    caller decides (they root nothing).
    """
    sd, rsd, state = store.store_dir, store.real_store_dir, store.state_dir
    found: list[GcRoot] = []
    stale: list[str] = []
    gcroots = _roots.gcroots_dir(state)
    auto = _roots.auto_roots_dir(state)
    for link in _walk_links(gcroots):
        try:
            direct = _store_path_of(_abs_target(link), sd, rsd)
        except OSError:
            continue
        if direct is not None:
            found.append(GcRoot(link, direct, "direct"))
            continue
        sp, exists = _resolve_link(link, sd, rsd)
        if sp is not None:
            found.append(GcRoot(_abs_target(link), sp, "indirect"))
        elif not exists and link.startswith(auto + "/"):  # like Nix, only gcroots/auto is pruned
            stale.append(link)
            if prune_stale:
                _unlink_stale(link, "stale GC root")
    for link in _walk_links(profiles_dir(state)):
        if stale_profile_temp(os.path.basename(link)):
            stale.append(link)
            if prune_stale:
                _unlink_stale(link, "the leftover profile link")
            continue
        sp, _exists = _resolve_link(link, sd, rsd)
        if sp is not None:
            found.append(GcRoot(link, sp, "profile"))
    if include_temp:
        for pid, sp in _roots.read_temp_roots_by_pid(state, sd):
            found.append(GcRoot(f"{{temp:{pid}}}", sp, "temp"))
    return found, stale


def _abs_target(link: str) -> str:
    t = os.readlink(link)
    return t if t.startswith("/") else os.path.normpath(os.path.join(os.path.dirname(link), t))


# --------------------------------------------------------------------------------------------
# liveness


class _Graph:
    """The whole reference graph, read in three queries (fast for tens of thousands of paths)."""

    def __init__(self, store):
        db = store.db
        rows = db.query("SELECT id, path, deriver FROM ValidPaths")
        self.id_of: dict[str, int] = {}
        self.name_of: dict[int, str] = {}
        self.deriver: dict[int, str] = {}
        for id_, path, deriver in rows:
            self.id_of[path] = id_
            self.name_of[id_] = path
            if deriver:
                self.deriver[id_] = deriver
        self.refs: dict[int, list[int]] = {}
        self.referrers: dict[int, list[int]] = {}
        for referrer, reference in db.query("SELECT referrer, reference FROM Refs"):
            self.refs.setdefault(referrer, []).append(reference)
            self.referrers.setdefault(reference, []).append(referrer)
        self.outputs: dict[str, list[str]] = {}
        self._store = store

    def load_outputs(self) -> None:
        for drv, path in self._store.db.query("SELECT drv, path FROM DerivationOutputs"):
            self.outputs.setdefault(drv, []).append(path)

    def live(self, root_names: Iterable[str], keep_derivations: bool, keep_outputs: bool) -> set[int]:
        if keep_outputs and not self.outputs:
            self.load_outputs()
        live: set[int] = set()
        todo = [self.id_of[n] for n in root_names if n in self.id_of]
        while todo:
            i = todo.pop()
            if i in live:
                continue
            live.add(i)
            todo.extend(self.refs.get(i, ()))
            if keep_derivations:
                d = self.deriver.get(i)
                if d is not None and d in self.id_of:
                    todo.append(self.id_of[d])
            if keep_outputs:
                name = self.name_of[i]
                if name.endswith(".drv"):
                    for o in self.outputs.get(name, ()):
                        if o in self.id_of:
                            todo.append(self.id_of[o])
        return live

    def referrers_first(self, ids: set[int]) -> list[int]:
        """Order ``ids`` so that every path comes after all its referrers within ``ids``."""
        pending = {i: sum(1 for r in self.referrers.get(i, ()) if r in ids and r != i) for i in ids}
        ready = sorted((i for i, n in pending.items() if n == 0), reverse=True)
        out: list[int] = []
        while ready:
            i = ready.pop()
            out.append(i)
            for ref in self.refs.get(i, ()):
                if ref != i and ref in pending:
                    pending[ref] -= 1
                    if pending[ref] == 0:
                        ready.append(ref)
        if len(out) != len(ids):  # a reference cycle (cannot happen in a sound store): append the rest
            seen = set(out)
            out.extend(sorted(i for i in ids if i not in seen))
        return out


def live_paths(store, *, roots: list[GcRoot] | None = None) -> set[StorePath]:
    """The live valid paths of ``store`` (see the module docstring)."""
    if roots is None:
        roots, _ = find_roots(store, prune_stale=False)
    g = _Graph(store)
    s = store.settings
    ids = g.live({r.path.base_name for r in roots}, s.keep_derivations, s.keep_outputs)
    return {StorePath.from_base_name(g.name_of[i]) for i in ids}


def is_live(store, path: StorePath) -> bool:
    """Whether ``path`` is reachable from a root (so ``pure store delete`` must refuse it)."""
    return live_reason(store, path) is not None


def live_reason(store, path: StorePath) -> str | None:
    """Why the roots keep ``path`` alive (a message fragment), or None when no root reaches it.

    Used by :meth:`LocalStore.is_live` (``pure store delete``).  The reference graph is cached
    on the store while the database is unchanged, so deleting many paths reads it once.
    """
    own = f"{{temp:{os.getpid()}}}"  # what this process itself asks to delete is not rooted by it
    roots = [r for r in find_roots(store, prune_stale=False)[0] if r.link != own]
    key = (store.db.query("PRAGMA data_version")[0][0], store.db.conn.total_changes)
    cached = getattr(store, "_gc_graph_cache", None)
    if cached is not None and cached[0] == key:
        g = cached[1]
    else:
        g = _Graph(store)
        store._gc_graph_cache = (key, g)
    target = g.id_of.get(path.base_name)
    if target is None:
        return None
    s = store.settings
    if target not in g.live({r.path.base_name for r in roots}, s.keep_derivations, s.keep_outputs):
        return None
    for r in sorted(roots, key=lambda r: (r.kind != "direct", r.link)):
        if r.path == path:
            what = {"temp": f"a temporary root of process {r.link[6:-1]}",
                    "profile": f"in use by the profile {r.link!r}"}.get(r.kind, f"a GC root ({r.link!r})")
            return f"it is {what}"
    for r in sorted(roots, key=lambda r: (r.kind != "direct", r.link)):
        if target in g.live([r.path.base_name], s.keep_derivations, s.keep_outputs):
            src = f"temporary root of process {r.link[6:-1]}" if r.kind == "temp" else f"root {r.link!r}"
            return f"it is reachable from the {src} ({r.path.absolute(store.store_dir)})"
    return None


def print_roots(store, roots: list[GcRoot]) -> list[str]:
    """Lines ``<link> -> <store path>`` like ``nix-store --gc --print-roots``, sorted."""
    return sorted(f"{r.link} -> {r.path.absolute(store.store_dir)}" for r in roots)


# --------------------------------------------------------------------------------------------
# deletion


def _invalidate(store, g: _Graph, order: list[int]) -> list[int]:
    """Remove ``order`` (referrers first) from the database in ONE transaction.

    Re-checks, inside the transaction, that nothing outside the set refers to a member (a path
    registered since the graph was read); such members and their references are spared.
    Returns the ids actually invalidated, in order.
    """
    with store.db.transaction() as c:
        c.execute("CREATE TEMP TABLE IF NOT EXISTS GcDead (id INTEGER PRIMARY KEY)")
        c.execute("DELETE FROM GcDead")
        c.executemany("INSERT INTO GcDead(id) VALUES (?)", ((i,) for i in order))
        while True:
            spared = [row[0] for row in c.execute(
                "SELECT DISTINCT r.reference FROM Refs r JOIN GcDead d ON d.id = r.reference "
                "WHERE r.referrer NOT IN (SELECT id FROM GcDead)")]
            if not spared:
                break
            todo, keep = list(spared), set()
            while todo:
                i = todo.pop()
                if i in keep:
                    continue
                keep.add(i)
                todo.extend(row[0] for row in c.execute("SELECT reference FROM Refs WHERE referrer = ?", (i,)))
            c.executemany("DELETE FROM GcDead WHERE id = ?", ((i,) for i in keep))
            order = [i for i in order if i not in keep]
        c.execute("DELETE FROM Refs WHERE referrer IN (SELECT id FROM GcDead)")
        c.execute("DELETE FROM DerivationOutputs WHERE drv IN "
                  "(SELECT v.path FROM ValidPaths v JOIN GcDead d ON d.id = v.id)")
        c.execute("DELETE FROM ValidPaths WHERE id IN (SELECT id FROM GcDead)")
        c.execute("DELETE FROM GcDead")
    return order


def _invalid_leftovers(store, valid_names: set[str], temp_names: set[str]) -> list[str]:
    """Entries of the store dir that look like store paths but are not valid nor temp-rooted
    (candidates: :func:`_remove_leftovers` takes each one's path lock before it moves it)."""
    out = []
    try:
        it = os.scandir(store.real_store_dir)
    except FileNotFoundError:
        return out
    with it:
        for e in it:
            n = e.name
            if n.startswith(".") or n in valid_names or n in temp_names:
                continue
            try:
                StorePath.from_base_name(n)
            except ValueError:
                continue
            out.append(n)
    return out


def _remove_leftovers(store, names: list[str], trash: str) -> tuple[list[str], int]:
    """Move the invalid leftovers ``names`` into ``trash``, each under its path lock, taken
    without waiting; returns those moved and the bytes freed by those unlinked at once (not
    directories: they count when the trash goes).

    A path whose lock is held is being written (a build, a substitution, an add): skipped.  The
    lock is held from the check of validity until the move, so a writer cannot install and
    register the path in between (a leftover moved away just after it was registered would be
    a valid path without files).  A lock *file* alone means nothing: a writer killed outright
    leaves its lock file behind, and a leftover of such a crash (killed after its rename into
    place, before it registered) was skipped for ever.  Taking the stale lock removes its file
    on release.
    """
    moved, freed = [], 0
    for n in names:
        if not store.locks.acquire(n, blocking=False):
            continue
        try:
            if store.db.query("SELECT 1 FROM ValidPaths WHERE path = ?", (n,)):
                continue  # registered since the store dir was read
            src = f"{store.real_store_dir}/{n}"
            try:
                st = os.lstat(src)
            except FileNotFoundError:
                continue
            try:
                if stat.S_ISDIR(st.st_mode):
                    rename_into(src, trash, n)
                else:
                    os.unlink(src)
                    freed += st.st_size if st.st_nlink == 1 else 0
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StoreError(f"cannot remove invalid path {src!r}: {e.strerror}") from e
            moved.append(n)
        finally:
            store.locks.release(n)
    return moved, freed


def collect_garbage(store, *, dry_run: bool = False, max_freed: int | None = None,
                    workers: int | None = None) -> GcResult:
    """Delete every dead path of ``store`` (or, with ``max_freed``, dead paths until those
    deleted free at least that many bytes, as :func:`.gc_trash.would_free` estimates them before
    deleting), referrers before references.

    Blocks while another collection runs.  Raises :class:`StoreError` when the database or the
    file system refuse an operation.
    """
    t0 = time.perf_counter()
    state = store.state_dir
    # Unlinking is bound by file-system latency, not CPU: many threads help even on 2 cores
    # (measured: 10,000 unlinks took 5.6 s in one thread, 0.2-0.5 s in 16).
    workers = workers or 16
    interrupted: KeyboardInterrupt | None = None
    freed = 0  # bytes really freed (files whose last link went)
    lock = _roots.gc_lock(state)
    try:
        roots, stale = find_roots(store, prune_stale=not dry_run)
        g = _Graph(store)
        s = store.settings
        live = g.live({r.path.base_name for r in roots}, s.keep_derivations, s.keep_outputs)
        dead_ids = set(g.name_of) - live
        order = order_all = g.referrers_first(dead_ids)
        dead = tuple(StorePath.from_base_name(g.name_of[i]) for i in order)
        if max_freed is not None or dry_run:
            # counted as bytes_freed will be (not NAR sizes: after `pure store optimise` a dead
            # path whose files live paths share frees next to nothing)
            linked = linked_inodes(store.real_store_dir)
            estimate = {}

            def size(i: int) -> int:
                if i not in estimate:
                    estimate[i] = would_free(f"{store.real_store_dir}/{g.name_of[i]}", linked)
                return estimate[i]
        if max_freed is not None:
            chosen, total = [], 0
            for i in order:
                if total >= max_freed:
                    break
                chosen.append(i)
                total += size(i)
            order = chosen
        if dry_run:
            chosen_set = set(order)
            return GcResult(dead=dead, deleted=(), bytes_freed=0, pruned_links=tuple(stale),
                            dry_run=True, seconds=time.perf_counter() - t0,
                            would_delete=tuple(p for i, p in zip(order_all, dead) if i in chosen_set),
                            would_free=sum(size(i) for i in order))
        trash = trash_dir(store)
        try:
            order = _invalidate(store, g, order)
            # what is no longer valid loses its signed provenance: a later build of the path
            # may give other contents, which `pure copy --to` must not send with the old statement
            from .provenance import delete_provenance_of
            delete_provenance_of(store, [StorePath.from_base_name(g.name_of[i]) for i in order])
            temp_names = {r.path.base_name for r in roots if r.kind == "temp"}
            leftovers = [] if max_freed is not None else _invalid_leftovers(
                store, {r[0] for r in store.db.query("SELECT path FROM ValidPaths")}
                | {g.name_of[i] for i in order}, temp_names)
            # Remove files and links, and move directories aside, while still holding the lock:
            # once it is released a builder may temp-root one of these (now invalid) paths and
            # write it anew at the same name.  Unlinking a file costs what renaming it would.
            freed += unlink_or_move(store.real_store_dir, [g.name_of[i] for i in order], trash, workers)
            leftovers, freed_leftovers = _remove_leftovers(store, leftovers, trash)
            freed += freed_leftovers
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: stop, and remove the trash
            # (before the invalidation committed, nothing changed; after, the dead paths not
            # moved yet stay in the store dir, invalid, and the next collection removes them)
            interrupted = e
        except StoreError:  # a dead path that cannot be moved, a busy database: the same
            try:
                remove_trash(trash, workers, None)
            except StoreError:
                pass  # (the next open of the store removes it; the first error says more)
            raise
    finally:
        lock.close()
    freed += remove_trash(trash, workers, interrupted)
    # a file hard-linked by `pure store optimise` frees its bytes when its last link goes: often
    # the .links entry, removed here once no path uses it
    from .optimise import remove_unused_links
    links_removed, freed_links = remove_unused_links(store.real_store_dir)
    freed += freed_links
    from .build_logs import remove_stale_log_temps
    log_temps = remove_stale_log_temps(state)
    by_id = dict(zip(order_all, dead))
    deleted = tuple(by_id[i] for i in order)
    return GcResult(dead=dead, deleted=deleted, bytes_freed=freed,
                    pruned_links=tuple(stale), invalid_removed=tuple(leftovers), dry_run=False,
                    seconds=time.perf_counter() - t0, links_removed=links_removed,
                    log_temps_removed=log_temps)

