"""The trio scheduler: realise derivations, dependencies first, up to N builds at once.

:func:`realise` is the entry point::

    results = await realise(store, settings, [drv_path, ...], BuildOptions(max_jobs=4), progress)

1. Load the ``.drv`` graph (worker thread) and find what is missing: a derivation whose wanted
   outputs are all valid is not needed, nor are its inputs.
2. Try the substituters for missing outputs (when the caches layer is installed and configured;
   see :mod:`.substitution`).
3. Announce the plan, then build: one task per derivation waits for its inputs, then hands
   the derivation to :class:`.derivation_builder.DerivationBuilder`, which waits for a job
   slot, takes the output path locks (so two ``pure`` processes build a path once: the second
   waits and then finds it valid), runs the builder in the sandbox (or a builtin builder in a
   thread), checks and registers the outputs, and stores the log.
4. Fail fast (the first failure cancels the rest) unless ``keep_going``; cancellation (Ctrl-C)
   kills the builders (SIGKILL on the whole PID namespace), removes temporary outputs and
   releases the locks before :func:`realise` returns.

Blocking work (reading ``.drv`` files, hashing, scanning, SQLite) runs in worker threads.
"""

from __future__ import annotations

import os
from typing import Iterable, NoReturn

import attrs
import trio

from ..errors import BuildError, DerivationError, StoreError
from ..formats.derivation import Derivation, check_output_paths, parse_aterm
from ..formats.store_path import StorePath
from .derivation_builder import DerivationBuilder
from .hook import check_hook, run_hook
from .progress import Progress
from .running import unwrap
from .substitution import Substitution, wanted_missing


@attrs.frozen
class BuildOptions:
    """How to realise: ``max_jobs`` builds at once; ``cores`` (NIX_BUILD_CORES, 0 = all);
    ``keep_going`` builds what it can after a failure; ``keep_failed`` keeps failed build dirs;
    ``check`` rebuilds already valid outputs of the requested derivations and compares;
    ``rounds`` builds each requested derivation that is built that many times and compares
    (with ``check``: that many builds in all, the valid outputs the first);
    ``fork_worker`` lets substitution restore in a forked copy of this process (for a caller
    with no other thread at work when the realisation starts: the CLI; see cache/forked.py)."""

    max_jobs: int = 1
    cores: int = 0
    keep_going: bool = False
    keep_failed: bool = False
    check: bool = False
    rounds: int = 1
    fork_worker: bool = False


@attrs.define(eq=False)
class _Node:
    path: StorePath
    drv: Derivation | None  # None: not parsed (its outputs were valid)
    label: str
    outputs: dict[str, StorePath]
    deps: list["_Node"] = attrs.field(factory=list)
    # the outputs something wants: all of a requested derivation's, those an input derivation's
    # referrers name (a package fetched for its "out" does not need its "doc")
    wanted: set[str] = attrs.field(factory=set)
    needed: bool = False
    top: bool = False
    done: trio.Event = attrs.field(factory=trio.Event)  # finished: outputs valid (ok) or failed
    ready: trio.Event = attrs.field(factory=trio.Event)  # outputs complete at their real paths, or done
    ok: bool = False
    error: str | None = None

    def finish(self) -> None:
        self.ready.set()
        self.done.set()


class BuildFailures(BuildError):
    """Raised when one or more derivations failed (``--keep-going``) or a dependency failed."""

    def __init__(self, errors: list[BuildError]):
        self.errors = errors
        if len(errors) == 1:
            super().__init__(str(errors[0]), hint=errors[0].hint)
        else:
            super().__init__(f"{len(errors)} derivations failed:\n" + "\n".join(f"- {e}" for e in errors))


class NotReproducible(BuildError):
    """Raised by ``--check``/``--rounds`` when a rebuild differs from the first build."""

    exit_status = 104


def _differences(found: list[str]) -> str:
    """The message of :class:`NotReproducible`: one difference as it is; several under a line
    that counts them, each a "- " item with its lines indented (they read as one error, not as
    an ``error:`` line followed by loose ones)."""
    if len(found) == 1:
        return found[0]
    items = ["- " + text.replace("\n", "\n  ") for text in found]
    return f"{len(found)} outputs differ:\n" + "\n".join(items)


def _count(items, noun: str) -> str:
    """'1 derivation', '3 paths'."""
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _some(items, most: int = 5) -> str:
    """The first ``most`` of ``items``, with '…' after them if there are more."""
    return ", ".join(items[:most]) + (" …" if len(items) > most else "")


async def realise(store, settings, drv_paths: Iterable[StorePath], options: BuildOptions,
                  progress: Progress | None = None, *, outputs: dict[StorePath, Iterable[str]] | None = None
                  ) -> dict[StorePath, dict[str, StorePath]]:
    """Make the outputs of ``drv_paths`` valid; returns drv -> {output name: path}.
    ``outputs``: the output names wanted of some of them (else all of theirs), as an input
    derivation is wanted for the outputs its referrers use.

    Raises :class:`BuildFailures` when a build fails (after stopping the others, or after
    building everything possible with ``keep_going``), :class:`NotReproducible` when a check
    finds a difference, :class:`StoreError` for store problems.
    """
    r = _Realiser(store, settings, options, progress or Progress(quiet=True))
    r.top_outputs = {d: frozenset(names) for d, names in (outputs or {}).items()}
    return await r.run(list(drv_paths))


@attrs.frozen
class Plan:
    """What realising would do (``pure build --dry-run``): the derivations to build (labels), the
    paths to fetch as ``(path, cache URL, download size, NAR size)``, and the paths to fetch
    once what they refer to is built here (the same way; their derivations are not built,
    unless that fetch fails then).  The sizes are those of ``will_fetch``."""

    will_build: tuple[str, ...]
    will_fetch: tuple[tuple[str, str, int, int], ...]
    will_fetch_after_build: tuple[tuple[str, str, int, int], ...] = ()

    @property
    def download_size(self) -> int:
        return sum(f[2] for f in self.will_fetch)

    @property
    def nar_size(self) -> int:
        return sum(f[3] for f in self.will_fetch)

    def to_json(self) -> dict:
        def entries(fetches):
            return [{"path": p, "url": u, "downloadSize": d, "narSize": n} for p, u, d, n in fetches]
        return {"willBuild": list(self.will_build), "willFetch": entries(self.will_fetch),
                "willFetchAfterBuild": entries(self.will_fetch_after_build),
                "downloadSize": self.download_size, "narSize": self.nar_size}


async def plan(store, settings, drv_paths: Iterable[StorePath]) -> Plan:
    """What :func:`realise` would build and fetch for ``drv_paths``, doing neither: the missing
    outputs are looked up in the substituters (narinfos only; see :meth:`.Substitution.choose`)."""
    r = _Realiser(store, settings, BuildOptions(), Progress(quiet=True))
    await trio.to_thread.run_sync(r._load_graph, list(drv_paths))
    s = r.subst
    wanted = s.missing_outputs()
    try:
        found = await s.query(None, wanted) if wanted else {}
    except ImportError:  # the caches layer is not installed
        found = {}
    s.plan_late_fetches(found)  # (not warned about: fetched once their reference is built)
    fetch, build = s.choose(found)
    s.fail_on_lookup_errors(fetch, build, found)  # as the run would
    s.warn_unfetchable(build)
    late = s.fetched_after_build(build)
    return Plan(tuple(sorted(r.nodes[p].label for p in build - late)), s.fetch_list(fetch, found),
                s.after_build_list(late))


class _Realiser:
    def __init__(self, store, settings, options: BuildOptions, progress: Progress):
        self.store = store
        self.settings = settings
        self.options = options
        self.progress = progress
        self.sd = settings.store_dir
        self.nodes: dict[StorePath, _Node] = {}
        self.errors: list[BuildError] = []
        self.top_outputs: dict[StorePath, frozenset[str]] = {}  # see realise(outputs=)
        self.subst = Substitution(store, settings, self.nodes, progress, fork_worker=options.fork_worker,
                                  late_fetches=not options.check, build_here=options.max_jobs != 0)
        self.builder = DerivationBuilder(store, settings, options, progress, self.nodes, self._read_drv)
        self.nursery: trio.Nursery | None = None  # where the nodes' tasks run

    # -- planning ------------------------------------------------------------------------------

    def _load_graph(self, tops: list[StorePath]) -> None:
        """Read the .drv closure of ``tops`` and mark what must be built (blocking).

        A derivation is needed when an output something wants of it is not valid: all the
        outputs of a requested one, the outputs its referrers name of an input one.  One that
        is not needed is not even parsed when the store knows its outputs (unless it is to be
        checked), and its inputs are not visited."""
        store = self.store
        store.add_temp_roots(tops)
        reparse = self.options.check or self.options.rounds > 1
        top_set = set(tops)
        stack: list[tuple[StorePath, frozenset[str] | None]] = \
            [(t, self.top_outputs.get(t)) for t in tops]  # None: all
        order: list[_Node] = []

        def parse(node: _Node) -> None:
            node.drv = self._read_drv(node.path)
            for n, o in node.drv.outputs.items():
                if not o.path:  # (it said "path '' is not in the store dir")
                    raise DerivationError(f"{node.label} has no path for its output {n!r}: a deferred "
                                          f"output, as Nix writes for a derivation that depends on a "
                                          f"content-addressed one, which purestore does not support")
            node.outputs = {n: StorePath.parse(o.path, self.sd) for n, o in node.drv.outputs.items()}

        while stack:
            p, names = stack.pop()
            node = self.nodes.get(p)
            if node is None:
                node = _Node(p, None, store.print_path(p), dict(store.query_derivation_outputs(p) or {}))
                self.nodes[p] = node
                if not node.outputs or (reparse and p in top_set):
                    parse(node)
            want = set(node.outputs) if names is None else set(names)
            if node.drv is None and not want <= set(node.outputs):
                parse(node)  # an output the store does not know of (the .drv says what there is)
                if names is None:
                    want = set(node.outputs)
            if want <= node.wanted:
                continue
            node.wanted |= want
            if node.needed:
                continue
            # root the outputs before reading their validity (as Nix's DerivationGoal does): a
            # valid output this run then relies on (an input of a build, a result) cannot be
            # deleted by a `pure gc` or `pure store delete` running meanwhile, nor can one that
            # this run or another process builds and registers later
            outs = [node.outputs[n] for n in node.wanted if n in node.outputs]
            store.add_temp_roots(outs)
            if all(store.is_valid(o) for o in outs):
                continue
            if node.drv is None:
                parse(node)
            node.needed = True
            order.append(node)
            stack.extend((StorePath.parse(d, self.sd), frozenset(outs)) for d, outs in node.drv.input_drvs.items())
        for node in order:
            node.deps = [self.nodes[StorePath.parse(d, self.sd)] for d in node.drv.input_drvs]
        self._check_output_paths(order + [self.nodes[t] for t in tops if self.nodes[t].drv is not None])
        for node in self.nodes.values():
            if not node.needed:
                node.ok = True
                node.finish()
        for t in tops:
            self.nodes[t].top = True

    def _check_output_paths(self, nodes: list[_Node]) -> None:
        """Refuse a derivation to be built (or checked) whose output paths are not the ones its
        contents give (see :func:`check_output_paths`)."""
        cache: dict[str, bytes] = {}

        def lookup(drv_path: str) -> Derivation:
            node = self.nodes.get(StorePath.parse(drv_path, self.sd))
            if node is not None and node.drv is not None:
                return node.drv
            return self._read_drv(StorePath.parse(drv_path, self.sd))

        for node in {n.path: n for n in nodes}.values():
            check_output_paths(node.drv, node.label, lookup, self.sd, cache)

    def _read_drv(self, p: StorePath) -> Derivation:
        real = self.store.real_path(p)
        try:
            with open(real, "rb") as f:
                return parse_aterm(f.read(), where=self.store.print_path(p))
        except FileNotFoundError:
            raise StoreError(f"derivation {self.store.print_path(p)!r} does not exist in the store "
                             f"at {self.store.real_store_dir!r}", hint=_damaged(self.store, p)) from None
        except OSError as e:
            raise StoreError(f"cannot read derivation {real!r}: {e.strerror}",
                             hint=_damaged(self.store, p)) from e
        except DerivationError as e:
            if e.hint is None:
                e.hint = _damaged(self.store, p)
            raise

    async def _substitute(self) -> list[str]:
        """Fetch what the caches can give (see :meth:`.Substitution.substitute`) and take what
        needs nothing any more out of the plan; returns the paths fetched."""
        got = await self.subst.substitute()
        if got is None:
            return []
        for node in self.nodes.values():
            if node.needed and all(o in got for o in wanted_missing(self.store, node)):
                node.needed = False
        # dependencies of substituted nodes are no longer needed unless a needed node uses them
        self._recompute_needed()
        return sorted(self.store.print_path(p) for p in self.subst.fetched)

    def _recompute_needed(self) -> None:
        needed_before = {p for p, n in self.nodes.items() if n.needed}
        keep: set[StorePath] = set()
        stack = [p for p, n in self.nodes.items() if n.top]
        while stack:
            p = stack.pop()
            if p in keep:
                continue
            n = self.nodes[p]
            if p in needed_before:
                keep.add(p)
                stack.extend(d.path for d in self.subst.waits_for(n))  # (a late fetch: not its build inputs)
        for p, n in self.nodes.items():
            n.needed = p in keep
            if not n.needed and not n.done.is_set():
                n.ok = True
                n.finish()

    # -- running -------------------------------------------------------------------------------

    async def run(self, tops: list[StorePath]) -> dict[StorePath, dict[str, StorePath]]:
        def setup():
            os.makedirs(self.builder.root_mount, mode=0o755, exist_ok=True)
            self._load_graph(tops)
        await trio.to_thread.run_sync(setup)
        try:
            return await self._run(tops)
        finally:
            self.progress.fetch_summary()  # (if an error came before _run said it)
            await self.subst.aclose()  # (the session kept open for the late fetches)

    async def _run(self, tops: list[StorePath]) -> dict[StorePath, dict[str, StorePath]]:
        valid_before = {t for t in tops if not self.nodes[t].needed}
        substituted = await self._substitute()
        to_build = [n for n in self.nodes.values() if n.needed]
        # fetched once what they refer to is built here (built only if that fetch fails then)
        late = set() if self.options.check else self.subst.fetched_after_build(n.path for n in to_build)
        if not late:
            self.progress.fetch_summary()  # else once the late fetches are over too (below)
        if self.options.max_jobs == 0 and (to_build or self.options.check):
            self._refuse_to_build(to_build, late)
        if to_build and self.settings.post_build_hook:
            check_hook(self.settings.post_build_hook)
        valid = [self.nodes[t] for t in dict.fromkeys(tops) if not self.nodes[t].needed]
        checks = valid if self.options.check else []
        if valid and self.options.rounds > 1 and not self.options.check:
            self._say_not_repeated(valid, bool(to_build), fetched=any(n.path not in valid_before for n in valid))
        if self.options.check and self.options.rounds == 1:
            self._say_not_checked([self.nodes[t] for t in dict.fromkeys(tops) if self.nodes[t].needed])
        self.progress.event("plan", will_build=sorted(n.label for n in to_build if n.path not in late),
                            will_fetch_after_build=[p for p, _u, _d, _n in self.subst.after_build_list(late)],
                            will_substitute=substituted,
                            will_check=sorted(n.label for n in checks),
                            valid=sorted(n.label for n in valid))
        try:
            async with trio.open_nursery() as background:
                # clean-ups (reaping sandboxes, removing build dirs) overlap with the next builds
                self.builder.background = background
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    for node in to_build:
                        nursery.start_soon(self._run_node, node, nursery.cancel_scope)
                    for node in checks:
                        nursery.start_soon(self._check_node, node)
        except BaseExceptionGroup as eg:
            raise unwrap(eg) from None
        finally:
            self.builder.close()
            self.progress.fetch_summary()  # what was fetched, the late fetches included
            self.progress.event("done")
        if self.errors:
            raise BuildFailures(self.errors)
        if self.builder.unreproducible:
            raise NotReproducible(_differences(self.builder.unreproducible))
        return {t: dict(self.nodes[t].outputs) for t in tops}

    def _say_not_repeated(self, valid: list[_Node], others_built: bool, *, fetched: bool) -> None:
        """--rounds N without --check: the requested derivations in ``valid`` (their outputs
        valid already, or just fetched) are not built, so not N times either, as in Nix; say so
        (a line for people; ``--json`` has the plan event's ``valid``)."""
        rounds = self.options.rounds
        labels = sorted(n.label for n in valid)
        what = (f"{_count(labels, 'requested derivation')} not built ({_some(labels)})" if others_built
                else "nothing built")
        how = "valid (already, or fetched just now)" if fetched else "valid already"
        self.progress.message(f"{what}: the outputs are {how}, and --rounds {rounds} repeats only the builds "
                              f"that happen; --check --rounds {rounds} rebuilds valid outputs and compares")

    def _say_not_checked(self, unchecked: list[_Node]) -> None:
        """--check (one round): the requested derivations in ``unchecked`` have no valid outputs
        to compare with, so they are built once and not checked; say so, as nothing else would
        (Nix refuses them; ``--json`` has them in the plan's ``willBuild``, not ``willCheck``)."""
        if not unchecked:
            return
        labels = sorted(n.label for n in unchecked)
        self.progress.message(f"not checking {_count(labels, 'requested derivation')} ({_some(labels)}): "
                              f"{'its outputs are' if len(labels) == 1 else 'their outputs are'} not valid, "
                              f"so there is nothing to compare with; building once instead (run --check "
                              f"again to compare, or --check --rounds 2 to build twice and compare now)")

    def _refuse_to_build(self, to_build: list[_Node], late: set[StorePath]) -> NoReturn:
        """max-jobs = 0 and something is to be built: raise :class:`BuildError` naming the
        derivations that would be built, and apart from them the paths that a cache has but
        that can only be fetched once what they refer to is built here (``late``: their
        derivations are not built), which max-jobs = 0 forbids too."""
        hint = "set max-jobs to 1 or more (the setting, or -j N where the command has it)"
        if not to_build:
            raise BuildError("--check builds again, and max-jobs is 0: nothing is built here",
                             hint="set max-jobs to 1 or more (the setting, or -j N)")
        builds = sorted(n.label for n in to_build if n.path not in late)
        after = [p for p, _u, _d, _n in self.subst.after_build_list(late)]
        one_after = len(after) == 1
        waits = (f"can only be fetched once what {'it refers' if one_after else 'they refer'} to is built here, "
                 f"which max-jobs 0 forbids")
        if not builds:  # (what they refer to is built with them: not expected, said all the same)
            raise BuildError(f"cannot fetch {_count(after, 'path')} ({_some(after)}): a cache has "
                             f"{'it' if one_after else 'them'}, but {'it' if one_after else 'they'} {waits}",
                             hint=hint)
        msg = (f"cannot build {_count(builds, 'derivation')} ({_some(builds)}): max-jobs is 0, so nothing is "
               f"built here, and {'it' if len(builds) == 1 else 'they'} could not be fetched")
        if after:
            msg += f"; and {_count(after, 'path')} a cache has ({_some(after)}) {waits}"
        raise BuildError(msg, hint=hint)

    async def _run_node(self, node: _Node, scope: trio.CancelScope) -> None:
        try:
            # a dependency's outputs may be used as soon as they are complete at their real paths;
            # registering ours waits until the dependencies are registered (see _build_once)
            waits = self.subst.waits_for(node)  # a late fetch: only what its outputs refer to
            if not await self._inputs_ok(node, waits):
                return
            if not self.options.check and await self.subst.fetch_late(node):
                node.ok = True
                return
            if any(d not in waits for d in node.deps):  # its late fetch failed: built, with all its inputs
                self._need_inputs(node)
                if not await self._inputs_ok(node, node.deps):
                    return
            rounds = self.options.rounds if node.top else 1
            built = await self.builder.build(node, rounds)
            node.ok = True
            if built and self.settings.post_build_hook:
                node.finish()  # what depends on it goes on while the hook runs
                await self._post_build_hook(node, scope)
        except BuildError as e:
            node.error = str(e)
            self.errors.append(e)
            self.progress.event("failed", drv=node.label, name=node.drv.name, error=str(e))
            if not self.options.keep_going:
                scope.cancel()
        finally:
            node.finish()

    async def _inputs_ok(self, node: _Node, deps: list[_Node]) -> bool:
        """Wait for ``deps`` to be complete; False when one failed (``--keep-going``: without it
        the failure cancels the rest).  The node is then not built: ``node.error``, a line and a
        ``failed`` event say so, as Nix's "dependencies of derivation ... failed to build"; the
        plan listed it, and without them it was neither built nor failed, the status line
        counting it as queued to the end."""
        for d in deps:
            await d.ready.wait()
        failed = [d for d in deps if d.done.is_set() and not d.ok]
        if failed:
            node.error = f"dependency {failed[0].label} failed"
            self.progress.message(f"not building '{node.label}': its dependency '{failed[0].label}' failed")
            self.progress.event("failed", drv=node.label, name=node.drv.name, dependency_failed=True,
                                error=f"not built: its dependency {failed[0].label} failed")
        return not failed

    def _need_inputs(self, node: _Node) -> None:
        """``node`` is built after all (its late fetch failed): realise the inputs it needs
        then that were left out of the plan (see :meth:`.Substitution.inputs_to_realise`)."""
        for d in self.subst.inputs_to_realise(node):
            d.needed, d.ok, d.error = True, False, None
            d.done, d.ready = trio.Event(), trio.Event()  # (finished when left out: no one waited)
            self.nursery.start_soon(self._run_node, d, self.nursery.cancel_scope)

    async def _post_build_hook(self, node: _Node, scope: trio.CancelScope) -> None:
        drv, outs = node.label, [self.store.print_path(node.outputs[n]) for n in sorted(node.outputs)]
        self.progress.event("hook", drv=drv, name=node.drv.name, hook=self.settings.post_build_hook)
        try:
            await run_hook(self.settings, drv, outs,
                           lambda line: self.progress.event("hook-log", drv=drv, name=node.drv.name, line=line))
        except BuildError as e:
            self.errors.append(e)
            self.progress.event("hook-failed", drv=drv, name=node.drv.name, error=str(e))
            if not self.options.keep_going:
                scope.cancel()

    async def _check_node(self, node: _Node) -> None:
        # --rounds N: N builds in all, the valid one the first (so at least one rebuild): the
        # rebuilds are rounds 2 to N, numbered so in the events, the database and the logs, as
        # the rebuilds of --rounds N without --check are
        rounds = max(2, self.options.rounds)
        try:
            for r in range(2, rounds + 1):
                await self.builder.rebuild_and_compare(node, "check", r, rounds)
        except BuildError as e:
            self.errors.append(e)
            self.progress.event("failed", drv=node.label, name=node.drv.name, error=str(e))


def _damaged(store, drv: StorePath) -> str | None:
    from ..store.local import damaged_drv_hint  # (only when a .drv is found damaged)
    return damaged_drv_hint(store, drv)
