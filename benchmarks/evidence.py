"""Benchmark: why-depends and verify --check-contents, pure vs Nix, on the same reference chain.

The workload: a chain of N text store paths, each referring to the previous one (t0 <- t1 <- …),
made in a chroot Nix store by `builtins.toFile` and in a rooted purestore store by
`LocalStore.add_text`.  Timed (best of R runs, each a fresh process):

- `why-depends TOP LEAF` (a chain of N links, each with the file holding the reference);
- `store verify --check-contents` over the whole store.

    .venv/bin/python benchmarks/evidence.py [N] [R]

Prints each time and the ratio pure/nix.  Needs Nix (nix-bin); the pure half runs without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

NIX_ENV = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")


def best(cmd, runs, env=None, ok=(0,)):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if p.returncode not in ok:
            raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return min(times)


def make_pure(root: str, n: int) -> tuple[str, str]:
    from purestore.store.local import LocalStore
    from purestore.store.settings import load_settings
    settings = load_settings(env={"PURE_CONFIG": "/dev/null"}, root=root)
    with LocalStore.open(settings, durable=False) as store:
        prev = store.add_text("t0", b"leaf")
        leaf = prev
        for i in range(1, n + 1):
            prev = store.add_text(f"t{i}", store.print_path(prev).encode(), [prev])
        return store.print_path(prev), store.print_path(leaf)


def make_nix(store: str, n: int) -> tuple[str, str] | None:
    if shutil.which("nix-instantiate") is None:
        return None
    expr = ('let mk = n: if n == 0 then builtins.toFile "t0" "leaf" '
            'else builtins.toFile "t${toString n}" "${mk (n - 1)}"; '
            f'in {{ top = mk {n}; leaf = mk 0; }}')
    out = {}
    for attr in ("top", "leaf"):
        p = subprocess.run(["nix-instantiate", "--store", store, "--eval", "--read-write-mode", "-E",
                            f"({expr}).{attr}"], env=NIX_ENV, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"nix-instantiate failed: {p.stderr}")
        out[attr] = p.stdout.strip().strip('"')
    return out["top"], out["leaf"]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    tmp = tempfile.mkdtemp(prefix="bench-evidence-")
    try:
        pure_root = os.path.join(tmp, "pure")
        os.makedirs(pure_root)
        ptop, pleaf = make_pure(pure_root, n)
        pure = [sys.executable, "-m", "purestore.cli.main", "--store", pure_root]
        penv = dict(os.environ, PURE_CONFIG="/dev/null", PYTHONPATH=REPO)
        results = {
            "why-depends": best(pure + ["why-depends", ptop, pleaf], runs, penv),
            "verify --check-contents": best(pure + ["store", "verify", "--check-contents"], runs, penv),
        }
        nix_store = os.path.join(tmp, "nix")
        made = make_nix(nix_store, n)
        nix_results = {}
        if made:
            ntop, nleaf = made
            nix_results["why-depends"] = best(
                ["nix", "why-depends", "--store", nix_store, ntop, nleaf], runs, NIX_ENV)
            nix_results["verify --check-contents"] = best(
                ["nix", "store", "verify", "--store", nix_store, "--all", "--no-trust"], runs, NIX_ENV)
        print(f"chain of {n} text paths, best of {runs}")
        for k, t in results.items():
            if k in nix_results:
                print(f"{k:26s} pure {t * 1000:8.1f} ms   nix {nix_results[k] * 1000:8.1f} ms   "
                      f"pure/nix {t / nix_results[k]:.2f}")
            else:
                print(f"{k:26s} pure {t * 1000:8.1f} ms   (nix not available)")
    finally:
        subprocess.run(["chmod", "-R", "u+w", tmp])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
