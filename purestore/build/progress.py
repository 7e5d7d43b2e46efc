"""Progress reporting for builds: a live status line on a terminal, plain lines otherwise, or
one JSON object per line (``--json``).

The scheduler calls :meth:`Progress.event` with a type and fields; every event is also what
``--json`` prints.  Event types: ``fetch-plan`` (will_fetch, download_size, nar_size: before
substituting), ``fetched`` (path: said by the counters of :meth:`Progress.fetch_progress`,
those of the late fetches too), ``fetch-failed`` (path, error), ``plan`` (will_build,
will_fetch_after_build: the paths to be fetched once what they refer to is built here, their
derivations not built unless that fails, will_substitute: what was fetched, will_check, valid:
the requested derivations whose outputs are valid, so not built), ``waiting``
(drv, path), ``start`` (drv, name, kind: build, round or check, round, rounds: the build
is round ``round`` of ``rounds``; with ``--check`` the valid outputs are round 1, so the
rebuilds are rounds 2 to ``rounds``), ``log`` (drv, line; only with ``print_logs``),
``built`` (drv, name, outputs), ``failed`` (drv, name, error; with dependency_failed true for
one left unbuilt because an input failed, ``-k``), ``check`` (drv, reproducible, differences),
``hook`` (drv, name, hook: the post-build hook starts), ``hook-log`` (drv, name, line: a line of
its output), ``hook-failed`` (drv, name, error), ``done``.  They come in that order: ``plan``
after the fetches made before the builds (what failed to come is built instead, so only then
are the builds known), then the builds' events.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO

from .._visible import visible


class Progress:
    """Reports build progress to ``stream`` (stderr by default; JSON goes to ``json_stream``)."""

    def __init__(self, stream: TextIO | None = None, *, json_stream: TextIO | None = None,
                 print_logs: bool = False, live: bool | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.json_stream = json_stream
        self.print_logs = print_logs
        self.quiet = quiet
        self.live = (self.stream.isatty() if live is None else live) and json_stream is None
        self.start = time.monotonic()
        self.total = 0
        self.planned: set[str] = set()  # the derivations counted in ``total``
        self.built = 0
        self.failed = 0
        self.not_built = 0  # -k: left unbuilt because a dependency failed
        self.running: dict[str, str] = {}
        self._status_shown = False
        self._last_draw = 0.0
        self.fetch = None  # the counters of a running substitution (see fetch_progress)
        # late fetches (made while builds run): the counters of those running, and the paths
        # and bytes (done, expected) of those finished while others ran, shown together
        self._late: list = []
        self._late_finished = (0, 0, 0, 0)
        self._last_fetch_line = 0.0
        # the summary of the fetches finished (see fetch_summary), and the time they took
        self._fetched_paths = 0
        self._fetched_bytes = 0
        self._fetched_time = 0.0
        self._fetching = 0  # substitutions running
        self._busy_since = 0.0
        self._json_lock = threading.Lock()  # events come from worker threads too (fetched)

    # -- events ----------------------------------------------------------------------------------

    def event(self, type_: str, **fields) -> None:
        if self.json_stream is not None:
            # keys in camelCase, as in every other --json of pure (and Nix's): willBuild, narSize
            obj = {"type": type_, **{_camel(k): v for k, v in fields.items()}}
            with self._json_lock:
                self.json_stream.write(json.dumps(obj, sort_keys=True) + "\n")
                self.json_stream.flush()
        if type_ == "fetch-plan":
            if self.json_stream is None and not self.quiet:
                for line in fetch_lines(fields["will_fetch"], fields["download_size"], fields["nar_size"]):
                    self._line(line)
        elif type_ == "plan":
            self.planned = set(fields.get("will_build", ()))
            self.total = len(self.planned)
            self._plan(fields)
        elif type_ == "start":
            self.running[fields["drv"]] = fields["name"]
            if fields.get("kind") == "build" and fields["drv"] not in self.planned:
                self.planned.add(fields["drv"])  # a fetch planned for after the builds failed
                self.total += 1
            what = _what_starts(fields.get("kind"), fields.get("round") or 1, fields.get("rounds") or 1)
            self._line(f"{what} '{fields['drv']}'...")
        elif type_ == "built":
            self.running.pop(fields["drv"], None)
            self.built += 1
            self._draw()
        elif type_ == "failed":
            started = self.running.pop(fields["drv"], None) is not None
            if started or fields["drv"] in self.planned:  # (not a late fetch left undone)
                if fields.get("dependency_failed"):
                    self.not_built += 1  # (the final error counts the failures alone)
                else:
                    self.failed += 1
            self._draw()
        elif type_ == "log" and self.print_logs and self.json_stream is None:
            self._line(f"{fields['name']}> {visible(fields['line'])}")  # (a builder's: made safe)
        elif type_ == "hook" and self.json_stream is None:
            self._line(f"running post-build-hook '{fields['hook']}' for '{fields['drv']}'...")
        elif type_ == "hook-log" and self.json_stream is None:
            self._line(f"{fields['name']} (post)> {visible(fields['line'])}")
        elif type_ == "done":
            self._clear()

    def message(self, text: str) -> None:
        """A line for people (not an event)."""
        self._line(text)

    # -- substitution --------------------------------------------------------------------------

    def fetch_progress(self, *, late: bool = False):
        """Counters for a substitution (:class:`purestore.cache.progress.Progress`) shown by this
        display: in the status line on a terminal, else a line every few seconds.  ``late``: a
        fetch made while builds run (a path fetched once what it refers to is built here): the
        late fetches running at once are shown together, after the builds' counts in their
        status line (else in a line every few seconds).  Called from trio tasks and worker
        threads alike, as the cache layer does; give them back with :meth:`fetch_finished`."""
        from ..cache.progress import Progress as Counters
        outer = self

        class _Fetch(Counters):
            def update(self, force: bool = False) -> None:
                outer._fetch_update(force)

            def note(self, text: str) -> None:  # a line of its own (say, waiting for a path lock)
                outer._line(text)

            def path_done(self, path: str) -> None:
                super().path_done(path)
                if outer.json_stream is not None:
                    outer.event("fetched", path=path)

        c = _Fetch("fetching")
        now = time.monotonic()
        if not self._fetching:
            self._busy_since = now
        self._fetching += 1
        if late:
            if not self._late:  # (a new burst: for a line without a terminal, as below)
                self._last_fetch_line = now
            self._late.append(c)
        else:
            self.fetch = c
            # without a terminal, the first line after 5 s: the plan said what comes, and the
            # totals are still being added up at the start (a line then would say "0/1 paths")
            self._last_fetch_line = now
        return c

    def fetch_finished(self, counters=None, *, summary: bool = True) -> None:
        """A substitution is over (``counters``: its counters, by default the shown ones): what
        it fetched is added to the summary, and with ``summary`` the summary is said now (see
        :meth:`fetch_summary`); else it waits for more fetches of the same run to join it."""
        c = counters if counters is not None else self.fetch
        if c is self.fetch:
            self.fetch = None
        if c is not None and any(x is c for x in self._late):
            self._late = [x for x in self._late if x is not c]
            done = self._late_finished
            self._late_finished = (0, 0, 0, 0) if not self._late else (
                done[0] + c.paths_done, done[1] + c.paths_total, done[2] + c.bytes_done, done[3] + c.bytes_total)
        if c is not None:
            self._fetching -= 1
            if not self._fetching:  # (the time fetching: fetches at once count once)
                self._fetched_time += time.monotonic() - self._busy_since
            self._fetched_paths += c.paths_done
            self._fetched_bytes += c.bytes_done
        if summary:
            self.fetch_summary()
        else:
            self._draw(force=True)

    def fetch_summary(self) -> None:
        """Say what the substitutions finished since the last summary fetched (one line: paths,
        unpacked bytes, time spent fetching), if anything; then start counting afresh."""
        n, nbytes, took = self._fetched_paths, self._fetched_bytes, self._fetched_time
        self._fetched_paths = self._fetched_bytes = 0
        self._fetched_time = 0.0
        if not n or self.json_stream is not None or self.quiet:
            self._draw(force=True)
            return
        self._line(f"fetched {n} path{'s' if n != 1 else ''} ({_size(nbytes)} unpacked) in {took:.1f} s")

    def _fetch_update(self, force: bool) -> None:
        if self.json_stream is not None or self.quiet:
            return
        counts = self._fetch_counts()
        if counts is None:
            return
        if self.live:
            self._draw(force)
            return
        now = time.monotonic()
        if now - self._last_fetch_line >= 5.0:
            self._last_fetch_line = now
            self._line(_fetch_status(*counts))

    def _fetch_counts(self) -> tuple[int, int, int, int] | None:
        """(paths done, paths expected, bytes done, bytes expected) of the fetch to show: the
        shown substitution's, else those of the late fetches running (with those finished
        while they ran); None when nothing is expected yet."""
        c = self.fetch
        if c is not None:
            return (c.paths_done, c.paths_total, c.bytes_done, c.bytes_total) if c.paths_total else None
        late = list(self._late)  # (a worker thread may change the list meanwhile)
        if not late:
            return None
        counts = tuple(sum(x) for x in zip(self._late_finished, *(
            (x.paths_done, x.paths_total, x.bytes_done, x.bytes_total) for x in late)))
        return counts if counts[1] else None

    # -- rendering -------------------------------------------------------------------------------

    def _plan(self, f: dict) -> None:
        if self.json_stream is not None or self.quiet:
            return
        for line in build_lines(f.get("will_build") or []) + after_build_lines(f.get("will_fetch_after_build") or []):
            self._line(line)

    def _line(self, text: str) -> None:
        if self.json_stream is not None or self.quiet:
            return
        self._clear()
        self.stream.write(text + "\n")
        self._draw(force=True)

    def _clear(self) -> None:
        if self._status_shown:
            self.stream.write("\r\x1b[K")
            self._status_shown = False
        self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.05:
            return
        self._last_draw = now
        queued = max(0, self.total - self.built - self.failed - self.not_built - len(self.running))
        el = int(now - self.start)
        names = ", ".join(list(self.running.values())[:3]) + (" …" if len(self.running) > 3 else "")
        counts = self._fetch_counts()
        if self.fetch is not None and counts is not None:  # (the fetches before the builds)
            self.stream.write(f"\r\x1b[K[{el // 60}:{el % 60:02d}] " + _fetch_status(*counts)[:180])
            self.stream.flush()
            self._status_shown = True
            return
        text = (f"[{el // 60}:{el % 60:02d}] built {self.built}/{self.total}, running {len(self.running)}, "
                f"queued {queued}" + (f", failed {self.failed}" if self.failed else "")
                + (f", not built {self.not_built}" if self.not_built else "")
                + (f" | {_fetch_status(*counts)}" if counts is not None else "")  # late fetches
                + (f" | {names}" if names else ""))
        self.stream.write("\r\x1b[K" + text[:200])
        self.stream.flush()
        self._status_shown = True


def _size(n: int) -> str:
    from ..cache.progress import format_size  # the caches layer is optional for builds
    return format_size(n)


def _fetch_status(paths_done: int, paths_total: int, bytes_done: int, bytes_total: int) -> str:
    return f"fetching {paths_done}/{paths_total} paths, {_size(bytes_done)}/{_size(bytes_total)}"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(w.capitalize() for w in rest)


def fetch_lines(paths, download: int, unpacked: int) -> list[str]:
    """'these N paths will be fetched (X MiB download, Y MiB unpacked):' and the paths (Nix's wording)."""
    if not paths:
        return []
    head = "this path" if len(paths) == 1 else f"these {len(paths)} paths"
    return [f"{head} will be fetched ({_mib(download)} download, {_mib(unpacked)} unpacked):",
            *(f"  {p}" for p in paths)]


def after_build_lines(paths, download: int | None = None, unpacked: int | None = None) -> list[str]:
    """'these N paths will be fetched once what they refer to is built here:' and the paths
    (with the sizes, when given): a cache has them, but not what they refer to."""
    if not paths:
        return []
    head = "this path" if len(paths) == 1 else f"these {len(paths)} paths"
    what = "what it refers to is" if len(paths) == 1 else "what they refer to is"
    sizes = f" ({_mib(download)} download, {_mib(unpacked)} unpacked)" if download is not None else ""
    return [f"{head} will be fetched once {what} built here{sizes}:", *(f"  {p}" for p in paths)]


def build_lines(drvs) -> list[str]:
    """'these N derivations will be built:' and the derivations."""
    if not drvs:
        return []
    head = "this derivation" if len(drvs) == 1 else f"these {len(drvs)} derivations"
    return [f"{head} will be built:", *(f"  {d}" for d in drvs)]


def _what_starts(kind: str | None, round_: int, rounds: int) -> str:
    """How a build's start is shown: ``building``, ``building (round 2 of 3)`` (--rounds),
    ``checking``, ``checking (round 3 of 3)`` (--check --rounds 3: the valid outputs are round 1,
    the rebuilds rounds 2 and 3)."""
    if kind == "check":
        return f"checking (round {round_} of {rounds})" if rounds > 2 else "checking"
    if rounds > 1:
        return f"building (round {round_} of {rounds})"
    return "building"
