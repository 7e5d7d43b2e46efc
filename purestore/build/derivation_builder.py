"""Building one derivation: :class:`DerivationBuilder` takes its output path locks, prepares its
sandbox (the closure of its inputs, its environment, its files), runs its builder there (or a
builtin builder in a thread) under the job limit, checks its outputs, then registers them (a
build) or compares them with the valid ones (``--check``, ``--rounds``), and stores its log.

The scheduler (:mod:`.scheduler`) decides what to build and when; it hands each derivation
(a node of its graph, whose dependencies are done) to :meth:`DerivationBuilder.build` or
:meth:`DerivationBuilder.rebuild_and_compare`.  Cancellation kills the builder (SIGKILL on
the whole PID namespace), removes the temporary outputs and releases the locks.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Callable

import trio

from .._json import camel_case_keys
from .._lock_wait import wait_lock_released
from ..errors import BuildError, HashMismatch, PurestoreError, SandboxError, StoreError
from ..formats.derivation import Derivation, render_aterm
from ..formats.hash import Hash
from ..formats.store_path import StorePath
from ..store import events
from . import check as check_mod
from . import sandbox as sb
from .builtins import BUILTIN_BUILDERS
from .logs import BuildLog
from .outputs import check_outputs, move_outputs, register_outputs
from .progress import Progress
from ..store.fstree import remove_tree
from .running import BuildLimitExceeded, GroupSync, Sandboxed, keep_dir, run_builtin, run_sandboxed

if TYPE_CHECKING:
    from .scheduler import BuildOptions, _Node

SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01T00:00:00Z (the earliest date ZIP can store)
_MAX_ARG_STRLEN = 131072  # Linux's limit on one argument or NAME=VALUE string (32 pages), NUL included


class DerivationBuilder:
    """The builds of one realisation over the scheduler's ``nodes`` (drv path -> node), up to
    ``options.max_jobs`` at once; ``read_drv`` reads a derivation the graph has not parsed (an
    input of one that is checked)."""

    def __init__(self, store, settings, options: BuildOptions, progress: Progress, nodes: dict,
                 read_drv: Callable[[StorePath], Derivation]):
        self.store = store
        self.sd = settings.store_dir
        self.limits = dict(max_silent_time=settings.max_silent_time, timeout=settings.timeout,
                           max_log_size=settings.max_build_log_size)
        self.options = options
        self.progress = progress
        self.nodes = nodes
        self.read_drv = read_drv
        self.limiter = trio.CapacityLimiter(max(1, options.max_jobs))
        self.in_progress: dict[StorePath, trio.Event] = {}
        self.unreproducible: list[str] = []  # what --check and --rounds found different
        self.kept_checks: set[str] = set()  # the <output>.check paths written by this run
        self.syncer = GroupSync(store.real_store_dir)
        self.background: trio.Nursery | None = None  # where clean-ups run on (set by the scheduler)
        self.fork_server: sb.ForkServer | None = None
        self.pending_refs: dict[StorePath, frozenset[StorePath]] = {}
        self.root_mount = os.path.join(store.state_dir, "sandbox-root")  # (made by the scheduler)

    def _server(self) -> sb.ForkServer:
        """The fork server, started on first use (in the trio thread: it dies with that thread)."""
        if self.fork_server is None:
            self.fork_server = sb.ForkServer()
        return self.fork_server

    def close(self) -> None:
        """Stop the fork server, if it was started."""
        if self.fork_server is not None:
            self.fork_server.close()

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
            # in a thread outside the default limiter's 40, bounded all the same, as the
            # substituter waits (see purestore._lock_wait): a wait per busy derivation, taking
            # those 40, would stop everything of this run that needs a thread, and so the other
            # process if it waits for us in turn
            await wait_lock_released(locks, busy)

    def _unlock(self, taken: list[str]) -> None:
        for name in reversed(taken):
            self.store.locks.release(name)

    async def build(self, node: _Node, rounds: int) -> bool:
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
                    await self._build_once(node, "build", 1, install=True, rounds=rounds)
            finally:
                self._unlock(taken)
        finally:
            for o, ev in evs.items():
                self.in_progress.pop(o, None)
                ev.set()
        for r in range(2, rounds + 1):
            await self.rebuild_and_compare(node, "round", r, rounds)
        return not valid

    async def rebuild_and_compare(self, node: _Node, kind: str, round_: int, rounds: int = 2) -> None:
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
                or {n: StorePath.parse(o.path, self.sd) for n, o in self.read_drv(dp).outputs.items()})
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
        if not drv.builder.startswith("builtin:"):  # (given the derivation itself: any attribute)
            _check_passable(node.label, drv, pass_as_file)
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
        if "__json" in drv.env:  # (a Nix .drv: its builder would find no .attrs.json nor .attrs.sh)
            raise BuildError(f"{node.label} uses structured attributes (__json), which purestore does "
                             f"not support: Nix gives them to the builder as .attrs.json and .attrs.sh")
        if drv.system == "builtin" and not builtin:  # (as Nix: it was run in the sandbox all the same)
            raise BuildError(f"{node.label} is for system 'builtin', which only a builtin builder "
                             f"(builtin:NAME) builds, but its builder is {drv.builder!r}")
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
        self.progress.event("start", drv=node.label, name=drv.name, kind=kind, round=round_, rounds=rounds)
        log: BuildLog | None = None
        status = "failed"
        keep_top = False
        outs_info = {}
        try:
            log = BuildLog(store.state_dir, node.path.base_name,
                           echo=(lambda line: self.progress.event("log", drv=node.label, name=drv.name, line=line))
                           if self.progress.print_logs or self.progress.json_stream else None,
                           variant=None if kind == "build" else f"{kind}-{round_}")
            host_outs = {n: spec.host_path(store.print_path(o)) for n, o in node.outputs.items()}
            if builtin:
                try:
                    await run_builtin(drv.builder, render_aterm(drv), host_outs["out"], log, **self.limits)
                except BuildLimitExceeded as e:  # killed and reaped
                    raise self._failure(node, None, log, None, how=str(e)) from None
                finally:
                    release_slot()
            else:
                try:
                    code, sandboxed = await run_sandboxed(self._server(), spec, log, **self.limits)
                except BuildLimitExceeded as e:  # killed and reaped
                    release_slot()
                    keep_top = self.options.keep_failed
                    raise self._failure(node, None, log, spec if keep_top else None, how=str(e)) from None
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
            await trio.to_thread.run_sync(events.record_sandbox_refusal, store, node.label,
                                          f"fixed-output hash mismatch: {e}")
            raise
        except SandboxError as e:
            await trio.to_thread.run_sync(events.record_sandbox_refusal, store, node.label, str(e))
            raise BuildError(f"cannot build {node.label}: {e}") from e
        except BuildError as e:
            if "suspicious" in str(e):
                await trio.to_thread.run_sync(events.record_sandbox_refusal, store, node.label, str(e))
            raise
        except BaseException as e:  # Cancelled, KeyboardInterrupt: the build was interrupted
            if not isinstance(e, Exception):
                status = "interrupted"
            raise
        finally:
            release_slot()
            with trio.CancelScope(shield=True):
                try:
                    if log is not None:
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

    def _failure(self, node: _Node, code: int | None, log: BuildLog, spec, how: str = "") -> BuildError:
        tail = log.tail()
        if how or code is None:
            pass
        elif code < 0:  # (the fork server's report of a signal)
            how = f"was killed by signal {-code}" + (
                f" ({signal.Signals(-code).name})" if -code in signal.valid_signals() else "")
        else:
            how = f"exited with status {code}"
        msg = f"builder for {node.label} {how}"
        if tail:
            msg += f"\nlast {len(tail)} log lines:\n" + "\n".join(f"  > {line}" for line in tail)
        msg += f"\nfull log: {log.path}" + ("" if log.variant else f" (or: pure log {node.label})")
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
            # the first result that differs is kept: a later round's (--rounds 3) replaced it,
            # and what had been said of the first ("kept at …", its hash) was then untrue
            first = keep not in self.kept_checks
            self.kept_checks.add(keep)

            # under a path lock named by the kept result: another process checking the same
            # derivation at once removed this one's result while it was renamed into place (a
            # FileNotFoundError or "Directory not empty" traceback), and `pure gc` takes that
            # lock before it removes such a leftover
            locks, lock_name = self.store.locks, os.path.basename(keep)

            def work(b=b, real=real, keep=keep, n=n, first=first):
                if not locks.acquire(lock_name, blocking=False):
                    return None  # (waited for below, outside the thread)
                try:
                    d = check_mod.diff_trees(real, b.host_path)
                    if first:
                        remove_tree(keep)
                        os.rename(b.host_path, keep)
                    extra = check_mod.diffoscope(real, keep if first else b.host_path)
                    return [{"output": n, **x} for x in d], extra
                finally:
                    locks.release(lock_name)
            told = False
            while (done := await trio.to_thread.run_sync(work)) is None:
                if not told:
                    told = True
                    self.progress.message(f"waiting for another process to finish checking "
                                          f"'{self.store.print_path(b.info.path)}'")
                await wait_lock_released(locks, lock_name)
            d, extra = done
            where = (f"the new result is kept at {keep}" if first else
                     f"the new result is not kept: the first result that differed is kept at {keep}")
            lines = [f"output {n!r} of {node.label} differs ({kind}): "
                     f"{old.nar_hash.sri} before, {b.info.nar_hash.sri} now; {where}"]
            lines += ["  " + check_mod.describe(x) for x in d]
            if extra:
                lines.append("diffoscope:\n" + extra)
            self.unreproducible.append("\n".join(lines))
            diffs.extend({**x, "kept": keep if first else None} for x in d)
        reproducible = not diffs and all(infos[n].nar_hash == b.info.nar_hash for n, b in built.items())
        await trio.to_thread.run_sync(lambda: events.record_check(
            self.store, node.label, kind="check" if kind == "check" else "rounds",
            rounds=rounds, reproducible=reproducible, differences=diffs))
        self.progress.event("check", drv=node.label, reproducible=reproducible,
                            differences=camel_case_keys(diffs))


def _cut(s: str, n: int = 60) -> str:
    """``repr`` of ``s``, cut to about ``n`` characters."""
    return repr(s) if len(s) <= n else repr(s[:n]) + "…"


def _check_passable(label: str, drv: Derivation, pass_as_file: set[str]) -> None:
    """Raise :class:`BuildError` naming an argument or attribute that ``execve`` would refuse:
    a NUL byte, an '=' in a name, more than Linux's limit for one string (it failed as "cannot
    run builder … in the sandbox: embedded null byte" or "Argument list too long", blaming the
    builder)."""
    if not drv.builder:
        raise BuildError(f"cannot build {label}: its builder is empty (give the program to run, "
                         f"e.g. builder=f\"{{bash}}/bin/bash\")")
    for i, a in enumerate((drv.builder, *drv.args)):
        what = "its builder" if i == 0 else f"its argument {i} ({_cut(a)})"
        if "\0" in a:
            raise BuildError(f"cannot build {label}: {what} holds a NUL byte, which no "
                             f"program's arguments can")
        size = len(a.encode(errors="surrogateescape")) + 1
        if size > _MAX_ARG_STRLEN:
            raise BuildError(f"cannot build {label}: {what} is too big for an argument ({size} bytes, "
                             f"Linux takes {_MAX_ARG_STRLEN} at most); pass it in a file instead (an "
                             f"attribute in passAsFile)")
    for k, v in drv.env.items():
        if not k or "=" in k or "\0" in k:
            raise BuildError(f"cannot build {label}: attribute {_cut(k)} cannot be an "
                             f"environment variable (a name must be non-empty, without '=' or "
                             f"a NUL byte)")
        if k in pass_as_file:
            continue
        if "\0" in v:
            raise BuildError(f"cannot build {label}: attribute {k!r} holds a NUL byte (at "
                             f"offset {v.index(chr(0))}), which no environment variable can; "
                             f"pass it as a file instead (passAsFile = [{k!r}])")
        size = len(k.encode(errors="surrogateescape")) + len(v.encode(errors="surrogateescape")) + 2
        if size > _MAX_ARG_STRLEN:
            raise BuildError(f"cannot build {label}: attribute {k!r} is too big for an environment "
                             f"variable ({size} bytes, Linux takes {_MAX_ARG_STRLEN} at most); pass it "
                             f"as a file instead (passAsFile = [{k!r}])")
