"""Pruning a local binary cache directory (``pure cache prune``): remove the paths nobody has
pushed or fetched for a while, without ever breaking a closure.

Which paths stay: those whose narinfo was written or used within the given age (used: found
already there by ``pure copy --to``, fetched from this directory by a substitution, or served
by ``pure cache serve``; see :func:`mark_used`), the paths named with ``--keep``, and
everything those refer to, transitively, so every kept narinfo's references stay in the
cache.  Everything else goes: its narinfo, its ``.ls`` listing and ``.provenance``, the NAR
file no kept narinfo uses (once it is older than the age: a push that finds a NAR present
marks it used), the ``debuginfo/`` links to such NARs, and the build logs of its derivers
(``log/<drv>``) when no kept path has the same deriver.  NAR files and logs no narinfo uses at all
(left by interrupted pushes) go when they are older than the age too.  A narinfo that cannot
be parsed is kept and reported, with the NAR its ``URL:`` line names (and when one cannot be
read at all, no NAR file is removed): nothing is removed on a guess.

Order: narinfos first, each before those of its references, then the files only they pointed
to, so a reader at any moment finds either a narinfo with its NAR and its references' narinfos,
or no narinfo; a prune stopped half way leaves a consistent cache (and unused files the next
prune removes).

Pushes: ``pure copy --to file://DIR`` holds a shared lock (``flock``) on the directory itself
while it runs (no lock file is added to the cache), and a prune takes it exclusively, so a prune never removes a NAR that a running push found
present and skipped; ``pure cache serve`` renames each upload into place under the same shared
lock.  Nix does not take the lock: prune when it is not pushing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import threading
import time
from typing import Callable, Iterable

import attrs

from ..errors import CacheError, FormatError
from ..formats.narinfo import NarInfo
from ..formats.provenance import provenance_file_name
from ..formats.store_path import StorePath
from ._graph import references_first
from ._temps import TEMP, left_by_killed_run
from .info import CacheInfo

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


MARK_AFTER = 3600  # a narinfo's time is updated at most this often (seconds) when it is used


def mark_used(path: str, fd: int | None = None) -> None:
    """Note that the narinfo at ``path`` was used (pushed again, fetched, served): its time,
    which a prune goes by, is set to now, unless it is less than :data:`MARK_AFTER` old.  Quietly
    does nothing where it cannot (a read-only cache)."""
    try:
        st = os.fstat(fd) if fd is not None else os.stat(path)
        if time.time() - st.st_mtime > MARK_AFTER:
            os.utime(fd if fd is not None and os.utime in os.supports_fd else path)
    except OSError:
        pass


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` → seconds."""
    m = _AGE.match(text)
    if not m:
        raise CacheError(f"cannot read the age {text!r}: expected a number with a unit, e.g. 30d, 12h, 90m")
    return float(m.group(1)) * _UNITS[m.group(2)]


def open_dir_lock(directory: str) -> int:
    """A descriptor of the directory to ``flock``."""
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise CacheError(f"cannot lock the cache directory {directory!r}: {e.strerror}") from e


@contextlib.contextmanager
def cache_lock(directory: str, *, exclusive: bool, on_wait: Callable[[], None] | None = None):
    """The cache directory's lock (shared for a push, exclusive for a prune): an ``flock`` on the
    directory itself."""
    fd = open_dir_lock(directory)
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_narinfo_lock(directory: str) -> int | None:
    """The descriptor whose exclusive ``flock`` each writer of a narinfo into the directory (a
    push, a signing, an upload through ``cache serve``) holds while it reads the narinfo it
    replaces and renames the new one into place, so that two of them writing one path at once
    keep both's signatures (:func:`..formats.narinfo.merge_sigs`): the directory's
    ``nix-cache-info`` (the directory's own flock is the prune's lock, shared by the writers).
    None where there is none to lock (then nothing is held)."""
    try:
        return os.open(os.path.join(directory, "nix-cache-info"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None


def try_lock(fd: int) -> bool:
    """Take the exclusive ``flock`` on ``fd`` if it is free; True when taken or when the file
    system cannot lock it this way (NFS refuses an exclusive lock on a file opened for reading:
    then it is written unlocked, as before there was a lock)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


_in_process: dict[str, threading.Lock] = {}
_in_process_guard = threading.Lock()


@contextlib.contextmanager
def narinfo_lock(directory: str):
    """:func:`open_narinfo_lock`'s lock, waited for (a thread of ``cache serve``).  The threads
    of this process first wait for each other on a lock of the directory's own, so that only
    another process's writer is polled for (two descriptors' ``flock`` exclude each other in
    one process too)."""
    with _in_process_guard:
        mine = _in_process.setdefault(os.path.realpath(directory), threading.Lock())
    with mine:
        fd = open_narinfo_lock(directory)
        if fd is None:
            yield
            return
        try:
            while not try_lock(fd):
                time.sleep(0.02)
            yield
        finally:
            os.close(fd)


@attrs.define
class PrunePlan:
    """What a prune removes (names relative to the cache directory) and keeps."""

    store_dir: str
    kept: list[StorePath] = attrs.field(factory=list)
    removed: list[StorePath] = attrs.field(factory=list)
    files: list[str] = attrs.field(factory=list)  # in removal order
    freed: int = 0  # bytes of the files
    # (kept path, its reference that the cache lacks)
    missing: list[tuple[StorePath, StorePath]] = attrs.field(factory=list)
    unreadable: list[str] = attrs.field(factory=list)  # narinfos kept because they do not parse
    uploads: list[tuple[str, str]] = attrs.field(factory=list)  # (name, id): S3 uploads to abort
    # hash part of a removed path → those of its references removed too (to spare them, with the
    # path, when its narinfo cannot be removed)
    gone_refs: dict[str, list[str]] = attrs.field(factory=dict)

    def to_json(self, directory: str, dry_run: bool) -> dict:
        sd = self.store_dir
        return {"cache": directory, "dryRun": dry_run, "kept": len(self.kept),
                "keptPaths": [p.absolute(sd) for p in self.kept],
                "removed": [p.absolute(sd) for p in self.removed], "files": self.files,
                "freedBytes": self.freed,
                "missingReferences": [{"path": p.absolute(sd), "reference": r.absolute(sd)}
                                      for p, r in self.missing],
                "unreadable": self.unreadable,
                "abortedUploads": [name for name, _id in self.uploads]}


TEMPS_GO_AFTER = 3600  # seconds: a prune removes ``.tmp-`` files older than this


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def plan_prune(directory: str, *, older_than: float | None, keep: Iterable[str] = (),
               now: float | None = None) -> PrunePlan:
    """Decide what to remove from the cache directory (nothing is touched).  ``older_than``:
    seconds (None: only ``keep`` and their closures stay); ``keep``: store paths (absolute, or
    base names).  One of the two must be given."""
    keep = list(keep)  # read twice: checked before any file is read, then planned with
    check_what_to_keep(older_than, keep)
    info_file = os.path.join(directory, "nix-cache-info")
    try:
        with open(info_file, "rb") as f:
            info_data = f.read()
    except FileNotFoundError:
        raise CacheError(f"{directory!r} is not a binary cache (it has no nix-cache-info)") from None
    except OSError as e:
        raise CacheError(f"cannot read {info_file!r}: {e.strerror}") from e
    listing: dict[str, tuple[int, float]] = {}  # name in the cache → (size, mtime)
    for sub in ("", "nar", "debuginfo", "log"):
        for n in _listdir(os.path.join(directory, sub)):
            name = f"{sub}/{n}" if sub else n
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            listing[name] = (st.st_size, st.st_mtime)
    narinfos: dict[str, bytes | str] = {}
    debuginfo: dict[str, bytes] = {}
    for name in listing:
        if (name.endswith(".narinfo") and "/" not in name) or name.startswith("debuginfo/"):
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    data = f.read()
            except OSError as e:
                data = e.strerror or str(e)
            if name.startswith("debuginfo/"):
                if isinstance(data, bytes):
                    debuginfo[name] = data
            else:
                narinfos[name] = data
    return plan_from_listing(directory, CacheInfo.parse(info_data, info_file),
                             listing, narinfos, debuginfo, older_than=older_than, keep=keep, now=now)


def check_what_to_keep(older_than: float | None, keep: Iterable[str]) -> None:
    if older_than is None and not list(keep):
        raise CacheError("say what to keep: an age (--older-than) or paths (--keep), or both")


def plan_from_listing(where: str, info: CacheInfo, listing: dict[str, tuple[int, float]],
                      narinfos: dict[str, bytes | str], debuginfo: dict[str, bytes], *,
                      older_than: float | None, keep: Iterable[str] = (), now: float | None = None) -> PrunePlan:
    """The prune of a cache given as data, whatever holds it (a directory, a bucket).

    ``listing``: every file of the cache (name → (size, time of last write or use));
    ``narinfos``: the top-level narinfos' contents, or why one could not be read;
    ``debuginfo``: the contents of the ``debuginfo/`` links."""
    keep = list(keep)
    check_what_to_keep(older_than, keep)
    sd = info.store_dir
    now = time.time() if now is None else now
    cutoff = None if older_than is None else now - older_than
    plan = PrunePlan(sd)

    infos: dict[str, NarInfo] = {}  # hash part → narinfo
    recent: set[str] = set()
    other_urls: set[str] = set()  # NAR files that narinfos we cannot parse seem to use
    blind = False  # a narinfo could not be read at all: its NAR is unknown, so no NAR goes
    for name in sorted(narinfos):
        data = narinfos[name]
        if isinstance(data, str):
            plan.unreadable.append(f"{name}: {data} (no NAR file is removed this time)")
            blind = True
            continue
        try:
            ni = NarInfo.parse(data, sd, where=f"{where.rstrip('/')}/{name}")
        except (FormatError, UnicodeDecodeError) as e:
            plan.unreadable.append(f"{name}: {e}")
            urls = [ln[5:].strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.startswith("URL: ")]
            other_urls.update(urls)
            continue
        h = name[: -len(".narinfo")]
        if ni.store_path.hash_part != h:
            plan.unreadable.append(f"{name}: describes {ni.store_path.absolute(sd)!r}")
            continue
        infos[h] = ni
        if cutoff is not None and listing.get(name, (0, 0.0))[1] >= cutoff:
            recent.add(h)

    roots = set(recent)
    for k in keep:
        base = os.path.basename(k.rstrip("/"))
        try:
            sp = StorePath.from_base_name(base)
        except FormatError as e:
            raise CacheError(f"--keep {k!r} is not a store path: {e}") from None
        if k.startswith("/") and os.path.dirname(k.rstrip("/")) != sd:
            raise CacheError(f"--keep {k!r} is not in the cache's store dir {sd!r}")
        if sp.hash_part not in infos:
            raise CacheError(f"--keep {k!r}: the cache has no such path")
        roots.add(sp.hash_part)

    kept: set[str] = set()
    todo = list(roots)
    while todo:
        h = todo.pop()
        if h in kept:
            continue
        kept.add(h)
        for r in infos[h].references:
            if r.hash_part in infos:
                todo.append(r.hash_part)
            else:
                plan.missing.append((infos[h].store_path, r))

    gone = sorted(set(infos) - kept)
    plan.kept = sorted((infos[h].store_path for h in kept), key=lambda p: p.base_name)
    plan.removed = sorted((infos[h].store_path for h in gone), key=lambda p: p.base_name)

    def add(name: str) -> None:
        if name in listing:
            plan.files.append(name)
            plan.freed += listing[name][0]

    gone_set = set(gone)
    plan.gone_refs = {h: sorted({r.hash_part for r in infos[h].references} & gone_set - {h}) for h in gone}
    # narinfos first (from here on nobody is sent to the files below), each before those of its
    # references: a narinfo never refers to one already gone
    for h in reversed(references_first(gone, plan.gone_refs.__getitem__)):
        add(f"{h}.narinfo")
    for h in gone:
        add(f"{h}.ls")
        add(provenance_file_name(h))
    used = {infos[h].url for h in kept} | other_urls
    freed_nars = {infos[h].url for h in gone} - used
    removed_nars: set[str] = set()
    for name in sorted(listing):
        if not name.startswith("nar/") or name[4:].startswith(".") or name in used or blind:
            continue
        # with an age, a NAR file goes only when it is old too: a push that just found it
        # present (and so did not upload it) has marked it used; without one, only the NARs
        # of removed paths go (an unused NAR may be a running push's, before its narinfo)
        if (name in freed_nars if cutoff is None else listing[name][1] < cutoff):
            add(name)
            removed_nars.add(name)
    for name in sorted(debuginfo):
        try:
            archive = json.loads(debuginfo[name]).get("archive", "")
        except (ValueError, AttributeError):
            continue
        target = os.path.normpath(os.path.join("debuginfo", str(archive)))
        if target in removed_nars:
            add(name)
    kept_drvs = {infos[h].deriver.base_name for h in kept if infos[h].deriver is not None}
    gone_logs = {f"log/{infos[h].deriver.base_name}" for h in gone if infos[h].deriver is not None} \
        - {f"log/{d}" for d in kept_drvs}
    for name in sorted(listing):
        if not name.startswith("log/") or name[4:].startswith(".") or name[4:] in kept_drvs:
            continue
        # the logs of removed paths; with an age, also an old log no narinfo names (its path
        # never got one: a push that failed), as for NAR files
        if name in gone_logs or (cutoff is not None and not blind and listing[name][1] < cutoff):
            add(name)
    # what killed pushes, copies and uploads left (``.tmp-…``: only ours): at once when they
    # name a process of this machine that is gone; else an hour's margin (an upload writes its
    # file before it takes the directory's lock, and a machine sharing the directory cannot be
    # asked whether the process that names another one still runs)
    for name in sorted(listing):
        base = name.rpartition("/")[2]
        if base.startswith(TEMP) and (listing[name][1] < now - TEMPS_GO_AFTER or left_by_killed_run(base)):
            add(name)
    return plan


def spare(plan: PrunePlan, spared: set[str], h: str) -> None:
    """The narinfo of hash part ``h`` stays (it could not be removed), and so do those of its
    references the plan removes: added to ``spared``, and their paths moved from
    ``plan.removed`` to ``plan.kept``."""
    todo, new = [h], set()
    while todo:
        x = todo.pop()
        if x not in spared:
            spared.add(x)
            new.add(x)
            todo.extend(plan.gone_refs.get(x, ()))
    stays = [p for p in plan.removed if p.hash_part in new]
    if stays:
        plan.removed = [p for p in plan.removed if p.hash_part not in new]
        plan.kept = sorted([*plan.kept, *stays], key=lambda p: p.base_name)


def apply_prune(directory: str, plan: PrunePlan, on_error: Callable[[str], None]) -> int:
    """Remove the plan's files in its order; returns how many were removed (a file already gone
    counts as removed; another failure is reported and the rest goes on, except that when a
    narinfo could not be removed no other file is: it may be one that narinfo needs, and neither
    is the narinfo of a path it refers to).  A path whose narinfo stays is moved from
    ``plan.removed`` to ``plan.kept``.  A directory that
    cannot be written to at all (read-only) is an error before anything."""
    if plan.files:
        try:
            fd, probe = tempfile.mkstemp(prefix=".tmp-prune-", dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise CacheError(f"cannot prune {directory!r}: {e.strerror}") from e
    n = 0
    kept_narinfo = False
    spared: set[str] = set()  # hash parts of narinfos that stay, with their closures
    for name in plan.files:
        if kept_narinfo and not name.endswith(".narinfo"):
            continue
        if name.endswith(".narinfo") and name[: -len(".narinfo")] in spared:
            continue
        try:
            os.unlink(os.path.join(directory, name))
            n += 1
        except FileNotFoundError:
            n += 1
        except OSError as e:
            on_error(f"cannot remove {name!r} from {directory!r}: {e.strerror}")
            if name.endswith(".narinfo"):
                kept_narinfo = True
                # it stays, and so do its references (not removed yet: referrers go first)
                spare(plan, spared, name[: -len(".narinfo")])
    if kept_narinfo:
        on_error("the other files of the removed paths were kept (a narinfo left in place may need them)")
    return n
