"""The local store: store dir, state dir, database, atomic adds, locks, delete (reading the
database, closures included, is in :mod:`.query`, adding text objects in :mod:`.texts`,
verifying in :mod:`.verify`, checking what to add in :mod:`.adding`).

Layout: the store's files live in ``settings.real_store_dir`` (the logical store dir under the
store root) and its state in ``settings.state_dir`` (see docs/internals.md).  Temporary entries
are prepared in ``<real_store_dir>/.tmp/<pid>-<random>-<what>``; whoever owns them holds the
flock on ``<state_dir>/temproots/<pid>`` (see :mod:`purestore.store.roots`), so leftovers of a
killed process are recognised and removed by the next :meth:`LocalStore.open`.

Adding is atomic: copy to a temporary name while hashing (canonical metadata), take the path
lock, rename into place, flush the file system, register in one transaction.  A path is valid
only once its row is committed, and the row is committed only after the files are complete, so
a crash at any moment leaves no registered-but-incomplete path; a complete but unregistered
path left by a crash is replaced by the next add of that path (it is never used unregistered).

Blocking throughout (layer 2 is synchronous); trio code calls it from worker threads, which is
safe: the database connection is guarded by a lock and path locks exclude threads too.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from typing import TYPE_CHECKING, Iterable, ContextManager

from ..errors import InvalidStorePath, PathInUse, PathNotValid, PurestoreError, StoreError
from ..formats.path_info import PathInfo
from ..formats.store_path import (
    StorePath, make_fixed_output_path, make_source_path,
)
from .adding import add_error, check_add_source, compute_add_path, file_sha256  # noqa: F401
from .db import StoreDB
from .fstree import remove_tree
from ._sync import syncfs as _syncfs
from .lock import PathLocks
from .query import StoreQueries, _chunks
from .texts import TextObjects
from .roots import TempRoots, gc_lock, owner_alive, remove_dead_temproots, temproots_dir, gcroots_dir, auto_roots_dir
from .settings import Settings

if TYPE_CHECKING:
    from .verify import VerifyReport


def __getattr__(name: str):
    """VerifyProblem and VerifyReport, re-exported from :mod:`.verify` for callers, imported
    when first asked for: verify (with narinfo and signing) costs every command 4 ms."""
    if name in ("VerifyProblem", "VerifyReport"):
        from . import verify
        return getattr(verify, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TMP_DIR = ".tmp"

def _read_only_reason(settings: Settings) -> str | None:
    """Why the store of ``settings`` can only be read by this process (its database exists, and
    its directory or file is not writable: another user's store, a read-only mount), or None."""
    db_dir = os.path.join(settings.state_dir, "db")
    db_file = os.path.join(db_dir, "db.sqlite")
    if not os.path.exists(db_file):
        return None
    if os.access(db_dir, os.W_OK) and os.access(db_file, os.W_OK):
        return None
    return (f"the store at {settings.real_store_dir!r} is read-only for this user (uid {os.getuid()}): "
            f"its database {db_file!r} may be read, not written")


class _NoTempRoots:
    """The temporary roots of a read-only store: none can be written (the collector of the
    store's owner does not see what this process uses; it only reads)."""

    def add(self, logical_path: str) -> None:
        pass

    def remove(self, logical_path: str) -> None:
        pass

    def close(self) -> None:
        pass


class LocalStore(StoreQueries, TextObjects):
    """A store on the local file system.  Create it with :meth:`open`; close it (or use ``with``).

    Paths are :class:`StorePath` values; :meth:`print_path` gives the logical absolute path,
    :meth:`real_path` the physical one.  The read-only queries (validity, path infos, references,
    closures, derivers) are inherited from :class:`~.query.StoreQueries`.
    """

    def __init__(self, settings: Settings, db: StoreDB, temp_roots: TempRoots, *, durable: bool):
        self.settings = settings
        self.store_dir = settings.store_dir
        self.real_store_dir = settings.real_store_dir
        self.state_dir = settings.state_dir
        self.db = db
        self.locks = PathLocks(os.path.join(self.state_dir, "locks"))
        self.durable = durable
        self._temp_roots = temp_roots
        self._tmp_dir = os.path.join(self.real_store_dir, TMP_DIR)

    # -- opening and closing -------------------------------------------------------------------

    read_only = False  # opened by a user who may not write it (see open)

    @classmethod
    def open(cls, settings: Settings, *, durable: bool | None = None) -> "LocalStore":
        """Open (creating if needed) the store of ``settings`` and clean up after crashed adds.

        ``durable`` (default: the ``fsync-store-paths`` setting, on) flushes the file system
        before registering new paths, so a power loss cannot leave a registered path whose
        data never reached the disk.
        Raises :class:`StoreError` when the directories or database cannot be created.
        """
        state = settings.state_dir
        why = _read_only_reason(settings)
        if why is not None:  # queries work; a write fails with `why`
            db = StoreDB(os.path.join(state, "db", "db.sqlite"), settings.store_dir, read_only=why)
            store = cls(settings, db, _NoTempRoots(), durable=False)
            store.read_only = True
            return store
        _make_dirs(settings, [*(os.path.join(state, sub) for sub in ("db", "locks", "profiles", "log")),
                              temproots_dir(state), gcroots_dir(state), auto_roots_dir(state)])
        # the database first: one made for another store dir refuses before that dir is made
        db = StoreDB(os.path.join(state, "db", "db.sqlite"), settings.store_dir)
        try:
            _make_dirs(settings, [os.path.join(settings.real_store_dir, TMP_DIR)])
            temp_roots = TempRoots(state)
        except BaseException:
            db.close()
            raise
        if durable is None:
            durable = settings.fsync_store_paths
        store = cls(settings, db, temp_roots, durable=durable)
        store.clean_leftovers()
        return store

    def close(self) -> None:
        self.db.close()
        self._temp_roots.close()

    def __enter__(self) -> "LocalStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def clean_leftovers(self) -> list[str]:
        """Remove temporary entries of processes that are gone; returns what was removed."""
        removed = []
        try:
            names = os.listdir(self._tmp_dir)
        except FileNotFoundError:
            return removed
        alive: dict[int, bool] = {}
        for name in names:
            pid_text = name.split("-", 1)[0]
            if not (pid_text.isascii() and pid_text.isdigit()):
                continue
            pid = int(pid_text)
            if pid not in alive:
                alive[pid] = pid == os.getpid() or owner_alive(self.state_dir, pid)
            if not alive[pid]:
                # claim it first (rename to a name of this live process), so that two processes
                # cleaning at once never remove the same tree under each other's feet
                claimed = self.temp_name()
                try:
                    os.rename(os.path.join(self._tmp_dir, name), claimed)
                except FileNotFoundError:
                    continue  # another process claimed it
                remove_tree(claimed)
                removed.append(name)
        remove_dead_temproots(self.state_dir)
        return removed

    # -- naming paths ---------------------------------------------------------------------------

    def print_path(self, sp: StorePath) -> str:
        """The logical absolute path (``/pure/store/<hash>-<name>``)."""
        return f"{self.store_dir}/{sp.base_name}"

    def real_path(self, sp: StorePath) -> str:
        """Where ``sp`` physically is (under the store root)."""
        return f"{self.real_store_dir}/{sp.base_name}"

    def parse_path(self, text: str, *, valid: bool = False) -> StorePath:
        """The store path that ``text`` names.

        Accepts a logical absolute store path, the physical path under the root's store dir, a
        path inside a store path (gives its store path), a symlink (such as ``result``) to any
        of these, or a bare base name ``<hash>-<name>``.  Raises :class:`InvalidStorePath` when
        ``text`` names nothing in the store, and with ``valid=True`` :class:`PathNotValid`
        when the path is not valid.
        """
        sp = self._parse_path(str(text), 0)
        if valid and not self.is_valid(sp):
            raise PathNotValid(f"path {self.print_path(sp)!r} is not valid in the store "
                               f"at {self.real_store_dir!r}")
        return sp

    def _parse_path(self, text: str, depth: int) -> StorePath:
        if not text:
            raise InvalidStorePath("empty store path")
        if "/" not in text:
            try:
                return StorePath.from_base_name(text)
            except InvalidStorePath:
                if not os.path.lexists(text):
                    raise InvalidStorePath(
                        f"{text!r} is neither a store path nor a store path base name (<hash>-<name>)"
                    ) from None
        absolute = os.path.abspath(text) if not text.startswith("/") else os.path.normpath(text)
        for prefix in (self.store_dir, self.real_store_dir):
            if absolute.startswith(prefix + "/"):
                try:
                    return StorePath.parse_prefix(absolute, prefix)[0]
                except InvalidStorePath as e:
                    raise InvalidStorePath(f"{text!r} is not a store path: {e}") from e
        if depth < 40 and os.path.islink(absolute):
            target = os.readlink(absolute)
            return self._parse_path(os.path.join(os.path.dirname(absolute), target), depth + 1)
        real = os.path.realpath(absolute)
        if real != absolute:
            for prefix in (self.store_dir, self.real_store_dir):
                if real.startswith(prefix + "/"):
                    return StorePath.parse_prefix(real, prefix)[0]
        hint = None
        m = re.match(r"(/[^\0]*?)/[0-9a-df-np-sv-z]{32}-[^/]+(/|$)", absolute)  # /<dir>/<hash>-<name>
        if m and m.group(1).endswith(self.store_dir) and m.group(1) != self.store_dir:
            # the physical path of a rooted store's path (`readlink result` of another --store):
            # the same path, by its logical name, is what to give
            root = m.group(1)[:-len(self.store_dir)]
            hint = (f"{m.group(1)!r} is where the rooted store {root!r} keeps its paths; name the "
                    f"path by its store dir: '{self.store_dir}{absolute[len(m.group(1)):]}'")
        elif m and m.group(1) != self.store_dir:
            hint = f"paths of {m.group(1)!r} need a store made for that dir (--store-dir {m.group(1)})"
        if absolute in (self.store_dir, self.real_store_dir) or real in (self.store_dir, self.real_store_dir):
            raise InvalidStorePath(f"{text!r} is the store dir itself, not a store path in it",
                                   hint=f"name a path in it: {self.store_dir}/<hash>-<name>")
        raise InvalidStorePath(f"path {text!r} is not in the store dir {self.store_dir!r}"
                               + (f" (physically {self.real_store_dir!r})" if self.settings.rooted else ""),
                               hint=hint)

    # -- locks and roots ------------------------------------------------------------------------

    def lock_path(self, sp: StorePath) -> ContextManager[None]:
        """Exclusive lock on ``sp`` across processes and threads, reentrant within a thread."""
        return self.locks.lock(sp.base_name)

    def lock_paths(self, sps: Iterable[StorePath]) -> ContextManager[None]:
        """Lock several paths, in sorted order (no deadlock between two callers)."""
        return self.locks.lock_many(sp.base_name for sp in sps)

    def add_temp_root(self, sp: StorePath) -> None:
        """Keep ``sp`` from garbage collection until this process exits."""
        self._temp_roots.add(self.print_path(sp))

    def remove_temp_root(self, sp: StorePath) -> None:
        """Drop one :meth:`add_temp_root` of ``sp`` (for long-running processes: a server)."""
        self._temp_roots.remove(self.print_path(sp))

    def add_temp_roots(self, sps: Iterable[StorePath]) -> None:
        text = "\n".join(self.print_path(sp) for sp in sps)
        if text:
            self._temp_roots.add(text)

    def temp_name(self, sp: StorePath | None = None) -> str:
        """A fresh physical path inside the store dir for preparing ``sp`` (nothing is created).

        Removed by the next :meth:`open` once this process is gone.  Move it into place with
        :meth:`install_path`.
        """
        what = sp.hash_part if sp is not None else "add"
        return os.path.join(self._tmp_dir, f"{os.getpid()}-{secrets.token_hex(6)}-{what}")

    def install_path(self, tmp: str, sp: StorePath) -> None:
        """Rename a finished temporary entry to ``sp``'s real path (caller holds the lock on
        ``sp`` and has checked it is not valid).  A stale unregistered copy is replaced."""
        real = self.real_path(sp)
        try:
            if os.path.lexists(real):
                remove_tree(real)
            st = os.lstat(tmp)
            readonly_dir = stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IWUSR
            if readonly_dir:  # moving a directory to another parent needs write access to it
                os.chmod(tmp, 0o755)
            os.rename(tmp, real)
            if readonly_dir:
                os.chmod(real, stat.S_IMODE(st.st_mode))
        except OSError as e:
            raise StoreError(f"cannot move {tmp!r} into place at {real!r}: {e.strerror}") from e

    def remove_temp(self, tmp: str) -> None:
        remove_tree(tmp)

    # -- adding ---------------------------------------------------------------------------------

    def register(self, infos: Iterable[PathInfo]) -> None:
        """Make paths valid, all in ONE transaction.

        The files must already be complete at :meth:`real_path`.  Every reference must be valid
        or registered in the same call.  An already valid path keeps its row; its signatures are
        merged.  Raises :class:`StoreError` for a missing reference or file.
        """
        infos = list(infos)
        if not infos:
            return
        batch = {i.path.base_name for i in infos}
        for i in infos:
            if not os.path.lexists(self.real_path(i.path)):
                raise StoreError(f"cannot register {self.print_path(i.path)!r}: "
                                 f"nothing at {self.real_path(i.path)!r}")
        with self.db.transaction() as c:
            existing = {}
            for chunk in _chunks(sorted(batch)):
                existing.update(c.execute(
                    f"SELECT path, sigs FROM ValidPaths WHERE path IN ({','.join('?' * len(chunk))})", chunk))
            new = [i for i in infos if i.path.base_name not in existing]
            for i in infos:
                if i.path.base_name in existing and i.sigs:
                    old = set((existing[i.path.base_name] or "").split())
                    c.execute("UPDATE ValidPaths SET sigs = ? WHERE path = ?",
                              (" ".join(sorted(old | i.sigs)), i.path.base_name))
            c.executemany(
                "INSERT INTO ValidPaths(path, hash, narSize, registrationTime, deriver, sigs, ca) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(i.path.base_name, f"sha256:{i.nar_hash.base16}", i.nar_size,
                  i.registration_time or int(time.time()),
                  i.deriver.base_name if i.deriver else None,
                  " ".join(sorted(i.sigs)) or None, i.ca) for i in new])
            wanted = sorted({r.base_name for i in new for r in i.references} | {i.path.base_name for i in new})
            ids: dict[str, int] = {}
            for chunk in _chunks(wanted):
                ids.update(c.execute(
                    f"SELECT path, id FROM ValidPaths WHERE path IN ({','.join('?' * len(chunk))})", chunk))
            rows = []
            for i in new:
                for r in i.references:
                    if r.base_name not in ids:
                        raise StoreError(f"cannot register {self.print_path(i.path)!r}: its reference "
                                         f"{self.print_path(r)!r} is not valid")
                    rows.append((ids[i.path.base_name], ids[r.base_name]))
            c.executemany("INSERT OR IGNORE INTO Refs(referrer, reference) VALUES (?, ?)", rows)

    def add_signatures(self, sp: StorePath, sigs: Iterable[str]) -> None:
        """Add signatures to a valid path (raises :class:`PathNotValid` if it is not)."""
        with self.db.transaction() as c:
            row = c.execute("SELECT sigs FROM ValidPaths WHERE path = ?", (sp.base_name,)).fetchone()
            if row is None:
                raise PathNotValid(f"cannot sign {self.print_path(sp)!r}: it is not valid")
            merged = set((row[0] or "").split()) | set(sigs)
            c.execute("UPDATE ValidPaths SET sigs = ? WHERE path = ?", (" ".join(sorted(merged)) or None, sp.base_name))

    def register_derivation_outputs(self, drv: StorePath, outputs: dict[str, StorePath]) -> None:
        """Record the output paths of ``drv`` (replacing earlier records of the same outputs)."""
        with self.db.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO DerivationOutputs(drv, id, path) VALUES (?, ?, ?)",
                          [(drv.base_name, name, sp.base_name) for name, sp in sorted(outputs.items())])

    def register_derivation_outputs_many(self, items: Iterable[tuple[StorePath, dict[str, StorePath]]]) -> None:
        """:meth:`register_derivation_outputs` for many derivations in ONE transaction
        (used by ``pure instantiate``)."""
        rows = [(drv.base_name, name, sp.base_name) for drv, outs in items for name, sp in sorted(outs.items())]
        if rows:  # only what is not recorded yet (an evaluation of an unchanged expression: none)
            have: set[tuple] = set()
            for chunk in _chunks(sorted({r[0] for r in rows})):
                have.update(self.db.query("SELECT drv, id, path FROM DerivationOutputs WHERE drv IN "
                                          f"({','.join('?' * len(chunk))})", chunk))
            rows = [r for r in rows if r not in have]
        if rows:
            with self.db.transaction() as c:
                c.executemany("INSERT OR REPLACE INTO DerivationOutputs(drv, id, path) VALUES (?, ?, ?)", rows)

    def add_path(self, src: str, name: str | None = None, *, flat: bool = False,
                 dry_run: bool = False) -> StorePath:
        """Add a file or tree, like ``nix-store --add`` (or ``--add-fixed sha256`` with ``flat``).

        Recursive (default): a ``source`` path of the NAR hash; ``src`` itself is not followed if
        it is a symlink.  ``flat``: ``src`` (followed) must be a regular file; the path is the
        fixed-output path of the sha256 of its contents.  ``dry_run`` computes the path only.
        Raises :class:`StoreError` when ``src`` cannot be read, :class:`InvalidStorePath` when
        the name is not a valid store path name.
        """
        from . import fsnar

        src, name = check_add_source(src, name, flat)
        if dry_run:
            return compute_add_path(src, name, flat=flat, store_dir=self.store_dir)
        try:
            tmp = self.temp_name()
            try:
                nar_hash, nar_size, _ = fsnar.copy_and_hash(src, tmp)
                if flat:
                    content = file_sha256(tmp)
                    sp = make_fixed_output_path(name, content, False, self.store_dir)
                    ca = f"fixed:sha256:{content.nix32}"
                else:
                    sp = make_source_path(name, nar_hash, (), self.store_dir)
                    ca = f"fixed:r:sha256:{nar_hash.nix32}"
                info = PathInfo(sp, nar_hash, nar_size, ca=ca, registration_time=int(time.time()))
                self._install_and_register(tmp, info)
            finally:
                remove_tree(tmp)
        except OSError as e:
            if isinstance(e, StoreError):
                raise
            raise add_error(src, e) from e
        return sp

    def _install_and_register(self, tmp: str, info: PathInfo) -> None:
        self.add_temp_root(info.path)
        with self.lock_path(info.path):
            if self.is_valid(info.path):
                return
            self.install_path(tmp, info.path)
            if self.durable:
                _syncfs(self.real_store_dir)
            self.register([info])

    # -- verify and delete ----------------------------------------------------------------------

    def verify(self, check_contents: bool = False, **kw) -> "VerifyReport":
        """Check that every valid path exists (and, with ``check_contents``, that its NAR hash and
        size match the database) and that no reference dangles; ``paths=`` limits the check,
        ``sigs_needed=`` with ``trusted=`` checks signatures too (:func:`.verify.verify_store`)."""
        from .verify import verify_store
        return verify_store(self, check_contents, **kw)

    def is_live(self, sp: StorePath, *, deleting: Iterable[StorePath] = ()) -> str | None:
        """Why ``sp`` must not be deleted, or None.  For now: valid referrers outside ``deleting``.

        (The garbage collector extends this with GC roots and temporary roots.)
        """
        others = sorted(self.query_referrers(sp) - set(deleting) - {sp})
        if not others:
            from .gc import live_reason  # GC roots, profiles, temporary roots (store/gc.py)
            return live_reason(self, sp)
        shown = ", ".join(repr(self.print_path(r)) for r in others[:3])
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        return f"it is referenced by {shown}{more}"

    def delete(self, paths: Iterable[StorePath]) -> list[StorePath]:
        """Delete valid paths that nothing else needs; returns them in deletion order.

        Raises :class:`PathNotValid` for a path that is not valid and :class:`PathInUse` when
        :meth:`is_live` says a path is still needed; nothing is deleted then.
        """
        targets = set(paths)
        for sp in sorted(targets):
            self._require_valid(sp)
        order = list(reversed(self.topo_sort(targets)))  # referrers first
        # gc.lock, exclusively, as a collection holds it (docs/gc.md, "Safety while builds
        # run"): from reading the roots until the files are gone, no process can add a
        # temporary root; one that adds it before relies on a path this then refuses to delete,
        # one that adds it after finds the path invalid.  Without it a build could root an
        # input and see it valid just after the roots were read, and lose it.
        with self.lock_paths(targets), gc_lock(self.state_dir):
            for sp in order:
                self._require_valid(sp)  # (a collection may have deleted it meanwhile)
                reason = self.is_live(sp, deleting=targets)
                if reason:
                    raise PathInUse(f"cannot delete {self.print_path(sp)!r}: {reason}", hint=_REFERRED_HINT
                                    if reason.startswith("it is referenced by") else _ROOTED_HINT)
            with self.db.transaction() as c:
                for sp in order:
                    row = c.execute("SELECT id FROM ValidPaths WHERE path = ?", (sp.base_name,)).fetchone()
                    if row is None:
                        continue
                    # a referrer registered since is_live looked (as the collector checks too)
                    ref = c.execute(
                        "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.referrer "
                        "WHERE r.reference = ? AND r.referrer != ?", (row[0], row[0])).fetchall()
                    others = sorted(r[0] for r in ref if StorePath.from_base_name(r[0]) not in targets)
                    if others:
                        raise PathInUse(f"cannot delete {self.print_path(sp)!r}: it is referenced by "
                                        f"{self.store_dir + '/' + others[0]!r}", hint=_REFERRED_HINT)
                    c.execute("DELETE FROM Refs WHERE referrer = ?", (row[0],))
                    c.execute("DELETE FROM DerivationOutputs WHERE drv = ?", (sp.base_name,))
                    c.execute("DELETE FROM ValidPaths WHERE id = ?", (row[0],))
            from .provenance import delete_provenance_of  # (statements about the old contents)
            delete_provenance_of(self, order)
            for sp in order:
                try:
                    remove_tree(self.real_path(sp))
                except OSError as e:
                    raise StoreError(f"cannot remove {self.real_path(sp)!r}: {e.strerror}") from e
        # files `pure store optimise` hard-linked free their space only when their .links entry
        # goes: as a collection does (and as Nix's --delete does), remove the entries no path
        # uses any more
        from .optimise import remove_unused_links
        remove_unused_links(self.real_store_dir)
        return order


def _make_dirs(settings: Settings, dirs: list[str]) -> None:
    try:
        for d in dirs:
            os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the store at {settings.real_store_dir!r} "
                         f"(state {settings.state_dir!r}): {e.strerror}") from e


_REFERRED_HINT = "delete the paths that refer to it in the same call (`pure store referrers` lists them)"
_ROOTED_HINT = "remove the root first (`pure gc --print-roots` lists the roots)"


def damaged_drv_hint(store, drv: StorePath) -> str | None:
    """The hint for a ``.drv`` that cannot be read or parsed although it is registered, if its
    file is damaged (it no longer has the NAR hash it was registered with): re-instantiating the
    expression writes it again (:meth:`LocalStore.repair_texts`).  None for a well-kept one that
    purestore cannot parse (a content-addressed derivation of Nix's, say), which was said to be
    damaged, with the advice to repair it."""
    from .fsnar import hash_path
    info = store.query_path_info(drv)
    if info is None:
        return None
    try:
        if hash_path(store.real_path(drv), info.nar_hash.algo)[0] == info.nar_hash:
            return None  # (as registered: not damaged)
    except (OSError, PurestoreError):
        pass
    return ("the store's copy of this derivation is damaged (`pure store verify --check-contents` "
            "checks the store); `pure instantiate --repair EXPR` writes it again from the "
            "expression that made it")
