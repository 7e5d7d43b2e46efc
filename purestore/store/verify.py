"""``pure store verify``: every valid path exists, optionally with the NAR hash and size the
database recorded, no reference dangles, and (with ``sigs_needed``) each path is trusted:
signed by enough trusted keys, or content-addressed.

Trust is judged as Nix's ``nix store verify --sigs-needed N`` judges it: a signature counts when
it is by a trusted key and verifies against the fingerprint of the path as *this* store records
it (path, NAR hash, NAR size, references), so a signature made for other contents never counts;
each key counts once; a path whose content address gives back its own store path needs none.
Signatures may also come from elsewhere (``more_sigs``: what binary caches hold for the path,
see :mod:`purestore.cache.sigs`); they count only by the same rule.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import attrs

from ..errors import FormatError, KeyError_
from ..formats.hash import Hash
from ..formats.narinfo import fingerprint
from ..formats.path_info import PathInfo
from ..formats.signing import PublicKey, Signature
from ..formats.store_path import StorePath, path_from_ca


@attrs.frozen
class VerifyProblem:
    """One thing :meth:`LocalStore.verify` found wrong: ``kind`` is ``missing``, ``hash``,
    ``size``, ``dangling-reference``, ``unreadable`` or ``untrusted``."""

    path: str
    kind: str
    message: str


@attrs.frozen
class VerifyReport:
    checked: int
    problems: tuple[VerifyProblem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@attrs.frozen
class Trust:
    """What the signatures of one path amount to: ``keys``, the trusted keys with a valid
    signature; ``untrusted``, names of keys that are not trusted; ``bad``, trusted keys (or
    unreadable signatures) whose signature does not verify; ``content_addressed``."""

    content_addressed: bool
    keys: tuple[str, ...] = ()
    untrusted: tuple[str, ...] = ()
    bad: tuple[str, ...] = ()

    def enough(self, needed: int) -> bool:
        return self.content_addressed or len(self.keys) >= needed

    def describe(self) -> str:
        """For people: "valid signature by trusted key 'a'; invalid signature by 'b'; signed by
        key 'c', not trusted here", the parts that apply, or "no signatures"."""
        parts = []
        if self.keys:
            parts.append(f"valid signature by trusted key {', '.join(repr(k) for k in self.keys)}")
        if self.bad:
            parts.append(f"invalid signature by {', '.join(repr(k) for k in self.bad)}")
        if self.untrusted:
            parts.append(f"signed by key {', '.join(repr(k) for k in self.untrusted)}, not trusted here")
        return "; ".join(parts) or "no signatures"


def is_content_addressed(info: PathInfo, store_dir: str) -> bool:
    """Whether ``info``'s content address gives back its own path (then it needs no signature)."""
    if not info.ca:
        return False
    try:
        return path_from_ca(info.ca, info.path, info.references, store_dir) == info.path
    except FormatError:
        return False


def path_trust(info: PathInfo, store_dir: str, trusted: Mapping[str, PublicKey],
               more_sigs: Iterable[str] = ()) -> Trust:
    """Judge the signatures of ``info`` (and ``more_sigs``) against ``trusted`` (see the module doc)."""
    fp = fingerprint(store_dir, info.path, info.nar_hash, info.nar_size, info.references)
    keys: dict[str, None] = {}
    untrusted: dict[str, None] = {}
    bad: dict[str, None] = {}
    for text in sorted(set(info.sigs) | set(more_sigs)):
        try:
            sig = Signature.parse(text)
        except KeyError_:
            bad[text.partition(":")[0] or "?"] = None
            continue
        key = trusted.get(sig.name)
        if key is None:
            untrusted[sig.name] = None
        elif key.verify(fp, sig):
            keys[sig.name] = None
        else:
            bad[sig.name] = None
    bad = {k: None for k in bad if k not in keys}  # a good signature by the same key wins
    return Trust(is_content_addressed(info, store_dir), tuple(keys), tuple(untrusted), tuple(bad))


def verify_store(store, check_contents: bool = False, *, paths: Iterable[StorePath] | None = None,
                 sigs_needed: int = 0, trusted: Mapping[str, PublicKey] | None = None,
                 more_sigs: Mapping[StorePath, Iterable[str]] | None = None) -> VerifyReport:
    """Check the valid paths of ``store`` (a :class:`~.local.LocalStore`), or only ``paths``;
    with ``sigs_needed`` > 0 also their trust (see the module doc)."""
    from . import fsnar

    problems: list[VerifyProblem] = []
    rows = store.db.query("SELECT path, hash, narSize FROM ValidPaths ORDER BY path")
    if paths is not None:
        chosen = {sp.base_name for sp in paths}
        rows = [r for r in rows if r[0] in chosen]
    def still_valid(base: str, h: str) -> bool:
        # A path that a collection (or `pure store delete`) removed while this ran is not a
        # problem: it is invalidated in the database before its files go, so a path whose
        # files were found missing or half gone is no longer valid when asked now.
        now = store.db.query("SELECT hash FROM ValidPaths WHERE path = ?", (base,))
        return bool(now) and now[0][0] == h

    for base, h, size in rows:
        logical = f"{store.store_dir}/{base}"
        real = f"{store.real_store_dir}/{base}"
        found: VerifyProblem | None = None
        if not os.path.lexists(real):
            found = VerifyProblem(logical, "missing", f"path {logical!r} is valid but {real!r} does not exist")
        elif check_contents:
            try:
                got, got_size = fsnar.hash_path(real)
            except (OSError, ValueError) as e:
                found = VerifyProblem(logical, "unreadable", f"cannot read {real!r}: {e}")
            else:
                want = Hash.parse(h, "sha256")
                if got != want:
                    found = VerifyProblem(logical, "hash", f"path {logical!r} was modified: expected NAR hash "
                                                           f"{want.typed()}, got {got.typed()}")
                elif got_size != size:
                    found = VerifyProblem(logical, "size", f"path {logical!r} has NAR size {got_size}, expected {size}")
        if found is not None and still_valid(base, h):
            problems.append(found)
    if sigs_needed > 0:
        more_sigs = more_sigs or {}
        for base, _h, _size in rows:
            sp = StorePath.from_base_name(base)
            info = store.query_path_info(sp)
            if info is None:
                continue  # deleted meanwhile (see still_valid)
            trust = path_trust(info, store.store_dir, trusted or {}, more_sigs.get(sp, ()))
            if not trust.enough(sigs_needed):
                logical = f"{store.store_dir}/{base}"
                problems.append(VerifyProblem(
                    logical, "untrusted",
                    f"path {logical!r} is untrusted: it needs {sigs_needed} valid signature"
                    f"{'s' if sigs_needed != 1 else ''} by trusted keys and has {len(trust.keys)} "
                    f"({trust.describe()})"))
    dangling = store.db.query(
        "SELECT a.path, r.reference FROM Refs r JOIN ValidPaths a ON a.id = r.referrer "
        "WHERE r.reference NOT IN (SELECT id FROM ValidPaths)")
    checked = {r[0] for r in rows}
    for base, ref in dangling:
        if base in checked:
            problems.append(VerifyProblem(f"{store.store_dir}/{base}", "dangling-reference",
                                          f"path {store.store_dir}/{base!r} refers to a path that is not valid (id {ref})"))
    return VerifyReport(checked=len(rows), problems=tuple(problems))
