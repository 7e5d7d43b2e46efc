"""The hermeticity report: what the store's event records say about how its paths came to be.

Figures, all from the database (:mod:`purestore.store.events`), over the whole history or since
a given time:

- **builds**: build attempts of kind ``build`` (not ``--check`` / ``--rounds`` re-runs), by status.
- **built without network**: the share of finished builds that ran without network access.
  Only fixed-output derivations (fetches) get the network, so anything below 100% apart from
  them is listed as a finding.
- **fixed-output inputs pinned by hash**: of the builds that had network access, the share that
  are fixed-output derivations declaring a hash (their output is checked against it).  A
  network-using build without a pinned hash would be listed.
- **reproducibility**: the share of ``--check`` / ``--rounds`` runs whose outputs were
  bit-identical, and the derivations that were not, with the first differences.
- **cache hit rate**: the share of the derivations whose outputs this store got that came from a
  cache instead of being built: derivations with an output substituted / (those + derivations
  built successfully), each derivation counted once.  A substituted path counts by its deriver
  (recorded from its narinfo; for older records, the one the store knows): ``.drv`` files,
  sources and paths with no known deriver avoided no build and do not count, nor do repeats.
- **sandbox refusals**: how many, and what.

A share with nothing to measure is ``None`` (shown as ``n/a``), never a made-up 100%.
"""

from __future__ import annotations

import datetime
from typing import Any


def _share(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def make_report(store, since: float | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict (see the module docstring for the figures)."""
    from ..store import events

    def recent(rows, key):
        return [r for r in rows if since is None or (r.get(key) or 0) >= since]

    all_builds = recent(events.query_builds(store), "start")
    builds = [b for b in all_builds if b["kind"] == "build"]
    by_status: dict[str, int] = {}
    for b in builds:
        by_status[b["status"]] = by_status.get(b["status"], 0) + 1
    finished = [b for b in builds if b["status"] in ("built", "failed")]
    no_net = [b for b in finished if not b["network"]]
    net_non_fod = sorted({b["drv"] for b in finished if b["network"] and not b["fixed_output"]})
    networked = [b for b in finished if b["network"] or b["fixed_output"]]
    pinned = [b for b in networked if b["fixed_output"]]
    fod_drvs = sorted({b["drv"] for b in pinned})

    checks = recent(events.query_checks(store), "time")
    failing: dict[str, dict] = {}
    for c in sorted(checks, key=lambda c: c["id"]):
        if not c["reproducible"]:
            failing[c["drv"]] = {"drv": c["drv"], "kind": c["kind"], "rounds": c["rounds"],
                                 "differences": c["differences"][:5]}
        # A later reproducible run does not erase a failure: the derivation stays listed.
    repro = [c for c in checks if c["reproducible"]]

    subs = recent(events.query_substitutions(store), "time")
    sub_paths = {sub["path"]: sub["nar_size"] or 0 for sub in subs}
    sub_drvs = _substituted_derivations(store, subs)
    built_drvs = {b["drv"] for b in builds if b["status"] == "built"}
    refusals = recent(events.query_sandbox_refusals(store), "time")

    return {
        "since": since,
        "builds": {
            "total": len(builds),
            "by_status": dict(sorted(by_status.items())),
            "fixed_output": sum(1 for b in builds if b["fixed_output"]),
        },
        "built_without_network": {
            "share": _share(len(no_net), len(finished)),
            "without_network": len(no_net),
            "finished": len(finished),
            "non_fixed_output_with_network": net_non_fod,
        },
        "fixed_output_pinned": {
            "share": _share(len(pinned), len(networked)),
            "pinned": len(pinned),
            "with_network": len(networked),
            "derivations": fod_drvs,
        },
        "reproducibility": {
            "rate": _share(len(repro), len(checks)),
            "reproducible": len(repro),
            "runs": len(checks),
            "failing": [failing[d] for d in sorted(failing)],
        },
        "cache": {
            "hit_rate": _share(len(sub_drvs), len(sub_drvs) + len(built_drvs)),
            "substituted": len(sub_drvs),
            "built": len(built_drvs),
            "substituted_paths": len(sub_paths),
            "substituted_bytes": sum(sub_paths.values()),
        },
        "sandbox_refusals": {
            "count": len(refusals),
            "refusals": [{"drv": r["drv"], "time": r["time"], "what": r["what"]} for r in refusals],
        },
    }


def _substituted_derivations(store, subs: list[dict]) -> set[str]:
    """The derivations (``.drv`` paths) whose outputs the substitutions ``subs`` fetched: each
    path's recorded deriver, else (a record older than that column) the one the store knows
    now.  A ``.drv`` file or a source has none: it avoided no build."""
    out: set[str] = set()
    for sub in subs:
        path = sub["path"]
        if sub.get("drv"):
            out.add(sub["drv"])
            continue
        if path.endswith(".drv"):
            continue
        dir_, _, base = path.rpartition("/")
        rows = store.db.query("SELECT deriver FROM ValidPaths WHERE path = ? AND deriver IS NOT NULL", (base,))
        rows = rows or store.db.query("SELECT drv FROM DerivationOutputs WHERE path = ? ORDER BY drv", (base,))
        if rows:
            out.add(f"{dir_}/{rows[0][0]}")
    return out


def _describe(d) -> str:
    """One line for a recorded difference (the builder's wording when it is one of its records)."""
    from .check import describe
    if isinstance(d, dict):
        try:
            prefix = f"output {d['output']!r}: " if "output" in d else ""
            return prefix + describe(d)
        except KeyError:
            return ", ".join(f"{k}={v}" for k, v in d.items())
    return str(d)


def render_report(r: dict[str, Any]) -> str:
    """The report for a person."""
    lines = []
    if r.get("since") is not None:
        ts = datetime.datetime.fromtimestamp(r["since"], datetime.timezone.utc)
        lines.append(f"since {ts:%Y-%m-%d %H:%M:%S} UTC")
    b = r["builds"]
    st = ", ".join(f"{n} {k}" for k, n in b["by_status"].items()) or "none"
    lines.append(f"builds run:                      {b['total']} ({st}; {b['fixed_output']} fixed-output fetches)")
    n = r["built_without_network"]
    lines.append(f"built without network:           {_pct(n['share'])} ({n['without_network']} of {n['finished']})")
    for d in n["non_fixed_output_with_network"]:
        lines.append(f"  ! had network but is not fixed-output: {d}")
    f = r["fixed_output_pinned"]
    lines.append(f"network inputs pinned by hash:   {_pct(f['share'])} ({f['pinned']} of {f['with_network']})")
    rp = r["reproducibility"]
    lines.append(f"reproducible (--check/--rounds): {_pct(rp['rate'])} ({rp['reproducible']} of {rp['runs']} runs)")
    for fl in rp["failing"]:
        lines.append(f"  ! not reproducible: {fl['drv']} ({fl['kind']}, {fl['rounds']} rounds)")
        for d in fl["differences"][:3]:
            lines.append(f"      {_describe(d)}")
    c = r["cache"]
    total = c["substituted"] + c["built"]
    lines.append(f"cache hit rate:                  {_pct(c['hit_rate'])} ({c['substituted']} of {total} "
                 f"derivation{'' if total == 1 else 's'} substituted, {c['built']} built)")
    sr = r["sandbox_refusals"]
    lines.append(f"sandbox refusals:                {sr['count']}")
    for x in sr["refusals"][:20]:
        lines.append(f"  ! {x['drv']}: {x['what']}")
    return "\n".join(lines) + "\n"
