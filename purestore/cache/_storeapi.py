"""The few things the cache layer asks of a local store, in one place.

Everything the push and the substituter need from :class:`purestore.store.local.LocalStore` goes
through these functions, so that the store's API can evolve without touching the cache logic.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

from ..formats.path_info import PathInfo
from ..formats.store_path import StorePath


def path_info(store, path: StorePath) -> PathInfo | None:
    return store.query_path_info(path)


def path_from_hash_part(store, hash_part: str) -> StorePath | None:
    return store.query_path_from_hash_part(hash_part)


def is_valid(store, path: StorePath) -> bool:
    return store.is_valid(path)


def valid_paths(store, paths: Iterable[StorePath]) -> set[StorePath]:
    """Those of ``paths`` that are valid, asked at once where the store can."""
    fn = getattr(store, "query_valid_paths", None)
    if fn is None:
        return {p for p in paths if store.is_valid(p)}
    return fn(paths)


def closure(store, paths: Iterable[StorePath]) -> set[StorePath]:
    return set(store.query_closure(set(paths)))


def topo_sort(store, paths: Iterable[StorePath]) -> list[StorePath]:
    """References before referrers."""
    return list(store.topo_sort(set(paths)))


def real_path(store, path: StorePath) -> str:
    return store.real_path(path)


def lock_path(store, path: StorePath):
    return store.lock_path(path)


def temp_path(store, path: StorePath) -> str:
    """A fresh name inside the real store dir to restore into before the final rename."""
    return store.temp_name(path)


def register(store, infos: Iterable[PathInfo]) -> None:
    store.register(list(infos))


def add_signatures(store, path: StorePath, sigs: Iterable[str]) -> None:
    store.add_signatures(path, set(sigs))


def add_temp_root(store, path: StorePath) -> None:
    fn = getattr(store, "add_temp_root", None)
    if fn is not None:
        fn(path)


def add_temp_roots(store, paths: Iterable[StorePath]) -> None:
    """Keep ``paths`` from garbage collection until this process exits: taken before relying
    on a path being valid (a collection running meanwhile would otherwise delete it)."""
    paths = list(paths)
    fn = getattr(store, "add_temp_roots", None)
    if fn is not None and paths:
        fn(paths)


def remove_temp_root(store, path: StorePath) -> None:
    fn = getattr(store, "remove_temp_root", None)
    if fn is not None:
        fn(path)


def state_dir(store) -> str:
    return store.settings.state_dir


def build_log(store, drv: StorePath) -> bytes | None:
    """The build log of ``drv`` if the store keeps one and it can be read, else None."""
    from ..errors import StoreError
    from ..store.build_logs import read_log
    try:
        return read_log(state_dir(store), drv.base_name)
    except StoreError:
        return None


@contextlib.contextmanager
def no_lock():
    yield


async def wait_lock_released(locks, name: str) -> None:
    """Wait, without blocking the trio thread, until nobody holds the path lock ``name`` (or
    try again a little later when many waits are under way): see :mod:`purestore._lock_wait`."""
    from .. import _lock_wait  # (imports trio: not for a caller that only asks the store)
    await _lock_wait.wait_lock_released(locks, name)
