"""A build of the same derivations in Nix and in purestore (--store-dir /nix/store, rooted store,
static busybox builder) gives the same output paths, NAR hashes and references."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from conftest import DATA, needs_nix, run_pure
from test_build import BUSYBOX, needs_sandbox

pytestmark = needs_sandbox
GOLDEN = DATA / "build" / "golden.json"


def _setup(tmp_path):
    (tmp_path / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, tmp_path / "bb" / "bin" / "busybox")
    for f in ("compat.py", "compat.nix"):
        shutil.copy(DATA / "build" / f, tmp_path / f)


def _pure_infos(tmp_path) -> dict:
    root = tmp_path / "pure-root"
    root.mkdir()
    p = run_pure("build", "compat.py", "-A", "top", "--no-link", root=root, store_dir="/nix/store", cwd=tmp_path)
    outs = p.stdout.split()
    info = json.loads(run_pure("store", "path-info", "--json", "-r", *outs, root=root, store_dir="/nix/store").stdout)
    return {i["path"]: {"narHash": i["narHash"], "narSize": i["narSize"], "references": sorted(i["references"])}
            for i in info if not i["path"].endswith("-bb")}


def test_same_outputs_as_the_nix_golden_file(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    with open(BUSYBOX, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != golden["busybox_sha256"]:
            pytest.skip("this /bin/busybox differs from the one golden.json was made with (run gen.sh)")
    _setup(tmp_path)
    assert _pure_infos(tmp_path) == golden["paths"]


@pytest.mark.slow
@needs_nix
def test_same_outputs_as_a_live_nix_build(tmp_path):
    _setup(tmp_path)
    env = dict(os.environ)
    env["NIX_CONFIG"] = "substituters =\nexperimental-features = nix-command\nsandbox = true\nbuild-users-group ="
    store = tmp_path / "nix-root"
    outs = subprocess.run(["nix-build", "--store", str(store), "compat.nix", "-A", "top", "--no-out-link"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    info = json.loads(subprocess.run(["nix", "path-info", "--store", str(store), "--json", "-r", *outs],
                                     env=env, capture_output=True, text=True, check=True).stdout)
    nix = {i["path"]: {"narHash": i["narHash"], "narSize": i["narSize"], "references": sorted(i.get("references", []))}
           for i in info if not i["path"].endswith("-bb")}
    subprocess.run(["chmod", "-R", "u+w", str(store)], check=False)
    assert _pure_infos(tmp_path) == nix
