"""Cheap questions asked before realising (no trio, no .drv parsing): are the outputs already valid?"""

from __future__ import annotations

from typing import Iterable

from ..formats.store_path import StorePath

_CHUNK = 900


def valid_outputs(store, drvs: Iterable[StorePath]) -> dict[StorePath, dict[str, StorePath]] | None:
    """drv -> {output: path} when every output of every ``drvs`` is recorded and valid, else None.

    The outputs are made temporary roots of this process *before* their validity is read, so a
    `pure gc` running meanwhile either keeps them or has deleted them already (then this says
    None and the caller builds them).  Checking first and rooting after left a window in which
    a collection deleted a path this then returned as valid (seen under concurrent `pure gc`).

    Two batched queries whatever the number of derivations, so a no-op build stays fast.
    """
    drvs = list(dict.fromkeys(drvs))
    outputs: dict[StorePath, dict[str, StorePath]] = {d: {} for d in drvs}
    by_base = {d.base_name: d for d in drvs}
    names = list(by_base)
    for i in range(0, len(names), _CHUNK):
        chunk = names[i:i + _CHUNK]
        rows = store.db.query(
            f"SELECT drv, id, path FROM DerivationOutputs WHERE drv IN ({','.join('?' * len(chunk))})", chunk)
        for drv, out, path in rows:
            outputs[by_base[drv]][out] = StorePath.from_base_name(path)
    if any(not o for o in outputs.values()):
        return None
    store.add_temp_roots(dict.fromkeys(p for o in outputs.values() for p in o.values()))
    paths = sorted({p.base_name for o in outputs.values() for p in o.values()})
    found = 0
    for i in range(0, len(paths), _CHUNK):
        chunk = paths[i:i + _CHUNK]
        found += store.db.query(
            f"SELECT COUNT(*) FROM ValidPaths WHERE path IN ({','.join('?' * len(chunk))})", chunk)[0][0]
    return outputs if found == len(paths) else None
