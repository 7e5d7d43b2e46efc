"""camelCase keys for ``--json`` output (README: every ``--json`` of pure has camelCase keys).

Records kept in the store database (build reports, check differences) use snake_case keys; they
are turned into camelCase where they are printed, so the database format stays as it is."""

from __future__ import annotations

__all__ = ["camel_case_keys"]


def camel_case_keys(obj):
    """``obj`` with every dict key ``a_b_c`` renamed ``aBC`` (recursively, in lists too); values,
    and keys without an underscore or not strings, are left as they are."""
    if isinstance(obj, dict):
        return {_camel(k): camel_case_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [camel_case_keys(v) for v in obj]
    return obj


def _camel(key):
    if not isinstance(key, str) or "_" not in key.strip("_"):
        return key
    head, *rest = key.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)
