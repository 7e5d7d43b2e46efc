"""Benchmark: garbage-collect 10,000 dead paths with `pure gc` and with `nix-store --gc`.

Both stores get the same 10,000 small files (one store path each, like `nix-store --add`), none
rooted; then each collector is timed as a subprocess on a fresh copy of its store, alternating,
for a few rounds (the machine is shared: the best round of each counts).  Set-up is not timed.

    .venv/bin/python benchmarks/gc.py [--paths N]

Prints both times and the ratio pure/nix (target <= 0.5).
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
sys.path.insert(0, str(REPO))


def make_files(d: Path, n: int) -> list[Path]:
    d.mkdir()
    out = []
    for i in range(n):
        p = d / f"f{i}"
        p.write_text(f"file {i}\n")
        out.append(p)
    return out


def setup_pure(root: Path, files: list[Path]) -> None:
    from purestore.store.local import LocalStore
    from purestore.store.settings import load_settings

    settings = load_settings(env={"PURE_CONFIG": "/dev/null"}, root=str(root))
    with LocalStore.open(settings, durable=False) as store:
        for f in files:
            store.add_path(str(f))
        assert len(store.valid_paths()) == len(files)


def setup_nix(store: Path, files: list[Path], env: dict) -> None:
    # one nix-store call per 1000 files (argument lists stay short)
    for i in range(0, len(files), 1000):
        subprocess.run(["nix-store", "--store", str(store), "--add", *map(str, files[i:i + 1000])],
                       check=True, env=env, stdout=subprocess.DEVNULL)


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    print(f"  {cmd[0]} {cmd[-2] if len(cmd) > 2 else ''}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds on fresh copies; the best counts")
    args = ap.parse_args()
    if not shutil.which("nix-store"):
        raise SystemExit("nix-store is not installed (apt-get install nix-bin)")
    tmp = Path(tempfile.mkdtemp(prefix="pure-gc-bench-"))
    try:
        files = make_files(tmp / "src", args.paths)
        pure_root = tmp / "pure-root"
        nix_store = tmp / "nix-store"
        nix_env = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command"}
        pure_env = {k: v for k, v in os.environ.items() if not k.startswith("PURE_")}
        pure_env.update(PURE_CONFIG="/dev/null", PYTHONPATH=str(REPO))

        print(f"setting up {args.paths} dead paths in each store…")
        setup_pure(pure_root, files)
        setup_nix(nix_store, files, nix_env)

        t_pure, t_nix = [], []
        for r in range(args.rounds):
            pr, ns = tmp / f"pure-{r}", tmp / f"nix-{r}"
            subprocess.run(["cp", "-a", str(pure_root), str(pr)], check=True)
            subprocess.run(["cp", "-a", str(nix_store), str(ns)], check=True)
            os.sync()
            pure_env["PURE_STORE"] = str(pr)
            t_pure.append(timed([sys.executable, "-m", "purestore.cli.main", "gc", "--quiet"], pure_env))
            t_nix.append(timed(["nix-store", "--store", str(ns), "--gc"], nix_env))
            left = [n for n in os.listdir(pr / "pure" / "store") if not n.startswith(".")]
            assert not left, f"pure gc left {len(left)} paths"
        tp, tn = min(t_pure), min(t_nix)
        print(f"pure gc:        {tp:.3f} s  (best of {args.rounds}: {', '.join(f'{t:.3f}' for t in t_pure)})")
        print(f"nix-store --gc: {tn:.3f} s  (best of {args.rounds}: {', '.join(f'{t:.3f}' for t in t_nix)})")
        print(f"ratio pure/nix: {tp / tn:.2f}  (target <= 0.5)")
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(tmp)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
