"""``pure build``, ``pure store realise``, ``pure log``: presentation over purestore.build."""

from __future__ import annotations

import hashlib
import json
import os
import sys

_BUILD_HELP = """\
Evaluate FILE (attribute -A ATTR, default `default`), instantiate its derivations, realise them
(substitute or build in the sandbox), link ./result (and ./result-OUTPUT for other outputs,
./result-2… for further derivations) and print the output paths.

FILE may also be a .drv store path, which is realised directly.

Each build runs in a Linux namespace sandbox: it sees only its input closure (read-only), a
writable /build and /tmp, no network (fixed-output derivations aside), uid 1000, hostname
localhost, and exactly the environment of the derivation plus PATH=/path-not-set,
HOME=/homeless-shelter, NIX_STORE, NIX_BUILD_CORES, NIX_BUILD_TOP,
TMPDIR/TEMPDIR/TMP/TEMP/PWD=/build, NIX_LOG_FD=2, TERM=xterm-256color and
SOURCE_DATE_EPOCH=315532800 (1980-01-01).

result links are indirect GC roots. Logs are kept (zstd) in the state dir: `pure log PATH`.

Before anything is fetched, the paths to fetch from binary caches are listed with their
download and unpacked sizes; a package found in a cache is fetched with its run-time closure
only, not its build-time inputs. --dry-run stops there: it asks the caches (narinfos only) and
prints what would be fetched and what built (--json: one object with willBuild and willFetch).
A path a cache has whose reference none can give is fetched once that reference is built here
(listed apart: willFetchAfterBuild).

Exit status: 0 on success, 1 when a build failed (or another error), 2 on bad usage, 104 when
--check/--rounds found a difference, 130 when interrupted (Ctrl-C), 143 on SIGTERM.
"""


def _add_build_options(p) -> None:
    p.add_argument("-j", "--max-jobs", type=_max_jobs, metavar="N", help="run up to N builds at once (default: settings max-jobs; auto: the number of cores; 0: build nothing here, "
                        "only fetch from the substituters, as in Nix)")
    p.add_argument("--cores", type=int, metavar="N", help="NIX_BUILD_CORES given to builders (default: setting cores; 0 = all)")
    p.add_argument("-k", "--keep-going", action="store_true", help="after a failure, keep building what does not depend on it")
    p.add_argument("-K", "--keep-failed", action="store_true", help="keep the build directory of failed builds and say where")
    p.add_argument("--check", action="store_true", help="rebuild already valid outputs and compare their NAR hashes")
    p.add_argument("--rounds", type=int, default=1, metavar="N", help="build N times and compare (N >= 1); only what is built: "
                        "outputs already valid are not, unless --check (then N builds in all, the valid one the first)")
    p.add_argument("-L", "--print-build-logs", action="store_true", help="print build logs as they come")
    p.add_argument("--json", action="store_true", help="print one JSON event per line on stdout")
    p.set_defaults(json_lines=True)
    import argparse
    p.add_argument("--offline", dest="global_offline", action="store_true", default=argparse.SUPPRESS,
                   help="ask no binary cache (the same as `pure --offline build ...`)")
    p.add_argument("--fallback", dest="global_fallback", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help="build what a cache lists but cannot give (the default); --no-fallback: fail instead")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="only say what would be built and what fetched from the binary caches "
                        "(with download sizes); build, fetch and link nothing")
    p.add_argument("--require-provenance", action="store_true",
                   help="substitute only paths with a valid provenance statement by a trusted key "
                        "(see docs/evidence.md)")


def register(reg) -> None:
    p = reg.command("build", "build an expression file (or .drv) and link ./result", cmd_build,
                    description=_BUILD_HELP)
    p.add_argument("file", metavar="FILE", help="expression file (.py) or .drv store path")
    p.add_argument("-A", "--attr", action="append", metavar="ATTR", help="attribute to build (repeatable)")
    p.add_argument("-I", "--include", action="append", default=[], metavar="PATH",
                   help="extra directory the expression may import from")
    p.add_argument("-o", "--out-link", default="result", metavar="NAME", help="name of the result link (default: result)")
    p.add_argument("--no-link", action="store_true", help="do not create result links")
    _add_build_options(p)

    p = reg.command("realise", "realise derivations (build or substitute their outputs)", cmd_realise,
                    group="store", description="Realise each DRV and print its output paths, one per line.")
    p.add_argument("drvs", nargs="+", metavar="DRV")
    _add_build_options(p)

    p = reg.command("log", "print the build log of a derivation or of the derivation of a path", cmd_log,
                    description=_LOG_HELP)
    p.add_argument("path", metavar="PATH|DRV")


_LOG_HELP = """\
Print the build log of DRV, or of the derivation that produced the output PATH.

The local store's logs come first.  Then each binary cache (the configured substituters, or
--substituters, in priority order) is asked for log/<drv base name>: for the derivations the
local store knows for PATH, and for the Deriver of PATH's narinfo in that cache.  Caches hold
the logs that `pure copy --to` (or Nix's `nix store copy-log`) put there.  Logs are not signed;
stderr says which cache a log came from.  --offline asks no cache."""


def _max_jobs(text: str) -> int:
    """-j N, or -j auto (Nix's word for the number of cores)."""
    if text == "auto":
        return os.cpu_count() or 1
    return int(text)


_max_jobs.__name__ = "int or 'auto'"  # (argparse names the type in its error)


def _check_options(args) -> None:
    """Refuse option values that are never right (a usage error), before anything is done:
    whatever the store holds (a no-op build does not run the scheduler), and --dry-run too."""
    from ..errors import UsageError
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    if args.max_jobs is not None and args.max_jobs < 0:
        raise UsageError(f"--max-jobs must be 0 (no local builds: substitution only) or more, got {args.max_jobs}")
    if args.cores is not None and args.cores < 0:
        raise UsageError(f"--cores must be 0 (all cores) or more, got {args.cores}")
    if getattr(args, "out_link", None) == "" and not args.no_link:  # (it linked the working directory)
        raise UsageError("-o/--out-link needs a name for the result link (or --no-link for none)")


def _options(args, settings):
    from ..build.scheduler import BuildOptions
    _check_options(args)
    # an explicit --cores 0 means all cores, also over a configured 'cores = N' (as in Nix)
    return BuildOptions(max_jobs=settings.max_jobs if args.max_jobs is None else args.max_jobs,
                        cores=settings.cores if args.cores is None else args.cores,
                        keep_going=args.keep_going, keep_failed=args.keep_failed, check=args.check,
                        rounds=args.rounds, fork_worker=True)  # a command: nothing else runs


def _settings(ctx, args):
    """The settings with this command's --require-provenance (a real run and --dry-run alike)."""
    if getattr(args, "require_provenance", False):
        return ctx.settings.evolve(require_provenance=True)
    return ctx.settings


def _realise(ctx, store, drvs, args):
    if not args.check and args.rounds == 1:
        from ..build.plan import valid_outputs
        done = valid_outputs(store, drvs)  # nothing to do: skip the scheduler (and importing trio)
        if done is not None:  # (valid_outputs temp-rooted them before checking)
            if args.json:
                print(json.dumps({"type": "plan", "willBuild": [], "willCheck": [], "willFetchAfterBuild": [],
                                  "willSubstitute": [], "valid": sorted(store.print_path(d) for d in done)},
                                 sort_keys=True))
                print(json.dumps({"type": "done"}))  # the same events as a run of the scheduler
            return done
    from .._run import run_trio
    from ..build.progress import Progress
    from ..build.scheduler import realise
    from ._warnings import warnings_to
    progress = Progress(json_stream=sys.stdout if args.json else None, print_logs=args.print_build_logs)
    settings = _settings(ctx, args)
    with warnings_to(None if args.json else progress.message):  # --json: stderr as it is
        return run_trio(realise, store, settings, drvs, _options(args, settings), progress)


def _drv_paths_from_file(ctx, store, args):
    from ..errors import UsageError
    f = args.file
    drv = None
    if f.endswith(".drv") and not os.path.isfile(f) or f.startswith(ctx.settings.store_dir + "/"):
        drv = _drv_arg(store, f)
    elif f.endswith(".drv") and os.path.isfile(f):
        try:
            drv = store.parse_path(f, valid=True)
        except Exception:  # noqa: BLE001 - not a store path: evaluate it as a file below
            pass
    if drv is not None:
        if args.attr:  # (it was ignored: the whole .drv was built)
            raise UsageError("-A selects from an expression file, not from a .drv path")
        return [drv]
    if os.path.dirname(os.path.realpath(f)) == os.path.realpath(store.real_store_dir):
        _drv_arg(store, f)  # a store path itself (`./result`): not an expression to evaluate
    if f.endswith(".drv") and _is_aterm(f):  # (it was evaluated as Python: NameError: 'Derive')
        raise UsageError(f"{f!r} is a derivation outside the store ({ctx.settings.store_dir}): this takes "
                         f"an expression file or a .drv store path",
                         hint="build the expression that made it, or copy it with what it needs from the "
                              "store that holds it (`pure copy`)")
    try:
        from ..expr.loader import evaluate, instantiate
    except ImportError as e:
        raise UsageError("evaluating expression files needs purestore.expr.loader, which is not installed") from e
    from ._warnings import warn_missing_search_dirs
    warn_missing_search_dirs(args.include)
    drvs = []
    for attr in args.attr or [None]:
        result = evaluate(f, attr, ctx.settings, args.include)
        drvs.extend(instantiate(store, result))
    return drvs


def _is_aterm(path: str) -> bool:
    """Whether the file at ``path`` starts as a derivation's ATerm does."""
    try:
        with open(path, "rb") as fh:
            return fh.read(7) == b"Derive("
    except OSError:
        return False  # (the evaluation says what is wrong with it)


def _drv_arg(store, text: str, takes: str = "an expression file or a .drv store path"):
    """The valid ``.drv`` store path ``text`` names; a store path that is not a derivation (an
    output, a source: often a `result` link) is a :class:`UsageError` saying so.  Before, an
    output was read as a damaged derivation (with the hint to repair it), and a `result` link
    to a file was evaluated as an expression."""
    from ..errors import UsageError
    sp = store.parse_path(text)
    if not sp.name.endswith(".drv"):
        shown = store.print_path(sp)
        named = repr(text) if text == shown else f"{text!r} (the store path {shown!r})"
        raise UsageError(f"{named} is not a derivation: this takes {takes}",
                         hint="`pure store path-info --json PATH` names the derivation that made a path; "
                              "`pure shell` and `pure run` take a store path as it is")
    if not store.is_valid(sp):
        store.parse_path(text, valid=True)  # (raises PathNotValid, saying so)
    return sp


def _replace_symlink(target: str, link: str) -> None:
    """Make ``link`` a symlink to ``target`` atomically (over what is there); no temporary is
    left behind when it fails.  The temporary is named by this process, which makes one at a
    time: one there already is a leftover of a killed run that had this pid (pids are reused),
    on which the symlink failed with 'File exists'."""
    tmp = f"{link}.tmp-{os.getpid()}"
    try:
        os.symlink(target, tmp)
    except FileExistsError:
        os.unlink(tmp)
        os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _link(ctx, store, results, drvs, base: str) -> list[str]:
    """Create result links (indirect GC roots); returns the links made."""
    from ..errors import StoreError
    from ..formats.hash import fold20, nix32_encode
    from ..store.roots import auto_roots_dir
    links = []
    for i, d in enumerate(drvs):
        for name, sp in sorted(results[d].items(), key=lambda kv: (kv[0] != "out", kv[0])):
            link = base + (f"-{i + 1}" if i else "") + ("" if name == "out" else f"-{name}")
            try:
                link = os.path.abspath(link)
            except FileNotFoundError:  # (os.getcwd(): the working directory was removed meanwhile)
                raise StoreError(f"cannot create the result link {link!r}: the working directory no longer "
                                 "exists (the outputs are built and valid)",
                                 hint="run pure from an existing directory, or give -o an absolute path "
                                      "(or --no-link)") from None
            target = store.print_path(sp) if not ctx.settings.rooted else store.real_path(sp)
            if os.path.lexists(link) and not os.path.islink(link):
                raise StoreError(f"cannot create the result link {link!r}: something else than a "
                                 "symlink is there (only a link is replaced)")
            try:
                _replace_symlink(target, link)
            except OSError as e:
                raise StoreError(f"cannot create the result link {link!r}: {e.strerror}") from e
            # then its GC root (the output is temp-rooted by this process meanwhile; a root
            # made first could be pruned as stale before the link exists, as Nix's order avoids).
            # A root that cannot be made (a store this user may only read, a full disk) takes
            # the link away again: left, it would look like a root while the next collection
            # deletes what it points to.
            root = os.path.join(auto_roots_dir(ctx.settings.state_dir),
                                nix32_encode(fold20(hashlib.sha256(os.fsencode(link)).digest())))
            try:
                if not (os.path.islink(root) and os.readlink(root) == link):
                    os.makedirs(os.path.dirname(root), exist_ok=True)
                    _replace_symlink(link, root)
            except OSError as e:
                try:
                    if os.readlink(link) == target:
                        os.unlink(link)
                except OSError:
                    pass
                raise StoreError(f"cannot make the GC root {root!r} of the result link {link!r} "
                                 f"(no link made): {e.strerror}",
                                 # (a store this user may only read: the CLI's hint says so)
                                 hint=None if store.read_only else "--no-link builds without a result link") from e
            links.append(link)
    return links


def _dry_run(ctx, store, drvs, args) -> int:
    from .._run import run_trio
    from ..build.progress import after_build_lines, build_lines, fetch_lines
    from ..build.scheduler import plan
    from ._warnings import warnings_to
    if args.check or args.rounds != 1:
        from ..errors import UsageError
        raise UsageError("--dry-run does not combine with --check or --rounds")
    with warnings_to(ctx.info):
        p = run_trio(plan, store, _settings(ctx, args), drvs)
    if args.json:
        print(json.dumps(p.to_json(), sort_keys=True))
        return 0
    late = p.will_fetch_after_build
    lines = (build_lines(p.will_build) + fetch_lines([f[0] for f in p.will_fetch], p.download_size, p.nar_size)
             + after_build_lines([f[0] for f in late], sum(f[2] for f in late), sum(f[3] for f in late)))
    if p.will_build and _options(args, ctx.settings).max_jobs == 0:
        lines.append("max-jobs is 0: a real run would build none of them, and fail")
    for line in lines or ["nothing to build or fetch: every output is valid"]:
        ctx.info(line)
    return 0


def cmd_build(args, ctx) -> int:
    _check_options(args)
    with ctx.open_store() as store:
        drvs = _drv_paths_from_file(ctx, store, args)
        if args.dry_run:
            return _dry_run(ctx, store, drvs, args)
        results = _realise(ctx, store, drvs, args)
        links = [] if args.no_link else _link(ctx, store, results, drvs, args.out_link)
        _print_results(store, results, drvs, args, links)
    return 0


def cmd_realise(args, ctx) -> int:
    _check_options(args)
    with ctx.open_store() as store:
        drvs = [_drv_arg(store, d, ".drv store paths") for d in args.drvs]
        if args.dry_run:
            return _dry_run(ctx, store, drvs, args)
        results = _realise(ctx, store, drvs, args)
        _print_results(store, results, drvs, args, [])
    return 0


def _print_results(store, results, drvs, args, links) -> None:
    if args.json:
        print(json.dumps({"type": "result", "links": links, "results": [
            {"drv": store.print_path(d), "outputs": {n: store.print_path(p) for n, p in sorted(results[d].items())}}
            for d in drvs]}, sort_keys=True))
        return
    seen = set()
    for d in drvs:
        for _, p in sorted(results[d].items()):
            if p not in seen:
                seen.add(p)
                print(store.print_path(p))


def cmd_log(args, ctx) -> int:
    from ..store.build_logs import read_log
    from ..errors import PathNotValid
    settings = ctx.settings
    with ctx.open_store() as store:
        sp = store.parse_path(args.path)
        candidates = [sp] if sp.name.endswith(".drv") else []
        if not candidates:
            d = store.query_deriver(sp) if store.is_valid(sp) else None
            # the deriver is usually also recorded as having sp as an output: name it once
            candidates = list(dict.fromkeys(([d] if d else []) + store.query_derivers_of(sp)))
        for c in candidates:
            data = read_log(settings.state_dir, c.base_name)
            if data is not None:
                _write_log(data)
                return 0
        where = (f"looked for the logs of {', '.join(store.print_path(c) for c in candidates)}"
                 if candidates else "its deriver is unknown here")
        if settings.offline or not settings.substituters:
            raise PathNotValid(f"no build log for {store.print_path(sp)!r} ({where}; "
                               + ("--offline: binary caches not asked)" if settings.offline
                                  else "no binary caches configured)"))
        from .._run import run_trio
        from ..cache.logs import fetch_build_log
        search = run_trio(fetch_build_log, settings, sp, candidates)
        if search.found is None:
            caches = f"the binary caches {' '.join(search.caches)}"
            if search.drvs:
                why = (f"looked for the logs of {', '.join(store.print_path(c) for c in search.drvs)} in the "
                       + (f"local store and in {caches}" if search.caches
                          else "local store; no binary cache could be used"))
            else:
                why = (f"its deriver is unknown: neither the local store nor {caches} name it" if search.caches
                       else "its deriver is unknown here, and no binary cache could be used")
            raise PathNotValid(f"no build log for {store.print_path(sp)!r} ({why})")
        f = search.found
        ctx.info(f"build log of {store.print_path(f.drv)} from {f.url} (cache logs are not signed)")
        _write_log(f.data)
    return 0


def _write_log(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
