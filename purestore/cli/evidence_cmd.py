"""``pure sbom``, ``pure provenance [verify]``, ``pure report``, ``pure why-depends``: supply-chain evidence."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ._duration import duration
from ._outfiles import file_name


def register(reg) -> None:
    p = reg.command(
        "sbom", "print a software bill of materials (CycloneDX or SPDX JSON) of a built path",
        cmd_sbom,
        description=(
            "Print the SBOM of TARGET: a store path (an output, or a .drv), a result link, or an\n"
            "expression file (with -A ATTR). It is made from the derivation graph and the store's\n"
            "metadata, not by scanning binaries: one component per store path of the build\n"
            "closure with its NAR sha256, name and version, whether it is needed at run time\n"
            "(in the output's reference closure: scope 'required') or only to build it (scope\n"
            "'excluded'), the dependency graph, and for fetched inputs their URLs and pinned hash.\n"
            "The CycloneDX output follows the official 1.6 schema; --validate checks it against\n"
            "that schema (bundled with cyclonedx-python-lib) before printing. With --format\n"
            "spdx-json, --validate checks the SPDX 2.3 document with the SPDX project's own parser\n"
            "and validator (spdx-tools)."),
    )
    p.add_argument("target", metavar="PATH|FILE", help="store path, .drv, result link, or expression file")
    p.add_argument("-A", "--attr", metavar="ATTR", help="attribute of the expression file (default: default)")
    p.add_argument("--format", choices=("cyclonedx-json", "spdx-json"), default="cyclonedx-json",
                   help="output format (default cyclonedx-json, spec 1.6; spdx-json is SPDX 2.3)")
    p.add_argument("--runtime-only", action="store_true",
                   help="only the run-time closure (leave out build-time-only components)")
    p.add_argument("-o", "--output", metavar="FILE", type=file_name, help="write to FILE instead of standard output")
    p.add_argument("--validate", action="store_true",
                   help="validate the output first: CycloneDX against the official schema (takes "
                        "seconds), SPDX with the SPDX project's validator")

    p = reg.command(
        "provenance", "write or verify signed SLSA provenance of a built path", cmd_provenance,
        usage=("pure provenance PATH --key-file KEY [-o FILE]\n"
               "       pure provenance verify FILE --trusted-key PUB [--trusted-key PUB...] [PATH]"),
        description=(
            "pure provenance PATH --key-file KEY: describe how PATH was built as an in-toto\n"
            "Statement v1 with a SLSA Provenance v1 predicate (subject: PATH and its NAR sha256;\n"
            "build definition: its derivation and resolved inputs with digests; run details:\n"
            "builder, purestore version, start and finish times), signed in a DSSE envelope with\n"
            "an ed25519 key in the caches' format ('pure key generate'). The envelope is kept in\n"
            "the store's state (so 'pure copy' uploads it next to the narinfo) and printed, or\n"
            "written to FILE with -o.\n\n"
            "pure provenance verify FILE --trusted-key PUB [PATH]: check the envelope's signature\n"
            "by a trusted key, and that its subject digest matches the store's NAR hash of PATH\n"
            "(or of every subject when no PATH is given). Exits 1 with the reason otherwise."),
    )
    # argparse cannot take positionals on both sides of an option ("verify FILE --trusted-key K
    # PATH"), so everything after the first positional is parsed again, intermixed, below.
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG", help="PATH, or 'verify' FILE [PATH]")
    _provenance_options(p)
    p.set_defaults(provenance_parser=p)  # its help, for a -h/--help after the first positional

    p = reg.command(
        "report", "hermeticity report: builds, network use, pinning, reproducibility, cache hits",
        cmd_report,
        description=(
            "Summarise the store's records: builds run; the share built without network (only\n"
            "fixed-output fetches get it); the share of network-using builds pinned by hash;\n"
            "the reproducibility rate over --check/--rounds runs, listing failing derivations;\n"
            "the cache hit rate (substituted vs built); sandbox refusals. --json for dashboards."),
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--since", metavar="DURATION", type=duration,
                   help="only records of the last DURATION: seconds, or with a unit (90m, 12h, 7d, 2w)")

    p = reg.command(
        "why-depends", "show why PATH depends on DEP: the chain of references", cmd_why_depends,
        description=(
            "Print a shortest chain of references from PATH to DEP (both store paths or result\n"
            "links), and for each link the files of the referrer that mention the next path.\n"
            "Exits 1 when PATH does not depend on DEP (with --json, after printing [])."),
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("dep", metavar="DEP")
    p.add_argument("--all", action="store_true",
                   help="show every path from PATH to DEP as a tree (with --json: every node with its references)")
    p.add_argument("--json", action="store_true", help="print the chain as a JSON list")


# -- sbom ------------------------------------------------------------------------------------


def _emit(text: str, output: str | None) -> None:
    if output and output != "-":
        from ..errors import UsageError
        from ._outfiles import replace_file
        try:
            replace_file(output, text)
        except OSError as e:
            raise UsageError(f"cannot write {output!r}: {e.strerror}") from e
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def _targets_of(store, ctx, target: str, attr: str | None) -> list[str]:
    """Store paths named by TARGET: a store path / result link, or the outputs of an expression."""
    from ..errors import InvalidStorePath, UsageError
    is_expr = target.endswith(".py") and os.path.isfile(target)
    if not is_expr:
        if attr:
            raise UsageError("-A ATTR needs an expression file as TARGET")
        try:
            return [store.print_path(store.parse_path(target))]
        except InvalidStorePath as e:
            if target.endswith(".py"):  # meant as an expression file (as `pure build` says)
                raise UsageError(f"expression file {os.path.abspath(target)!r} does not exist or "
                                 "is not a file") from e
            raise
    return _instantiate(store, ctx, target, attr)


def _instantiate(store, ctx, file: str, attr: str | None) -> list[str]:
    """Evaluate FILE (-A ATTR) and return the .drv paths it instantiates to."""
    from ..errors import UsageError
    try:
        from ..expr.loader import evaluate, instantiate
    except ImportError as e:
        raise UsageError(f"cannot evaluate {file!r}: the expression evaluator is not available ({e})",
                         hint="pass the built store path (or ./result) instead") from e
    result = evaluate(file, attr, ctx.settings)
    return [store.print_path(d) for d in instantiate(store, result)]


def cmd_sbom(args, ctx) -> int:
    from ..build.sbom import render, sbom_of_paths
    with ctx.open_store() as store:
        targets = _targets_of(store, ctx, args.target, args.attr)
        sbom = sbom_of_paths(store, targets)
    for w in sbom.warnings:
        ctx.info(f"warning: {w}")
    if args.runtime_only:
        sbom = sbom.runtime_only()
    _emit(render(sbom, args.format, validate=args.validate), args.output)
    return 0


# -- provenance ------------------------------------------------------------------------------


def _provenance_options(p, suppress: bool = False) -> None:
    d = (lambda x: argparse.SUPPRESS) if suppress else (lambda x: x)
    p.add_argument("--key-file", metavar="KEY", default=d(None), help="secret key file to sign with")
    p.add_argument("-o", "--output", metavar="FILE", default=d(None), type=file_name,
                   help="write the envelope to FILE instead of standard output")
    p.add_argument("--trusted-key", metavar="PUB", action="append", default=d([]),
                   help="trusted public key 'name:base64' or a file holding one (repeatable)")
    p.add_argument("--allow-unrecorded", action="store_true", default=d(False),
                   help="sign even when this store has no record of building the path (no times)")
    p.add_argument("--json", action="store_true", default=d(False),
                   help="verify: print the verified statement as JSON")


def _reparse_provenance(args) -> None:
    from ..errors import UsageError

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(f"pure provenance: {message}", hint="see 'pure provenance --help'")

    inner = Parser(prog="pure provenance", add_help=False)
    inner.add_argument("args", nargs="*")
    _provenance_options(inner, suppress=True)
    ns = inner.parse_intermixed_args(args.args)
    for k, v in vars(ns).items():
        if k == "trusted_key":
            args.trusted_key = list(args.trusted_key) + list(v)
        else:
            setattr(args, k, v)


def _load_trusted(specs: list[str]):
    """``--trusted-key`` values: a key (``NAME:BASE64``) or a file of keys; an error names the
    value or the file."""
    import re

    from ..errors import KeyError_, UsageError
    from ..formats.signing import parse_public_keys
    texts = []
    for s in specs:
        if not os.path.lexists(s) and re.fullmatch(r"[^/:\s]+:\S*", s):
            texts.append(s)
            continue
        try:
            with open(s, encoding="utf-8") as f:
                found = f.read().split()
        except OSError as e:
            raise UsageError(f"cannot read trusted key file {s!r}: {e.strerror}",
                             hint="--trusted-key takes NAME:BASE64 or a file holding such keys") from None
        except UnicodeDecodeError:
            raise UsageError(f"trusted key file {s!r} is not text",
                             hint="--trusted-key takes NAME:BASE64 or a file holding such keys") from None
        try:
            parse_public_keys(found)
        except KeyError_ as e:
            raise KeyError_(f"trusted key file {s!r}: {e}", hint=e.hint) from None
        texts.extend(found)
    if not texts:
        raise UsageError("no trusted key given", hint="pass --trusted-key NAME:BASE64 (or a file holding it)")
    return parse_public_keys(texts)


def cmd_provenance(args, ctx) -> int:
    from ..errors import UsageError
    words = args.args[:args.args.index("--")] if "--" in args.args else args.args
    if "-h" in words or "--help" in words:  # 'pure provenance verify --help': REMAINDER took it
        args.provenance_parser.print_help()
        return 0
    _reparse_provenance(args)
    if not args.args:
        raise UsageError("pure provenance needs a PATH (or 'verify FILE')")
    if args.args[0] == "verify":
        rest = args.args[1:]
        if not 1 <= len(rest) <= 2:
            raise UsageError("usage: pure provenance verify FILE --trusted-key PUB [PATH]")
        if args.key_file:
            raise UsageError("--key-file is for signing; verify takes --trusted-key")
        return _provenance_verify(args, ctx, rest[0], rest[1] if len(rest) == 2 else None)
    if len(args.args) != 1:
        raise UsageError(f"expected one PATH, got {len(args.args)} arguments: {' '.join(args.args)}")
    if not args.key_file:
        raise UsageError("pure provenance PATH needs --key-file KEY",
                         hint="create a key with 'pure key generate'")
    if args.trusted_key:
        raise UsageError("--trusted-key is for 'pure provenance verify'")
    return _provenance_make(args, ctx, args.args[0])


def _provenance_make(args, ctx, target: str) -> int:
    from ..build.provenance import make_and_keep_provenance
    from ..cache.push import load_secret_key
    from ..store.provenance import provenance_path
    key = load_secret_key(args.key_file)  # errors name the file (and never quote a secret)
    with ctx.open_store() as store:
        sp = store.parse_path(target, valid=True)
        data, where = make_and_keep_provenance(store, sp, key, require_build_record=not args.allow_unrecorded)
    if where is not None:
        ctx.info(f"signed provenance of {store.print_path(sp)} with key {key.name!r} (kept in {where})")
    else:
        ctx.info(f"signed provenance of {store.print_path(sp)} with key {key.name!r}; not kept in the "
                 f"store, which keeps a statement of this path already ({provenance_path(store, sp)}): "
                 "one without a build record does not replace it")
    _emit(data.decode(), args.output)
    return 0


def _provenance_verify(args, ctx, file: str, target: str | None) -> int:
    from ..build.provenance import verify_provenance
    from ..errors import UsageError
    trusted = _load_trusted(args.trusted_key)
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read provenance file {file!r}: {e.strerror}") from e
    with ctx.open_store() as store:
        sp = store.parse_path(target, valid=True) if target else None
        v = verify_provenance(store, data, trusted, sp, where=file)
    if args.json:
        print(json.dumps({"key": v.key_name, "statement": v.statement}, indent=2))
    else:
        # what was checked: PATH, or every subject
        names = store.print_path(sp) if sp is not None else ", ".join(v.subject_names())
        print(f"ok: {file} is signed by {v.key_name!r} and matches the store for {names}")
    return 0


# -- report ----------------------------------------------------------------------------------


def cmd_report(args, ctx) -> int:
    import time
    from ..build.report import make_report, render_report
    # (a window reaching back before 1970 takes everything: since the epoch)
    since = max(0.0, time.time() - args.since) if args.since is not None else None
    with ctx.open_store() as store:
        r = make_report(store, since)
    if args.json:
        from .._json import camel_case_keys
        print(json.dumps(camel_case_keys(r), indent=2, sort_keys=True))
    else:
        sys.stdout.write(render_report(r))
    return 0


# -- why-depends -----------------------------------------------------------------------------


def cmd_why_depends(args, ctx) -> int:
    from ..build.why import find_chain, find_all, render_chain, render_tree, where_referenced
    with ctx.open_store() as store:
        src = store.parse_path(args.path, valid=True)
        dep = store.parse_path(args.dep, valid=True)
        chain = find_chain(store, src, dep)
        if chain is None:
            ctx.info(f"{store.print_path(src)} does not depend on {store.print_path(dep)}")
            if args.json:
                print("[]")  # no route: stdout is JSON all the same (README: never empty)
            return 1
        # PATH itself is DEP: its only route is the path alone, which --all (a graph of
        # references) has no edge for; shown as the chain [PATH]
        every_route = args.all and src != dep
        if args.json and every_route:
            # every node of every route, PATH first (breadth first), DEP last: each with its
            # references on such routes and the files that hold them
            edges = find_all(store, src, dep)
            order, queue = [src], [src]
            while queue:
                for r in edges.get(queue.pop(0), []):
                    if r not in order and r != dep:
                        order.append(r)
                        queue.append(r)
            out = [{"path": store.print_path(p), "references": [
                {"path": store.print_path(r), "files": where_referenced(store, p, r)} for r in edges[p]]}
                for p in order] + [{"path": store.print_path(dep)}]
            print(json.dumps(out, indent=2))
        elif args.json:
            out = []
            for i, sp in enumerate(chain):
                item = {"path": store.print_path(sp)}
                if i + 1 < len(chain):
                    item["files"] = where_referenced(store, sp, chain[i + 1])
                out.append(item)
            print(json.dumps(out, indent=2))
        elif every_route:
            sys.stdout.write(render_tree(store, find_all(store, src, dep)))
        else:
            sys.stdout.write(render_chain(store, chain))
    return 0
