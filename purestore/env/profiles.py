"""Profiles: numbered generations of a user environment, as symlinks (like Nix).

Layout, in ``<state_dir>/profiles/``::

    <name>            -> <name>-<N>-link          the current generation (relative link)
    <name>-<N>-link   -> <store dir>/<hash>-user-environment
    <name>.lock       held (flock) while the profile changes

A *user environment* is a store path holding a tree of symlinks into the installed packages
(directories shared by several packages are merged, a file provided by two packages is a
collision, as in Nix's ``buildEnv``) plus ``manifest.json``::

    {"version": 1, "elements": [{"name": "hello-2.12", "storePaths": ["/pure/store/…-hello-2.12"],
                                 "source": {"file": "/abs/expr.py", "attr": "hello"} | null}]}

It is added with the packages as its references (found by scanning, like a build output), so
each generation is a GC root for everything it holds (the garbage collector scans
``profiles/``).  Links name logical store paths, so a profile of a rooted store is usable inside
``pure shell``/``pure run``'s namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from typing import Iterable, Iterator

import attrs

from ..errors import ProfileError, StoreError
from ..formats.path_info import PathInfo
from ..formats.store_path import StorePath, make_source_path

MANIFEST = "manifest.json"
ENV_NAME = "user-environment"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
_TMP_RE = re.compile(r".+\.tmp-\d+\Z")  # (a profile's link while it is switched: see _switch_to)
_GEN_RE = re.compile(r"(.+)-(\d+)-link\Z")
_VERSION_RE = re.compile(r"(.+?)-(\d.*)\Z")


@attrs.frozen
class Element:
    """One installed thing: its name, its store paths (outputs) and where it came from."""

    name: str
    store_paths: tuple[str, ...]
    source: dict | None = None

    @property
    def pname(self) -> str:
        """The name without its version (``hello-2.12`` → ``hello``)."""
        m = _VERSION_RE.match(self.name)
        return m.group(1) if m else self.name

    def to_json(self) -> dict:
        return {"name": self.name, "storePaths": list(self.store_paths), "source": self.source}

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "Element":
        try:
            return cls(str(obj["name"]), tuple(str(p) for p in obj["storePaths"]), obj.get("source"))
        except (KeyError, TypeError) as e:
            raise ProfileError(f"{where}: malformed manifest element {obj!r}: missing or bad {e}") from None


@attrs.frozen
class Generation:
    number: int
    link: str
    path: str          # logical store path of the user environment
    created: float
    current: bool


# ---------------------------------------------------------------------------------------------


def profiles_dir(store) -> str:
    return os.path.join(store.state_dir, "profiles")


def check_profile_name(name: str) -> str:
    if not _NAME_RE.match(name) or _GEN_RE.match(name) or name.endswith(".lock") or _TMP_RE.match(name):
        raise ProfileError(f"bad profile name {name!r}: expected letters, digits and ._+- "
                           f"(not starting with - or ., not ending in -<N>-link, .lock or .tmp-<N>)")
    return name


class Profile:
    """A named profile of ``store``."""

    def __init__(self, store, name: str = "default"):
        self.store = store
        self.name = check_profile_name(name)
        self.dir = profiles_dir(store)
        self.link = os.path.join(self.dir, name)

    # -- reading ------------------------------------------------------------------------------

    def generations(self) -> list[Generation]:
        cur = self.current_number()
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for n in names:
            m = _GEN_RE.match(n)
            if not m or m.group(1) != self.name:
                continue
            link = os.path.join(self.dir, n)
            try:
                target = os.readlink(link)
                created = os.lstat(link).st_mtime
            except OSError:
                continue
            num = int(m.group(2))
            out.append(Generation(num, link, target, created, num == cur))
        return sorted(out, key=lambda g: g.number)

    def current_number(self) -> int | None:
        try:
            target = os.readlink(self.link)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ProfileError(f"profile {self.link!r} is not a symlink: {e.strerror}") from e
        m = _GEN_RE.match(os.path.basename(target))
        return int(m.group(2)) if m and m.group(1) == self.name else None

    def current_path(self) -> str | None:
        """Logical store path of the current user environment (None for an empty profile)."""
        n = self.current_number()
        if n is None:
            return None
        try:
            return os.readlink(self._gen_link(n))
        except FileNotFoundError:
            # (its link was deleted by hand): every command reading the profile stops here, so
            # say how to make an existing generation current again
            older = [g.number for g in self.generations() if g.number < n]
            have = ", ".join(str(g.number) for g in self.generations())
            raise ProfileError(
                f"profile {self.name!r} points to generation {n}, which does not exist"
                + (f" (generations: {have})" if have else " (it has no generations)"),
                hint=("`pure profile rollback` goes back to generation "
                      f"{older[-1]}, `pure profile switch-generation N` to generation N" if older else
                      "`pure profile switch-generation N` makes generation N the current one" if have else
                      f"remove the profile link {self.link!r}; `pure profile install` then starts "
                      "it afresh")) from None

    def elements(self, env_path: str | None = None) -> list[Element]:
        """The installed elements of the current generation (or of ``env_path``)."""
        env_path = env_path or self.current_path()
        if env_path is None:
            return []
        sp = self.store.parse_path(env_path)
        manifest = os.path.join(self.store.real_path(sp), MANIFEST)
        try:
            with open(manifest) as f:
                obj = json.load(f)
        except FileNotFoundError:
            raise ProfileError(f"{env_path!r} is not a user environment: it has no {MANIFEST}") from None
        except (OSError, ValueError) as e:
            raise ProfileError(f"cannot read the manifest {manifest!r}: {e}") from e
        if not isinstance(obj, dict) or obj.get("version") != 1 or not isinstance(obj.get("elements"), list):
            raise ProfileError(f"{manifest!r}: expected a version 1 manifest, got {str(obj)[:80]!r}")
        return [Element.from_json(e, manifest) for e in obj["elements"]]

    # -- changing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self.link + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _gen_link(self, n: int) -> str:
        return os.path.join(self.dir, f"{self.name}-{n}-link")

    def _switch_to(self, n: int) -> None:
        if os.path.lexists(self.link) and not os.path.islink(self.link):
            raise ProfileError(f"cannot switch profile {self.link!r} to generation {n}: something else "
                               "than a symlink is there (only a profile's link is replaced)")
        tmp = f"{self.link}.tmp-{os.getpid()}"
        try:
            self._remove_stale_temps()
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(f"{self.name}-{n}-link", tmp)
            os.replace(tmp, self.link)
        except OSError as e:
            raise ProfileError(f"cannot switch profile {self.link!r} to generation {n}: {e.strerror}") from e

    def _remove_stale_temps(self) -> None:
        """Remove this profile's ``<name>.tmp-<pid>`` links left by switches killed before their
        rename (their process is gone): otherwise they stay, listed as GC roots, for ever."""
        from ..store.gc import stale_profile_temp
        prefix = f"{self.name}.tmp-"
        for n in os.listdir(self.dir):
            if n.startswith(prefix) and n[len(prefix):].isdigit() and stale_profile_temp(n):
                try:
                    os.unlink(os.path.join(self.dir, n))
                except FileNotFoundError:
                    pass

    def set_elements(self, elements: list[Element]) -> Generation:
        """Make a new generation holding ``elements`` and switch to it (caller holds the lock);
        when the newest generation holds just these, switch to that one instead."""
        env = build_user_environment(self.store, elements)
        env_path = self.store.print_path(env)
        gens = self.generations()
        if gens and gens[-1].path == env_path:
            # the newest generation holds this already: no new one (as Nix: installing what is
            # installed does not pile up generations); switched to it, e.g. after a rollback
            if not gens[-1].current:
                self._switch_to(gens[-1].number)
            return attrs.evolve(gens[-1], current=True)
        n = (gens[-1].number if gens else 0) + 1
        link = self._gen_link(n)
        try:
            os.symlink(env_path, link)
        except OSError as e:
            raise ProfileError(f"cannot create generation link {link!r}: {e.strerror}") from e
        self._switch_to(n)
        return Generation(n, link, env_path, time.time(), True)

    def install(self, elements: Iterable[Element]) -> Generation:
        """Add ``elements``; an installed element with the same name without version is replaced.

        The same package given twice (the same store paths) is added once.
        """
        new, seen = [], set()
        for e in elements:
            if e.store_paths not in seen:
                seen.add(e.store_paths)
                new.append(e)
        for e in new:
            for p in e.store_paths:
                self.store.parse_path(p, valid=True)
        with self.locked():
            # a replaced element keeps its place (and its index in `list`), so that installing
            # what is installed already changes nothing
            by_pname: dict[str, list[Element]] = {}
            for e in new:
                by_pname.setdefault(e.pname, []).append(e)
            elements: list[Element] = []
            for e in self.elements():
                if e.pname not in by_pname:
                    elements.append(e)
                elif not any(e2 in elements for e2 in by_pname[e.pname]):
                    elements += by_pname[e.pname]
            elements += [e for e in new if e not in elements]
            return self.set_elements(elements)

    def remove(self, selectors: Iterable[str]) -> tuple[Generation, list[Element]]:
        """Remove the elements matching ``selectors`` (an index from ``list``, a name, a name
        without version, or a store path).  Raises :class:`ProfileError` if one matches nothing."""
        selectors = list(selectors)
        with self.locked():
            cur = self.elements()
            drop = set()
            for s in selectors:
                hits = {i for i, e in enumerate(cur)
                        if s == str(i) or s in (e.name, e.pname) or s in e.store_paths
                        or _same_path(self.store, s, e.store_paths)}
                if not hits:
                    names = ", ".join(repr(e.name) for e in cur) or "nothing"
                    raise ProfileError(f"profile {self.name!r} has no element {s!r}; installed: {names}")
                drop |= hits
            removed = [e for i, e in enumerate(cur) if i in drop]
            return self.set_elements([e for i, e in enumerate(cur) if i not in drop]), removed

    def switch_generation(self, n: int) -> Generation:
        with self.locked():
            for g in self.generations():
                if g.number == n:
                    self._switch_to(n)
                    return attrs.evolve(g, current=True)
            have = ", ".join(str(g.number) for g in self.generations()) or "none"
            raise ProfileError(f"profile {self.name!r} has no generation {n} (generations: {have})")

    def rollback(self) -> Generation:
        """Switch to the newest generation older than the current one.

        Raises :class:`ProfileError` when there is none: the profile has no generations, none is
        current, or the current one is the oldest.
        """
        with self.locked():
            cur = self.current_number()
            gens = self.generations()
            have = ", ".join(str(g.number) for g in gens)
            if not gens:
                raise ProfileError(f"cannot roll back profile {self.name!r}: it has no generations yet",
                                   hint="`pure profile install` makes its first generation")
            if cur is None:
                raise ProfileError(f"cannot roll back profile {self.name!r}: no generation is current "
                                   f"(generations: {have})",
                                   hint="`pure profile switch-generation N` makes generation N the current one")
            older = [g for g in gens if g.number < cur]
            if not older:
                only = len(gens) == 1
                raise ProfileError(
                    f"cannot roll back profile {self.name!r}: it has no generation older than {cur} "
                    + ("(its only one)" if only else f"(generations: {have})"),
                    hint=None if only else f"`pure profile switch-generation {gens[-1].number}` goes to the newest")
            self._switch_to(older[-1].number)
            return attrs.evolve(older[-1], current=True)

    def delete_generations(self, numbers: Iterable[int] | None = None) -> list[int]:
        """Delete generation links (all but the current one when ``numbers`` is None).

        The current generation cannot be deleted, nor all but the current one when none is (the
        profile link removed, or its generation's link).  Their paths become garbage for
        ``pure gc``.
        """
        with self.locked():
            cur = self.current_number()
            gens = {g.number: g for g in self.generations()}
            if numbers is None and gens and cur not in gens:
                # (all but the current one would be all of them: the one to recover with too)
                have = ", ".join(map(str, sorted(gens)))
                now = "no generation is current" if cur is None else f"its current generation {cur} does not exist"
                raise ProfileError(
                    f"cannot delete the old generations of profile {self.name!r}: {now} (generations: {have}), "
                    "so every generation would go",
                    hint="`pure profile switch-generation N` makes generation N the current one; "
                         "or name the generations to delete")
            # (a number given twice is one generation to delete: its link went at the first)
            wanted = [n for n in gens if n != cur] if numbers is None else sorted(set(numbers))
            for n in wanted:
                if n == cur:
                    raise ProfileError(f"cannot delete generation {n} of profile {self.name!r}: it is the current one")
                if n not in gens:
                    raise ProfileError(f"profile {self.name!r} has no generation {n}")
            for n in wanted:
                os.unlink(gens[n].link)
            return sorted(wanted)


def _same_path(store, text: str, paths: tuple[str, ...]) -> bool:
    if "/" not in text:
        return False
    try:
        return store.print_path(store.parse_path(text)) in paths
    except (ValueError, OSError):
        return False


def list_profiles(store) -> list[str]:
    d = profiles_dir(store)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if os.path.islink(os.path.join(d, n)) and not _GEN_RE.match(n)
                  and not _TMP_RE.match(n))


# -- user environments -------------------------------------------------------------------------


def element_for(store, paths: list[StorePath], source: dict | None = None) -> Element:
    """An element for the outputs ``paths`` of one package, named after the first."""
    return Element(paths[0].name, tuple(store.print_path(p) for p in paths), source)


def build_user_environment(store, elements: list[Element]) -> StorePath:
    """Add a user environment for ``elements`` to ``store`` (temp-rooted) and return its path.

    Raises :class:`ProfileError` when two elements provide the same file.
    """
    tmp = store.temp_name()
    try:
        os.mkdir(tmp)
        pkgs = []
        for e in elements:
            for p in e.store_paths:
                sp = store.parse_path(p, valid=True)
                pkgs.append((store.real_path(sp), store.print_path(sp), e.name))
        _merge_top(store, tmp, pkgs)
        manifest = {"version": 1, "elements": [e.to_json() for e in elements]}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.write("\n")
        from ..store import fsnar, fstree

        fstree.canonicalise_path(tmp)
        candidates = {store.parse_path(p).hash_part: store.parse_path(p)
                      for e in elements for p in e.store_paths}
        nar_hash, nar_size, found = fsnar.nar_hash_and_scan(tmp, candidates)
        refs = frozenset(candidates[h] for h in found)
        sp = make_source_path(ENV_NAME, nar_hash, refs, store.store_dir)
        store.add_temp_root(sp)
        with store.lock_path(sp):
            if not store.is_valid(sp):
                store.install_path(tmp, sp)
                store.register([PathInfo(sp, nar_hash, nar_size, references=refs,
                                         ca=f"fixed:r:sha256:{nar_hash.nix32}",
                                         registration_time=int(time.time()))])
        return sp
    except OSError as e:
        if isinstance(e, StoreError):
            raise
        raise ProfileError(f"cannot build the user environment in {tmp!r}: {e.strerror} ({e.filename})") from e
    finally:
        if os.path.lexists(tmp):
            store.remove_temp(tmp)


def host_path(store, path: str) -> str | None:
    """Where ``path`` physically is: symlinks are followed, and those naming the logical store
    dir are mapped to the real one (for a rooted store).  None when it does not exist."""
    p = path
    if store.store_dir != store.real_store_dir and p.startswith(store.store_dir + "/"):
        p = store.real_store_dir + p[len(store.store_dir):]
    parts = p.split("/")
    resolved = ""
    budget = 40
    i = 1
    while i < len(parts):
        cand = resolved + "/" + parts[i]
        if os.path.islink(cand):
            budget -= 1
            if budget < 0:
                return None
            t = os.readlink(cand)
            if not t.startswith("/"):
                t = os.path.normpath(os.path.join(resolved or "/", t))
            if store.store_dir != store.real_store_dir and (t + "/").startswith(store.store_dir + "/"):
                t = store.real_store_dir + t[len(store.store_dir):]
            parts = t.split("/") + parts[i + 1:]
            resolved, i = "", 1
            continue
        if not os.path.lexists(cand):
            return None
        resolved = cand
        i += 1
    return resolved or "/"


def _host_kind(store, real: str) -> str:
    """'dir', 'file' or 'missing' for ``real``, following symlinks that name the logical store."""
    p = host_path(store, real)
    if p is None:
        return "missing"
    return "dir" if os.path.isdir(p) else "file"


def _merge_top(store, dst: str, pkgs: list[tuple[str, str, str]]) -> None:
    entries: dict[str, list[tuple[str, str, str]]] = {}
    for real, logical, label in pkgs:
        if _host_kind(store, real) != "dir":
            raise ProfileError(f"cannot install {logical!r} ({label}): it is a file, not a directory")
        # (a package that is a symlink to another store path's directory names the logical
        # store dir: in a rooted store only host_path finds it, as in _merge_entry)
        for n in sorted(os.listdir(host_path(store, real))):
            if n == MANIFEST:
                continue
            entries.setdefault(n, []).append((f"{real}/{n}", f"{logical}/{n}", label))
    for n, cands in sorted(entries.items()):
        _merge_entry(store, os.path.join(dst, n), cands, n)


def _merge_entry(store, dst: str, cands: list[tuple[str, str, str]], rel: str) -> None:
    if len(cands) == 1:
        os.symlink(cands[0][1], dst)
        return
    kinds = [_host_kind(store, c[0]) for c in cands]
    if all(k == "dir" for k in kinds):
        os.mkdir(dst)
        entries: dict[str, list[tuple[str, str, str]]] = {}
        for real, logical, label in cands:
            # (a symlink to another store path names the logical store dir: in a rooted store
            # only host_path finds it; listing ``real`` itself failed with ENOENT there)
            for n in sorted(os.listdir(host_path(store, real))):
                entries.setdefault(n, []).append((f"{real}/{n}", f"{logical}/{n}", label))
        for n, sub in sorted(entries.items()):
            _merge_entry(store, os.path.join(dst, n), sub, f"{rel}/{n}")
        return

    def target(real: str) -> str:
        return host_path(store, real) or os.path.realpath(real)
    targets = {target(c[0]) for c in cands}
    if len(targets) == 1:  # the same file reached through different links
        os.symlink(cands[0][1], dst)
        return
    a, b = cands[0], next(c for c in cands[1:] if target(c[0]) != target(cands[0][0]))
    raise ProfileError(f"collision: {rel!r} is provided by both {a[1]!r} ({a[2]}) and {b[1]!r} ({b[2]})",
                       hint="remove one of them from the profile first")
