"""Substitution in a realisation: which missing outputs the binary caches can give, what is
then fetched and what built, the fetches made before the builds, and the late fetches.

:class:`Substitution` reads the scheduler's graph of derivations (each node's outputs, what is
needed) and never changes it: it says which outputs became valid, and the scheduler
(:mod:`.scheduler`) takes the nodes that need nothing any more out of its plan.

A *late fetch*: an output a cache has, whose missing reference no cache can give (not there,
not signed by a trusted key, or its NAR failed), is fetched once that reference is built here:
it then has the same path as the cache's (as Nix does).  The plan lists it apart from the
builds, the status line shows it beside them while it runs, and the fetch summary of the run
counts it.  It waits only for the derivations whose outputs it refers to
(:meth:`Substitution.waits_for`): unlike Nix, its derivation's build-only inputs are realised
only if the fetch fails and it is built after all (:meth:`Substitution.inputs_to_realise`).  A NAR that came and passed its
checks before its reference failed is not downloaded again for it (the session keeps the
restored tree: ``cache/restored.py``).  The caches layer is imported lazily: without it,
everything is built.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Iterable

import trio

from ..errors import BuildError
from ..formats.store_path import StorePath

if TYPE_CHECKING:
    from .progress import Progress
    from .scheduler import _Node

log = logging.getLogger("purestore.build")
NOT_IN_CACHES = "no binary cache has it"  # cache.narinfo_lookup.query_substitutable's reason


def wanted_missing(store, n: "_Node") -> list[StorePath]:
    """The outputs of ``n`` that something wants and that are not valid."""
    return [n.outputs[name] for name in sorted(n.wanted)
            if name in n.outputs and not store.is_valid(n.outputs[name])]


class Substitution:
    """The binary-cache side of one realisation over the scheduler's ``nodes`` (drv path ->
    node).  ``fork_worker``: see :class:`.scheduler.BuildOptions`."""

    def __init__(self, store, settings, nodes: dict, progress: "Progress", *, fork_worker: bool = False,
                 late_fetches: bool = True, build_here: bool = True):
        self.store = store
        self.late_fetches = late_fetches  # False: a late fetch is not tried, its package is built (--check)
        self.build_here = build_here  # False: max-jobs = 0, what is not fetched is an error, not built
        self.settings = settings
        self.sd = settings.store_dir
        self.nodes = nodes
        self.progress = progress
        self.fork_worker = fork_worker
        self.query_failures: dict[StorePath, str] = {}
        self.query_blocked: dict[StorePath, tuple] = {}  # see Substitutable.blocked
        self.query_lookup_errors: dict[StorePath, str] = {}  # see Substitutable.lookup_errors
        # outputs a cache has, not fetched only because a reference of theirs failed to come:
        # fetched once their derivation's inputs are built (see fetch_late), as Nix does
        self.fetch_after_build: dict[StorePath, tuple] = {}
        self.found_all: dict[StorePath, tuple] = {}
        self.fetched_for: dict[StorePath, str] = {}  # fetched late as an input of (see inputs_to_realise)
        self.session = None  # the substitution's, kept open for the late fetches
        self.fetched: set[StorePath] = set()  # every path downloaded before the builds

    async def aclose(self) -> None:
        """Close the session kept open for the late fetches, if any (shielded: also on the way
        out of a cancelled run)."""
        if self.session is not None:
            with trio.CancelScope(shield=True):
                await self.session.aclose()
            self.session = None

    def missing_outputs(self) -> set[StorePath]:
        """The missing outputs of needed derivations, when binary caches are to be asked."""
        if not self.settings.substituters or self.settings.offline:
            return set()
        return {o for n in self.nodes.values() if n.needed for o in wanted_missing(self.store, n)}

    async def query(self, session, wanted: set[StorePath]) -> dict:
        """The substitutable ``wanted`` outputs (and the missing paths they refer to):
        path -> (cache URL, narinfo).  Nothing is fetched."""
        from ..cache.narinfo_lookup import query_substitutable
        q = await query_substitutable(self.store, self.settings, wanted, session=session)
        self.query_failures = q.failures
        self.query_blocked = q.blocked
        self.query_lookup_errors = q.lookup_errors
        return dict(q.found)

    def choose(self, found: dict) -> tuple[set[StorePath], set[StorePath]]:
        """``(outputs to fetch, derivations to build)``, walking down from the requested ones: a
        needed derivation whose missing wanted outputs can all be fetched is fetched (those
        outputs only), and then its inputs are not needed (as in Nix, a build-time dependency
        is not downloaded for a package that is); one with none missing any more (another
        process made them meanwhile) needs nothing; any other is built, or fetched late, and
        the inputs it waits for (:meth:`waits_for`) are visited."""
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
            missing = wanted_missing(self.store, n)
            if not missing:
                continue
            if all(o in found for o in missing):
                fetch.update(missing)
            else:
                build.add(p)
                stack.extend(d.path for d in self.waits_for(n))
        return fetch, build

    def waits_for(self, n: "_Node") -> list["_Node"]:
        """The derivations that ``n``, a needed derivation, waits for: all its inputs for a
        build; for a late fetch (its missing wanted outputs all in ``fetch_after_build``), only
        those below it in the graph whose outputs these refer to, an input's input too (a path
        it refers to through what it copied from a build-only input).  Its build-only inputs
        are not realised for it unless that fetch fails (see :meth:`inputs_to_realise`): Nix
        2.8 builds them all the same."""
        if not self.late_fetches or not n.deps or not self.fetch_after_build:
            return n.deps
        outs = wanted_missing(self.store, n)
        if not outs or not all(o in self.fetch_after_build for o in outs):
            return n.deps
        left = {r for o in outs for r in self.fetch_after_build[o][1].references if r not in outs}
        waits, seen, todo = [], set(), collections.deque(n.deps)
        while todo and left:  # (breadth first: the inputs themselves before theirs)
            d = todo.popleft()
            if d.path in seen:
                continue
            seen.add(d.path)
            made = left.intersection(d.outputs.values())
            if made:
                waits.append(d)
                left -= made
            todo.extend(d.deps)
        return waits

    def inputs_to_realise(self, n: "_Node") -> list["_Node"]:
        """The inputs of ``n`` (and theirs, down the graph) that are not needed and whose wanted
        outputs are missing: what ``n``, built after all because its late fetch failed, needs
        realised that :meth:`waits_for` left out.  One a cache has is fetched then (noted in
        ``fetch_after_build``: its task fetches it once what it refers to is there), if the
        caches' session is still open; any other is built."""
        if not wanted_missing(self.store, n):  # another process made them meanwhile
            return []
        todo, seen, out = list(n.deps), set(), []
        while todo:
            d = todo.pop()
            if d.path in seen or d.needed or d.drv is None:
                continue
            seen.add(d.path)
            missing = wanted_missing(self.store, d)
            if not missing:
                continue
            if self.late_fetches and self.session is not None and all(o in self.found_all for o in missing):
                for o in missing:
                    self.fetch_after_build[o] = self.found_all[o]
                    self.fetched_for[o] = n.label
            out.append(d)
            todo.extend(self.waits_for(d))
        return out

    def plan_late_fetches(self, found: dict) -> None:
        """What a cache has but whose missing reference no cache can give (not there, untrusted)
        is fetched once that reference is built here, as Nix does (it has the same path), when
        every reference of it is in a cache, or made here: noted in ``fetch_after_build``."""
        outputs_here = {o for n in self.nodes.values() for o in n.outputs.values()}
        for p, entry in self.query_blocked.items():
            if all(r == p or r in found or r in outputs_here or r in self.query_blocked
                   for r in entry[1].references):
                self.fetch_after_build[p] = self.found_all[p] = entry

    def fetched_after_build(self, build: Iterable[StorePath]) -> set[StorePath]:
        """The derivations of ``build`` (to be built, by :meth:`choose`) whose missing outputs
        are all to be fetched once what they refer to is built here (``fetch_after_build``):
        not built, unless that fetch fails then (see :meth:`fetch_late`)."""
        late = set()
        for p in build:
            outs = wanted_missing(self.store, self.nodes[p])
            if outs and all(o in self.fetch_after_build for o in outs):
                late.add(p)
        return late

    def fail_on_lookup_errors(self, fetch: set[StorePath], build: set[StorePath], found: dict) -> None:
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

    def warn_unfetchable(self, build: set[StorePath]) -> None:
        """Say why an output to be built could not be fetched, when a cache had it but it could
        not be used (untrusted, a reference missing…); not when no cache has it.  With max-jobs
        0 (``build_here`` false) it is not built either: the realisation then fails, naming it."""
        then = "building it" if self.build_here else "and max-jobs is 0, so it is not built here either"
        for p in sorted(build):
            for o in self.nodes[p].outputs.values():
                why = self.query_failures.get(o)
                if why and why != NOT_IN_CACHES and o not in self.fetch_after_build:
                    log.warning("warning: cannot substitute %r: %s; %s", self.store.print_path(o), why, then)

    def fetch_list(self, fetch: set[StorePath], found: dict) -> tuple[tuple[str, str, int, int], ...]:
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

    def after_build_list(self, late: Iterable[StorePath]) -> tuple[tuple[str, str, int, int], ...]:
        """The missing outputs of the derivations ``late`` (see :meth:`fetched_after_build`):
        (path, cache, download, NAR size), as :meth:`fetch_list`."""
        outs = {o for p in late for o in wanted_missing(self.store, self.nodes[p])}
        return tuple((o.absolute(self.sd), self.fetch_after_build[o][0],
                      self.fetch_after_build[o][1].file_size or 0, self.fetch_after_build[o][1].nar_size)
                     for o in sorted(outs, key=lambda q: q.base_name))

    async def substitute(self) -> set[StorePath] | None:
        """Fetch what can be fetched (see :meth:`choose`), announcing it first; returns the
        wanted outputs now valid (None: no cache was to be asked).  The paths downloaded are in
        ``fetched``.  One session on the caches serves the lookup and the fetches (each cache is
        opened, and its nix-cache-info read, once); it stays open for the late fetches, if any
        (:meth:`aclose` closes it)."""
        wanted = self.missing_outputs()
        try:
            from ..cache.narinfo_lookup import Substituters
        except ImportError:  # the caches layer is not installed: build everything
            wanted = set()
        if not wanted:
            return None
        session = Substituters(self.settings)
        await session.__aenter__()
        self.session = session
        try:
            got, self.fetched = await self._fetch(session, wanted)
        except BaseException:
            self.progress.fetch_summary()  # what came before the error
            raise
        if not self.fetch_after_build:
            self.session = None
            await session.aclose()
        else:  # the NARs of the late fetches that came already, restored and checked, stay
            await session.restored.discard(p for p in session.restored.paths() if p not in self.fetch_after_build)
        return got

    async def _fetch(self, session, wanted: set[StorePath]) -> tuple[set[StorePath], set[StorePath]]:
        """(the wanted outputs now valid, every path downloaded: those and their references)."""
        found = await self.query(session, wanted)
        outputs_here = {o for n in self.nodes.values() for o in n.outputs.values()}  # built, if not fetched
        self.found_all = dict(found)
        self.plan_late_fetches(found)
        if not found:
            self.fail_on_lookup_errors(set(), self.choose(found)[1], found)
            self.warn_unfetchable({p for p, n in self.nodes.items() if n.needed})
            return set(), set()
        from ..cache.substituter import substitute_report
        fetch, build = self.choose(found)
        self.fail_on_lookup_errors(fetch, build, found)
        self.warn_unfetchable(build)
        listed = self.fetch_list(fetch, found)
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
                                              fork_worker=self.fork_worker, known=found, session=session)
            finally:  # (one summary for all the rounds, and the late fetches: see _Realiser._run)
                self.progress.fetch_finished(summary=False)
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
            fetch = self.choose(found)[0] - got
            more = [x for x in self.fetch_list(fetch, found) if x[0] not in announced]
            if more:  # inputs of what is built instead, said before they are fetched too
                self._announce(more)
                announced.update(x[0] for x in more)
        return got, fetched

    def _announce(self, listed) -> None:
        """Say what will be fetched before fetching it (the builds are announced with the plan)."""
        self.progress.event("fetch-plan", will_fetch=[p for p, _u, _d, _n in listed],
                            download_size=sum(d for _p, _u, d, _n in listed),
                            nar_size=sum(n for _p, _u, _d, n in listed))

    async def fetch_late(self, node: "_Node") -> bool:
        """Fetch ``node``'s outputs now that the inputs whose outputs they refer to are built
        (:meth:`waits_for`), when a cache had them and only a reference of theirs had failed to
        come (those outputs, built here now, have the same paths).  True when they all came;
        else it is built (the failure said), and no longer counted as a late fetch: it then
        waits for all its inputs."""
        outs = wanted_missing(self.store, node)
        if not outs or not all(o in self.fetch_after_build for o in outs) or self.session is None:
            return False
        if await self._fetch_late(node, outs):
            return True
        for o in outs:
            self.fetch_after_build.pop(o, None)
        await self.session.restored.discard(outs)  # built instead
        return False

    async def _fetch_late(self, node: "_Node", outs: list[StorePath]) -> bool:
        for d in self.waits_for(node):  # registered, not only complete on disk
            await d.done.wait()
        store = self.store
        refs = {r for o in outs for r in self.fetch_after_build[o][1].references if r not in outs}
        if not all(await trio.to_thread.run_sync(lambda: [store.is_valid(r) for r in refs])):
            return False  # what failed to come was not built before this one (another output of it)
        from ..cache.substituter import substitute_report
        counters = self.progress.fetch_progress(late=True)  # shown beside the builds' status
        try:
            rep = await substitute_report(self.store, self.settings, outs, known=self.found_all,
                                          progress=counters, fork_worker=False, session=self.session)
        finally:
            self.progress.fetch_finished(counters, summary=False)
        for p, why in sorted(rep.failures.items()):
            log.warning("warning: cannot substitute %r: %s", p.absolute(self.sd), why)
            self.progress.event("fetch-failed", path=p.absolute(self.sd), error=why)
        if not all(o in rep.valid for o in outs):
            return False
        for p in sorted(rep.fetched, key=lambda q: q.base_name):  # (a "fetched" event each: the counters')
            why = (f"to build {self.fetched_for[p]}, whose fetch failed" if p in self.fetched_for
                   else "once what it refers to was built here")
            self.progress.message(f"fetched {p.absolute(self.sd)} ({why})")
        return True

