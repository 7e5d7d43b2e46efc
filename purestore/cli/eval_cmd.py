"""``pure eval``, ``pure instantiate``, ``pure show-derivation``."""

from __future__ import annotations

import json
import math
import os
import sys


def _add_expr_args(p, file_help="the expression file (a .py)"):
    p.add_argument("file", metavar="FILE", help=file_help)
    p.add_argument("-A", "--attr", metavar="ATTR", default=None,
                   help="dotted path of the value to select (default: the module's 'default')")
    p.add_argument("-I", "--include", metavar="DIR", action="append", default=[],
                   help="add DIR to the import roots of expressions (also PURE_PATH, colon-separated)")


_EVAL_HELP = """\
Evaluate FILE in pure mode (no environment, no network, no subprocesses, no reads outside the
expression's tree) and print the selected value: the module's `default`, or the dotted path
given with -A. Derivations print as their output path, a list or dict one item per line;
--json keeps the structure and prints a derivation's name, version, system, .drv path and
outputs. Nothing is written to the store.

examples:
  pure eval expr.py                        the output path(s) of `default`
  pure eval expr.py -A pkgs.hello --json   one attribute, as JSON
  pure eval expr.py -A tools.0             the first item of the list `tools`
  pure eval expr.py -A lib.dev             the `dev` output of `lib`
"""

_INSTANTIATE_HELP = """\
Evaluate FILE, add its sources, to_file texts and .drv files to the store (with their
references) and print the .drv paths of the selected derivations, one per line.

examples:
  pure instantiate expr.py
  pure instantiate expr.py -A greet --json     the .drv paths as a JSON list
  pure instantiate expr.py --repair            rewrite a damaged or missing .drv
"""

_SHOW_HELP = """\
Print the derivation(s) of a .drv store path, of an output path whose derivation the store
knows (such as ./result), or of the selected value of an expression FILE (evaluated, not
written), as JSON in the shape of `nix show-derivation`.

examples:
  pure show-derivation expr.py -A hello        from the expression (nothing written)
  pure show-derivation /pure/store/...-hello-2.10.drv -r
  pure show-derivation ./result                the derivation that made ./result
"""


def register(reg) -> None:
    p = reg.command(
        "eval", "evaluate an expression file in pure mode and print the selected value", cmd_eval,
        description=_EVAL_HELP)
    _add_expr_args(p)
    p.add_argument("--json", action="store_true", help="print the value as JSON")

    p = reg.command(
        "instantiate", "write the .drv files of an expression into the store", cmd_instantiate,
        description=_INSTANTIATE_HELP)
    _add_expr_args(p)
    p.add_argument("--json", action="store_true",
                   help="print the .drv paths as a JSON list (in the order of the lines without --json)")
    p.add_argument("--repair", action="store_true",
                   help="write again the .drv files and texts of the expression that are registered "
                        "but missing or damaged in the store (each named on stderr)")

    p = reg.command(
        "show-derivation", "print derivations as JSON (like nix show-derivation)", cmd_show,
        description=_SHOW_HELP)
    _add_expr_args(p, "a .drv store path, an output path (or a link to one, such as result), "
                      "or an expression file (a .py)")
    p.add_argument("-r", "--recursive", action="store_true", help="include every input derivation, recursively")


def _settings_and_eval(args, ctx, allow_values=False):
    from ..expr.loader import evaluate
    from ._warnings import warn_missing_search_dirs
    warn_missing_search_dirs(args.include)
    return evaluate(args.file, args.attr, ctx.settings, args.include, allow_values=allow_values)


def _value_json(v):
    from ..expr.values import Drv, Output, Source
    if isinstance(v, Drv):
        return {"type": "derivation", "name": v.name, "version": v.version, "system": v.system,
                "drvPath": v.drv_path, "outputs": {o: out.path for o, out in v.outputs.items()}}
    if isinstance(v, Output):
        return {"type": "output", "derivation": v.derivation.drv_path, "output": v.name, "path": v.path}
    if isinstance(v, Source):
        return {"type": v.kind, "path": v.path}
    if isinstance(v, dict):
        return {str(k): _value_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_value_json(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # (JSON has no NaN or Infinity: json.dumps wrote them bare, not JSON)
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return repr(v)


def _value_lines(v, out: list[str]) -> None:
    todo = [v]  # (a stack, not recursion: any depth; evaluate() refused cycles)
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            todo.extend(reversed(list(v.values())))
        elif isinstance(v, (list, tuple)):
            todo.extend(reversed(v))
        else:
            out.append(str(v))


def cmd_eval(args, ctx):
    from ..errors import EvalError
    result = _settings_and_eval(args, ctx, allow_values=True)
    what = f"the value of {args.attr!r}" if args.attr else "the selected value"
    try:
        if args.json:
            text = json.dumps(_value_json(result.value), indent=2)
        else:
            lines: list[str] = []
            _value_lines(result.value, lines)
            text = "\n".join(lines)
            if not lines:  # an empty list or dict: no line (not one empty line)
                return 0
    except RecursionError:
        raise EvalError(f"{what} is nested too deeply to print as JSON") from None
    except ValueError as e:  # an int of more than sys.get_int_max_str_digits() digits
        raise EvalError(f"cannot print {what}: {e}") from e
    print(text)
    return 0


def cmd_instantiate(args, ctx):
    from ..expr.loader import instantiate
    result = _settings_and_eval(args, ctx)
    repaired: list = []
    with ctx.open_store() as store:
        paths = instantiate(store, result, repair=args.repair, repaired=repaired)
        shown = [store.print_path(p) for p in paths]
        for p in repaired:
            print(f"repaired {store.print_path(p)!r}", file=sys.stderr)
    if args.json:
        json.dump(shown, sys.stdout, indent=2)
        print()
    else:
        if shown:
            print("\n".join(shown))
    return 0


def cmd_show(args, ctx):
    from ..formats.derivation import to_json
    out: dict = {}
    target = args.file
    if target.endswith(".drv") or _names_a_store_path(target, ctx.settings):
        # a store path (logical, physical, a base name, a link such as `result`): a .drv, or an
        # output whose derivation the store knows, as `nix show-derivation` takes
        from ..errors import UsageError
        from ..expr.loader import read_derivation
        if args.attr:
            raise UsageError("-A selects from an expression file, not from a .drv path")
        with ctx.open_store() as store:
            sp = store.parse_path(target)
            if not sp.name.endswith(".drv"):
                sp = _deriver_of(store, sp)
            todo = [sp]
            seen = set()
            while todo:
                p = todo.pop()
                if p in seen:
                    continue
                seen.add(p)
                drv = read_derivation(store, p)
                out.update(to_json(store.print_path(p), drv))
                if args.recursive:
                    todo.extend(store.parse_path(d) for d in drv.input_drvs)
    else:
        result = _settings_and_eval(args, ctx)
        drvs = result.graph.values() if args.recursive else result.selected
        for d in drvs:
            out.update(to_json(d.drv_path, d.drv))
    out = dict(sorted(out.items()))  # by .drv path, as Nix prints them
    from ..formats import nix_json
    print(nix_json.dumps(out, indent=2))
    return 0


def _names_a_store_path(target: str, settings) -> bool:
    """Whether ``target`` (not a ``.drv``) is a path into the store (logical or physical, or a
    link resolving there, such as ``result``) rather than an expression file (a ``.py`` file is
    one, also inside the store: a source tree added there)."""
    if target.endswith(".py") and os.path.isfile(target):
        return False
    if "/" not in target and not os.path.lexists(target):
        from ..formats.store_path import StorePath
        try:
            StorePath.from_base_name(target)  # a bare <hash>-<name>
            return True
        except ValueError:
            return False
    real = os.path.realpath(target)
    return any(p == d or p.startswith(d + "/")
               for p in (os.path.abspath(target), real)
               for d in (settings.store_dir, settings.real_store_dir))


def _deriver_of(store, sp):
    """The .drv that the store records as having built (or as having) output ``sp``."""
    from ..errors import PathNotValid
    d = store.query_deriver(sp) if store.is_valid(sp) else None
    known = [d] if d else store.query_derivers_of(sp)
    for c in known:
        if store.is_valid(c):
            return c
    raise PathNotValid(
        f"{store.print_path(sp)!r} is not a .drv, and the store knows no valid derivation that has it "
        f"as an output", hint="pass the .drv path (`pure instantiate FILE` prints it) or the expression file")
