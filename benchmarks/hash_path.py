"""Benchmark: `pure hash path` vs `nix hash path` on a realistic tree (~20,000 files, ~350 MB).

    .venv/bin/python benchmarks/hash_path.py [--runs N] [--files N] [--mb N]

The tree is built once, deterministically, by benchmarks/_tree.py (cached under /var/tmp).  Both
commands run as real processes (start-up included) on a warm page cache, alternating; the best
and the median wall time of each are printed with the ratio pure/nix (lower is better; the target
is <= 1.0).  Both must print the same hash.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _tree import DEFAULT_DIR, make_tree  # noqa: E402

NIX_ENV = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command"}


def pure_cmd() -> list[str]:
    exe = REPO / ".venv" / "bin" / "pure"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "purestore.cli.main"]


def timed(cmd: list[str], env=None) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - t, p.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--mb", type=int, default=350)
    args = ap.parse_args()

    os.makedirs(DEFAULT_DIR, exist_ok=True)
    t = time.perf_counter()
    tree = make_tree(os.path.join(DEFAULT_DIR, f"tree-{args.files}-{args.mb}"), args.files, args.mb)
    print(f"tree: {tree} (ready in {time.perf_counter() - t:.1f} s)")

    pure = pure_cmd() + ["hash", "path", tree]
    nix = ["nix", "hash", "path", tree]
    have_nix = shutil.which("nix") is not None
    if not have_nix:
        print("nix is not installed: timing pure only")

    # warm the page cache and check both agree
    _, ph = timed(pure, {**os.environ, "PYTHONPATH": str(REPO)})
    if have_nix:
        _, nh = timed(nix, NIX_ENV)
        if ph != nh:
            print(f"MISMATCH: pure {ph} nix {nh}")
            return 1
    print(f"hash: {ph}")

    pt, nt = [], []
    for _ in range(args.runs):
        pt.append(timed(pure)[0])
        if have_nix:
            nt.append(timed(nix, NIX_ENV)[0])
    print(f"pure hash path: best {min(pt):.3f} s, median {statistics.median(pt):.3f} s")
    if have_nix:
        print(f"nix hash path:  best {min(nt):.3f} s, median {statistics.median(nt):.3f} s")
        print(f"ratio pure/nix: best {min(pt) / min(nt):.2f}, median {statistics.median(pt) / statistics.median(nt):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
