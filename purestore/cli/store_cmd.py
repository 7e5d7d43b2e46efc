"""``pure store …``: add, path-info, ls, references, requisites, verify, copy-sigs, delete.

Presentation only; the work is :class:`purestore.store.local.LocalStore`.
"""

from __future__ import annotations

import json
import sys

_ADD_HELP = """\
Copy PATH into the store and print the store path.

By default PATH is added recursively (its NAR, like `nix-store --add`): the store path is a
`source` path of its NAR hash and NAME (default: PATH's base name). With --flat, PATH must be a
regular file and the store path is the fixed sha256 path of its contents (like
`nix-store --add-fixed sha256`). With --store-dir /nix/store the paths equal Nix's.

The copy is atomic: it is written under a temporary name with canonical metadata (mtime 1,
modes 0444/0555) while being hashed, renamed into place and then registered, so an interrupted
add leaves nothing valid behind.

examples:
  pure store add ./src                         /pure/store/<hash>-src
  pure store add --flat ./hello.tar.gz         the path fetchurl gives that file
  pure store add --name patch-1 ./fix.patch
  pure --store-dir /nix/store store add -n ./src   Nix's path for ./src, nothing copied
"""

_PATH_INFO_HELP = """\
Show what the store records for valid paths: NAR hash and size, references, deriver,
signatures, content address, registration time. Without --json, prints one line per path with
the sizes asked for (-s NAR size, -S closure size), tab-separated.

PATH may be a store path, a file inside one, a symlink to one (such as `result`), the physical
path in a rooted store, or a base name <hash>-<name>.

examples:
  pure store path-info ./result
  pure store path-info -rsS ./result           the closure, with NAR and closure sizes
  pure store path-info --json <hash>-hello-2.10
"""

_VERIFY_HELP = """\
Check that every valid path (or each PATH, with -r its closure) exists on disk and that no
reference dangles; with --check-contents also that each path's NAR hash and size match the
database. Exits 1 when problems are found.

With --sigs-needed N each path must also be trusted: carry valid signatures by N different keys
of trusted-public-keys (the setting, or --trusted-public-keys), made over the path as this
store records it (path, NAR hash, NAR size, references), or be content-addressed (its CA field
gives back its path, as for added sources and fetched files). Signatures that the binary
caches given with --substituter hold for the same contents count too, without being stored
(`pure store copy-sigs` stores them). Like `nix store verify --sigs-needed N`.

examples:
  pure store verify                            every valid path exists, no dangling reference
  pure store verify --check-contents -r ./result   also rehash the closure of ./result
  pure store verify --check-contents --repair  fetch damaged paths again from the substituters
  pure store verify --sigs-needed 1 -r ./result
"""

_COPY_SIGS_HELP = """\
Add to valid paths the signatures that binary caches hold for the same contents.

  pure store copy-sigs -r -s https://cache.example.org/ ./result

For each PATH, each cache's narinfo is read; when its NAR hash, NAR size and references equal
the local ones, its signatures by trusted keys (trusted-public-keys, or --trusted-public-keys)
that verify are added to the local path info. So a path built here and by a trusted builder
gets that builder's signature: evidence that both produced the same bytes, which `pure copy
--to` then passes on. Unlike `nix store copy-sigs`, a signature by an untrusted key or one that
does not verify is not copied; both are reported, and so is a cache that holds different
contents for the path (the build did not reproduce there, or one side is corrupted).
"""


def _count(text: str) -> int:
    import argparse
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of signatures (0 or more), got {text!r}")
    return n


def register(reg) -> None:
    reg.group("store", help="manage the local store (add paths, query, verify, delete)")

    p = reg.command("add", "add files or trees to the store", cmd_add, group="store",
                    description=_ADD_HELP)
    p.add_argument("paths", nargs="+", metavar="PATH", help="file, directory or symlink to add")
    p.add_argument("--name", help="store path name (default: the base name of PATH)")
    p.add_argument("--flat", action="store_true",
                   help="add a regular file by the sha256 of its contents (fixed path)")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="print the store path without copying anything")

    p = reg.command("path-info", "show path info (hash, size, references, signatures)",
                    cmd_path_info, group="store", description=_PATH_INFO_HELP)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print JSON like `nix path-info --json`")
    p.add_argument("-r", "--recursive", action="store_true", help="show the whole closure of PATH")
    p.add_argument("-s", "--size", action="store_true", help="show the NAR size")
    p.add_argument("-S", "--closure-size", action="store_true", help="show the closure size")

    p = reg.command("ls", "list all valid paths", cmd_ls, group="store")
    p.add_argument("--json", action="store_true", help="print a JSON list of paths")

    p = reg.command("references", "list the paths PATH refers to", cmd_references, group="store")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = reg.command("referrers", "list the valid paths that refer to PATH", cmd_referrers, group="store")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = reg.command("requisites", "list the closure of PATHs (dependencies first)", cmd_requisites,
                    group="store")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = reg.command("verify", "check the store's consistency (and trust); exit 1 and list problems if any",
                    cmd_verify, group="store", description=_VERIFY_HELP)
    p.add_argument("paths", nargs="*", metavar="PATH", help="check only these paths (default: all valid paths)")
    p.add_argument("-r", "--recursive", action="store_true", help="check the closures of PATHs")
    p.add_argument("--check-contents", action="store_true", help="rehash every valid path")
    p.add_argument("--sigs-needed", type=_count, default=0, metavar="N",
                   help="each path needs valid signatures by N different trusted keys (or a content "
                        "address that gives back its path)")
    p.add_argument("-s", "--substituter", action="append", default=[], metavar="URL",
                   help="with --sigs-needed, also count the signatures this binary cache holds for "
                        "the same contents (may be repeated)")
    p.add_argument("--repair", action="store_true",
                   help="fetch missing or corrupted paths again from the substituters (signatures "
                        "and NAR hashes checked) and put them back")
    p.add_argument("--json", action="store_true", help="print a JSON report")

    p = reg.command("copy-sigs", "add signatures that binary caches hold for the same contents",
                    cmd_copy_sigs, group="store", description=_COPY_SIGS_HELP)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("-r", "--recursive", action="store_true", help="the closures of PATHs")
    p.add_argument("-s", "--substituter", action="append", default=[], metavar="URL",
                   help="binary cache to take signatures from (may be repeated; default: the "
                        "substituters setting)")
    p.add_argument("--json", action="store_true", help="print a JSON report")

    p = reg.command("optimise", "save space: hard-link files with equal contents", cmd_optimise, group="store",
                    description=_OPTIMISE_HELP)
    p.add_argument("paths", nargs="*", metavar="PATH", help="only these paths (default: every valid path)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")

    p = reg.command("delete", "delete paths that nothing refers to and no root keeps", cmd_delete, group="store",
                    description="Delete valid paths, like `nix-store --delete`. Refuses (and deletes nothing)\n"
                                "while a path is referenced by a valid path not being deleted too, or kept\n"
                                "alive by a GC root (such as ./result), a profile or a running process.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="store paths, files in them, links to them (./result) or <hash>-<name>")


_OPTIMISE_HELP = """\
Replace files with equal contents (and executable bit) by hard links to one copy, as Nix's
`nix-store --optimise`: each file is named by its NAR hash under <store dir>/.links/. Paths keep
their NAR hashes, modes and times. An existing .links entry is rehashed before it is used, so a
damaged one is replaced instead of spread. `pure gc` removes the entries no path uses any more.
Safe while builds run; a second run at once waits for the first."""


def cmd_optimise(args, ctx) -> int:
    from ..store.optimise import optimise_store
    with ctx.open_store() as store:
        paths = [store.parse_path(p, valid=True) for p in args.paths] if args.paths else None
        tty = sys.stderr.isatty() and not args.json
        step = [0.0]

        def progress(done: int, total: int) -> None:
            import time
            now = time.monotonic()
            if tty and (now - step[0] > 0.2 or done == total):
                step[0] = now
                sys.stderr.write(f"\roptimising: {done}/{total} paths\x1b[K")
                if done == total:
                    sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
        r = optimise_store(store, paths, progress=progress,
                           on_wait=lambda: ctx.info("waiting for another 'pure store optimise' to finish..."))
    if args.json:
        _print_json(r.to_json())
        return 0
    from ._words import counted
    repaired = f"; {counted(r.entries_repaired, 'damaged link')} replaced" if r.entries_repaired else ""
    skipped = (f"; {counted(r.skipped, 'file')} left as they were (gone meanwhile, or at the link limit)"
               if r.skipped else "")
    ctx.info(f"{counted(r.linked, 'file')} hard-linked, {r.bytes_saved} bytes ({r.bytes_saved / (1 << 20):.2f} MiB) "
             f"saved; {counted(r.files, 'file')} in {counted(r.paths, 'path')} looked at{repaired}{skipped}")
    return 0


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")


def cmd_add(args, ctx) -> int:
    from ..errors import UsageError

    if args.name is not None and len(args.paths) > 1:
        raise UsageError(f"--name applies to one path, got {len(args.paths)} paths")
    if args.dry_run:  # computing paths needs no store (nothing is created)
        from ..store.adding import compute_add_path
        sd = ctx.settings.store_dir
        for path in args.paths:
            print(f"{sd}/{compute_add_path(path, args.name, flat=args.flat, store_dir=sd).base_name}", flush=True)
        return 0
    with ctx.open_store() as store:
        for path in args.paths:
            sp = store.add_path(path, args.name, flat=args.flat)
            print(store.print_path(sp), flush=True)
    return 0


def cmd_path_info(args, ctx) -> int:
    with ctx.open_store() as store:
        roots = [store.parse_path(p, valid=True) for p in args.paths]
        paths = store.topo_sort(store.query_closure(roots)) if args.recursive else list(dict.fromkeys(roots))
        infos = [store.query_path_info(sp) for sp in paths]
        closure = {sp: store.closure_size([sp]) for sp in paths} if args.closure_size else {}
        if args.json:
            _print_json([i.to_json(store.store_dir, closure.get(i.path)) for i in infos])
            return 0
        width = max((len(store.print_path(i.path)) for i in infos), default=0)
        for i in infos:
            name = store.print_path(i.path)
            cols = [name.ljust(width) if args.size or args.closure_size else name]  # padded, as Nix
            if args.size:
                cols.append(f"{i.nar_size:>11}")
            if args.closure_size:
                cols.append(f"{closure[i.path]:>11}")
            print("\t".join(cols))
    return 0


def _print_paths(store, paths, as_json: bool) -> None:
    text = [store.print_path(sp) for sp in paths]
    if as_json:
        _print_json(text)
    else:
        for t in text:
            print(t)


def cmd_ls(args, ctx) -> int:
    with ctx.open_store() as store:
        _print_paths(store, store.valid_paths(), args.json)
    return 0


def cmd_references(args, ctx) -> int:
    with ctx.open_store() as store:
        sp = store.parse_path(args.path, valid=True)
        _print_paths(store, sorted(store.query_references(sp)), args.json)
    return 0


def cmd_referrers(args, ctx) -> int:
    with ctx.open_store() as store:
        sp = store.parse_path(args.path, valid=True)
        _print_paths(store, sorted(store.query_referrers(sp)), args.json)
    return 0


def cmd_requisites(args, ctx) -> int:
    with ctx.open_store() as store:
        roots = [store.parse_path(p, valid=True) for p in args.paths]
        _print_paths(store, store.topo_sort(store.query_closure(roots)), args.json)
    return 0


def _trusted_keys(ctx, what: str):
    from ..errors import UsageError
    from ..formats.signing import parse_public_keys
    trusted = parse_public_keys(ctx.settings.trusted_public_keys)
    if not trusted:
        raise UsageError(f"{what} needs trusted keys, and none are set",
                         hint="set trusted-public-keys in the config file, or pass "
                              "--trusted-public-keys 'NAME:BASE64 ...' before the command")
    return trusted


def _chosen_paths(store, args):
    roots = [store.parse_path(p, valid=True) for p in args.paths]
    return store.topo_sort(store.query_closure(roots)) if args.recursive else list(dict.fromkeys(roots))


def _warn_failures(ctx, store, failures) -> None:
    for url, path, why in failures:
        ctx.info(f"warning: cannot read {url} for {store.print_path(path)}: {why}")


def cmd_verify(args, ctx) -> int:
    from ..errors import UsageError
    if args.recursive and not args.paths:
        raise UsageError("--recursive needs PATHs (without them every valid path is checked)")
    if args.substituter and not args.sigs_needed:
        raise UsageError("--substituter is for counting signatures: use it with --sigs-needed N")
    trusted = _trusted_keys(ctx, "--sigs-needed") if args.sigs_needed else None
    with ctx.open_store() as store:
        paths = _chosen_paths(store, args) if args.paths else None
        more_sigs = None
        if args.substituter:
            from .._run import run_trio
            from ..cache.sigs import cache_narinfos, sigs_for_same_contents
            chosen = paths if paths is not None else store.valid_paths()
            found = run_trio(lambda: cache_narinfos(ctx.settings, chosen, args.substituter))
            _warn_failures(ctx, store, found.failures)
            more_sigs, differs = sigs_for_same_contents(store, found)
            for sp, url, why in differs:
                ctx.info(f"warning: {url} holds other contents for {store.print_path(sp)}: {why}")
        report = store.verify(check_contents=args.check_contents, paths=paths,
                              sigs_needed=args.sigs_needed, trusted=trusted, more_sigs=more_sigs)
        repaired = []
        if getattr(args, "repair", False) and not report.ok:
            from ..build.repair import repair_report
            report, repaired = repair_report(store, ctx.settings, report, info=ctx.info)
    if args.json:
        _print_json({"checked": report.checked, "ok": report.ok,
                     "problems": [{"path": p.path, "kind": p.kind, "message": p.message}
                                  for p in report.problems],
                     **({"repaired": repaired} if getattr(args, "repair", False) else {})})
    else:
        for p in report.problems:
            print(f"{p.kind}: {p.message}")
        from ._words import counted
        ctx.info(f"checked {counted(report.checked, 'path')}: "
                 + ("no problems" if report.ok else counted(len(report.problems), "problem")))
    return 0 if report.ok else 1


def cmd_copy_sigs(args, ctx) -> int:
    from .._run import run_trio
    from ..cache.sigs import copy_sigs
    from ..errors import UsageError
    trusted = _trusted_keys(ctx, "copy-sigs (it copies only signatures by trusted keys)")
    urls = args.substituter or ([] if ctx.settings.offline else list(ctx.settings.substituters))
    if not urls:
        raise UsageError("no binary cache to take signatures from"
                         + (" (--offline leaves out the substituters)" if ctx.settings.offline else ""),
                         hint="pass -s URL, or set substituters in the config file")
    with ctx.open_store() as store:
        paths = _chosen_paths(store, args)
        # caches named with -s must work; of the configured ones, an unusable one is a warning
        copies, found = run_trio(lambda: copy_sigs(store, ctx.settings, paths, urls, trusted,
                                                   strict=bool(args.substituter)))
        _warn_failures(ctx, store, found.failures)
        if args.json:
            _print_json([c.to_json(store.store_dir) for c in copies])
        for c in copies:
            where = store.print_path(c.path)
            for key, url, _sig in c.added:
                if not args.json:
                    print(f"{where}: added the signature by {key!r} from {url}")
            for key, url, why in c.left_out:
                ctx.info(f"{where}: left out the signature by {key!r} from {url}: {why}")
            for url, why in c.differs:
                ctx.info(f"warning: {url} holds other contents for {where}: {why}")
        n_sigs = sum(len(c.added) for c in copies)
        n_paths = sum(1 for c in copies if c.added)
        ctx.info(f"added {n_sigs} signature{'s' if n_sigs != 1 else ''} to {n_paths} of "
                 f"{len(copies)} path{'s' if len(copies) != 1 else ''}")
    return 0


def cmd_delete(args, ctx) -> int:
    with ctx.open_store() as store:
        targets = [store.parse_path(p, valid=True) for p in args.paths]
        for sp in store.delete(targets):
            ctx.info(f"deleted {store.print_path(sp)}")
    return 0
