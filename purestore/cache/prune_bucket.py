"""Pruning an S3 bucket's cache (``pure cache prune s3://…``): the same decision as for a
directory (:func:`.prune.plan_from_listing`), made from a listing of the bucket.

- "Used" here is "written": a file's time is its Last-Modified, which a push renews for the
  narinfos it finds already there (:meth:`.s3_backend.S3Backend.mark_used`); downloads leave
  no trace in a bucket, so a path only fetched for longer than the age goes.
- Removal: the narinfos first, then the files only they pointed to (DeleteObjects, up to 1000
  names a request), so that a reader never finds a narinfo without its NAR.
- With an age, unfinished multipart uploads started before it are aborted as well (an upload
  cut off before it could abort itself: S3 bills its parts).
- A bucket has no lock: do not prune while a push writes into the same prefix.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import trio

from ..errors import CacheError
from ._nursery import open_nursery
from .backend import file_url
from .info import CacheInfo
from .prune import PrunePlan, check_what_to_keep, plan_from_listing, spare


async def plan_prune_bucket(backend, *, older_than: float | None, keep: Iterable[str] = (),
                            now: float | None = None, concurrency: int = 32,
                            say: Callable[[str], None] | None = None) -> PrunePlan:
    """What a prune of the bucket cache would remove (nothing is touched); as
    :func:`.prune.plan_prune`, and ``plan.uploads``: the unfinished uploads to abort.  ``say``
    gets a line before each long step (a bucket may hold many thousand narinfos)."""
    keep = list(keep)
    check_what_to_keep(older_than, keep)
    data = await backend.get("nix-cache-info")
    if data is None:
        raise CacheError(f"{backend.url!r} is not a binary cache (it has no nix-cache-info)")
    info = CacheInfo.parse(data, file_url(backend.url, "nix-cache-info"))
    now = time.time() if now is None else now
    listing = await backend.list_files()
    narinfos: dict[str, bytes | str] = {}
    debuginfo: dict[str, bytes] = {}
    limit = trio.CapacityLimiter(concurrency)

    async def read(name: str) -> None:
        async with limit:
            try:
                body = await backend.get(name)
            except CacheError as e:
                body = str(e)
        if body is None:  # gone since the listing
            listing.pop(name, None)
        elif name.startswith("debuginfo/"):
            if isinstance(body, bytes):
                debuginfo[name] = body
        else:
            narinfos[name] = body
    wanted = [name for name in listing
              if (name.endswith(".narinfo") and "/" not in name) or name.startswith("debuginfo/")]
    if say is not None:
        count = sum(1 for name in wanted if name.endswith(".narinfo"))
        say(f"reading the {count} narinfo{'' if count == 1 else 's'} among the {len(listing)} files of "
            f"{backend.url.split('?')[0]!r}...")
    async with open_nursery() as n:
        for name in wanted:
            n.start_soon(read, name)
    plan = plan_from_listing(backend.url.split("?")[0], info, listing, narinfos, debuginfo,
                             older_than=older_than, keep=keep, now=now)
    if older_than is not None:
        plan.uploads = sorted((name, uid) for name, uid, started in await backend.list_uploads()
                              if started < now - older_than)
    return plan


async def apply_prune_bucket(backend, plan: PrunePlan, on_error: Callable[[str], None]) -> int:
    """Remove the plan's files (narinfos first) and abort its uploads; returns how many files
    were removed.  A failure is reported and the rest goes on, but no NAR goes while a narinfo
    that may point to it could not be removed."""
    narinfos = [f for f in plan.files if f.endswith(".narinfo") and "/" not in f]
    first = set(narinfos)
    rest = [f for f in plan.files if f not in first]
    # One batch of deletions (unordered within it, in S3) per layer: a path's referrers go in an
    # earlier batch than it, so that no narinfo left refers to a removed one, even when the prune
    # stops half way.  A narinfo that cannot be removed keeps its references' narinfos too.
    layer: dict[str, int] = {}
    for name in narinfos:  # referrers first (see plan_from_listing): their layers are known
        h = name[: -len(".narinfo")]
        layer.setdefault(h, 0)
        for r in plan.gone_refs.get(h, ()):
            layer[r] = max(layer.get(r, 0), layer[h] + 1)
    spared: set[str] = set()
    problems: list[str] = []
    removed = 0
    for depth in range(max(layer.values(), default=-1) + 1):
        batch = [n for n in narinfos if layer[n[: -len(".narinfo")]] == depth and n[: -len(".narinfo")] not in spared]
        failed = await backend.delete_files(batch)
        removed += len(batch) - len(failed)
        for p in failed:
            on_error(p)
        problems += failed
        for name in batch:
            if any(f"'{name}'" in p for p in failed):  # it stays, and so does its closure
                spare(plan, spared, name[: -len(".narinfo")])
    if problems:
        on_error(f"no other file was removed from {backend.url!r}, since a narinfo that was not "
                 "may still point to it")
        return removed
    more = await backend.delete_files(rest)
    for p in more:
        on_error(p)
    for name, uid in plan.uploads:
        problem = await backend.abort_upload(name, uid)
        if problem:
            on_error(f"cannot abort the unfinished upload of {name!r} (UploadId {uid}): {problem}")
    return len(plan.files) - len(problems) - len(more)
