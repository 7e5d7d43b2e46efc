"""Signing the narinfos of a binary cache in place (``pure cache sign``), without a store: a new
key for a cache whose paths another key signed (key rotation), or a signature for paths pushed
without one.  Nix's ``nix store sign --store URL``.

A narinfo is signed only when it is vouched for: signed already by a trusted key (unless
``check_sigs`` is off) and, with ``check_contents``, its NAR file read whole and checked against
it first (FileSize, FileHash, NarSize, NarHash).  Nothing else in it changes; it is written back
atomically (a ``file://`` cache: a temporary file renamed over it; HTTP: one PUT, which needs
the server's upload token).  Every narinfo is checked before the first one is written, so a
refusal leaves the cache as it was.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import attrs
import trio

from ..errors import CacheError, NarError, NarInfoError, SignatureError
from ..formats.narinfo import NarInfo
from ..formats.signing import SecretKey, parse_public_keys, verify_any
from ..formats.store_path import StorePath
from ._nursery import open_nursery
from .backend import FileBackend, backend_for, check_name
from .info import read_cache_info
from .progress import Progress
from .destination import push_lock
from .query import CONCURRENCY
from .url import hide_password
from .verify import check_nar


@attrs.frozen
class SignResult:
    store_dir: str
    signed: tuple[StorePath, ...]  # narinfos that got a signature
    unchanged: tuple[StorePath, ...]  # signed by every key already


async def sign_cache(settings, url: str, keys: Iterable[SecretKey], paths: Iterable[StorePath] | None = None, *,
                     recursive: bool = False, trusted_keys: Iterable[str] | None = None,
                     check_sigs: bool = True, check_contents: bool = False,
                     progress: Progress | None = None) -> SignResult:
    """Add signatures by ``keys`` to the narinfos of ``paths`` (their closures with
    ``recursive``; None: every narinfo of a ``file://`` or ``s3://`` cache) in the cache at ``url``.
    Raises :class:`CacheError` naming each path that cannot be signed and why, before
    anything is written."""
    keys = list(keys)
    if not keys:
        raise CacheError("no secret key to sign with")
    trusted = parse_public_keys(list(settings.trusted_public_keys if trusted_keys is None else trusted_keys))
    if check_sigs and not trusted:
        raise CacheError(f"no trusted public keys to check the narinfos of {hide_password(url)!r} with before "
                         "signing them",
                         hint="give --trusted-public-keys KEYS (or set trusted-public-keys), or "
                              "--no-check-sigs to sign what the cache holds as it is")
    backend = backend_for(url, settings)
    url = backend.url  # (what is said of it: a login's password as ***)
    async with backend, contextlib.AsyncExitStack() as held:
        sd = (await read_cache_info(backend, url, default_store_dir=settings.store_dir)).store_dir
        if isinstance(backend, FileBackend):  # a prune must not remove what is read to be rewritten
            await held.enter_async_context(push_lock(backend.dir))
        if paths is None:
            names = await backend.list_narinfos()
            if names is None:
                raise CacheError(f"binary cache {url!r} cannot be listed over HTTP",
                                 hint="name the store paths to sign")
            wanted = [n[:-len(".narinfo")] for n in names]
        else:
            wanted = [p.hash_part for p in paths]
        infos: dict[str, NarInfo] = {}
        problems: dict[str, str] = {}
        limit = trio.CapacityLimiter(CONCURRENCY)
        base = url.split("?")[0].rstrip("/")

        async def read(h: str, by: NarInfo | None) -> None:
            name = f"{h}.narinfo"
            async with limit:
                try:
                    data = await backend.get(name)
                except CacheError as e:
                    problems[h] = str(e)
                    return
            if data is None:
                why = f", which {by.store_path.absolute(sd)!r} refers to," if by else ""
                problems[h] = f"the cache has no narinfo {name}{why}"
                return
            try:
                ni = NarInfo.parse(data, sd, where=f"{base}/{name}")
            except NarInfoError as e:
                problems[h] = f"bad narinfo: {e}"
                return
            if ni.store_path.hash_part != h:
                problems[h] = f"{name} describes {ni.store_path.absolute(sd)!r}, another path"
                return
            infos[h] = ni
            if recursive:
                for r in ni.references:
                    if r.hash_part not in infos and r.hash_part not in asked:
                        asked.add(r.hash_part)
                        n.start_soon(read, r.hash_part, ni)

        asked = set(wanted)
        async with open_nursery() as n:
            for h in wanted:
                n.start_soon(read, h, None)
        if progress:
            progress.expect(len(infos), sum(ni.nar_size for ni in infos.values()) if check_contents else 0)

        nar_limit = trio.CapacityLimiter(2)

        async def vouch(h: str, ni: NarInfo) -> None:
            try:
                check_name(ni.url, "narinfo")
            except CacheError:
                problems[h] = f"its URL {ni.url!r} points outside the cache"
                return
            if check_sigs:
                try:
                    verify_any(ni.fingerprint(sd), ni.sigs, trusted)
                except SignatureError as e:
                    problems[h] = f"not trusted, so not signed: {e}"
                    return
            if check_contents:
                try:
                    async with nar_limit:
                        await check_nar(backend, ni, f"{h}.narinfo", progress)
                except (CacheError, NarError) as e:
                    problems[h] = str(e)

        async with open_nursery() as n:
            for h, ni in infos.items():
                n.start_soon(vouch, h, ni)
        if problems:
            def label(h: str) -> str:
                return infos[h].store_path.absolute(sd) if h in infos else f"{h}.narinfo"
            lines = [f"cannot sign {label(h)!r} in {base!r}: {why}" for h, why in sorted(problems.items())]
            raise CacheError("\n".join(lines), hint="nothing was signed")

        signed: list[StorePath] = []
        unchanged: list[StorePath] = []

        async def write(h: str, ni: NarInfo) -> None:
            fp = ni.fingerprint(sd)
            new = [s for s in (k.sign(fp).render() for k in keys) if s not in ni.sigs]
            if not new:
                unchanged.append(ni.store_path)
            else:
                async with limit:
                    await backend.put_narinfo(f"{h}.narinfo", ni.with_sigs(new).render(sd).encode(), sd)
                signed.append(ni.store_path)
            if progress:
                progress.path_done(ni.store_path.absolute(sd))

        async with open_nursery() as n:
            for h, ni in infos.items():
                n.start_soon(write, h, ni)
        if progress:
            progress.finish()
    return SignResult(sd, tuple(sorted(signed)), tuple(sorted(unchanged)))
