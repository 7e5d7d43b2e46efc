"""Benchmark: `pure build` vs `nix-build` (sandbox on) on trivial busybox derivations.

Workloads (N = 400 by default, `--n`):
  independent  N derivations `busybox sh -c 'echo I > $out'`, no dependencies between them
  chain        N derivations, each one's script names the previous one's output (a chain)
  noop         building the N independent derivations again (all valid: nothing to do)

Both tools evaluate an equivalent expression (Python for pure, Nix for nix-build) that gives the
same derivations: with --store-dir /nix/store the output paths are identical, which the
benchmark checks.  Each runs against its own fresh rooted store (`--store DIR`), with the same
number of parallel jobs (`-j`, default 2 = this machine's cores).

Run: .venv/bin/python benchmarks/build.py [--n 400] [-j 2]

purestore flushes the file system before registering each output (`fsync-store-paths`, on by
default; Nix does not).  BENCH_PURE_CONFIG=FILE runs pure with that config file instead of none,
e.g. one saying `fsync-store-paths = false` to compare like with like.
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

PY_EXPR = """\
from purestore.expr import derivation, source
bb = source("bb")
B = f"{{bb}}/bin/busybox"
independent = [derivation(name=f"triv-{{i}}", system="x86_64-linux", builder=B,
                          args=["sh", "-c", f"echo {{i}} > $out"]) for i in range({n})]
chain = []
prev = ""
for i in range({n}):
    prev = derivation(name=f"chain-{{i}}", system="x86_64-linux", builder=B,
                      args=["sh", "-c", f"echo {{i}} {{prev}} > $out"])
    chain.append(prev)
chain = chain[-1]
"""

NIX_EXPR = """\
let
  B = "${{./bb}}/bin/busybox";
  triv = i: derivation {{ name = "triv-${{toString i}}"; system = "x86_64-linux"; builder = B;
                         args = [ "sh" "-c" "echo ${{toString i}} > $out" ]; }};
  step = prev: i: derivation {{ name = "chain-${{toString i}}"; system = "x86_64-linux"; builder = B;
                               args = [ "sh" "-c" "echo ${{toString i}} ${{prev}} > $out" ]; }};
in {{
  independent = builtins.genList triv {n};
  chain = builtins.foldl' step "" (builtins.genList (x: x) {n});
}}
"""


def timed(cmd, env, cwd) -> tuple[float, list[str]]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return dt, p.stdout.split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    if not shutil.which("nix-build"):
        sys.exit("nix-build is not installed (apt-get install nix-bin)")
    work = Path(tempfile.mkdtemp(prefix="pure-bench-build-"))
    try:
        (work / "bb" / "bin").mkdir(parents=True)
        shutil.copy("/bin/busybox", work / "bb" / "bin" / "busybox")
        (work / "bench.py").write_text(PY_EXPR.format(n=a.n))
        (work / "bench.nix").write_text(NIX_EXPR.format(n=a.n))
        pure_env = {k: v for k, v in os.environ.items() if not k.startswith("PURE_")}
        pure_env.update(PURE_CONFIG=os.environ.get("BENCH_PURE_CONFIG", "/dev/null"), PYTHONPATH=str(REPO))
        # like an installed package (pip byte-compiles at install time): compiled modules cached
        cenv = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "purestore")], env=cenv, check=False)
        nix_env = dict(os.environ)
        nix_env["NIX_CONFIG"] = ("substituters =\nexperimental-features = nix-command\nsandbox = true\n"
                                 f"build-users-group =\nmax-jobs = {a.jobs}\n")
        pure = [str(REPO / ".venv" / "bin" / "pure") if (REPO / ".venv/bin/pure").exists() else sys.executable,
                *([] if (REPO / ".venv/bin/pure").exists() else ["-m", "purestore.cli.main"]),
                "--store", str(work / "pure-root"), "--store-dir", "/nix/store"]
        nix = ["nix-build", "--store", str(work / "nix-root")]
        rows = []
        for label, attr in (("independent", "independent"), ("chain", "chain"), ("noop", "independent")):
            tp, outp = timed([*pure, "build", "bench.py", "-A", attr, "--no-link", "-j", str(a.jobs)], pure_env, work)
            tn, outn = timed([*nix, "bench.nix", "-A", attr, "--no-out-link", "-j", str(a.jobs)], nix_env, work)
            same = sorted(outp) == sorted(outn)
            rows.append((label, tp, tn, same))
            print(f"{label:12s} pure {tp:7.2f} s ({tp / a.n * 1000:6.1f} ms/drv)   "
                  f"nix {tn:7.2f} s ({tn / a.n * 1000:6.1f} ms/drv)   ratio pure/nix {tp / tn:5.2f}"
                  f"   same output paths: {'yes' if same else 'NO'}", flush=True)
        print("ratios: " + ", ".join(f"{l}={tp / tn:.2f}" for l, tp, tn, _ in rows))
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
