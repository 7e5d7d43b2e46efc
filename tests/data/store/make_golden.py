#!/usr/bin/env python3
"""Regenerate golden.json: the store paths Nix gives the inputs of trees.py.

Run from the repository root (needs Nix 2.8's nix-store and nix on PATH):

    python3 tests/data/store/make_golden.py

For each case it runs, in a fresh chroot store under a temporary directory,
    nix-store --store DIR --add PATH                 (recursive cases)
    nix-store --store DIR --add-fixed sha256 PATH    (flat cases)
and then `nix path-info --store DIR --json PATH` for narHash, narSize and ca.
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from trees import CASES, make_case  # noqa: E402

ENV = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")


def nix_add(store: str, path: str, mode: str) -> dict:
    cmd = ["nix-store", "--store", store]
    cmd += ["--add", path] if mode == "recursive" else ["--add-fixed", "sha256", path]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=ENV).stdout.strip()
    info = json.loads(subprocess.run(["nix", "path-info", "--store", store, "--json", out],
                                     check=True, capture_output=True, text=True, env=ENV).stdout)[0]
    return {"mode": mode, "path": out, "narHash": info["narHash"], "narSize": info["narSize"],
            "ca": info.get("ca")}


def main() -> None:
    golden = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "nixstore")
        for name, mode in CASES.items():
            src = make_case(name, os.path.join(tmp, "in"))
            golden[name] = nix_add(store, src, mode)
        subprocess.run(["chmod", "-R", "u+w", tmp], check=True)
    with open(os.path.join(HERE, "golden.json"), "w") as f:
        json.dump(golden, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(golden)} cases to golden.json")


if __name__ == "__main__":
    main()
