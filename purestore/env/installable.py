"""What ``pure profile install``, ``pure shell`` and ``pure run`` act on: an expression file
attribute (evaluated, instantiated and realised) or store paths that are already valid."""

from __future__ import annotations

import os
from typing import Iterable

import attrs

from ..errors import UsageError
from ..formats.store_path import StorePath


@attrs.frozen
class Built:
    """One realised package: its name, output paths (``out`` first), the derivation (if any) and
    where it came from."""

    name: str
    outputs: tuple[StorePath, ...]
    drv: StorePath | None = None
    source: dict | None = None


def is_store_path_text(store, text: str) -> bool:
    """Whether ``text`` names a store path (logical or physical, or a link such as ``result``
    that leads into the store) rather than an expression file (also through a link to one)."""
    dirs = (store.store_dir + "/", store.real_store_dir + "/")
    if text.startswith(dirs):
        return True
    if not os.path.islink(text) or text.endswith(".py"):
        return False
    # a link to a file outside the store is an expression (`default -> shell.py`); a link into
    # the store is not, also when it names the logical store dir of a rooted store (a path not
    # there on the host), and the store path's checks say what is wrong with any other link
    target = os.path.realpath(text)
    return target.startswith(dirs) or not os.path.isfile(target)


def realise_installables(store, settings, file: str, attrs_: Iterable[str | None] = (None,), *,
                         include_paths: Iterable[str] = (), max_jobs: int | None = None,
                         progress=None, fork_worker: bool = False) -> list[Built]:
    """Evaluate ``file`` (each attribute of ``attrs_``), build what is missing and return the
    packages.  ``file`` may instead be a store path (or a link to one such as ``result``), which
    is fetched from the substituters when it is not valid.  All returned paths are temporary roots of this process.

    ``fork_worker``: substitutions may restore in a forked copy of this process (see
    ``BuildOptions``; the CLI's commands, nothing else running).

    Raises :class:`EvalError` for expression errors, :class:`BuildError` when a build fails,
    :class:`PathNotValid`/:class:`InvalidStorePath` for a bad store path.
    """
    attrs_ = list(attrs_) or [None]
    if is_store_path_text(store, file):
        if attrs_ != [None]:
            raise UsageError(f"-A/--attr makes no sense with the store path {file!r}")
        sp = store.parse_path(file)
        store.add_temp_root(sp)
        if not store.is_valid(sp):
            _fetch(store, settings, sp, progress, fork_worker)
        if sp.name.endswith(".drv"):
            return _realise(store, settings, [sp], [{"drv": store.print_path(sp)}], max_jobs, progress,
                            fork_worker)
        return [Built(sp.name, (sp,), store.query_deriver(sp), {"path": store.print_path(sp)})]
    from ..expr.loader import evaluate, instantiate

    drvs, sources = [], []
    for a in attrs_:
        result = evaluate(file, a, settings, include_paths)
        got = instantiate(store, result)
        drvs.extend(got)
        sources.extend({"file": os.path.abspath(file), "attr": a or "default"} for _ in got)
    return _realise(store, settings, drvs, sources, max_jobs, progress, fork_worker)


def realise_inputs(store, settings, built: Iterable[Built], *, progress=None, fork_worker: bool = False) -> None:
    """Make valid the outputs of the input derivations of ``built`` (what ``pure shell`` puts
    in the environment besides the packages): a package fetched from a cache came without its
    build-time inputs, which are then fetched or built now."""
    from ..expr.loader import read_derivation
    missing: dict[StorePath, set[str]] = {}  # input derivation → the outputs used
    for b in built:
        if b.drv is None or not store.is_valid(b.drv):
            continue
        for inp, names in sorted(read_derivation(store, b.drv).input_drvs.items()):
            dp = store.parse_path(inp)
            outs = store.query_derivation_outputs(dp) or {}
            # rooted before their validity is read: a gc in between would otherwise delete one
            # found valid here, and the environment would go without it
            store.add_temp_roots([outs[n] for n in names if n in outs])
            if any(n not in outs or not store.is_valid(outs[n]) for n in names):
                missing.setdefault(dp, set()).update(names)
    if missing:  # only the outputs used: a cache's "out" of an input serves without its "doc"
        from .._run import run_trio
        from ..build.scheduler import BuildOptions, realise
        store.add_temp_roots(missing)
        opts = BuildOptions(max_jobs=settings.max_jobs, cores=settings.cores, fork_worker=fork_worker)
        results = run_trio(lambda: realise(store, settings, list(missing), opts, progress, outputs=missing))
        store.add_temp_roots([results[d][n] for d, names in missing.items() for n in names if n in results[d]])


def _fetch(store, settings, sp: StorePath, progress, fork_worker: bool) -> None:
    """Fetch the store path ``sp`` (not valid here) from the substituters, as ``nix shell
    /nix/store/…`` does; an error that says why when it cannot be had."""
    from .._run import run_trio
    from ..errors import PathNotValid
    where = f"path {store.print_path(sp)!r} is not valid in the store at {store.real_store_dir!r}"
    if settings.offline or not settings.substituters:
        raise PathNotValid(where, hint="with substituters configured (docs/caches.md) it is fetched; or "
                                       "fetch it from a cache with 'pure copy --from URL PATH'")
    from ..cache.substituter import substitute_report
    fetch_progress = progress.fetch_progress() if progress is not None and hasattr(progress, "fetch_progress") else None
    try:
        rep = run_trio(lambda: substitute_report(store, settings, [sp], progress=fetch_progress,
                                                 fork_worker=fork_worker))
    finally:
        if fetch_progress is not None:
            progress.fetch_finished()
    if sp not in rep.valid:
        raise PathNotValid(f"{where}, and it cannot be fetched: {rep.failures.get(sp, 'no binary cache has it')}")


def _realise(store, settings, drvs: list[StorePath], sources: list[dict], max_jobs, progress,
             fork_worker: bool = False) -> list[Built]:
    from ..build.plan import valid_outputs

    store.add_temp_roots(drvs)
    # every output valid already (`pure shell` entered again): nothing for the scheduler to do,
    # so neither it nor trio is imported, as for a no-op `pure build`
    results = valid_outputs(store, drvs)
    if results is None:
        from .._run import run_trio
        from ..build.scheduler import BuildOptions, realise
        opts = BuildOptions(max_jobs=max_jobs or settings.max_jobs, cores=settings.cores, fork_worker=fork_worker)
        results = run_trio(realise, store, settings, drvs, opts, progress)
    out = []
    for drv, src in zip(drvs, sources):
        outs = results[drv]
        ordered = tuple(p for _, p in sorted(outs.items(), key=lambda kv: (kv[0] != "out", kv[0])))
        store.add_temp_roots(ordered)
        name = drv.name[:-4] if drv.name.endswith(".drv") else drv.name
        out.append(Built(name, ordered, drv, src))
    return out
