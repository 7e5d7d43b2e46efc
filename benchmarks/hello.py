"""Benchmark: build GNU hello from the bootstrap seeds, cold and warm, with purestore and with Nix.

Workload: the derivation graph of expressions/hello.py (bootstrap-tools -> zig-cc -> untar ->
bmake -> hello) in a fresh rooted store whose seeds (busybox, zig, the tarballs) are already
present, then the same build again with everything valid.  Nix builds the same graph from
benchmarks/hello.nix (same builder scripts and attributes) in a fresh chroot store
(`--store DIR`) into which the same seed paths were added with `nix-store --add-fixed`.

Also timed for purestore alone: "from nothing", i.e. obtaining the seeds too (from the
PURE_SEED_CACHE download cache when warm, else through apt-get/pip).

    .venv/bin/python benchmarks/hello.py [--no-nix] [--no-from-nothing] [--keep DIR]

Prints each wall time and the ratio pure/nix.  Takes several minutes (zig builds musl in each C
derivation).  Not a test.
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
PURE = [sys.executable, "-m", "purestore.cli.main"]
SEED_CACHE = os.environ.get("PURE_SEED_CACHE") or os.path.expanduser("~/.cache/purestore/seed-cache")
NIX_CONFIG = "substituters =\nexperimental-features = nix-command\nsandbox = true\nrequire-sigs = false"


def run(cmd, env=None, quiet=True) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"benchmark: {' '.join(map(str, cmd))} failed ({p.returncode}):\n"
                 f"{(p.stderr or '')[-3000:]}")
    return dt, p


def pure_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PURE_")}
    env.update(PURE_STORE=str(root), PURE_CONFIG="/dev/null", PYTHONPATH=str(REPO),
               PURE_SEED_CACHE=SEED_CACHE)
    return env


def bench_pure(work: Path, from_nothing: bool) -> dict:
    res = {}
    if from_nothing:
        # Seeds obtained too (from the download cache when warm, else with the clients).
        root0 = work / "pure-from-nothing"
        root0.mkdir()
        res["pure from nothing"], _ = run(
            [*PURE, "build", "--no-link", REPO / "expressions/hello.py"], env=pure_env(root0))
    # Cold with seeds present (the like-for-like comparison with Nix).
    root = work / "pure"
    root.mkdir()
    run([*PURE, "build", "--no-link", REPO / "expressions/seeds.py"], env=pure_env(root))
    res["pure cold"], p = run([*PURE, "build", "--no-link", REPO / "expressions/hello.py"],
                              env=pure_env(root))
    res["pure warm"], _ = run([*PURE, "build", "--no-link", REPO / "expressions/hello.py"],
                              env=pure_env(root))
    res["pure out"] = p.stdout.split()[-1]
    res["pure root"] = root
    return res


def bench_nix(work: Path, pure_root: Path) -> dict:
    store = work / "nix"
    env = dict(os.environ, NIX_CONFIG=NIX_CONFIG)
    seeds = work / "seeds"
    seeds.mkdir()
    p = subprocess.run([*PURE, "build", "--no-link", REPO / "expressions/seeds.py"],
                       env=pure_env(pure_root), capture_output=True, text=True, check=True)
    for path in p.stdout.split():
        name = path.split("-", 1)[1]
        if "make-4.3" in name:
            continue
        src = Path(str(pure_root) + path)
        dst = seeds / name
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
            flags = ["--recursive"]
        else:
            shutil.copy2(src, dst)
            flags = []
        run(["nix-store", "--store", store, "--add-fixed", *flags, "sha256", dst], env=env)
    res = {}
    cmd = ["nix-build", "--store", store, "--no-out-link", REPO / "benchmarks/hello.nix"]
    res["nix cold"], p = run(cmd, env=env)
    res["nix warm"], _ = run(cmd, env=env)
    res["nix out"] = p.stdout.split()[-1]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-nix", action="store_true", help="time purestore only")
    ap.add_argument("--no-from-nothing", action="store_true",
                    help="skip the extra purestore build that also obtains the seeds")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-hello-", dir=os.environ.get("TMPDIR")))
    work.mkdir(parents=True, exist_ok=True)
    try:
        r = bench_pure(work, not args.no_from_nothing)
        if "pure from nothing" in r:
            print(f"pure  from nothing (incl. seeds): {r['pure from nothing']:8.1f} s")
        print(f"pure  cold (seeds present):       {r['pure cold']:8.1f} s")
        print(f"pure  warm (all valid):           {r['pure warm']:8.2f} s")
        print(f"pure  output: {r['pure out']}")
        if not args.no_nix and shutil.which("nix-build"):
            n = bench_nix(work, r["pure root"])
            print(f"nix   cold (seeds present):       {n['nix cold']:8.1f} s")
            print(f"nix   warm (all valid):           {n['nix warm']:8.2f} s")
            print(f"nix   output: {n['nix out']}")
            print(f"ratio pure/nix cold: {r['pure cold'] / n['nix cold']:.2f}")
            print(f"ratio pure/nix warm: {r['pure warm'] / n['nix warm']:.2f}")
        elif not args.no_nix:
            print("nix: not installed, skipped")
    finally:
        if not args.keep:
            subprocess.run(["chmod", "-R", "u+w", work], capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
