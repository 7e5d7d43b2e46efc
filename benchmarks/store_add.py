"""Benchmark: add the ~20,000-file, 350 MB tree with `pure store add` and `nix-store --add`.

Each round adds the tree (benchmarks/_tree.py, made once and cached) into a fresh store: a fresh
rooted purestore store (`pure --store DIR store add TREE`) and a fresh Nix chroot store
(`nix-store --store DIR --add TREE`), both as subprocesses, alternating; the best round of each
counts (the machine is shared).  The stores are removed between rounds and not timed.  Both must
print the same store path (purestore runs with --store-dir /nix/store).

    .venv/bin/python benchmarks/store_add.py [--rounds N] [--tree DIR] [--work DIR]

``--work`` says where the fresh stores go (default /var/tmp, on disk; /dev/shm shows the cost
without the disk).  By default purestore flushes the file system (syncfs) before it registers
the path (setting ``fsync-store-paths``), so on disk its time includes writing the data out;
Nix's does not.  So pure is timed twice per round: with the default, and with
``fsync-store-paths = false`` (like Nix).  Every timed run starts after a ``sync`` (not timed), so
no run pays for writing out the previous run's data.

The stores of all rounds are kept until the end: this machine's root file system is ext4
without a journal, where creating a file scans past every inode deleted in the last minutes
(ext4's ``recently_deleted``), so deleting a 20,000-file store before the next timed run made
that run several times slower, whichever tool it was (Nix's time swung from 2 to 15 s).

Prints each time and the ratios pure/nix (target <= 1.0).
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
sys.path.insert(0, str(REPO / "benchmarks"))
from _tree import default_tree, make_tree  # noqa: E402

NIX_ENV = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")
PURE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PURE_")}
PURE_ENV.update(PURE_CONFIG="/dev/null", PYTHONPATH=str(REPO))
NOFLUSH_CONF = "fsync-store-paths = false\n"


def wipe(path: Path) -> None:
    if path.exists():
        subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)
        shutil.rmtree(path)


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}): {p.stderr.strip()}")
    return dt, p.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", help="use (or create) the tree here instead of the cached default")
    ap.add_argument("--work", default="/var/tmp", help="directory for the fresh stores (default /var/tmp)")
    args = ap.parse_args()
    tree = make_tree(args.tree) if args.tree else default_tree()
    pure_exe = [sys.executable, "-m", "purestore.cli.main"]
    work = Path(tempfile.mkdtemp(prefix="bench-store-add-", dir=args.work))
    # warm the page cache for the tree so that neither side pays for the first read
    subprocess.run(["tar", "cf", "/dev/null", tree], check=True)
    pure_times, noflush_times, nix_times = [], [], []
    noflush_conf = work / "noflush.conf"
    noflush_conf.write_text(NOFLUSH_CONF)
    noflush_env = dict(PURE_ENV, PURE_CONFIG=str(noflush_conf))
    try:
        for r in range(args.rounds):
            nix_store = work / f"nix{r}"
            pure_root = work / f"pure{r}"
            noflush_root = work / f"pure-noflush{r}"
            dt, nix_path = timed(["nix-store", "--store", str(nix_store), "--add", tree], NIX_ENV)
            nix_times.append(dt)
            dt, pure_path = timed([*pure_exe, "--store", str(pure_root), "--store-dir", "/nix/store",
                                   "store", "add", tree], PURE_ENV)
            pure_times.append(dt)
            dt, noflush_path = timed([*pure_exe, "--store", str(noflush_root), "--store-dir", "/nix/store",
                                      "store", "add", tree], noflush_env)
            noflush_times.append(dt)
            if not pure_path == noflush_path == nix_path:
                sys.exit(f"paths differ: pure {pure_path} / {noflush_path} nix {nix_path}")
            print(f"round {r + 1}: nix {nix_times[-1]:.2f} s, pure {pure_times[-1]:.2f} s, "
                  f"pure without flush {noflush_times[-1]:.2f} s  ({pure_path})", flush=True)
    finally:
        wipe(work)
    p, f, n = min(pure_times), min(noflush_times), min(nix_times)
    print(f"nix-store --add:                      {n:.2f} s")
    print(f"pure store add (flush, the default):  {p:.2f} s   ratio {p / n:.2f}")
    print(f"pure store add (no flush, like Nix):  {f:.2f} s   ratio {f / n:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
