"""Benchmark: push one big path (no per-path parallelism to be had), with and without
``parallel-compression``, through `pure copy --to` and `nix copy --to`, in one run.

Setup (not timed): the ~350 MB tree of benchmarks/_tree.py added as a single store path to a
rooted purestore store and to a Nix chroot store (--store-dir /nix/store, the same path in both);
for xz, the tree's biggest package directory as a second, smaller path (xz is slow).  Then, in
rounds (which tool goes first alternates, see copy_cache.py), each of these is timed for both
tools, each into a new file:// cache:

- zstd:           ``?compression=zstd``                               (single-threaded in both)
- zstd parallel:  ``?compression=zstd&parallel-compression=true``     (Nix 2.8's libarchive ignores
                  the setting for zstd and stays single-threaded; pure uses libzstd's workers)
- xz parallel:    ``?compression=xz&compression-level=1&parallel-compression=true`` on the smaller
                  path (both use liblzma's multi-threaded encoder; the bytes are the same)

Prints the best time of each tool and the ratio pure/nix, and pure's parallel/single ratio.
Runs on a fresh ext4 when root (benchmarks/_scratchfs.py).

    .venv/bin/python benchmarks/push_one_path.py [--rounds N] [--content mixed|random]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from _scratchfs import work_dir  # noqa: E402
from _tree import CONTENTS, default_tree  # noqa: E402
from copy_cache import PURE, PURE_ENV, nix_env  # noqa: E402 - the same commands and environments
CASES = (("zstd", "compression=zstd", "big"),
         ("zstd parallel", "compression=zstd&parallel-compression=true", "big"),
         ("xz parallel", "compression=xz&compression-level=1&parallel-compression=true", "small"))


def timed(cmd, env) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return dt


def bench(args, tree: Path, where: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-push-one-", dir=where))
    key = REPO / "tests/data/cache/test-key-1.sec"
    small_src = max((p for p in tree.iterdir() if p.is_dir()),
                    key=lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()))
    paths = {}
    for name, src in (("big", tree), ("small", small_src)):
        out = subprocess.run(PURE + ["--store", work / "src-pure", "--store-dir", "/nix/store", "store", "add", src],
                             env=PURE_ENV, capture_output=True, text=True, check=True).stdout.strip()
        nout = subprocess.run(["nix-store", "--store", work / "src-nix", "--add", src], env=nix_env(work / "xdg"),
                              capture_output=True, text=True, check=True).stdout.strip()
        assert out == nout, "pure and Nix disagree on the store path"
        paths[name] = out
    sizes = {n: json.loads(subprocess.run(PURE + ["--store", work / "src-pure", "--store-dir", "/nix/store",
                                                  "store", "path-info", "--json", p], env=PURE_ENV,
                                          capture_output=True, text=True, check=True).stdout)[0]["narSize"]
             for n, p in paths.items()}
    print(f"one path of {sizes['big'] / 2**20:.0f} MiB of NAR ({args.content} content); for xz one of "
          f"{sizes['small'] / 2**20:.0f} MiB; {os.cpu_count()} cores")
    subprocess.run(["tar", "cf", "/dev/null", str(work / "src-pure"), str(work / "src-nix")], check=True)
    times: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for case, query, which in CASES:
            for who in ("pure", "nix") if rnd % 2 == 0 else ("nix", "pure"):
                cache = work / f"cache-{who}-{case.replace(' ', '-')}-{rnd}"
                url = f"file://{cache}?{query}&secret-key={key}"
                subprocess.run(["sync"], check=True)
                if who == "pure":
                    cmd = PURE + ["--store", work / "src-pure", "--store-dir", "/nix/store", "copy", "--to", url,
                                  paths[which]]
                    env = PURE_ENV
                else:
                    cmd = ["nix", "copy", "--store", work / "src-nix", "--to", url, paths[which]]
                    env = nix_env(work / "xdg")
                times.setdefault((case, who), []).append(timed(cmd, env))
        print(f"round {rnd + 1}: " + ", ".join(f"{c}/{w} {v[-1]:.2f}s" for (c, w), v in times.items()), flush=True)
    print()
    for case, _q, _w in CASES:
        p, n = min(times[(case, "pure")]), min(times[(case, "nix")])
        print(f"{case:<15} pure {p:6.2f} s   nix {n:6.2f} s   ratio pure/nix {p / n:.2f}")
    print(f"pure zstd parallel / single: {min(times[('zstd parallel', 'pure')]) / min(times[('zstd', 'pure')]):.2f}")
    subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
    subprocess.run(["rm", "-rf", str(work)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--content", choices=CONTENTS, default="mixed")
    args = ap.parse_args()
    tree = Path(default_tree(args.content))
    with work_dir(4 + 2 * args.rounds) as where:
        bench(args, tree, where)


if __name__ == "__main__":
    main()
