"""Store paths named on the command line for a binary cache, whose store dir is known only once
the cache is read; shared by ``pure copy`` (between caches) and the ``pure cache`` commands."""

from __future__ import annotations

import os

from ._words import counted


def shown_url(url: str) -> str:
    """A cache URL as a summary line shows it: without its parameters, and with the password of
    a login in it written ``***``."""
    from ..cache.url import hide_password
    return hide_password(url).split("?")[0]


def count_paths(n: int) -> str:
    """``1 path``, ``3 paths``."""
    return counted(n, "path")


def base_name_paths(texts):
    """Store paths named by their base names: a cache's store dir is known only once it is read
    (:func:`check_store_dir`).  A symlink (``./result``) names the store path it points to."""
    from ..errors import InvalidStorePath, UsageError
    from ..formats.store_path import StorePath
    paths = []
    for p in texts:
        name = link_target(p)
        try:
            paths.append(StorePath.from_base_name(os.path.basename(name.rstrip("/"))))
        except InvalidStorePath as e:
            raise UsageError(f"{p!r} is not a store path: {e}") from None
    return paths


def link_target(text: str) -> str:
    """What a symlink (``./result``, a link to one…) names in the end; any other text as it is."""
    p = text.rstrip("/") or text
    for _ in range(40):  # as the kernel's limit on links followed
        if not os.path.islink(p):
            break
        target = os.readlink(p)
        p = target if os.path.isabs(target) else os.path.join(os.path.dirname(p), target)
    return p


def check_store_dir(texts, url: str, settings) -> None:
    """The absolute paths among ``texts`` are in the store dir of the cache at ``url`` (read
    now): a path of another store dir is another path, even with the same base name."""
    from ..errors import CacheError, UsageError
    from .._run import run_trio
    given = [p for p in texts or () if p.startswith("/") and not os.path.islink(p.rstrip("/") or p)]
    if not given:
        return
    try:
        sd = run_trio(lambda: _cache_store_dir(settings, url))
    except CacheError:
        return  # an unusable cache: the command itself says why, in its own words
    for p in given:
        if os.path.dirname(p.rstrip("/")) != sd:
            raise UsageError(f"{p!r} is not in the store dir of {url.split('?')[0]!r}, {sd!r}",
                             hint=f"name it by its base name, or as {sd}/{os.path.basename(p.rstrip('/'))}")


async def _cache_store_dir(settings, url: str) -> str:
    from ..cache.backend import backend_for, parse_url
    from ..cache.info import read_cache_info
    async with backend_for(parse_url(url), settings) as backend:
        return (await read_cache_info(backend, url, default_store_dir=settings.store_dir)).store_dir
