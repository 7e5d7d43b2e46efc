"""Benchmark: copy a ~350 MB, ~20,000-file closure from one binary cache to another, through
`pure copy --from A --to B` and `nix copy --from A --to B`, in one run.

Setup (not timed): the tree of benchmarks/_tree.py added as ~50 store paths to a rooted purestore
store (--store-dir /nix/store) and pushed, signed, to a file:// zstd cache A.  Then, in rounds
(which tool goes first alternates, as in copy_cache.py), each tool copies the closure into a new
cache:

- file:// → file://   A read in place
- nginx → file://      A served by nginx on 127.0.0.1 (where nginx is installed)

Both check the narinfos' signatures against the test key.  pure checks every NAR file against
its narinfo (FileSize, FileHash, NarSize, NarHash) and copies it as it is; Nix 2.8 decompresses
each NAR, checks its NarHash and compresses it again with the destination's zstd.  So the two do
not do the same work: this measures what a user waits for to mirror a cache with each tool.

Prints the best time of each tool, the ratio pure/nix, and each round's ratio.  Runs on a fresh
ext4 when root (benchmarks/_scratchfs.py).

    .venv/bin/python benchmarks/mirror_cache.py [--rounds N] [--content mixed|random]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from _scratchfs import work_dir  # noqa: E402
from _tree import CONTENTS, default_tree  # noqa: E402
from copy_cache import PURE, PURE_ENV, nix_env, run, start_nginx, wipe  # noqa: E402 - same commands


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--content", choices=CONTENTS, default="mixed",
                    help="what the files of the tree hold (benchmarks/_tree.py)")
    args = ap.parse_args()
    tree = Path(default_tree(args.content))
    with work_dir(3 + 2 * args.rounds) as where:
        bench(args, tree, where)


def bench(args, tree: Path, where: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-mirror-", dir=where))
    key = REPO / "tests/data/cache/test-key-1.sec"
    pub = (REPO / "tests/data/cache/test-key-1.pub").read_text().strip()
    nginx = None
    try:
        pkgs = sorted(p for p in tree.iterdir() if p.is_dir())
        src = work / "src"
        paths = subprocess.run(PURE + ["--store", src, "--store-dir", "/nix/store", "store", "add", *pkgs],
                               env=PURE_ENV, capture_output=True, text=True, check=True).stdout.split()
        a = work / "A"
        subprocess.run(PURE + ["--store", src, "--store-dir", "/nix/store", "copy", "--to",
                               f"file://{a}?compression=zstd&secret-key={key}", *paths],
                       env=PURE_ENV, capture_output=True, check=True)
        nars = sum(f.stat().st_size for f in (a / "nar").iterdir())
        print(f"cache A: {len(paths)} paths, {nars / 2**20:.0f} MiB of zstd NAR files")
        wipe(src)
        sources = {"file": f"file://{a}"}
        nginx = start_nginx(work / "nginx", a)
        if nginx is not None:
            sources["nginx"] = nginx[1]
        times: dict[str, list[float]] = {f"{s}-{who}": [] for s in sources for who in ("pure", "nix")}
        subprocess.run(["tar", "cf", "/dev/null", str(a)], check=True)  # A in the page cache for both
        for rnd in range(args.rounds):
            for who in ("pure", "nix") if rnd % 2 == 0 else ("nix", "pure"):
                for s, url in sources.items():
                    dst = work / f"B-{s}-{who}-{rnd}"
                    if who == "pure":
                        cmd = PURE + ["copy", "--from", url, "--to", f"file://{dst}",
                                      "--trusted-public-keys", pub, *paths]
                        env = PURE_ENV
                    else:
                        cmd = ["nix", "copy", "--from", url, "--to", f"file://{dst}?compression=zstd",
                               "--option", "trusted-public-keys", pub, *paths]
                        env = nix_env(work / f"xdg-{who}-{rnd}")
                    subprocess.run(["sync"], check=True)
                    times[f"{s}-{who}"].append(run(cmd, env, f"{s}-{who}"))
                    wipe(dst)
            print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
        print()
        for s in sources:
            p, n = times[f"{s}-pure"], times[f"{s}-nix"]
            each = [x / y for x, y in zip(p, n)]
            print(f"copy A to a new cache, from {s:<6} pure {min(p):6.2f} s  nix {min(n):6.2f} s  "
                  f"ratio {min(p) / min(n):.2f}   each round: {' '.join(f'{r:.2f}' for r in each)} "
                  f"(median {statistics.median(each):.2f})")
    finally:
        if nginx is not None:
            nginx[0].kill()
            nginx[0].wait()
        wipe(work)


if __name__ == "__main__":
    main()
