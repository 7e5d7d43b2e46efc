"""``pure gc``, ``pure profile …``, ``pure shell``, ``pure run``: presentation only."""

from __future__ import annotations

import json
import re
import sys

from ..errors import UsageError

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*\Z", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``1024``, ``10K``, ``5M``, ``2GiB``, ``1.5G`` (binary units) → bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"--max-freed: expected a size such as 1024, 500M or 2GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _human(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


# ------------------------------------------------------------------------------------------ gc

def cmd_gc(args, ctx) -> int:
    from ..store import gc

    max_freed = parse_size(args.max_freed) if args.max_freed is not None else None
    with ctx.open_store() as store:
        if args.print_roots or args.print_live or args.print_dead:
            roots, _stale = gc.find_roots(store, prune_stale=False)
            if args.print_roots:
                lines = gc.print_roots(store, roots)
                if args.json:
                    print(json.dumps([{"link": r.link, "path": store.print_path(r.path), "kind": r.kind}
                                      for r in sorted(roots, key=lambda r: (r.link, r.path))], indent=2))
                else:
                    print("\n".join(lines)) if lines else None
                return 0
            live = gc.live_paths(store, roots=roots)
            if args.print_live:
                paths = sorted(live)
            else:
                paths = sorted(set(store.valid_paths()) - live)
            if args.json:
                print(json.dumps([store.print_path(p) for p in paths], indent=2))
            else:
                sys.stdout.write("".join(store.print_path(p) + "\n" for p in paths))
            return 0
        result = gc.collect_garbage(store, dry_run=args.dry_run, max_freed=max_freed)
        if args.json:
            print(json.dumps(result.to_json(store.store_dir), indent=2))
            return 0
        if args.dry_run:
            sys.stdout.write("".join(store.print_path(p) + "\n" for p in result.dead))
            ctx.info(f"would delete {len(result.dead)} store paths "
                     f"({sum(1 for _ in result.pruned_links)} stale roots to prune)")
            return 0
        if not args.quiet:
            sys.stdout.write("".join(store.print_path(p) + "\n" for p in result.deleted))
        for link in result.pruned_links:
            ctx.info(f"removed stale GC root {link!r}")
        extra = f", {len(result.invalid_removed)} invalid leftovers removed" if result.invalid_removed else ""
        ctx.info(f"{len(result.deleted)} store paths deleted, {result.bytes_freed} bytes freed "
                 f"({_human(result.bytes_freed)}){extra}")
    return 0


# ------------------------------------------------------------------------------------ register

def register(reg) -> None:
    p = reg.command(
        "gc", "delete store paths that no GC root reaches", cmd_gc,
        description=(
            "Delete every valid store path that no root keeps alive.\n\n"
            "Roots: symlinks under <state>/gcroots/ (gcroots/auto/ holds `result` links;\n"
            "those whose link was deleted are pruned), profiles and their generations, and\n"
            "temporary roots of running pure processes.  Live = the closure of the roots under\n"
            "references, plus derivers of live paths (keep-derivations, default on) and outputs\n"
            "of live derivations (keep-outputs, default off).  Prints the deleted paths on\n"
            "stdout and a summary on stderr.  Safe to run while builds run."),
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    p.add_argument("--max-freed", metavar="SIZE", default=None,
                   help="stop after freeing SIZE bytes of NAR size (e.g. 500M, 2GiB)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--print-roots", action="store_true", help="print the roots ('LINK -> PATH') and exit")
    g.add_argument("--print-live", action="store_true", help="print the live paths and exit")
    g.add_argument("--print-dead", action="store_true", help="print the dead paths and exit")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="do not list the deleted paths")
