"""The answer of :func:`.substituter.copy_from` when every path asked for is valid already.

``pure copy --from URL PATH…`` of paths the store holds fetches nothing and opens no cache; this
module gives that answer without importing trio and the fetching machinery (50 ms of a no-op
copy's start-up), for the CLI to ask before starting a trio run, and for ``copy_from`` itself.
"""

from __future__ import annotations

from typing import Iterable

import attrs

from ..formats.store_path import StorePath
from . import _storeapi as S
from .url import parse_url


@attrs.define
class SubstituteReport:
    """What a substitution run did: ``valid`` (requested paths now valid), ``fetched`` (paths
    downloaded, requested or not), ``present`` (paths that another process registered while
    this run was on its way: not downloaded, or downloaded but not registered by this run),
    ``failures`` (path → reason; not registered)."""

    valid: set[StorePath] = attrs.field(factory=set)
    fetched: list[StorePath] = attrs.field(factory=list)
    present: list[StorePath] = attrs.field(factory=list)
    failures: dict[StorePath, str] = attrs.field(factory=dict)
    hints: dict[StorePath, str] = attrs.field(factory=dict)  # what to do about a failure, if known
    nar_bytes: int = 0


def present_report(store, url: str, paths: Iterable[StorePath],
                   trusted_keys: Iterable[str] | None = None) -> SubstituteReport | None:
    """What ``copy_from(store, settings, url, paths, trusted_keys=trusted_keys)`` reports when
    every one of ``paths`` is valid: all valid, nothing fetched.  None when something is to be
    fetched (nothing is done then).

    As ``copy_from``, raises :class:`CacheError` for a malformed ``url`` and
    :class:`KeyError_` for a malformed key even when nothing needs fetching, and keeps the
    paths from garbage collection (temporary roots) before relying on their being valid.
    """
    paths = set(paths)
    parse_url(url)
    if trusted_keys is not None:
        from ..formats.signing import parse_public_keys  # (2 ms: only when keys are given)
        parse_public_keys(list(trusted_keys))
    if S.valid_paths(store, paths) != paths:
        return None
    S.add_temp_roots(store, paths)
    if S.valid_paths(store, paths) != paths:  # a collection took one before its root was there
        return None
    return SubstituteReport(valid=paths)
