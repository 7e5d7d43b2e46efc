"""Copying closures from one binary cache to another (``pure copy --from A --to B PATH…``),
without a store: mirroring a cache, or filling an offline one.

1. **Read** the closure of the paths from the source cache (narinfos in parallel).  Before
   anything is written, every narinfo must parse strictly for the path it names, keep its
   ``URL`` inside the cache, and (unless ``check_sigs`` is off) carry a valid signature by a
   trusted key; with ``require_provenance`` an input-addressed path also needs a provenance
   statement by a trusted key for its NarHash.  One bad narinfo: an error naming every bad
   path, and the destination is left untouched.
2. **Copy** what the destination lacks, the biggest NARs first, several at once: the compressed
   NAR is streamed into a temporary file while it is checked as substitution checks it
   (FileSize, FileHash, then decompressed: NarSize, NarHash, and that it parses as a NAR).
   Only a NAR that passed is put under the same ``nar/…`` name.  Its ``.ls`` listing,
   provenance statement and build log come along when the source has them (with
   ``write_listing``, a missing listing is made from the NAR).  A NAR URL with a query
   (``nar/….nar?hash=…``, as Harmonia serves) is asked with it, and the file kept without it,
   the narinfo's URL too.
   A path the destination has already gets the source's provenance statement where the
   destination has none (:func:`_copy_missing_statements`), as a push does.
3. **Publish** the narinfo only after those of all its references, so the destination holds
   whole closures at every moment.  Without new keys it is the source's narinfo byte for byte
   (its signatures stay valid: they sign the path, not the cache); with ``secret_keys`` their
   signatures are added.

NARs are not recompressed: the copy is as fast as reading and checking them, and the narinfos
stay the ones their signers wrote (Nix's ``nix copy --from A --to B`` recompresses through a
store).  A path that fails (a corrupt NAR, say) fails its referrers too; the others go on, and
the error lists each failed path and why.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Iterable

import attrs
import trio

from ..errors import CacheError, CopyIncomplete, NarError, ProvenanceError, SignatureError
from ..formats.narinfo import NarInfo
from ..formats.signing import SecretKey, parse_public_keys, verify_any
from ..formats.store_path import StorePath
from ._files import open_regular
from ._graph import cycle_problems, references_first
from ._nursery import open_nursery
from .backend import CacheMissing, FileBackend, backend_for, check_name, file_url, parse_url
from .fetch import stream_to_thread
from .info import read_cache_info
from .nar_jobs import VerifyingReader, read_checked
from .progress import Progress
from .debug_info import debug_info_members, write_debug_links
from .destination import cached_paths, ensure_cache_info, mark_present, nar_temp_dir, push_lock
from .push import load_secret_key, push_temp_name
from .query import CONCURRENCY, read_narinfo

# URL parameters of a push that choose how NARs are written; a copy between caches keeps the
# source's NAR files as they are, so these would silently do nothing
_PUSH_ONLY_PARAMS = ("compression", "compression-level", "parallel-compression")


@attrs.frozen
class MirrorResult:
    store_dir: str
    copied: tuple[StorePath, ...]  # references first
    skipped: tuple[StorePath, ...]  # the destination had them already
    nar_bytes: int  # NAR bytes of the copied paths
    file_bytes: int  # bytes of NAR files transferred (NAR files the destination had are not)


async def copy_between(settings, src_url: str, dst_url: str, paths: Iterable[StorePath], *,
                       trusted_keys: Iterable[str] | None = None, check_sigs: bool = True,
                       require_provenance: bool = False, secret_keys: Iterable[SecretKey] = (),
                       write_listing: bool | None = None, jobs: int | None = None,
                       progress: Progress | None = None) -> MirrorResult:
    """Copy the closure of ``paths`` (named in the source cache's store dir, which the
    destination must share) from the cache at ``src_url`` to the one at ``dst_url``.

    ``trusted_keys``: None for the settings' ``trusted-public-keys``.  ``secret_keys`` (and a
    ``secret-key=FILE`` parameter of ``dst_url``) add signatures.  ``write_listing`` (None: the
    destination URL's ``write-nar-listing``): make ``.ls`` listings the source lacks.  Raises
    :class:`CacheError` naming every path that could not be copied and why.
    """
    from .url import url_flag

    dst_cu = parse_url(dst_url)
    src_cu = parse_url(src_url)
    src_url, dst_url = src_cu.url, dst_cu.url  # (what is said of them: a login's password as ***)
    for key in _PUSH_ONLY_PARAMS:
        if dst_cu.param(key) is not None:
            raise CacheError(f"cache URL {dst_url!r}: {key} does not apply to a copy between caches "
                             "(the source's NAR files are copied as they are)")
    keys = list(secret_keys)
    if dst_cu.param("secret-key"):
        keys.append(load_secret_key(dst_cu.param("secret-key")))  # type: ignore[arg-type]
    if write_listing is None:
        write_listing = url_flag(dst_cu, "write-nar-listing")
    debug_links = url_flag(dst_cu, "index-debug-info")
    trusted = parse_public_keys(list(settings.trusted_public_keys if trusted_keys is None else trusted_keys))
    if (check_sigs or require_provenance) and not trusted:
        raise CacheError(f"no trusted public keys to check the narinfos of {src_url!r} with",
                         hint="give --trusted-public-keys KEYS (or set trusted-public-keys), or "
                              "--no-check-sigs to copy unsigned paths")
    wanted = list(dict.fromkeys(paths))

    src = backend_for(src_cu, settings)
    dst = backend_for(dst_cu, settings)
    async with src, dst, contextlib.AsyncExitStack() as held:
        sd = (await read_cache_info(src, src_url, default_store_dir=settings.store_dir)).store_dir
        found = await _read_closure(src, src_url, sd, wanted)
        problems: dict[StorePath, str] = {}
        limit = trio.CapacityLimiter(CONCURRENCY)  # provenance statements are fetched
        statements: dict[StorePath, bytes | None] = {}  # (those fetched: not asked for again)

        async def check(p: StorePath, ni: NarInfo) -> None:
            async with limit:
                why = await _refusal(src, sd, ni, trusted if check_sigs else None,
                                     trusted if require_provenance else None, statements)
            if why:
                problems[p] = why
        async with open_nursery() as n:
            for p, (ni, _) in found.items():
                n.start_soon(check, p, ni)
        # a reference cycle (a hostile cache's): its narinfos would each wait for the other's
        for p, via in cycle_problems(found, lambda q: found[q][0].references).items():
            problems.setdefault(p, "its narinfo is part of a reference cycle" if via is None else
                                f"its reference {via.absolute(sd)!r} is part of a reference cycle or refers to one")
        if problems:
            e = _failed(sd, src_url, problems)
            raise CopyIncomplete(e.message, result=MirrorResult(sd, (), (), 0, 0), failures=problems, hint=e.hint)

        await ensure_cache_info(dst, sd, f"the source cache's ({src_url.split('?')[0]!r})")
        if isinstance(dst, FileBackend):  # a prune of the destination waits for the copy
            await held.enter_async_context(push_lock(dst.dir))
        order = _topo(found)
        have, _ = await cached_paths(dst, order, CONCURRENCY)
        todo = [p for p in order if p not in have]
        await mark_present(dst, have)
        await _copy_missing_statements(src, dst, [p for p in order if p in have], statements, limit)
        if progress:
            progress.expect(len(todo), sum(found[p][0].nar_size for p in todo))
        tmp_dir = await nar_temp_dir(dst)

        done = {p: trio.Event() for p in todo}
        failed: dict[StorePath, str] = {}
        copied: list[StorePath] = []
        totals = [0, 0]
        pending = collections.deque(sorted(todo, key=lambda p: -found[p][0].nar_size))

        def finish(p: StorePath, why: str | None) -> None:
            if why is not None:
                failed[p] = why
            done[p].set()
            if progress and why is None:  # (a failed path stays uncounted: "3/5 paths" at the end)
                progress.path_done(p.absolute(sd))

        async def publish(p: StorePath) -> None:
            """The narinfo, once its references' narinfos are in (or one of them failed)."""
            ni, text = found[p]
            refs = [r for r in ni.references if r != p and r in done]
            for r in refs:
                await done[r].wait()
            bad_ref = next((r for r in refs if r in failed), None)
            if bad_ref is not None:
                return finish(p, f"its reference {bad_ref.absolute(sd)!r} could not be copied")
            stored = _stored_url(src, ni)
            if stored != ni.url:  # (a URL is not signed: the signatures stay good)
                ni = attrs.evolve(ni, url=stored)
                text = ni.render(sd).encode()
            if keys:
                text = ni.with_sigs(k.sign(ni.fingerprint(sd)).render() for k in keys).render(sd).encode()
            try:
                await dst.put_narinfo(f"{p.hash_part}.narinfo", text, sd)
            except CacheError as e:
                return finish(p, str(e))
            copied.append(p)
            totals[0] += ni.nar_size
            finish(p, None)

        async def lane(n) -> None:
            # a lane copies NARs; the narinfos wait for their references in tasks of their own,
            # so that no lane ever waits for a path still queued behind it
            while pending:
                p = pending.popleft()
                ni = found[p][0]
                bad_ref = next((r for r in ni.references if r in failed), None)
                if bad_ref is not None:  # no need to copy a NAR that cannot be published
                    finish(p, f"its reference {bad_ref.absolute(sd)!r} could not be copied")
                    continue
                if progress:
                    progress.message(f"copying path {p.absolute(sd)!r} from {src_url.split('?')[0]!r}")
                try:
                    # index-debug-info needs the path's listing: the source's, or made from the NAR
                    listing = await _copy_nar(src, dst, ni, tmp_dir, write_listing or debug_links, progress, totals)
                    await _copy_extras(src, dst, ni, listing if write_listing else None)
                    if debug_links:
                        listing = listing or await src.get(f"{ni.store_path.hash_part}.ls")
                        if listing is not None:
                            await write_debug_links(dst, debug_info_members(listing), _stored_url(src, ni))
                except (CacheError, NarError) as e:
                    finish(p, str(e))
                    continue
                n.start_soon(publish, p)

        if jobs is not None and jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        lanes = jobs or ((os.cpu_count() or 1) if isinstance(src, FileBackend) else 8)
        async with open_nursery() as n:
            for _ in range(min(lanes, len(todo))):
                n.start_soon(lane, n)
        if progress:
            progress.finish()
        order_index = {p: i for i, p in enumerate(order)}
        result = MirrorResult(sd, tuple(sorted(copied, key=order_index.__getitem__)),
                              tuple(p for p in order if p in have), totals[0], totals[1])
        if failed:
            e = _failed(sd, src_url, failed, copied=len(copied))
            raise CopyIncomplete(e.message, result=result, failures=dict(failed), hint=e.hint)
    return result


def _failed(sd: str, src_url: str, failures: dict[StorePath, str], copied: int | None = None) -> CacheError:
    lines = [f"cannot copy {p.absolute(sd)!r} from {src_url.split('?')[0]!r}: {why}"
             for p, why in sorted(failures.items())]
    if copied is None:
        hint = "nothing was written to the destination"
    else:
        hint = (f"{copied} other path{' was' if copied == 1 else 's were'} copied (whole closures); "
                "the same command again copies only what is missing")
    return CacheError("\n".join(lines), hint=hint)


async def _read_closure(src, src_url: str, sd: str, wanted: list[StorePath]) -> dict[StorePath, tuple[NarInfo, bytes]]:
    """Every narinfo of the closure of ``wanted``: path → (parsed, the file's bytes)."""
    found: dict[StorePath, tuple[NarInfo, bytes]] = {}
    asked: dict[StorePath, StorePath | None] = {p: None for p in wanted}  # → who refers to it
    limit = trio.CapacityLimiter(CONCURRENCY)

    async def fetch(p: StorePath) -> None:
        async with limit:
            ni, data = await read_narinfo(src, src_url, sd, p, asked[p])
        found[p] = (ni, data)
        for r in ni.references:
            if r not in asked:
                asked[r] = p
                n.start_soon(fetch, r)

    async with open_nursery() as n:
        for p in wanted:
            n.start_soon(fetch, p)
    return found


async def _copy_missing_statements(src, dst, present: list[StorePath], statements: dict[StorePath, bytes | None],
                                   limit: trio.CapacityLimiter) -> None:
    """The provenance statements of paths the destination has already, where the source has
    one and the destination none (as a push does: a statement signed after a path was copied
    follows with the next copy; one the destination has stays, it may be the builder's).  One
    request to the source per path (none when ``--require-provenance`` read it already), and
    one ``exists()`` at the destination for each that has a statement."""
    from ..formats.provenance import provenance_file_name

    async def one(p: StorePath) -> None:
        name = provenance_file_name(p.hash_part)
        async with limit:
            data = statements[p] if p in statements else await src.get(name)
            if data is not None and not await dst.exists(name):
                await dst.put(name, data, "text/plain; charset=utf-8")
    async with open_nursery() as n:
        for p in present:
            n.start_soon(one, p)


async def _refusal(src, sd: str, ni: NarInfo, trusted, provenance_keys,
                   statements: dict[StorePath, bytes | None]) -> str | None:
    """Why this narinfo must not be copied (None: it may).  A provenance statement read is
    kept in ``statements``."""
    try:
        check_name(ni.url, "narinfo")
    except CacheError:
        return f"its narinfo's URL {ni.url!r} points outside the cache"
    if trusted is not None:
        try:
            verify_any(ni.fingerprint(sd), ni.sigs, trusted)
        except SignatureError as e:
            return f"its narinfo is not trusted: {e}"
    if provenance_keys is not None and ni.ca is None:
        from ..formats.provenance import provenance_file_name, verify_for_path
        name = provenance_file_name(ni.store_path.hash_part)
        data = statements[ni.store_path] = await src.get(name)
        if data is None:
            return "the cache has no provenance statement for it (require-provenance is set)"
        try:
            verify_for_path(data, provenance_keys, ni.store_path.absolute(sd), ni.nar_hash, name)
        except ProvenanceError as e:
            return f"its provenance is not valid: {e}"
    return None


def _stored_url(src, ni: NarInfo) -> str:
    """The name the destination keeps ``ni``'s NAR file under: its URL, but for the query an
    HTTP cache's narinfo may give it (``nar/<NAR hash>.nar?hash=<path hash>``: Harmonia's), which
    the source is asked with and which is no part of a file's name (a static server drops it)."""
    if getattr(src, "_nar_query", False) and ni.url.startswith("nar/"):
        return ni.url.partition("?")[0]
    return ni.url


def _topo(found: dict[StorePath, tuple[NarInfo, bytes]]) -> list[StorePath]:
    """The paths, references before referrers (ties by name, for a stable order)."""
    return references_first(found, lambda p: found[p][0].references)


async def _copy_nar(src, dst, ni: NarInfo, tmp_dir: str | None, write_listing: bool,
                    progress: Progress | None, totals: list[int]) -> bytes | None:
    """Put ``ni``'s NAR file into ``dst`` (checked on the way) unless it is there already (and,
    with ``write_listing``, the path's listing too).  Returns the listing made from it
    (``write_listing``), else None."""
    stored = _stored_url(src, ni)
    if await dst.exists(stored) and (not write_listing or await dst.exists(f"{ni.store_path.hash_part}.ls")):
        if progress:
            progress.add_bytes(ni.nar_size)
        return None
    where = f"{src.url.split('?')[0].rstrip('/')}/{ni.url}"
    tmp = push_temp_name(tmp_dir)

    def consume(next_chunk) -> bytes | None:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise CacheError(f"cannot create {tmp!r}: {e.strerror}") from e
        with os.fdopen(fd, "wb") as out:
            def tee() -> bytes:
                c = next_chunk()
                if c:
                    try:
                        out.write(c)
                    except OSError as e:
                        raise CacheError(f"cannot write {tmp!r}: {e.strerror}") from e
                return c
            # parsed, as a substitution and `cache verify --check-contents` parse it
            listing = read_checked(VerifyingReader(tee, ni, where, progress), listing=write_listing)
        return listing

    try:
        if isinstance(src, FileBackend):
            def read_local():
                with open_regular(src.local_path(ni.url)) as f:
                    return consume(lambda: f.read(1 << 20))
            try:
                listing = await trio.to_thread.run_sync(read_local)
            except FileNotFoundError:
                raise CacheMissing(f"{file_url(src.url, ni.url)} is missing from the cache") from None
            except OSError as e:
                raise CacheError(f"cannot read {where}: {e.strerror}") from e
        else:
            listing = await stream_to_thread(lambda: src.open_read(ni.url), consume)
        if not await dst.exists(stored):  # else another path shares it, or it was there (listing)
            size = os.path.getsize(tmp)
            await dst.put_file(stored, tmp, "application/x-nix-nar", move=True)
            totals[1] += size
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return listing


async def _copy_extras(src, dst, ni: NarInfo, listing: bytes | None) -> None:
    """The path's ``.ls`` listing (or the one just made), provenance and build log, where the
    source has them and the destination does not."""
    from ..formats.provenance import provenance_file_name
    h = ni.store_path.hash_part
    names = [f"{h}.ls", provenance_file_name(h)]
    if ni.deriver is not None:
        names.append(f"log/{ni.deriver.base_name}")
    for name in names:
        data = await src.get(name)
        if data is None and name.endswith(".ls"):
            data = listing
        if data is not None and not await dst.exists(name):
            kind = "application/json" if name.endswith(".ls") else "text/plain; charset=utf-8"
            await dst.put(name, data, kind)

