"""``pure gc``, ``pure profile …``, ``pure shell``, ``pure run``: presentation only."""

from __future__ import annotations

import argparse
import json
import re
import sys

from ..errors import UsageError

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b?)\s*\Z", re.I | re.ASCII)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``1024``, ``10K``, ``5M``, ``2GiB``, ``1.5G`` (binary units) → bytes, exactly (no float:
    a number too large for one is simply more than the store holds)."""
    from fractions import Fraction
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"--max-freed: expected a size such as 1024, 500M or 2GiB, got {text!r}")
    return int(Fraction(m.group(1)) * _UNITS[m.group(2).lower()])


def _human(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


# ------------------------------------------------------------------------------------------ gc

def cmd_gc(args, ctx) -> int:
    from .._run import sigterm_interrupts
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
                elif lines:
                    print("\n".join(lines))
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
        with sigterm_interrupts():  # (its trash is removed before it stops)
            result = gc.collect_garbage(store, dry_run=args.dry_run, max_freed=max_freed)
        if args.json:
            print(json.dumps(result.to_json(store.store_dir), indent=2))
            return 0
        if args.dry_run:
            sys.stdout.write("".join(store.print_path(p) + "\n" for p in result.would_delete))
            ctx.info(f"would delete {len(result.would_delete)} of {len(result.dead)} dead store paths, "
                     f"freeing {result.would_free} bytes ({_human(result.would_free)}); "
                     f"{len(result.pruned_links)} stale roots to prune")
            return 0
        if not args.quiet:
            sys.stdout.write("".join(store.print_path(p) + "\n" for p in result.deleted))
        for link in result.pruned_links:
            ctx.info(f"removed stale GC root {link!r}")
        extra = f", {len(result.invalid_removed)} invalid leftovers removed" if result.invalid_removed else ""
        if result.links_removed:
            extra += f", {result.links_removed} unused links of 'pure store optimise' removed"
        if result.log_temps_removed:
            extra += f", {result.log_temps_removed} temporary build log files of killed builds removed"
        ctx.info(f"{len(result.deleted)} store paths deleted, {result.bytes_freed} bytes freed "
                 f"({_human(result.bytes_freed)}){extra}")
    return 0


# ------------------------------------------------------------------------------------- profile

def _profile(ctx, store, args):
    from ..env.profiles import Profile
    return Profile(store, args.profile)


def _note_unknown_profile(ctx, store, prof) -> None:
    """A profile named with -p that has no generation at all: say so on stderr (a misspelt name
    would otherwise list nothing without a word); the default profile before its first install
    is simply empty."""
    if prof.name == "default" or prof.generations():
        return
    from ..env.profiles import list_profiles
    others = [n for n in list_profiles(store) if n != prof.name]
    ctx.info(f"profile {prof.name!r} has no generations yet"
             + (f" (profiles of this store: {', '.join(others)})" if others else ""))


def _fmt_time(t: float) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def cmd_profile_install(args, ctx) -> int:
    from ..build.progress import Progress
    from ..env.installable import realise_installables
    from ..env.profiles import element_for
    from ._warnings import warnings_to

    from ._warnings import warn_missing_search_dirs
    warn_missing_search_dirs(args.include)
    with ctx.open_store() as store:
        prof = _profile(ctx, store, args)
        built = []
        for what in args.installables:
            progress = Progress()
            with warnings_to(progress.message):
                got = realise_installables(store, ctx.settings, what, args.attr or [None],
                                           include_paths=args.include, progress=progress, fork_worker=True)
            if not got:  # (an attribute that is an empty list: installing nothing is a mistake)
                from ..errors import ProfileError
                attrs_ = "".join(f" -A {a}" for a in args.attr or [])
                raise ProfileError(f"nothing to install: {what}{attrs_} gives no package")
            built += got
        before = prof.current_number()
        gen = prof.install([element_for(store, list(b.outputs), b.source) for b in built])
        said = set()
        for b in built:  # (a package given twice is installed once, and said once)
            if tuple(b.outputs) not in said:
                said.add(tuple(b.outputs))
                ctx.info(f"installed {b.name} ({', '.join(store.print_path(p) for p in b.outputs)})")
        if gen.number == before:
            ctx.info(f"profile {prof.name!r} is unchanged: generation {gen.number} has this already")
        else:
            ctx.info(f"profile {prof.name!r} is now at generation {gen.number}")
        print(gen.path)
    return 0


def cmd_profile_remove(args, ctx) -> int:
    with ctx.open_store() as store:
        prof = _profile(ctx, store, args)
        gen, removed = prof.remove(args.elements)
        for e in removed:
            ctx.info(f"removed {e.name}")
        ctx.info(f"profile {prof.name!r} is now at generation {gen.number}")
        print(gen.path)
    return 0


def cmd_profile_list(args, ctx) -> int:
    with ctx.open_store() as store:
        prof = _profile(ctx, store, args)
        _note_unknown_profile(ctx, store, prof)
        elements = prof.elements()
        if args.json:
            print(json.dumps({"profile": prof.link, "generation": prof.current_number(),
                              "path": prof.current_path(),
                              "elements": [dict(e.to_json(), index=i) for i, e in enumerate(elements)]}, indent=2))
            return 0
        for i, e in enumerate(elements):
            print(f"{i} {e.name} {' '.join(e.store_paths)}")
    return 0


def cmd_profile_history(args, ctx) -> int:
    with ctx.open_store() as store:
        prof = _profile(ctx, store, args)
        _note_unknown_profile(ctx, store, prof)
        gens = prof.generations()
        rows = []
        prev: set[str] = set()
        for g in gens:
            try:
                names = {e.name for e in prof.elements(g.path)}
            except Exception:  # noqa: BLE001 - a generation whose path was deleted by hand
                names = set()
            rows.append({"generation": g.number, "path": g.path, "created": _fmt_time(g.created),
                         "current": g.current, "added": sorted(names - prev), "removed": sorted(prev - names)})
            prev = names
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            mark = "   (current)" if r["current"] else ""
            print(f"Version {r['generation']} {r['created']} {r['path']}{mark}")
            for n in r["added"]:
                print(f"  + {n}")
            for n in r["removed"]:
                print(f"  - {n}")
    return 0


def cmd_profile_rollback(args, ctx) -> int:
    with ctx.open_store() as store:
        prof = _profile(ctx, store, args)
        old = prof.current_number()
        g = prof.rollback()
        ctx.info(f"switched profile {prof.name!r} from generation {old} to {g.number}")
    return 0


def cmd_profile_switch(args, ctx) -> int:
    with ctx.open_store() as store:
        prof = _profile(ctx, store, args)
        old = prof.current_number()
        g = prof.switch_generation(args.generation)
        ctx.info(f"switched profile {prof.name!r} from generation {old} to {g.number}")
    return 0


def cmd_profile_delete_generations(args, ctx) -> int:
    with ctx.open_store() as store:
        prof = _profile(ctx, store, args)
        if args.generations == ["old"]:
            nums = None
        else:
            try:
                nums = [int(n) for n in args.generations]
            except ValueError:
                raise UsageError(f"expected generation numbers or 'old', got {' '.join(args.generations)!r}") from None
        gone = prof.delete_generations(nums)
        ctx.info(f"deleted generations {', '.join(map(str, gone)) or '(none)'} of profile {prof.name!r}; "
                 f"run `pure gc` to free their paths")
    return 0


# ------------------------------------------------------------------------------- shell and run

def _built(ctx, store, args):
    from ..build.progress import Progress
    from ..env.installable import realise_installables
    from ._warnings import warn_missing_search_dirs, warnings_to
    warn_missing_search_dirs(args.include)
    progress = Progress()
    with warnings_to(progress.message):
        return realise_installables(store, ctx.settings, args.file, args.attr or [None],
                                    include_paths=args.include, progress=progress, fork_worker=True)


def _inputs(ctx, store, built) -> None:
    from ..build.progress import Progress
    from ..env.installable import realise_inputs
    from ._warnings import warnings_to
    progress = Progress()
    with warnings_to(progress.message):
        realise_inputs(store, ctx.settings, built, progress=progress, fork_worker=True)


def cmd_shell(args, ctx) -> int:
    from ..env.namespace import spawn
    from ..env.shell import interactive_rc, shell_environment

    with ctx.open_store() as store:
        built = _built(ctx, store, args)
        _inputs(ctx, store, built)  # a package fetched came without its build inputs
        senv = shell_environment(store, built, pure=args.pure)
        env = dict(senv.env)
        if args.shell_command is not None:
            argv = [senv.shell, "-c", (senv.hook + "\n" if senv.hook else "") + args.shell_command]
            return spawn(argv, env, settings=ctx.settings)
        env.setdefault("PS1", "[pure-shell:\\w]$ ")
        argv = [senv.shell]
        from ._words import counted
        ctx.info(f"entering a {'pure ' if args.pure else ''}shell with "
                 f"{counted(len(senv.paths), 'store path')} ({senv.shell}); exit to leave")
        import tempfile
        # what an interactive shell reads first (the user's rc file, then PATH and PS1 made
        # the environment's again, then the hook): bash reads --rcfile, a POSIX sh $ENV
        with tempfile.NamedTemporaryFile("w", prefix="pure-shell-rc-", suffix=".sh") as rc:
            rc.write(interactive_rc(senv, env))
            rc.flush()
            if senv.shell.endswith("/bash"):
                argv += ["--rcfile", rc.name]
            else:
                env["ENV"] = rc.name
            if senv.hook:
                argv.append("-i")  # the hook runs even when stdin is not a terminal
            return spawn(argv, env, settings=ctx.settings)


def _split_run_args(args) -> None:
    """argparse hands everything after FILE to ``args``: options before ``--`` are ours, all
    after it the program's.  argparse swallows a ``--`` that directly follows FILE, so where it
    was is read from the command line itself (``pure run FILE -- -x``: ``-x`` is the program's)."""
    rest = list(args.args)
    raw = getattr(args, "raw_argv", None) or []
    after = raw[raw.index("--") + 1:] if "--" in raw else None  # (no option of ours takes '--')
    if after is not None and len(after) <= len(rest) and rest[len(rest) - len(after):] == after:
        ours, theirs = rest[:len(rest) - len(after)], after  # (a '--' before FILE: not this)
        if ours and ours[-1] == "--":
            ours.pop()
    elif "--" in rest:
        ours, theirs = rest[:rest.index("--")], rest[rest.index("--") + 1:]
    elif rest and rest[0].startswith("-"):
        ours, theirs = rest, []
    else:  # no '--': words after FILE are the program's
        ours, theirs = [], rest
    if ours:
        p = argparse.ArgumentParser(prog="pure run", add_help=False)
        p.add_argument("-A", "--attr", action="append")
        p.add_argument("-I", "--include", action="append", default=[])
        p.add_argument("--program")
        got, unknown = p.parse_known_args(ours)
        if unknown:
            raise UsageError(f"pure run: unexpected {' '.join(unknown)!r}; arguments for the program "
                             f"go after '--' (pure run FILE [-A ATTR] -- ARGS)")
        args.attr = (args.attr or []) + (got.attr or []) or None
        args.include = list(args.include) + got.include
        args.program = got.program or args.program
    args.args = theirs


def cmd_run(args, ctx) -> int:
    from ..env.namespace import spawn
    from ..env.shell import find_program, make_environment, environment_paths

    if args.file is None:
        raise UsageError("pure run needs the package to run: an expression file (-A ATTR for one of "
                         "its attributes) or a store path; arguments for its program go after '--'",
                         hint="pure run FILE|PATH [-A ATTR] [-- ARGS...]; see 'pure run --help'")
    _split_run_args(args)
    with ctx.open_store() as store:
        built = _built(ctx, store, args)
        if len(built) != 1:
            raise UsageError(f"pure run needs exactly one package, {args.file!r} gave {len(built)}")
        prog = find_program(store, built[0], args.program)
        env = make_environment(store, environment_paths(store, built), pure=False, shell=False)
        argv = list(args.args)
        return spawn([prog, *argv], env, settings=ctx.settings)


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
                   help="stop once the paths deleted free SIZE bytes (e.g. 500M, 2GiB)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--print-roots", action="store_true", help="print the roots ('LINK -> PATH') and exit")
    g.add_argument("--print-live", action="store_true", help="print the live paths and exit")
    g.add_argument("--print-dead", action="store_true", help="print the dead paths and exit")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="do not list the deleted paths")

    grp = reg.group("profile", "manage profiles: installed packages with numbered generations")

    def sub(name, help_, func, description=None):
        q = reg.command(name, help_, func, group="profile", description=description)
        q.add_argument("--profile", "-p", metavar="NAME", default="default",
                       help="profile name under <state>/profiles (default: default)")
        return q

    q = sub("install", "build and add packages; makes a new generation (if anything changes)", cmd_profile_install,
            description="Build FILE (attribute -A ATTR), or take a valid store path, and add it to the\n"
                        "profile as a new generation. An installed package with the same name (without\n"
                        "version) is replaced, in its place. When the newest generation holds just that\n"
                        "already, no generation is added (the profile switches to that one). Prints the\n"
                        "user environment's store path.")
    q.add_argument("installables", nargs="+", metavar="FILE|PATH")
    q.add_argument("-A", "--attr", action="append", metavar="ATTR", help="attribute of FILE (repeatable)")
    q.add_argument("-I", "--include", action="append", default=[], metavar="PATH",
                   help="extra directory the expression may import from")
    q = sub("remove", "remove packages (by index, name, name without version or store path)",
            cmd_profile_remove)
    q.add_argument("elements", nargs="+", metavar="ELEMENT")
    q = sub("list", "list the packages of the current generation", cmd_profile_list)
    q.add_argument("--json", action="store_true", help="print JSON")
    q = sub("history", "list the generations with what each added and removed", cmd_profile_history)
    q.add_argument("--json", action="store_true", help="print JSON")
    sub("rollback", "switch to the previous generation", cmd_profile_rollback)
    q = sub("switch-generation", "switch to generation N", cmd_profile_switch)
    q.add_argument("generation", type=int, metavar="N")
    q = sub("delete-generations", "delete generations (numbers, or 'old' for all but the current)",
            cmd_profile_delete_generations)
    q.add_argument("generations", nargs="+", metavar="N|old")
    del grp

    p = reg.command(
        "shell", "start a shell (or run a command) with a built environment on PATH", cmd_shell,
        description=(
            "Build FILE (attribute -A ATTR; or take a store path) and start a shell whose PATH\n"
            "(and CPATH, LIBRARY_PATH, PKG_CONFIG_PATH, MANPATH) come from the outputs, their\n"
            "build inputs and their runtime closure. --pure clears the rest of the environment\n"
            "(keeping HOME USER LOGNAME DISPLAY TERM TZ PAGER SHLVL and PURE_*), so PATH holds\n"
            "store paths only. With a rooted store (--store ROOT) the shell runs in a mount\n"
            "namespace where ROOT's store appears at the logical store dir. The shell is bash or\n"
            "sh from the environment, else the host's /bin/sh. A derivation's shellHook attribute\n"
            "runs first (as in nix-shell). Exits with the shell's status (killed by a signal:\n"
            "pure ends by the same signal)."),
    )
    p.add_argument("file", metavar="FILE|PATH", help="expression file, or a store path")
    p.add_argument("-A", "--attr", action="append", metavar="ATTR", help="attribute (repeatable)")
    p.add_argument("-I", "--include", action="append", default=[], metavar="PATH",
                   help="extra directory the expression may import from")
    p.add_argument("--pure", action="store_true", help="clear the rest of the host environment")
    # (not dest "command": that is the name of the command, which errors use to name its --help)
    p.add_argument("--command", "-c", dest="shell_command", metavar="CMD", default=None,
                   help="run CMD with the shell, then exit")

    p = reg.command(
        "run", "build a package and run its program", cmd_run,
        usage="pure run [-h] [-A ATTR] [-I PATH] [--program NAME] FILE|PATH [-- ARGS...]",
        description=(
            "Build FILE (attribute -A ATTR; or take a store path) and run its program with ARGS:\n"
            "--program NAME from its bin/ (of the first output that has one), else the only\n"
            "program there, else the one named like the package without version. The\n"
            "environment's bin directories are put in front of PATH. With a rooted store the\n"
            "program runs in the store namespace (see pure shell).\n"
            "Exits with the program's status (killed by a signal: pure ends by the same signal)."),
    )
    # (optional to argparse so that cmd_run says what is missing: argparse named "-- ARGS" too)
    p.add_argument("file", metavar="FILE|PATH", nargs="?", help="expression file, or a store path")
    p.add_argument("-A", "--attr", action="append", metavar="ATTR", help="attribute")
    p.add_argument("-I", "--include", action="append", default=[], metavar="PATH",
                   help="extra directory the expression may import from")
    p.add_argument("--program", metavar="NAME", default=None, help="which program of bin/ to run")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                   help="arguments for the program (after --)")
