"""Benchmark: instantiate big derivation graphs with `pure instantiate` and with `nix-instantiate`.

Workloads (the same graphs written in Python and in Nix, store dir /nix/store so the .drv paths
must agree, which the benchmark checks):

- wide:  10,000 leaf derivations and one top derivation depending on all of them;
- chain: 1,000 derivations, each depending on the previous one.

Each tool runs as a subprocess into a fresh rooted/chroot store; the best of --repeat runs is kept.
Prints each time and the ratio pure/nix (target <= 1.0).

    .venv/bin/python benchmarks/instantiate.py [--repeat 2] [--width 10000] [--depth 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PY_WIDE = '''
from purestore.expr import derivation
leaves = [derivation(name=f"leaf-{i}", system="x86_64-linux", builder="/bin/sh",
                     args=["-c", f"echo {i} > $out"]) for i in range(@N@)]
default = derivation(name="top", system="x86_64-linux", builder="/bin/sh",
                     args=["-c", "echo " + " ".join(str(l) for l in leaves) + " > $out"])
'''
NIX_WIDE = '''
let
  leaves = builtins.genList (i: derivation { name = "leaf-${toString i}"; system = "x86_64-linux";
    builder = "/bin/sh"; args = [ "-c" "echo ${toString i} > $out" ]; }) @N@;
in derivation { name = "top"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo ${toString leaves} > $out" ]; }
'''
PY_CHAIN = '''
from purestore.expr import derivation
prev = ""
for i in range(@N@):
    prev = derivation(name=f"c-{i}", system="x86_64-linux", builder="/bin/sh",
                      args=["-c", f"echo {prev} > $out"])
default = prev
'''
NIX_CHAIN = '''
builtins.foldl' (prev: i: derivation { name = "c-${toString i}"; system = "x86_64-linux";
  builder = "/bin/sh"; args = [ "-c" "echo ${toString prev} > $out" ]; }) "" (builtins.genList (x: x) @N@)
'''


def run(cmd, env) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return dt, p.stdout.strip()


def bench(name, py_src, nix_src, repeat, work) -> float:
    pyf = work / f"{name}.py"
    nixf = work / f"{name}.nix"
    pyf.write_text(py_src)
    nixf.write_text(nix_src)
    pure_env = {k: v for k, v in os.environ.items() if not k.startswith("PURE_")}
    pure_env.update(PURE_CONFIG="/dev/null", PURE_STORE_DIR="/nix/store", PYTHONPATH=str(REPO))
    nix_env = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")
    best_pure = best_nix = float("inf")
    for i in range(repeat):
        proot = work / f"pure-{name}-{i}"
        nroot = work / f"nix-{name}-{i}"
        tp, out_p = run([sys.executable, "-m", "purestore.cli.main", "--store", str(proot),
                         "instantiate", str(pyf)], pure_env)
        tn, out_n = run(["nix-instantiate", "--store", str(nroot), str(nixf)], nix_env)
        if out_p != out_n:
            sys.exit(f"{name}: pure gave {out_p!r}, nix gave {out_n!r}")
        ndrv_p = len(list((proot / "nix" / "store").glob("*.drv")))
        ndrv_n = len(list((nroot / "nix" / "store").glob("*.drv")))
        if ndrv_p != ndrv_n:
            sys.exit(f"{name}: pure wrote {ndrv_p} .drv files, nix {ndrv_n}")
        best_pure, best_nix = min(best_pure, tp), min(best_nix, tn)
        for d in (proot, nroot):
            subprocess.run(["chmod", "-R", "u+w", str(d)], check=False)
            shutil.rmtree(d, ignore_errors=True)
    ratio = best_pure / best_nix
    print(f"{name:6s} ({ndrv_p} .drv, same paths): pure {best_pure:7.3f} s   nix-instantiate {best_nix:7.3f} s"
          f"   ratio pure/nix {ratio:5.2f}", flush=True)
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--width", type=int, default=10000)
    ap.add_argument("--depth", type=int, default=1000)
    a = ap.parse_args()
    if not shutil.which("nix-instantiate"):
        sys.exit("nix-instantiate is not installed; this benchmark compares against it")
    with tempfile.TemporaryDirectory(prefix="bench-inst-") as tmp:
        work = Path(tmp)
        r1 = bench("wide", PY_WIDE.replace("@N@", str(a.width)), NIX_WIDE.replace("@N@", str(a.width)), a.repeat, work)
        r2 = bench("chain", PY_CHAIN.replace("@N@", str(a.depth)), NIX_CHAIN.replace("@N@", str(a.depth)), a.repeat, work)
    print(f"overall (geometric mean) ratio pure/nix: {(r1 * r2) ** 0.5:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
