"""Signatures that binary caches hold for paths of the local store.

``pure store copy-sigs`` (:func:`copy_sigs`) adds to local paths the signatures that caches
carry for the very same contents: a path built here and also built, signed and pushed by a
trusted builder gets that builder's signature, which says that two machines produced the same
NAR (and lets ``pure copy --to`` pass it on).  ``pure store verify --sigs-needed N
--substituter URL`` counts the same signatures without storing them (:func:`cache_narinfos`).

A signature is only taken when a key in ``trusted-public-keys`` made it and it verifies against
the fingerprint of the path *as the local store records it* (path, NAR hash, NAR size,
references).  Nix's ``nix store copy-sigs`` copies every signature of a narinfo whose NAR hash
matches, unchecked; here an untrusted or invalid signature is reported and left out.  A cache
that holds different contents for the same path (another NAR hash, size or references: the
build did not reproduce, or one side is corrupted) is reported too.
"""

from __future__ import annotations

import logging
from typing import Iterable

import attrs
import trio

from ..errors import CacheError, NarInfoError
from ..formats.narinfo import NarInfo
from ..formats.signing import PublicKey
from ..formats.store_path import StorePath
from ..store.verify import path_trust
from . import _storeapi as S
from ._nursery import open_nursery
from .narinfo_lookup import Substituters

log = logging.getLogger("purestore.cache")

CONCURRENCY = 16  # narinfo requests at once


@attrs.frozen
class CacheNarInfos:
    """What the caches said: for each path, ``(url, narinfo)`` of every cache that has one (in
    priority order); ``failures``: ``(url, path, reason)`` of what could not be read."""

    urls: tuple[str, ...]
    found: dict[StorePath, list[tuple[str, NarInfo]]]
    failures: tuple[tuple[str, StorePath, str], ...]


async def cache_narinfos(settings, paths: Iterable[StorePath], urls: Iterable[str] | None = None,
                         *, strict: bool = True) -> CacheNarInfos:
    """Ask every cache (``urls``, default the substituters setting) for the narinfo of every
    path, in parallel.  With ``strict`` a cache that cannot be used at all (unreachable, another
    store dir) raises :class:`CacheError`; otherwise it is left out with a logged warning.  A
    narinfo that cannot be read, or describes another path, is a failure of that path at that
    cache."""
    paths = list(dict.fromkeys(paths))
    sd = settings.store_dir
    async with Substituters(settings, urls, trusted_keys=(), strict=strict) as subs:
        # (without strict, an unusable cache has been warned about by Substituters)
        failures: list[tuple[str, StorePath, str]] = []
        answers: dict[tuple[int, StorePath], NarInfo] = {}
        limit = trio.CapacityLimiter(CONCURRENCY)

        async def ask(i: int, cache, p: StorePath) -> None:
            name = f"{p.hash_part}.narinfo"
            where = f"{cache.url.split('?')[0].rstrip('/')}/{name}"
            async with limit:
                try:
                    data = await cache.backend.get(name)
                except CacheError as e:
                    failures.append((cache.url, p, str(e)))
                    return
            if data is None:
                return
            try:
                ni = NarInfo.parse(data, sd, where=where)
            except NarInfoError as e:
                failures.append((cache.url, p, str(e)))
                return
            if ni.store_path != p:
                failures.append((cache.url, p, f"{where} describes {ni.store_path.absolute(sd)!r}"))
                return
            answers[(i, p)] = ni

        async with open_nursery() as n:
            for i, cache in enumerate(subs.caches):
                for p in paths:
                    n.start_soon(ask, i, cache, p)
        found = {p: [(c.url, answers[(i, p)]) for i, c in enumerate(subs.caches) if (i, p) in answers]
                 for p in paths}
        return CacheNarInfos(tuple(c.url for c in subs.caches), found, tuple(failures))


@attrs.frozen
class SigCopy:
    """What :func:`copy_sigs` did for one path: the signatures ``added`` (``(key name, url)`` and
    the text), signatures left out (``(key name, url, why)``) and the caches that hold
    different contents for the path (``(url, what differs)``)."""

    path: StorePath
    added: tuple[tuple[str, str, str], ...] = ()
    left_out: tuple[tuple[str, str, str], ...] = ()
    differs: tuple[tuple[str, str], ...] = ()

    def to_json(self, store_dir: str) -> dict:
        return {"path": self.path.absolute(store_dir),
                "added": [{"key": k, "cache": u, "sig": s} for k, u, s in self.added],
                "leftOut": [{"key": k, "cache": u, "reason": r} for k, u, r in self.left_out],
                "differs": [{"cache": u, "reason": r} for u, r in self.differs]}


def _difference(info, ni: NarInfo) -> str | None:
    """What differs between the local path info and a cache's narinfo for the same path."""
    if ni.nar_hash != info.nar_hash:
        return f"its NarHash is {ni.nar_hash.typed()}, here {info.nar_hash.typed()}"
    if ni.nar_size != info.nar_size:
        return f"its NarSize is {ni.nar_size}, here {info.nar_size}"
    if set(ni.references) != set(info.references):
        theirs, ours = set(ni.references), set(info.references)
        extra = sorted(r.base_name for r in theirs - ours)
        missing = sorted(r.base_name for r in ours - theirs)
        return ("its References differ" + (f" (only there: {', '.join(extra)})" if extra else "")
                + (f" (only here: {', '.join(missing)})" if missing else ""))
    return None


def choose_sigs(info, store_dir: str, found: list[tuple[str, NarInfo]],
                trusted: dict[str, PublicKey]) -> SigCopy:
    """Which of the signatures the caches hold for ``info``'s path to add (module doc)."""
    added: dict[str, tuple[str, str, str]] = {}
    left_out: list[tuple[str, str, str]] = []
    differs: list[tuple[str, str]] = []
    have = set(info.sigs)
    for url, ni in found:
        diff = _difference(info, ni)
        if diff:
            differs.append((url, diff))
            continue
        for text in sorted(ni.sigs):
            if text in have or text in added:
                continue
            trust = path_trust(info.evolve(sigs=frozenset()), store_dir, trusted, [text])
            if trust.keys:
                added[text] = (trust.keys[0], url, text)
            elif trust.untrusted:
                left_out.append((trust.untrusted[0], url, "not a trusted key"))
            else:
                left_out.append((trust.bad[0], url, "the signature does not verify"))
    return SigCopy(info.path, tuple(added.values()), tuple(left_out), tuple(differs))


def sigs_for_same_contents(store, found: CacheNarInfos) -> tuple[dict[StorePath, list[str]], list[tuple[StorePath, str, str]]]:
    """The signatures the caches hold for the same contents as the local paths (what
    ``verify --substituter`` counts, unchecked: the caller judges them), and the caches that
    hold other contents: ``(path, url, what differs)``."""
    sigs: dict[StorePath, list[str]] = {}
    differs: list[tuple[StorePath, str, str]] = []
    for p, got in found.found.items():
        info = S.path_info(store, p)
        for url, ni in got:
            diff = _difference(info, ni)
            if diff:
                differs.append((p, url, diff))
            else:
                sigs.setdefault(p, []).extend(ni.sigs)
    return sigs, differs


async def copy_sigs(store, settings, paths: Iterable[StorePath], urls: Iterable[str] | None = None,
                    trusted: dict[str, PublicKey] | None = None, *,
                    strict: bool = True) -> tuple[list[SigCopy], CacheNarInfos]:
    """Add to each of ``paths`` (valid in ``store``) the signatures by trusted keys that the caches
    hold for the same contents; returns what was done per path, and what the caches said.
    ``strict``: see :func:`cache_narinfos`."""
    paths = list(dict.fromkeys(paths))
    result = await cache_narinfos(settings, paths, urls, strict=strict)
    out = []
    for p in paths:
        info = S.path_info(store, p)
        copy = choose_sigs(info, store.store_dir, result.found.get(p, []), trusted or {})
        if copy.added:
            S.add_signatures(store, p, [s for _k, _u, s in copy.added])
        out.append(copy)
    return out, result
