"""The trio scheduler: realise derivations, dependencies first, up to N builds at once.

:func:`realise` is the entry point::

    results = await realise(store, settings, [drv_path, ...], BuildOptions(max_jobs=4), progress)

1. Load the ``.drv`` graph (worker thread) and find what is missing: a derivation whose wanted
   outputs are all valid is not needed, nor are its inputs.
2. Try the substituters for missing outputs (when the caches layer is installed and configured).
3. Announce the plan, then build: one task per derivation waits for its inputs, then for a job
   slot; it takes the output path locks (so two ``pure`` processes build a path once: the
   second waits and then finds it valid), runs the builder in the sandbox (or a builtin builder
   in a thread), checks and registers the outputs, and stores the log.
4. Fail fast (the first failure cancels the rest) unless ``keep_going``; cancellation (Ctrl-C)
   kills the builders (SIGKILL on the whole PID namespace), removes temporary outputs and
   releases the locks before :func:`realise` returns.

Blocking work (reading ``.drv`` files, hashing, scanning, SQLite) runs in worker threads.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Iterable

import attrs
import trio

from ..errors import BuildError, HashMismatch, PurestoreError, SandboxError, StoreError
from ..formats.derivation import Derivation, parse_aterm
from ..formats.hash import Hash
from ..formats.store_path import StorePath
from ..store import events
from . import check as check_mod
from . import sandbox as sb
from .builtins import BUILTIN_BUILDERS
from .hook import check_hook, run_hook
from .logs import BuildLog
from .outputs import check_outputs, move_outputs, register_outputs
from .progress import Progress
from ..store.fstree import remove_tree
from .running import GroupSync, Sandboxed, keep_dir, run_sandboxed, unwrap

log = logging.getLogger("purestore.build")
NOT_IN_CACHES = "no binary cache has it"  # cache.narinfo_lookup.query_substitutable's reason
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01T00:00:00Z (the earliest date ZIP can store)


@attrs.frozen
class BuildOptions:
    """How to realise: ``max_jobs`` builds at once; ``cores`` (NIX_BUILD_CORES, 0 = all);
    ``keep_going`` builds what it can after a failure; ``keep_failed`` keeps failed build dirs;
    ``check`` rebuilds already valid outputs of the requested derivations and compares;
    ``rounds`` builds each requested derivation that many times and compares;
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
    """What realising would do (``pure build --dry-run``): the derivations to build (labels) and
    the paths to fetch as ``(path, cache URL, download size, NAR size)``."""

    will_build: tuple[str, ...]
    will_fetch: tuple[tuple[str, str, int, int], ...]

    @property
    def download_size(self) -> int:
        return sum(f[2] for f in self.will_fetch)

    @property
    def nar_size(self) -> int:
        return sum(f[3] for f in self.will_fetch)

    def to_json(self) -> dict:
        return {"willBuild": list(self.will_build),
                "willFetch": [{"path": p, "url": u, "downloadSize": d, "narSize": n}
                              for p, u, d, n in self.will_fetch],
                "downloadSize": self.download_size, "narSize": self.nar_size}


async def plan(store, settings, drv_paths: Iterable[StorePath]) -> Plan:
    """What :func:`realise` would build and fetch for ``drv_paths``, doing neither: the missing
    outputs are looked up in the substituters (narinfos only; see :meth:`_Realiser._choose`)."""
    r = _Realiser(store, settings, BuildOptions(), Progress(quiet=True))
    await trio.to_thread.run_sync(r._load_graph, list(drv_paths))
    wanted = r._missing_outputs()
    try:
        found = await r._query(None, wanted) if wanted else {}
    except ImportError:  # the caches layer is not installed
        found = {}
    r._plan_late_fetches(found)  # (not warned about: fetched once their reference is built)
    fetch, build = r._choose(found)
    r._fail_on_lookup_errors(fetch, build, found)  # as the run would
    r._warn_unfetchable(build)
    return Plan(tuple(sorted(r.nodes[p].label for p in build)), r._fetch_list(fetch, found))


class _Realiser:
    def __init__(self, store, settings, options: BuildOptions, progress: Progress):
        self.store = store
        self.settings = settings
        self.options = options
        self.progress = progress
        self.sd = settings.store_dir
        self.nodes: dict[StorePath, _Node] = {}
        self.errors: list[BuildError] = []
        self.limiter = trio.CapacityLimiter(max(1, options.max_jobs))
        self.in_progress: dict[StorePath, trio.Event] = {}
        self.unreproducible: list[str] = []
        self.syncer = GroupSync(store.real_store_dir)
        self.background: trio.Nursery | None = None
        self.fork_server: sb.ForkServer | None = None
        self.pending_refs: dict[StorePath, frozenset[StorePath]] = {}
        self.query_failures: dict[StorePath, str] = {}
        self.query_blocked: dict[StorePath, tuple] = {}  # see Substitutable.blocked
        self.query_lookup_errors: dict[StorePath, str] = {}  # see Substitutable.lookup_errors
        self.top_outputs: dict[StorePath, frozenset[str]] = {}  # see realise(outputs=)
        # outputs a cache has, not fetched only because a reference of theirs failed to come:
        # fetched once their derivation's inputs are built (see _fetch_late), as Nix does
        self.fetch_after_build: dict[StorePath, tuple] = {}
        self.found_all: dict[StorePath, tuple] = {}
        self.session = None  # the substitution's, kept open for the late fetches

    def _server(self) -> sb.ForkServer:
        """The fork server, started on first use (in the trio thread: it dies with that thread)."""
        if self.fork_server is None:
            self.fork_server = sb.ForkServer()
        return self.fork_server

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
            if node.needed or all(store.is_valid(node.outputs[n]) for n in node.wanted if n in node.outputs):
                continue
            if node.drv is None:
                parse(node)
            node.needed = True
            order.append(node)
            stack.extend((StorePath.parse(d, self.sd), frozenset(outs)) for d, outs in node.drv.input_drvs.items())
        for node in order:
            node.deps = [self.nodes[StorePath.parse(d, self.sd)] for d in node.drv.input_drvs]
        for node in self.nodes.values():
            if not node.needed:
                node.ok = True
                node.finish()
        for t in tops:
            self.nodes[t].top = True

    def _wanted_missing(self, n: _Node) -> list[StorePath]:
        """The outputs of ``n`` that something wants and that are not valid."""
        return [n.outputs[name] for name in sorted(n.wanted)
                if name in n.outputs and not self.store.is_valid(n.outputs[name])]

    def _read_drv(self, p: StorePath) -> Derivation:
        real = self.store.real_path(p)
        try:
            with open(real, "rb") as f:
                return parse_aterm(f.read(), where=self.store.print_path(p))
        except FileNotFoundError:
            raise StoreError(f"derivation {self.store.print_path(p)!r} does not exist in the store "
                             f"at {self.store.real_store_dir!r}") from None
        except OSError as e:
            raise StoreError(f"cannot read derivation {real!r}: {e.strerror}") from e

    def _missing_outputs(self) -> set[StorePath]:
        """The missing outputs of needed derivations, when binary caches are to be asked."""
        if not self.settings.substituters or self.settings.offline:
            return set()
        return {o for n in self.nodes.values() if n.needed for o in self._wanted_missing(n)}

    async def _query(self, session, wanted: set[StorePath]) -> dict:
        """The substitutable ``wanted`` outputs (and the missing paths they refer to):
        path -> (cache URL, narinfo).  Nothing is fetched."""
        from ..cache.narinfo_lookup import query_substitutable
        q = await query_substitutable(self.store, self.settings, wanted, session=session)
        self.query_failures = q.failures
        self.query_blocked = q.blocked
        self.query_lookup_errors = q.lookup_errors
        return dict(q.found)

    def _choose(self, found: dict) -> tuple[set[StorePath], set[StorePath]]:
        """``(outputs to fetch, derivations to build)``, walking down from the requested ones: a
        needed derivation whose missing wanted outputs can all be fetched is fetched (those
        outputs only), and then its inputs are not needed (as in Nix, a build-time dependency
        is not downloaded for a package that is); one with none missing any more (another
        process made them meanwhile) needs nothing; any other is built, and its inputs are
        visited."""
        fetch: set[StorePath] = set()
        build: set[StorePath] = set()
        seen: set[StorePath] = set()
        stack = [p for p, n in self.nodes.items() if n.top]
        while stack:
            p = stack.pop()
            if p in seen:
                continue
            seen.add(p)
            n = self.nodes[p]
            if not n.needed:
                continue
            missing = self._wanted_missing(n)
            if not missing:
                continue
            if all(o in found for o in missing):
                fetch.update(missing)
            else:
                build.add(p)
                stack.extend(d.path for d in n.deps)
        return fetch, build

    def _plan_late_fetches(self, found: dict) -> None:
        """What a cache has but whose missing reference no cache can give (not there, untrusted)
        is fetched once that reference is built here, as Nix does (it has the same path), when
        every reference of it is in a cache, or made here: noted in ``fetch_after_build``."""
        outputs_here = {o for n in self.nodes.values() for o in n.outputs.values()}
        for p, entry in self.query_blocked.items():
            if all(r == p or r in found or r in outputs_here or r in self.query_blocked
                   for r in entry[1].references):
                self.fetch_after_build[p] = self.found_all[p] = entry

    def _fail_on_lookup_errors(self, fetch: set[StorePath], build: set[StorePath], found: dict) -> None:
        """With ``fallback = false``, as Nix without ``--fallback``: a cache that could not be
        asked for a path this build needs (an output it builds, or a path it fetches with its
        closure) fails the build; building here what a cache that is down has is what
        fallback = true is for.  A build input of a package that is fetched is not needed."""
        if not self.query_lookup_errors or getattr(self.settings, "fallback", True):
            return
        needed = {o for p in build for o in self.nodes[p].outputs.values()}
        todo = list(fetch)
        while todo:
            p = todo.pop()
            if p not in needed:
                needed.add(p)
                if p in found:
                    todo.extend(found[p][1].references)
        errors = {p: why for p, why in self.query_lookup_errors.items() if p in needed}
        if errors:
            p, why = min(errors.items(), key=lambda kv: kv[0].base_name)
            n = len(errors)
            more = f" (and {n - 1} other path{'s' if n > 2 else ''})" if n > 1 else ""
            raise BuildError(f"cannot look up {self.store.print_path(p)!r}{more} in the binary caches: "
                             f"{why}; and fallback = false: it is not built here instead",
                             hint="give --fallback, or set fallback = true (the default), to build what "
                                  "cannot be fetched")

    def _warn_unfetchable(self, build: set[StorePath]) -> None:
        """Say why an output to be built could not be fetched, when a cache had it but it could
        not be used (untrusted, a reference missing…); not when no cache has it."""
        for p in sorted(build):
            for o in self.nodes[p].outputs.values():
                why = self.query_failures.get(o)
                if why and why != NOT_IN_CACHES and o not in self.fetch_after_build:
                    log.warning("warning: cannot substitute %r: %s; building it", self.store.print_path(o), why)

    def _fetch_list(self, fetch: set[StorePath], found: dict) -> tuple[tuple[str, str, int, int], ...]:
        """``fetch`` with the missing paths of their closures: (path, cache, download, NAR size)."""
        todo, closure = list(fetch), set()
        while todo:
            p = todo.pop()
            if p in closure or p not in found:
                continue
            closure.add(p)
            todo.extend(found[p][1].references)
        return tuple((p.absolute(self.sd), found[p][0], found[p][1].file_size or 0, found[p][1].nar_size)
                     for p in sorted(closure, key=lambda q: q.base_name))

    async def _substitute(self) -> list[str]:
        """Fetch what can be fetched (see :meth:`_choose`), announcing it first; returns the
        requested paths that were fetched.  One session on the caches serves the lookup and the
        fetches (each cache is opened, and its nix-cache-info read, once)."""
        wanted = self._missing_outputs()
        try:
            from ..cache.narinfo_lookup import Substituters
        except ImportError:  # the caches layer is not installed: build everything
            wanted = set()
        if not wanted:
            return []
        session = Substituters(self.settings)
        await session.__aenter__()
        self.session = session  # closed by run(); kept open for the late fetches, if any
        got, fetched = await self._fetch(session, wanted)
        if not self.fetch_after_build:
            self.session = None
            await session.aclose()
        for node in self.nodes.values():
            if node.needed and all(o in got for o in self._wanted_missing(node)):
                node.needed = False
        # dependencies of substituted nodes are no longer needed unless a needed node uses them
        self._recompute_needed()
        return sorted(self.store.print_path(p) for p in fetched)

    async def _fetch(self, session, wanted: set[StorePath]) -> tuple[set[StorePath], set[StorePath]]:
        """(the wanted outputs now valid, every path downloaded: those and their references)."""
        found = await self._query(session, wanted)
        outputs_here = {o for n in self.nodes.values() for o in n.outputs.values()}  # built, if not fetched
        self.found_all = dict(found)
        self._plan_late_fetches(found)
        if not found:
            self._fail_on_lookup_errors(set(), self._choose(found)[1], found)
            self._warn_unfetchable({p for p, n in self.nodes.items() if n.needed})
            return set(), set()
        from ..cache.substituter import substitute_report
        fetch, build = self._choose(found)
        self._fail_on_lookup_errors(fetch, build, found)
        self._warn_unfetchable(build)
        listed = self._fetch_list(fetch, found)
        self._announce(listed)
        announced = {x[0] for x in listed}
        got: set[StorePath] = set()
        fetched: set[StorePath] = set()
        failed_all: set[StorePath] = set()  # warned about once each, and not tried again
        # what failed to come is built, which may need inputs fetched: rounds until nothing is
        # left to fetch (each round takes what failed, and what needs it, out of ``found``)
        while fetch:
            try:
                rep = await substitute_report(self.store, self.settings, fetch, progress=self.progress.fetch_progress(),
                                              fork_worker=self.options.fork_worker, known=found, session=session)
            finally:
                self.progress.fetch_finished()
            for p, why in sorted(rep.failures.items()):  # then built instead, where it is needed
                if p not in failed_all:
                    # one that failed only with a reference is not warned about: the reference
                    # is (the cause), and it is fetched once that is built, or built
                    by_reference = p in found and (found[p][0], p.hash_part) not in session.failed and any(
                        r != p and r in rep.failures for r in found[p][1].references)
                    if not by_reference:
                        log.warning("warning: cannot substitute %r: %s", p.absolute(self.sd), why)
                    self.progress.event("fetch-failed", path=p.absolute(self.sd), error=why)
            if rep.failures and not getattr(self.settings, "fallback", True):
                n = len(rep.failures)
                raise BuildError(f"{n} path{'s' if n > 1 else ''} listed by the substituters could not be "
                                 f"fetched (said above), and fallback = false: "
                                 f"{'they are' if n > 1 else 'it is'} not built here instead",
                                 hint="give --fallback, or set fallback = true (the default), to build what cannot be fetched")
            failed_all |= set(rep.failures)
            fetched.update(rep.fetched)
            new = rep.valid
            got |= new
            failed = fetch - new
            if not failed:
                break
            failed_all |= failed
            # not tried again: what failed, and what needs it (its closure would fail again)
            stale = True
            while stale:
                stale = False
                for p in list(found):
                    own = (found[p][0], p.hash_part) in session.failed  # its NAR failed
                    refs = [r for r in found[p][1].references if r != p]
                    if p in failed_all or own or any(r in failed_all for r in refs):
                        if not own and all(r in outputs_here or r not in failed_all for r in refs):
                            self.fetch_after_build[p] = found[p]  # once what failed is built
                        del found[p]
                        failed_all.add(p)
                        stale = True
            fetch = self._choose(found)[0] - got
            more = [x for x in self._fetch_list(fetch, found) if x[0] not in announced]
            if more:  # inputs of what is built instead, said before they are fetched too
                self._announce(more)
                announced.update(x[0] for x in more)
        return got, fetched

    def _announce(self, listed) -> None:
        """Say what will be fetched before fetching it (the builds are announced with the plan)."""
        self.progress.event("fetch-plan", will_fetch=[p for p, _u, _d, _n in listed],
                            download_size=sum(d for _p, _u, d, _n in listed),
                            nar_size=sum(n for _p, _u, _d, n in listed))

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
                stack.extend(d.path for d in n.deps)
        for p, n in self.nodes.items():
            n.needed = p in keep
            if not n.needed and not n.done.is_set():
                n.ok = True
                n.finish()

    # -- running -------------------------------------------------------------------------------

    async def run(self, tops: list[StorePath]) -> dict[StorePath, dict[str, StorePath]]:
        self.root_mount = os.path.join(self.store.state_dir, "sandbox-root")

        def setup():
            os.makedirs(self.root_mount, mode=0o755, exist_ok=True)
            self._load_graph(tops)
        await trio.to_thread.run_sync(setup)
        try:
            return await self._run(tops)
        finally:
            if self.session is not None:  # (kept open by _substitute for the late fetches)
                with trio.CancelScope(shield=True):
                    await self.session.aclose()
                self.session = None

    async def _run(self, tops: list[StorePath]) -> dict[StorePath, dict[str, StorePath]]:
        substituted = await self._substitute()
        to_build = [n for n in self.nodes.values() if n.needed]
        if self.options.max_jobs == 0 and (to_build or self.options.check):
            if not to_build:
                raise BuildError("--check builds again, and max-jobs is 0: nothing is built here",
                                 hint="set max-jobs to 1 or more (the setting, or -j N)")
            names = ", ".join(sorted(n.label for n in to_build)[:5]) + (" …" if len(to_build) > 5 else "")
            raise BuildError(f"cannot build {len(to_build)} derivation{'s' if len(to_build) > 1 else ''} "
                             f"({names}): max-jobs is 0, so nothing is built here, and "
                             f"{'they' if len(to_build) > 1 else 'it'} could not be fetched",
                             hint="set max-jobs to 1 or more (the setting, or -j N where the command has it)")
        if to_build and self.settings.post_build_hook:
            check_hook(self.settings.post_build_hook)
        checks = []
        if self.options.check:
            checks = [self.nodes[t] for t in tops if not self.nodes[t].needed]
        self.progress.event("plan", will_build=sorted(n.label for n in to_build),
                            will_substitute=substituted,
                            will_check=sorted(n.label for n in checks))
        try:
            async with trio.open_nursery() as background:
                # clean-ups (reaping sandboxes, removing build dirs) overlap with the next builds
                self.background = background
                async with trio.open_nursery() as nursery:
                    for node in to_build:
                        nursery.start_soon(self._run_node, node, nursery.cancel_scope)
                    for node in checks:
                        nursery.start_soon(self._check_node, node)
        except BaseExceptionGroup as eg:
            raise unwrap(eg) from None
        finally:
            if self.fork_server is not None:
                self.fork_server.close()
            self.progress.event("done")
        if self.errors:
            raise BuildFailures(self.errors)
        if self.unreproducible:
            raise NotReproducible("\n".join(self.unreproducible))
        return {t: dict(self.nodes[t].outputs) for t in tops}

    async def _run_node(self, node: _Node, scope: trio.CancelScope) -> None:
        try:
            # a dependency's outputs may be used as soon as they are complete at their real paths;
            # registering ours waits until the dependencies are registered (see _build_once)
            for d in node.deps:
                await d.ready.wait()
            failed = [d for d in node.deps if d.done.is_set() and not d.ok]
            if failed:
                node.error = f"dependency {failed[0].label} failed"
                return
            if not self.options.check and await self._fetch_late(node):
                node.ok = True
                return
            rounds = self.options.rounds if node.top else 1
            built = await self._build_node(node, rounds)
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

    async def _fetch_late(self, node: _Node) -> bool:
        """Fetch ``node``'s outputs now that its inputs are built, when a cache had them and
        only a reference of theirs had failed to come (its inputs' outputs, built here now,
        have the same paths).  True when they all came; else it is built (the failure said)."""
        outs = self._wanted_missing(node)
        if not outs or not all(o in self.fetch_after_build for o in outs) or self.session is None:
            return False
        for d in node.deps:  # registered, not only complete on disk
            await d.done.wait()
        store = self.store
        refs = {r for o in outs for r in self.fetch_after_build[o][1].references if r not in outs}
        if not all(await trio.to_thread.run_sync(lambda: [store.is_valid(r) for r in refs])):
            return False  # what failed to come was not built before this one (another output of it)
        from ..cache.substituter import substitute_report
        rep = await substitute_report(self.store, self.settings, outs, known=self.found_all,
                                      fork_worker=False, session=self.session)
        for p, why in sorted(rep.failures.items()):
            log.warning("warning: cannot substitute %r: %s", p.absolute(self.sd), why)
            self.progress.event("fetch-failed", path=p.absolute(self.sd), error=why)
        if not all(o in rep.valid for o in outs):
            for o in outs:
                self.fetch_after_build.pop(o, None)
            return False
        for p in sorted(rep.fetched, key=lambda q: q.base_name):
            self.progress.message(f"fetched {p.absolute(self.sd)} (once what it refers to was built here)")
            self.progress.event("fetched", path=p.absolute(self.sd))
        return True

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
        try:
            await self._rebuild_and_compare(node, "check", 1)
        except BuildError as e:
            self.errors.append(e)
            self.progress.event("failed", drv=node.label, name=node.drv.name, error=str(e))

    async def _lock_outputs(self, node: _Node) -> list[str]:
        """Take the path locks of ``node``'s outputs in the trio thread (without blocking it),
        all or none: while one is busy (another process builds or substitutes it) none is held,
        so that no cycle of waits can form with a process that holds that one and waits for
        another output of ours (a substitution holds a path's lock until its references are
        registered)."""
        names = sorted(o.base_name for o in node.outputs.values())
        locks = self.store.locks
        told = False
        while True:
            taken: list[str] = []
            busy = None
            try:
                for name in names:
                    if not locks.acquire(name, blocking=False):
                        busy = name
                        break
                    taken.append(name)
            except BaseException:
                for name in reversed(taken):
                    locks.release(name)
                raise
            if busy is None:
                return taken
            for name in reversed(taken):
                locks.release(name)
            if not told:  # said once, as a substitution says it
                told = True
                path = self.store.print_path(next(o for o in node.outputs.values() if o.base_name == busy))
                self.progress.message(f"waiting for another process to finish '{path}'")
                self.progress.event("waiting", drv=node.label, path=path)
            await trio.to_thread.run_sync(locks.wait_released, busy, abandon_on_cancel=True)

    def _unlock(self, taken: list[str]) -> None:
        for name in reversed(taken):
            self.store.locks.release(name)

    async def _build_node(self, node: _Node, rounds: int) -> bool:
        """Build ``node`` unless another process did meanwhile; True when this one built it."""
        # one in-process builder per output path (two FODs may share an output path)
        for o in node.outputs.values():
            ev = self.in_progress.get(o)
            if ev is not None:
                await ev.wait()
        evs = {o: trio.Event() for o in node.outputs.values()}
        self.in_progress.update(evs)
        try:
            taken = await self._lock_outputs(node)
            try:
                valid = await trio.to_thread.run_sync(
                    lambda: all(self.store.is_valid(o) for o in node.outputs.values()))
                if not valid:
                    await self._build_once(node, "build", 1, install=True)
            finally:
                self._unlock(taken)
        finally:
            for o, ev in evs.items():
                self.in_progress.pop(o, None)
                ev.set()
        for r in range(2, rounds + 1):
            await self._rebuild_and_compare(node, "round", r, rounds)
        return not valid

    async def _rebuild_and_compare(self, node: _Node, kind: str, round_: int, rounds: int = 2) -> None:
        infos = await trio.to_thread.run_sync(
            lambda: {n: self.store.query_path_info(o) for n, o in node.outputs.items()})
        if any(i is None for i in infos.values()):
            raise BuildError(f"cannot check {node.label}: not all of its outputs are valid")
        await self._build_once(node, kind, round_, install=False, compare_with=infos, rounds=rounds)

    def _input_closure(self, node: _Node) -> set[StorePath]:
        roots = {StorePath.parse(s, self.sd) for s in node.drv.input_srcs}
        for d, outs in node.drv.input_drvs.items():
            dp = StorePath.parse(d, self.sd)
            dep = self.nodes.get(dp)
            dep_outs = dep.outputs if dep is not None else (
                self.store.query_derivation_outputs(dp)
                or {n: StorePath.parse(o.path, self.sd) for n, o in self._read_drv(dp).outputs.items()})
            for o in outs:
                if o not in dep_outs:
                    raise BuildError(f"{node.label} uses output {o!r} of {d}, which has no such output")
                roots.add(dep_outs[o])
        self.store.add_temp_roots(roots)
        # outputs built by this run but not registered yet: their references are known here
        closure: set[StorePath] = set()
        from_db: list[StorePath] = []
        stack = list(roots)
        while stack:
            p = stack.pop()
            if p in closure:
                continue
            refs = self.pending_refs.get(p)
            if refs is None:
                from_db.append(p)
                continue
            closure.add(p)
            stack.extend(refs)
        return closure | self.store.query_closure(from_db)

    def _env(self, node: _Node) -> tuple[dict[str, str], dict[str, bytes]]:
        drv = node.drv
        cores = self.options.cores or os.cpu_count() or 1
        env = {
            "PATH": "/path-not-set",
            "HOME": "/homeless-shelter",
            "NIX_STORE": self.sd,
            "NIX_BUILD_CORES": str(cores),
            "NIX_BUILD_TOP": "/build",
            "TMPDIR": "/build", "TEMPDIR": "/build", "TMP": "/build", "TEMP": "/build",
            "PWD": "/build",
            "NIX_LOG_FD": "2",
            "TERM": "xterm-256color",
            "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
        }
        if drv.is_fixed_output:
            # like Nix: a fixed-output build may see the host's values of the variables it
            # declares impure (proxies and the like); its output is checked against its hash
            for k in drv.env.get("impureEnvVars", "").split():
                if k in os.environ:
                    env[k] = os.environ[k]
        files: dict[str, bytes] = {}
        pass_as_file = set(drv.env.get("passAsFile", "").split())
        for k, v in drv.env.items():
            if k in pass_as_file:
                fn = ".attr-" + Hash.of_bytes(k.encode()).nix32  # Nix's file name
                files[fn] = v.encode(errors="surrogateescape")
                env[k + "Path"] = "/build/" + fn
            else:
                env[k] = v
        return env, files

    async def _build_once(self, node: _Node, kind: str, round_: int, *, install: bool,
                          compare_with: dict | None = None, rounds: int = 1) -> None:
        store, drv = self.store, node.drv
        builtin = drv.builder.startswith("builtin:")
        network = drv.is_fixed_output
        if builtin and drv.builder not in BUILTIN_BUILDERS:
            raise BuildError(f"{node.label} uses unknown builtin builder {drv.builder!r} "
                             f"(known: {', '.join(sorted(BUILTIN_BUILDERS))})")
        if builtin and not drv.is_fixed_output:
            raise BuildError(f"builtin builder {drv.builder!r} of {node.label} is only allowed "
                             f"for fixed-output derivations")
        if drv.system not in ("x86_64-linux", "builtin") and not builtin:
            raise BuildError(f"{node.label} is for system {drv.system!r}, this machine builds x86_64-linux")
        top = store.temp_name(node.path)
        spec = None
        sandboxed: Sandboxed | None = None
        token = object()
        await self.limiter.acquire_on_behalf_of(token)  # -j: how many builders run at once
        holding = [True]

        def release_slot():
            if holding[0]:
                holding[0] = False
                self.limiter.release_on_behalf_of(token)

        def begin():
            event = events.record_build_start(store, node.label, drv.name, fixed_output=drv.is_fixed_output,
                                              network=network, kind=kind, round=round_)
            try:
                closure = self._input_closure(node)
                env, files = self._env(node)
                inputs = {store.print_path(p): store.real_path(p) for p in closure}
                sp = sb.SandboxSpec(argv=(drv.builder, *drv.args), env=env, top=top, store_dir=self.sd,
                                    inputs=inputs, network=network, root_mount=self.root_mount,
                                    ro_base=store.real_store_dir)
                sb.prepare_root(sp)
                for fn, data in files.items():
                    with open(os.path.join(sp.build_dir, fn), "wb") as f:
                        f.write(data)
            except BaseException as e:
                events.record_build_finish(store, event, "failed", error=str(e))
                raise
            return event, closure, sp
        try:
            event_id, closure, spec = await trio.to_thread.run_sync(begin)
        except BaseException:
            release_slot()
            raise
        self.progress.event("start", drv=node.label, name=drv.name, kind=kind, round=round_)
        log = BuildLog(store.state_dir, node.path.base_name,
                       echo=(lambda line: self.progress.event("log", drv=node.label, name=drv.name, line=line))
                       if self.progress.print_logs or self.progress.json_stream else None)
        status = "failed"
        keep_top = False
        outs_info = {}
        try:
            host_outs = {n: spec.host_path(store.print_path(o)) for n, o in node.outputs.items()}
            if builtin:
                await self._run_builtin(node, host_outs["out"], log)
                release_slot()
            else:
                code, sandboxed = await run_sandboxed(self._server(), spec, log)
                release_slot()  # checking and registering the outputs does not count against -j
                if code != 0:
                    await sandboxed.reap()
                    keep_top = self.options.keep_failed
                    raise self._failure(node, code, log, spec if keep_top else None)
            built = await trio.to_thread.run_sync(
                lambda: check_outputs(drv, node.path, host_outs, closure, self.sd, node.label))
            outs_info = {n: (store.print_path(b.info.path), f"sha256:{b.info.nar_hash.nix32}")
                         for n, b in built.items()}
            if install:
                for b in built.values():
                    self.pending_refs[b.info.path] = b.info.references
                moved = await trio.to_thread.run_sync(lambda: move_outputs(store, built))
                node.ready.set()
                if moved and store.durable:
                    await self.syncer.sync()
                for d in node.deps:
                    await d.done.wait()
                    if not d.ok:
                        raise BuildError(f"cannot register the outputs of {node.label}: "
                                         f"its dependency {d.label} failed")
                await trio.to_thread.run_sync(lambda: register_outputs(store, built, moved, node.path))
            else:
                await self._compare(node, kind, built, compare_with, rounds)
            status = "built"
            self.progress.event("built", drv=node.label, name=drv.name,
                                outputs={n: p for n, (p, _) in outs_info.items()})
        except HashMismatch as e:
            await trio.to_thread.run_sync(lambda: events.record_sandbox_refusal(
                store, node.label, f"fixed-output hash mismatch: {e}"))
            raise
        except SandboxError as e:
            await trio.to_thread.run_sync(lambda: events.record_sandbox_refusal(store, node.label, str(e)))
            raise BuildError(f"cannot build {node.label}: {e}") from e
        except BuildError as e:
            if "suspicious" in str(e):
                await trio.to_thread.run_sync(lambda: events.record_sandbox_refusal(store, node.label, str(e)))
            raise
        except BaseException as e:  # Cancelled, KeyboardInterrupt: the build was interrupted
            if not isinstance(e, Exception):
                status = "interrupted"
            raise
        finally:
            release_slot()
            with trio.CancelScope(shield=True):
                try:
                    log.close()
                except StoreError:
                    pass
                def finish():
                    if not keep_top:
                        remove_tree(top)
                    events.record_build_finish(store, event_id, status, outs_info,
                                               None if status == "built" else status)

                async def cleanup():
                    # after the namespaces are gone (they hold the build dir): remove, record
                    if sandboxed is not None:
                        await sandboxed.reap()
                    with trio.CancelScope(shield=True):
                        try:
                            await trio.to_thread.run_sync(finish)
                        except (PurestoreError, OSError):
                            pass
                if status == "built" and self.background is not None:
                    self.background.start_soon(cleanup)
                else:
                    await cleanup()

    async def _run_builtin(self, node: _Node, out: str, log: BuildLog) -> None:
        fn = BUILTIN_BUILDERS[node.drv.builder]
        lines: list[str] = []
        try:
            await trio.to_thread.run_sync(lambda: fn(node.drv, out, lines.append), abandon_on_cancel=False)
        finally:
            for line in lines:
                log.line(line)

    def _failure(self, node: _Node, code: int, log: BuildLog, spec) -> BuildError:
        tail = log.tail()
        if code > 128:
            how = f"was killed by signal {code - 128} ({signal.Signals(code - 128).name})" \
                if code - 128 in signal.valid_signals() else f"exited with status {code}"
        else:
            how = f"exited with status {code}"
        msg = f"builder for {node.label} {how}"
        if tail:
            msg += f"\nlast {len(tail)} log lines:\n" + "\n".join(f"  > {line}" for line in tail)
        msg += f"\nfull log: {log.path} (or: pure log {node.label})"
        if spec is not None:
            kept = keep_dir(spec.top, node.drv.name)
            msg += f"\nkeeping build directory {kept}/build (what the builder wrote to the store dir: {kept}/upper)"
        return BuildError(msg)

    async def _compare(self, node: _Node, kind: str, built: dict, infos: dict, rounds: int) -> None:
        diffs: list[dict] = []
        for n, b in built.items():
            old = infos[n]
            if old.nar_hash == b.info.nar_hash:
                continue
            real = self.store.real_path(b.info.path)
            keep = real + ".check"

            def work(b=b, real=real, keep=keep, n=n):
                d = check_mod.diff_trees(real, b.host_path)
                remove_tree(keep)
                os.rename(b.host_path, keep)
                extra = check_mod.diffoscope(real, keep)
                return [{"output": n, **x} for x in d], extra
            d, extra = await trio.to_thread.run_sync(work)
            lines = [f"output {n!r} of {node.label} differs ({kind}): "
                     f"{old.nar_hash.sri} before, {b.info.nar_hash.sri} now; the new result is kept at {keep}"]
            lines += ["  " + check_mod.describe(x) for x in d]
            if extra:
                lines.append("diffoscope:\n" + extra)
            self.unreproducible.append("\n".join(lines))
            diffs.extend({**x, "kept": keep} for x in d)
        reproducible = not diffs and all(infos[n].nar_hash == b.info.nar_hash for n, b in built.items())
        await trio.to_thread.run_sync(lambda: events.record_check(
            self.store, node.label, kind="check" if kind == "check" else "rounds",
            rounds=rounds if kind == "round" else 2, reproducible=reproducible, differences=diffs))
        self.progress.event("check", drv=node.label, reproducible=reproducible, differences=diffs)
