"""Load an expression file in pure mode, select a value, instantiate the derivation graph.

- :func:`evaluate` runs the file (no store writes) and returns an :class:`EvalResult`: the
  selected value, the derivations in it, and their whole graph, dependencies first.
- :func:`instantiate` writes what an evaluation computed into a store: sources with
  ``add_path``, ``to_file`` texts and ``.drv`` files with one ``add_texts`` transaction.
- :func:`read_derivation` reads and parses a ``.drv`` from a store.

Imports inside expressions: the package set (``<repo>/expressions`` or ``$PURE_PKGS``) is the
package ``pkgs``; a plain ``import name`` finds ``name.py`` (or ``name/__init__.py``) in the
expression's directory, then in each ``-I``/``PURE_PATH`` root (:mod:`.importer`).  Modules are
compiled without writing ``__pycache__`` and forgotten after each evaluation, so two evaluations
never share state.
"""

from __future__ import annotations

import contextvars
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Iterable

import attrs

from ..errors import DerivationError, EvalError
from ..formats.derivation import Derivation, drv_references, parse_aterm
from ..formats.store_path import StorePath
from .api import EvalContext, evaluating
from .attr_path import parse_attr_path, render_attr_path
from .importer import ExprImporter, ExprLoader, find_pkgs_dir, missing_search_dirs, search_path
from .purity import pure_mode
from .values import Drv, Output, Source

__all__ = ["EvalResult", "evaluate", "instantiate", "read_derivation", "find_pkgs_dir", "search_path",
           "missing_search_dirs", "parse_attr_path", "select_attr"]


# -- results ---------------------------------------------------------------------------------------


@attrs.frozen
class EvalResult:
    """What an evaluation produced.

    ``value``: the selected value as the expression made it; ``selected``: the derivations in it
    (a derivation, or the derivations of a list/dict, in order); ``graph``: ``.drv`` path ->
    :class:`Drv` for the whole closure of ``selected``, dependencies before dependents.
    """

    file: str
    attr: str | None
    store_dir: str
    value: object
    selected: tuple[Drv, ...]
    graph: dict[str, Drv]

    def derivations(self) -> dict[str, Derivation]:
        """``.drv`` path -> Derivation for the whole graph."""
        return {p: d.drv for p, d in self.graph.items()}

    def sources(self) -> list[Source]:
        """Every source and text the graph refers to (texts' own references included)."""
        seen: dict[str, Source] = {}
        stack = [s for d in self.graph.values() for s in d.input_srcs.values() if isinstance(s, Source)]
        while stack:
            s = stack.pop()
            if s.path not in seen:
                seen[s.path] = s
                stack.extend(s.references)
        return list(seen.values())


def _flatten(value, path: str, out: list, allow_values: bool) -> None:
    """Append the derivations in ``value`` (nested dicts, lists and tuples) to ``out``, in order.

    Walked with a stack of its own, not by recursion: a list that holds itself (``x.append(x)``)
    is an :class:`EvalError` naming where, and a deep nesting is no RecursionError (both were a
    traceback).  The same container met again elsewhere (shared, not a cycle) is walked again."""
    within: list[int] = []  # ids of the containers holding the item now walked (the way down)
    paths: dict[int, str] = {}  # and their paths
    todo: list = [(value, path, 0)]
    while todo:
        value, path, depth = todo.pop()
        while len(within) > depth:
            del paths[within.pop()]
        if isinstance(value, Drv):
            out.append(value)
        elif isinstance(value, Output):
            out.append(value.derivation)
        elif isinstance(value, (dict, list, tuple)):
            if id(value) in paths:
                raise EvalError(f"{path} is {paths[id(value)] or 'the selected value'} again, a "
                                f"{type(value).__name__} that contains itself (a cycle); expected a "
                                f"derivation, or a list or dict of derivations")
            within.append(id(value))
            paths[id(value)] = path
            if isinstance(value, dict):
                items = [(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
            else:
                items = [(v, f"{path}[{i}]") for i, v in enumerate(value)]
            todo.extend((v, p, depth + 1) for v, p in reversed(items))
        elif not allow_values:
            raise EvalError(f"{path or 'the selected value'} is {type(value).__name__} {_short(value)}; expected a "
                            f"derivation, or a list or dict of derivations")


def _short(v) -> str:
    r = repr(v)
    return r if len(r) < 60 else r[:57] + "..."


def topo_order(roots: Iterable[Drv]) -> dict[str, Drv]:
    """The closure of ``roots``, dependencies first; a cycle raises :class:`EvalError` naming it."""
    order: dict[str, Drv] = {}
    state: dict[str, int] = {}
    for root in roots:
        if root.drv_path in order:
            continue
        stack: list[tuple[Drv, Iterable]] = [(root, iter(root.input_drvs.values()))]
        state[root.drv_path] = 1
        path = [root]
        while stack:
            d, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                path.pop()
                state[d.drv_path] = 2
                order[d.drv_path] = d
                continue
            s = state.get(nxt.drv_path)
            if s == 2:
                continue
            if s == 1:
                i = next(k for k, x in enumerate(path) if x.drv_path == nxt.drv_path)
                cycle = " -> ".join(x.name for x in path[i:] + [nxt])
                raise EvalError(f"dependency cycle between derivations: {cycle}")
            state[nxt.drv_path] = 1
            path.append(nxt)
            stack.append((nxt, iter(nxt.input_drvs.values())))
    return order


# -- selecting --------------------------------------------------------------------------------------


def _available(obj) -> list[str]:
    if isinstance(obj, dict):
        return [str(k) for k in obj]
    if isinstance(obj, Drv):  # what -A can select below a derivation: its outputs
        return list(obj.outputs)
    names = []
    for k, v in vars(obj).items() if hasattr(obj, "__dict__") else []:
        if k.startswith("_") or type(v).__name__ == "module" or callable(v) and not isinstance(v, Drv):
            continue
        names.append(k)
    return sorted(names)


def select_attr(root, attr: str | None, file: str):
    """Follow the dotted ``attr`` (``default`` when None; see :func:`parse_attr_path`) from
    the module ``root``."""
    parts = parse_attr_path(attr or "default")
    cur = root
    done: list[str] = []
    for part in parts:
        where = render_attr_path(done) or file
        if isinstance(cur, dict):
            if part in cur:
                cur = cur[part]
            else:
                raise EvalError(_missing(attr, part, where, cur))
        elif isinstance(cur, (list, tuple)):
            try:
                cur = cur[int(part)]
            except (ValueError, IndexError):
                raise EvalError(f"attribute {attr!r} not found: {where} is a list of {len(cur)} "
                                f"items, {part!r} is not an index into it") from None
        elif isinstance(cur, Drv) and part in cur.outputs:
            cur = cur.outputs[part]
        else:
            try:
                cur = getattr(cur, part)
            except AttributeError:
                raise EvalError(_missing(attr, part, where, cur)) from None
        done.append(part)
    return cur


_SHOWN = 30  # names listed at most: a module of thousands made an error of tens of KiB


def _missing(attr, part, where, obj) -> str:
    avail = _available(obj)
    if len(avail) > _SHOWN:
        import difflib
        near = difflib.get_close_matches(part or "default", avail, n=5)
        first = near + [a for a in avail if a not in near][:_SHOWN - len(near)]
        shown = ", ".join(render_attr_path([a]) for a in first) + f", … ({len(avail) - len(first)} more)"
    else:
        shown = ", ".join(render_attr_path([a]) for a in avail) if avail else "(none)"
    if attr is None:
        return (f"{where} defines no 'default'; choose a value with -A ATTR; available: {shown}")
    return f"attribute {attr!r} not found: {where} has no {part!r}; available: {shown}"


# -- evaluate ----------------------------------------------------------------------------------------


def _expression_traceback(exc: BaseException, files: set[str]) -> str:
    import traceback  # (here: only a failed evaluation needs it, and with textwrap it costs 1 ms)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in files]
    if not frames:
        return ""
    lines = ["expression traceback (most recent call last):"]
    last, repeats = None, 0
    for f in frames:
        where = (f.filename, f.lineno, f.name)
        if where == last:
            repeats += 1     # deep recursion: said once with a count, as Python's traceback does
            continue
        _repeated(lines, repeats)
        last, repeats = where, 0
        lines.append(f'  File "{f.filename}", line {f.lineno}, in {f.name}')
        if f.line:
            lines.append(f"    {f.line.strip()}")
    _repeated(lines, repeats)
    return "\n".join(lines)


def _repeated(lines: list[str], repeats: int) -> None:
    if repeats:
        lines.append(f"  [previous frame repeated {repeats} more time{'s' if repeats > 1 else ''}]")


def evaluate(file: str, attr: str | None = None, settings=None, include_paths: Iterable[str] = (), *,
             store_dir: str | None = None, env: dict[str, str] | None = None,
             allow_values: bool = False) -> EvalResult:
    """Evaluate the expression ``file`` in pure mode and select ``attr`` (``default`` if None).

    The store dir comes from ``settings`` (or ``store_dir``); ``include_paths`` and ``$PURE_PATH``
    add import roots; ``$PURE_PKGS`` overrides the package set.  ``allow_values`` lets the
    selected value hold non-derivations (for ``pure eval``).  Raises :class:`EvalError` (syntax
    errors with file:line, exceptions with the expression frames of the traceback, missing
    attributes with the available ones), :class:`PurityError` for refused operations and
    :class:`DerivationArgumentError` for bad ``derivation()`` arguments.

    The expression runs in a thread of its own (see :func:`_run_apart`): Ctrl-C (and SIGTERM,
    which the CLI turns into one) raises KeyboardInterrupt here, in the caller, whatever the
    expression does; an expression's ``signal.signal()`` fails (only the main thread may set
    handlers) and it never sees the KeyboardInterrupt, so it can neither ignore nor swallow it.

    What the expression prints (``print()``, ``sys.stdout``) goes to stderr: stdout is the
    command's (output paths, ``--json`` lines), which a debugging print must not corrupt.
    """
    saved = sys.stdout
    sys.stdout = sys.stderr
    try:
        return _run_apart(_evaluate, file, attr, settings, include_paths, store_dir=store_dir, env=env,
                          allow_values=allow_values)
    finally:
        sys.stdout = saved  # (also when the expression replaced sys.stdout itself)


def _run_apart(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a new thread (in a copy of the caller's context), waited for.

    Python runs signal handlers in the main thread only, and refuses ``signal.signal()`` in any
    other: the expression cannot change how ``pure`` handles signals, and the wait below is what
    a Ctrl-C interrupts (its KeyboardInterrupt propagates from here).  The thread is then left
    behind as a daemon, to end with the process: an evaluation writes nothing (pure mode), so
    nothing is left half done."""
    box: dict = {}
    ctx = contextvars.copy_context()

    def run():
        try:
            box["value"] = ctx.run(fn, *args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            box["error"] = e
    t = threading.Thread(target=run, name="pure-evaluation", daemon=True)
    _start_with_main_stack(t)
    t.join()
    if "error" in box:
        try:
            raise box["error"]
        finally:
            box.clear()
    return box["value"]


# The evaluation thread's stack where the main thread's has no limit (`ulimit -s unlimited`):
# glibc then gives a new thread 2 MiB only, and an expression that raised the recursion limit
# (deep recursion through C frames: __init__, __repr__, sorted's key ...) crashed pure with
# SIGSEGV where the main thread had room.  Where the limit is finite, a thread's default stack
# is that limit already.  Address space only: the pages are used as the recursion goes.
UNLIMITED_STACK = 512 << 20
_stack_lock = threading.Lock()


def _start_with_main_stack(t: threading.Thread) -> None:
    """Start ``t`` with as much stack as the main thread may use (see :data:`UNLIMITED_STACK`);
    with the default one when that much cannot be had."""
    import resource
    if resource.getrlimit(resource.RLIMIT_STACK)[0] != resource.RLIM_INFINITY:
        t.start()
        return
    with _stack_lock:  # (threading.stack_size is for every thread started meanwhile)
        try:
            old = threading.stack_size(UNLIMITED_STACK)
        except (ValueError, RuntimeError):  # not settable here
            t.start()
            return
        try:
            t.start()
            return
        except RuntimeError:  # could not map that much: the default stack, as before
            pass
        finally:
            threading.stack_size(old)
    t.start()


def _evaluate(file: str, attr: str | None, settings, include_paths: Iterable[str], *,
              store_dir: str | None, env: dict[str, str] | None, allow_values: bool) -> EvalResult:
    if store_dir is None:
        if settings is None:
            raise EvalError("evaluate() needs settings or store_dir")
        store_dir = settings.store_dir
    env = os.environ if env is None else env
    file = os.path.abspath(file)
    if attr:
        parse_attr_path(attr)  # (a malformed -A is said before the expression runs)
    if not os.path.isfile(file):
        if os.path.isdir(file):
            init = os.path.join(file, "__init__.py")
            raise EvalError(f"expression file {file!r} is a directory",
                            hint=f"give its {init!r}" if os.path.isfile(init) else "give a .py file")
        raise EvalError(f"expression file {file!r} does not exist or is not a file")
    pkgs_dir = find_pkgs_dir(env)
    roots = [os.path.dirname(file), *search_path(include_paths, env)]
    importer = ExprImporter(roots, pkgs_dir)
    ctx = EvalContext(store_dir)
    allowed = list(roots) + [os.path.realpath(r) for r in roots]
    if pkgs_dir:
        allowed += [pkgs_dir, os.path.realpath(pkgs_dir)]
    stem = Path(file).stem
    mod_name = stem if stem.isidentifier() and stem not in sys.modules \
        and stem not in sys.stdlib_module_names else "__pure_main__"
    failure: BaseException | None = None
    value = None
    sys.meta_path.insert(0, importer)
    try:
        with evaluating(store_dir, ctx), pure_mode(allowed, importer.where) as mode:
            mode.dynamic = ctx.source_roots
            try:
                module = importlib.util.module_from_spec(
                    importlib.util.spec_from_file_location(mod_name, file, loader=ExprLoader(importer, file)))
                sys.modules[mod_name] = module
                importer.loaded.append(mod_name)
                importer.run(module, file)
                value = select_attr(module, attr, file)
            except BaseException as e:  # turned into an EvalError below, outside pure mode
                # SystemExit (sys.exit() in an expression) and other BaseExceptions too: an
                # expression that exits has not defined its value, whatever the exit status
                failure = e
    finally:
        try:
            sys.meta_path.remove(importer)
        except ValueError:
            pass
        for name in importer.loaded:
            sys.modules.pop(name, None)
    if failure is not None:
        raise _as_eval_error(failure, file, importer.files, roots=roots, pkgs_dir=pkgs_dir, env=env)
    if mode.refusals:
        raise mode.refusals[0]
    selected: list[Drv] = []
    _flatten(value, attr or "", selected, allow_values)
    selected = list(dict.fromkeys(selected))
    return EvalResult(file=file, attr=attr, store_dir=store_dir, value=value, selected=tuple(selected),
                      graph=topo_order(selected))


def _missing_module_hint(e: ImportError, roots: list[str], pkgs_dir: str | None, env) -> str:
    """Where a module was looked for: the package set for ``pkgs.…`` (whose directory may be
    wrong: a PURE_PKGS naming nothing gave only "No module named 'pkgs.seeds'"), else the roots."""
    if (e.name or "").split(".")[0] == "pkgs":
        if pkgs_dir is None:
            return "no package set was found: set PURE_PKGS to the directory of the package set (expressions/)"
        if not os.path.isdir(pkgs_dir):
            return (f"the package set {pkgs_dir!r} is not a directory"
                    + (" (PURE_PKGS names it)" if env.get("PURE_PKGS") else ""))
        return f"the package set 'pkgs' is {pkgs_dir}" + (" (PURE_PKGS)" if env.get("PURE_PKGS") else "")
    return "modules are looked for in " + ", ".join(roots) + " (the expression's directory, -I, PURE_PATH)"


def _as_eval_error(e: BaseException, file: str, files: set[str], *, roots: list[str] = (),
                   pkgs_dir: str | None = None, env=None) -> EvalError:
    tb = _expression_traceback(e, files)
    if isinstance(e, EvalError):
        msg = e.message + (f"\n{tb}" if tb and "expression traceback" not in e.message else "")
        err = type(e)(msg, hint=e.hint)
    elif isinstance(e, SystemExit):
        err = EvalError(f"evaluating {file} failed: the expression called sys.exit({e.code!r}); an "
                        "expression defines values, it cannot end the command"
                        + (f"\n{tb}" if tb else ""))
    else:
        text = str(e)
        # signal.signal() (and the like) in the expression's thread, which is not the main one
        hint = ("an expression cannot change how pure handles signals: Ctrl-C always stops pure"
                if isinstance(e, ValueError) and text.startswith("signal only works in main thread") else None)
        if isinstance(e, ImportError) and e.name and (
                isinstance(e, ModuleNotFoundError) or e.name.split(".")[0] == "pkgs"):
            hint = _missing_module_hint(e, list(roots), pkgs_dir, os.environ if env is None else env)
        err = EvalError(f"evaluating {file} failed: {type(e).__name__}" + (f": {text}" if text else "")
                        + (f"\n{tb}" if tb else ""), hint=hint)
    err.__cause__ = e
    return err


# -- instantiate -------------------------------------------------------------------------------------


def instantiate(store, result: EvalResult, *, repair: bool = False,
                repaired: list[StorePath] | None = None) -> list[StorePath]:
    """Write the evaluation's sources, texts and ``.drv`` files into ``store``; return the ``.drv``
    paths of ``result.selected``.  Sources are copied with ``add_path``; texts and ``.drv`` files
    are registered with their references in one ``add_texts`` transaction; output paths are
    recorded with ``register_derivation_outputs``.  ``repair``: texts and ``.drv`` files already
    valid whose files are missing or damaged are written again (their content is known exactly),
    and appended to ``repaired``."""
    store_dir = result.store_dir
    if store.store_dir != store_dir:
        raise EvalError(f"the evaluation used store dir {store_dir!r} but the store's is {store.store_dir!r}")
    items = []
    for src in result.sources():
        sp = StorePath.parse(src.path, store_dir)
        if src.kind == "source":
            if store.is_valid(sp):
                continue
            got = store.add_path(src.host_path, src.name)
            if got != sp:
                raise EvalError(f"source {src.host_path!r} changed during evaluation: it was hashed as "
                                f"{src.path!r} but added as {store.print_path(got)!r}")
        else:
            refs = [StorePath.parse(r.path, store_dir) for r in src.references]
            items.append((src.name, src.text, refs))
    drvs = []
    for d in result.graph.values():
        sp = StorePath.parse(d.drv_path, store_dir)
        items.append((d.name + ".drv", d.aterm, drv_references(d.drv, store_dir)))
        drvs.append((sp, d))
    if items:
        if repair:
            fixed = store.repair_texts(items)
            if repaired is not None:
                repaired.extend(fixed)
        got = store.add_texts(items)
        for (sp, d), g in zip(drvs, got[len(items) - len(drvs):]):
            if g != sp:
                raise DerivationError(f"internal error: .drv of {d.name!r} was written at {g}, expected {sp}")
        records = [(sp, {o: StorePath.parse(out.path, store_dir) for o, out in d.outputs.items()})
                   for sp, d in drvs]
        many = getattr(store, "register_derivation_outputs_many", None)
        if many is not None:
            many(records)  # one transaction
        else:
            for sp, outs in records:
                store.register_derivation_outputs(sp, outs)
    return [StorePath.parse(d.drv_path, store_dir) for d in result.selected]


def read_derivation(store, drv: StorePath) -> Derivation:
    """Read and parse the ``.drv`` file ``drv`` from ``store`` (raises :class:`EvalError` if
    missing, :class:`DerivationError` if malformed)."""
    real = store.real_path(drv)
    try:
        with open(real, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EvalError(f"cannot read derivation {store.print_path(drv)!r}: {e.strerror}",
                        hint=_damaged(store, drv)) from e
    try:
        return parse_aterm(data, store.print_path(drv))
    except DerivationError as e:
        if e.hint is None:
            e.hint = _damaged(store, drv)
        raise


def _damaged(store, drv: StorePath) -> str | None:
    from ..store.local import damaged_drv_hint  # (only when a .drv is found damaged)
    return damaged_drv_hint(store, drv)
