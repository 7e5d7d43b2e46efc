"""pure build / pure store realise / pure log: real builds with a static busybox in the sandbox."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_pure
from purestore.build.sandbox import sandbox_available
from purestore.formats.derivation import Derivation, DerivationOutput, fill_output_paths, render_aterm, drv_store_path
from purestore.formats.derivation import drv_references, parse_aterm
from purestore.formats.hash import Hash

BUSYBOX = "/bin/busybox"


def _reason() -> str | None:
    if not os.path.exists(BUSYBOX):
        return "no /bin/busybox (install busybox-static)"
    with open(BUSYBOX, "rb") as f:
        if b"ld-linux" in f.read(1 << 20):
            return "/bin/busybox is dynamically linked (install busybox-static)"
    return sandbox_available()


REASON = _reason()
needs_sandbox = pytest.mark.skipif(REASON is not None, reason=REASON or "")
pytestmark = needs_sandbox


class Drvs:
    """Writes derivations straight into a store (no expression layer needed)."""

    def __init__(self, store):
        self.store = store
        self.sd = store.store_dir
        d = Path(store.real_store_dir).parent / "bbsrc" / "busybox"
        if not d.exists():
            (d / "bin").mkdir(parents=True)
            shutil.copy(BUSYBOX, d / "bin" / "busybox")
        self.busybox = store.print_path(store.add_path(str(d), "busybox"))
        self.sh = f"{self.busybox}/bin/busybox"

    def _lookup(self, p):
        with open(self.store.real_path(self.store.parse_path(p)), "rb") as f:
            return parse_aterm(f.read())

    def add(self, name: str, script: str, *, deps=(), srcs=(), outputs=("out",), fixed: tuple | None = None,
            builder: str | None = None, args=None, env=None) -> str:
        """A derivation running `busybox sh -c SCRIPT` (with $B = busybox); returns its .drv path."""
        dep_outs = {}
        for d in deps:
            p, _, o = d.partition("!")
            dep_outs.setdefault(p, set()).add(o or "out")
        if fixed:
            algo, h = fixed
            outs = {"out": DerivationOutput("", algo, h)}
        else:
            outs = {o: DerivationOutput("") for o in outputs}
        e = {"name": name, "system": "x86_64-linux", "builder": builder or self.sh, "B": self.sh, **(env or {})}
        for o in outs:
            e[o] = ""
        if len(outputs) > 1:
            e["outputs"] = " ".join(outputs)
        drv = Derivation(outputs=outs, input_drvs={k: frozenset(v) for k, v in dep_outs.items()},
                         input_srcs=frozenset([self.busybox, *srcs]), system="x86_64-linux",
                         builder=builder or self.sh, args=tuple(args if args is not None else ("sh", "-c", script)),
                         env=e)
        drv = fill_output_paths(drv, self._lookup, self.sd)
        aterm = render_aterm(drv)
        sp = self.store.add_text(drv.name + ".drv", aterm, drv_references(drv, self.sd))
        return self.store.print_path(sp)

    def out(self, drv_path: str, o: str = "out") -> str:
        return self._lookup(drv_path).outputs[o].path


@pytest.fixture
def drvs(settings):
    from purestore.store.local import LocalStore
    store = LocalStore.open(settings)
    yield Drvs(store)
    store.close()
