"""Deduplicating the store: files with the same contents become hard links to one inode.

``pure store optimise`` (Nix's ``nix-store --optimise``) walks valid paths; every regular file is
named by the NAR hash of that file alone (contents and executable bit, as Nix names them) and
hard-linked as ``<store dir>/.links/<nix32 hash>``.  A file whose contents are there already is
replaced, atomically, by a hard link to that inode (a new link made in the store dir, renamed
over the file).  Store paths are immutable and every file's metadata is canonical (mode 0444 or
0555, mtime 1), so the paths' NAR hashes do not change; the directory a file is in keeps its
mtime too.  The collector removes ``.links`` entries no path uses any more (link count 1).

Safer than Nix's: an existing ``.links`` entry is rehashed (once a run) before anything is
linked to it, so a corrupted entry (a disk error, a hand edit) is replaced instead of spreading
into every path with that file.  Builds and collections are not locked out: a path the collector
removes meanwhile is skipped, an entry it removes meanwhile is made again.  Runs of optimise take
turns (an flock on ``.links``): two at once would each make a directory writable, rename into it
and restore its mode and mtime, and undo each other's (a directory left writable or with a new
mtime, a rename refused).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from typing import Callable, Iterable

import attrs

from .._pids import writer_gone
from ..errors import StoreError
from ..formats.store_path import StorePath
from .fsnar import hash_path

LINKS = ".links"
_TMP_PREFIX = ".tmp-link-"


@attrs.frozen
class OptimiseResult:
    paths: int            # store paths walked
    files: int            # regular files seen
    linked: int           # files replaced by a link to an equal one
    bytes_saved: int      # their sizes
    entries_added: int    # new .links entries
    entries_repaired: int  # .links entries whose contents did not match their name, replaced
    skipped: int          # files left as they were (too many links, gone meanwhile)

    def to_json(self) -> dict:
        return {"paths": self.paths, "files": self.files, "linked": self.linked,
                "bytesSaved": self.bytes_saved, "entriesAdded": self.entries_added,
                "entriesRepaired": self.entries_repaired, "skipped": self.skipped}


def links_dir(real_store_dir: str) -> str:
    return os.path.join(real_store_dir, LINKS)


def _fail(what: str, path: str, e: OSError) -> StoreError:
    hint = None
    if e.errno == errno.EROFS:
        hint = "the store is on a read-only file system: optimise where it is mounted writable"
    return StoreError(f"cannot {what} {path!r}: {e.strerror}", hint=hint)


def _remove_stale_temps(rsd: str, *, own_too: bool) -> None:
    """Temporary links of optimise runs that died (their pid is not running, or, ``own_too``,
    is this process's: a run holds the lock on ``.links`` and has made none yet, so one named by
    this pid is a leftover of a killed run whose pid came round again, on which the first link
    of this run would fail with EEXIST)."""
    mine = f"{_TMP_PREFIX}{os.getpid()}-" if own_too else None
    try:
        names = [n for n in os.listdir(rsd) if n.startswith(_TMP_PREFIX)]
    except OSError:
        return
    for n in names:
        if (mine and n.startswith(mine)) or writer_gone(n, _TMP_PREFIX):
            try:
                os.unlink(os.path.join(rsd, n))
            except OSError:
                pass


class _Optimiser:
    def __init__(self, rsd: str):
        self.rsd = rsd
        self.links = links_dir(rsd)
        self.checked: set[str] = set()  # .links entries rehashed in this run
        self.linked_inodes: set[int] = set()
        self.n_tmp = 0
        self.files = self.linked = self.saved = self.added = self.repaired = self.skipped = 0

    def start(self) -> None:
        try:
            os.makedirs(self.links, exist_ok=True)
        except OSError as e:
            raise _fail("create", self.links, e) from e
        _remove_stale_temps(self.rsd, own_too=True)
        with os.scandir(self.links) as it:
            for e in it:
                try:
                    self.linked_inodes.add(e.inode())
                except OSError:
                    pass

    def _tmp(self) -> str:
        self.n_tmp += 1
        return os.path.join(self.rsd, f"{_TMP_PREFIX}{os.getpid()}-{self.n_tmp}")

    def walk(self, top: str) -> None:
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            return  # removed by a collection meanwhile
        if stat.S_ISREG(st.st_mode):
            try:
                self.file(top, st)
            except FileNotFoundError:
                self.skipped += 1
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        stack = [top]
        while stack:
            d = stack.pop()
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _fail("read", d, e) from e
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    try:
                        self.file(e.path, e.stat(follow_symlinks=False))
                    except FileNotFoundError:
                        self.skipped += 1

    def file(self, path: str, st: os.stat_result) -> None:
        self.files += 1
        if st.st_ino in self.linked_inodes:
            return  # linked already
        if st.st_size == 0:
            return  # nothing to save (Nix links empty files too; they cost no blocks)
        h = _hash_unless_gone(path)
        if h is None:  # its path was collected meanwhile (after the walk saw the file)
            self.skipped += 1
            return
        name = h.nix32
        link = os.path.join(self.links, name)
        for _attempt in range(3):
            try:
                lst = os.lstat(link)
            except FileNotFoundError:
                try:
                    os.link(path, link)
                except FileExistsError:
                    continue  # made meanwhile (another run): look again
                except FileNotFoundError:  # the file: its path was collected meanwhile
                    self.skipped += 1
                    return
                except OSError as e:
                    if e.errno == errno.EMLINK:
                        self.skipped += 1
                        return
                    raise _fail("link", path, e) from e
                self.added += 1
                self.checked.add(name)
                self.linked_inodes.add(st.st_ino)
                return
            if lst.st_ino == st.st_ino:
                self.linked_inodes.add(st.st_ino)
                return
            if name not in self.checked:
                got = _hash_unless_gone(link) if stat.S_ISREG(lst.st_mode) else False
                if got is None:  # the collector removed the entry meanwhile
                    continue
                good = got == h
                if not good:  # a damaged entry: this file (just hashed) takes its place
                    tmp = self._tmp()
                    try:
                        os.link(path, tmp)
                    except FileNotFoundError:  # collected meanwhile
                        self.skipped += 1
                        return
                    except OSError as e:
                        raise _fail("replace the damaged link", link, e) from e
                    try:
                        os.rename(tmp, link)
                    except OSError as e:
                        _unlink_quietly(tmp)
                        raise _fail("replace the damaged link", link, e) from e
                    self.repaired += 1
                    self.checked.add(name)
                    self.linked_inodes.add(st.st_ino)
                    return
                self.checked.add(name)
            done = self._replace(path, link, st)
            if done is None:  # the collector removed the entry meanwhile: made again from this file
                self.checked.discard(name)
                continue
            if done:
                self.linked += 1
                self.saved += st.st_size
                self.linked_inodes.add(lst.st_ino)
            return
        self.skipped += 1

    def _replace(self, path: str, link: str, st: os.stat_result) -> bool | None:
        """``path`` becomes a hard link to ``link``; False when it could not (gone, too many
        links), None when ``link`` is gone (the collector removed it: no path used it)."""
        tmp = self._tmp()
        try:
            os.link(link, tmp)
        except FileNotFoundError:  # the collector removed the entry meanwhile
            return None
        except OSError as e:
            if e.errno == errno.EMLINK:  # the file system's limit of links to one inode
                self.skipped += 1
                return False
            raise _fail("link", link, e) from e
        parent = os.path.dirname(path)
        try:
            pst = os.stat(parent)
            writable = parent == self.rsd or os.access(parent, os.W_OK)
            if not writable:
                os.chmod(parent, stat.S_IMODE(pst.st_mode) | stat.S_IWUSR)
            try:
                os.rename(tmp, path)
            finally:
                if not writable:
                    os.chmod(parent, stat.S_IMODE(pst.st_mode))
                if parent != self.rsd:  # the directory keeps its canonical mtime
                    os.utime(parent, ns=(pst.st_atime_ns, pst.st_mtime_ns), follow_symlinks=False)
        except FileNotFoundError:
            _unlink_quietly(tmp)
            self.skipped += 1
            return False
        except OSError as e:
            _unlink_quietly(tmp)
            raise _fail("replace", path, e) from e
        return True


def _hash_unless_gone(path: str):
    """The NAR hash of the file ``path``; None when it is gone (hash_path says so as a
    StoreError "cannot read ...: No such file or directory", whose cause is the OSError)."""
    try:
        return hash_path(path)[0]
    except FileNotFoundError:
        return None
    except StoreError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return None
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextlib.contextmanager
def _one_run_at_a_time(links: str, on_wait: Callable[[], None] | None):
    """Hold an exclusive flock on the ``.links`` directory (made if missing); wait for it."""
    try:
        os.makedirs(links, exist_ok=True)
        fd = os.open(links, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise _fail("create", links, e) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def optimise_store(store, paths: Iterable[StorePath] | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   on_wait: Callable[[], None] | None = None) -> OptimiseResult:
    """Hard-link equal files of ``paths`` (default: every valid path) through ``.links``.

    ``progress(done, total)`` is called after each path; ``on_wait()`` once if another run holds
    the store's optimise lock (this one then waits for it).  Raises :class:`StoreError` when the
    file system refuses (a read-only store, no space for a link)."""
    o = _Optimiser(store.real_store_dir)
    with _one_run_at_a_time(o.links, on_wait):
        todo = sorted(store.valid_paths() if paths is None else paths, key=lambda p: p.base_name)
        o.start()
        for i, p in enumerate(todo, 1):
            if store.is_valid(p):  # (not deleted by a collection since)
                o.walk(store.real_path(p))
            if progress is not None:
                progress(i, len(todo))
    return OptimiseResult(paths=len(todo), files=o.files, linked=o.linked, bytes_saved=o.saved,
                          entries_added=o.added, entries_repaired=o.repaired, skipped=o.skipped)


def remove_unused_links(real_store_dir: str) -> tuple[int, int]:
    """Remove the ``.links`` entries no store path uses (link count 1): (entries, bytes).

    The temporary links of optimise runs that were killed go first: each is a second name of a
    ``.links`` entry (made to be renamed over a file), so its entry never came down to one link
    and was never removed, and the leftover itself stayed in the store dir until the next
    ``pure store optimise``."""
    _remove_stale_temps(real_store_dir, own_too=False)
    d = links_dir(real_store_dir)
    n = freed = 0
    try:
        it = os.scandir(d)
    except (FileNotFoundError, NotADirectoryError):
        return 0, 0  # (no links; a file in its place is for `pure store optimise` to report)
    except OSError as e:
        raise StoreError(f"cannot read the links of 'pure store optimise' in {d!r}: {e.strerror}") from e
    with it:
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
                if st.st_nlink == 1:
                    os.unlink(e.path)
                    n += 1
                    freed += st.st_size
            except FileNotFoundError:
                pass
            except OSError as ex:
                raise StoreError(f"cannot remove the unused link {e.path!r}: {ex.strerror}") from ex
    return n, freed
