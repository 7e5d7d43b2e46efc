"""Progress reporting for builds: a live status line on a terminal, plain lines otherwise, or
one JSON object per line (``--json``).

The scheduler calls :meth:`Progress.event` with a type and fields; every event is also what
``--json`` prints.  Event types: ``plan`` (will_build, will_substitute), ``start`` (drv, name,
kind, round), ``log`` (drv, line; only with ``print_logs``), ``built`` (drv, name, outputs),
``failed`` (drv, name, error), ``check`` (drv, reproducible, differences), ``done``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO


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
        self.built = 0
        self.failed = 0
        self.running: dict[str, str] = {}
        self._status_shown = False
        self._last_draw = 0.0

    # -- events ----------------------------------------------------------------------------------

    def event(self, type_: str, **fields) -> None:
        if self.json_stream is not None:
            self.json_stream.write(json.dumps({"type": type_, **fields}, sort_keys=True) + "\n")
            self.json_stream.flush()
        if type_ == "plan":
            self.total = len(fields.get("will_build", ()))
            self._plan(fields)
        elif type_ == "start":
            self.running[fields["drv"]] = fields["name"]
            what = {"check": "checking", "round": f"building (round {fields.get('round')})"}.get(
                fields.get("kind"), "building")
            self._line(f"{what} '{fields['drv']}'...")
        elif type_ == "built":
            self.running.pop(fields["drv"], None)
            self.built += 1
            self._draw()
        elif type_ == "failed":
            self.running.pop(fields["drv"], None)
            self.failed += 1
            self._draw()
        elif type_ == "log" and self.print_logs and self.json_stream is None:
            self._line(f"{fields['name']}> {fields['line']}")
        elif type_ == "done":
            self._clear()

    def message(self, text: str) -> None:
        """A line for people (not an event)."""
        self._line(text)

    # -- rendering -------------------------------------------------------------------------------

    def _plan(self, f: dict) -> None:
        if self.json_stream is not None or self.quiet:
            return
        subs = f.get("will_substitute") or []
        if subs:
            self._line(f"these {len(subs)} paths will be fetched:")
            for p in subs:
                self._line(f"  {p}")
        builds = f.get("will_build") or []
        if builds:
            self._line("this derivation will be built:" if len(builds) == 1
                       else f"these {len(builds)} derivations will be built:")
            for d in builds:
                self._line(f"  {d}")

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
        queued = max(0, self.total - self.built - self.failed - len(self.running))
        el = int(now - self.start)
        names = ", ".join(list(self.running.values())[:3]) + (" …" if len(self.running) > 3 else "")
        text = (f"[{el // 60}:{el % 60:02d}] built {self.built}/{self.total}, running {len(self.running)}, "
                f"queued {queued}" + (f", failed {self.failed}" if self.failed else "")
                + (f" | {names}" if names else ""))
        self.stream.write("\r\x1b[K" + text[:200])
        self.stream.flush()
        self._status_shown = True
