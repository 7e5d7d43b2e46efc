"""Derivations written in Python instantiate to the very .drv bytes and paths Nix gives their twins."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import DATA, needs_nix, run_pure
from purestore.formats.derivation import parse_aterm

D = DATA / "drv"
GOLDEN = json.loads((D / "golden.json").read_text())
DRV_ATTRS = sorted(a for a, v in GOLDEN.items() if "drv" in v)


@pytest.fixture(scope="module")
def instantiated(tmp_path_factory):
    """One `pure instantiate` of every case into a rooted store with store dir /nix/store."""
    root = tmp_path_factory.mktemp("golden") / "root"
    p = run_pure("instantiate", "--json", D / "cases.py", "-A", "everything", root=root, store_dir="/nix/store")
    return root, json.loads(p.stdout)


def test_cases_cover_the_required_kinds():
    assert len(DRV_ATTRS) >= 25
    for needle in ("sha1", "sha256", "sha512", "nix32", "base16", "sri", "rec", "flat"):
        assert any(needle in a for a in DRV_ATTRS), needle


def test_every_drv_path_matches_nix(instantiated):
    _root, paths = instantiated
    assert paths == [GOLDEN[a]["drv"] for a in DRV_ATTRS]


@pytest.mark.parametrize("attr", DRV_ATTRS)
def test_drv_bytes_and_output_paths_match_nix(instantiated, attr):
    root, _ = instantiated
    drv_path = GOLDEN[attr]["drv"]
    # the whole closure, byte for byte
    got = (root / drv_path.lstrip("/")).read_bytes()
    assert got == (D / "golden" / os.path.basename(drv_path)).read_bytes()
    todo, seen = [drv_path], set()
    while todo:
        dp = todo.pop()
        if dp in seen:
            continue
        seen.add(dp)
        data = (root / dp.lstrip("/")).read_bytes()
        assert data == (D / "golden" / os.path.basename(dp)).read_bytes(), dp
        todo.extend(parse_aterm(data, dp).input_drvs)
    outs = sorted(parse_aterm(got, drv_path).output_paths().values())
    assert outs == sorted(GOLDEN[attr]["outputs"].split())


def test_show_derivation_of_a_store_drv_is_recursive_json(instantiated):
    root, _ = instantiated
    drv_path = GOLDEN["level3"]["drv"]
    shown = json.loads(run_pure("show-derivation", drv_path, "-r", root=root, store_dir="/nix/store").stdout)
    assert len(shown) == 4  # level3, level2, level1, the fod
    assert shown[drv_path]["outputs"]["out"]["path"] == GOLDEN["level3"]["outputs"]
    for dp in shown:
        assert (root / dp.lstrip("/")).read_bytes() == (D / "golden" / os.path.basename(dp)).read_bytes()
    # the same from the expression file, without writing anything
    from_file = json.loads(run_pure("show-derivation", D / "cases.py", "-A", "level3", "-r",
                                    root=root, store_dir="/nix/store").stdout)
    assert from_file == shown


def test_to_file_paths_match_nix_and_sources_are_in_the_store(instantiated):
    root, _ = instantiated
    for attr in ("text_a", "text_b"):
        p = run_pure("eval", D / "cases.py", "-A", attr, root=root, store_dir="/nix/store")
        assert p.stdout.strip() == GOLDEN[attr]["text"]
        assert (root / GOLDEN[attr]["text"].lstrip("/")).is_file()
    text_b = (root / GOLDEN["text_b"]["text"].lstrip("/")).read_text()
    hello = text_b.split()[1]
    assert (root / hello.lstrip("/")).read_text() == "hello\n"
    info = run_pure("store", "references", GOLDEN["text_b"]["text"], root=root, store_dir="/nix/store",
                    check=False)
    if info.returncode == 0:  # the store engineer's command, when present
        assert hello in info.stdout and GOLDEN["text_a"]["text"] in info.stdout


def test_instantiating_twice_gives_the_same_paths(instantiated):
    root, paths = instantiated
    p = run_pure("instantiate", "--json", D / "cases.py", "-A", "everything", root=root, store_dir="/nix/store")
    assert json.loads(p.stdout) == paths


@needs_nix
@pytest.mark.slow
def test_live_nix_instantiate_agrees(tmp_path, instantiated):
    """Run nix-instantiate now on cases.nix and compare every .drv with pure's."""
    root, _ = instantiated
    env = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")
    nix_store = tmp_path / "nix"
    out = subprocess.run(["nix-instantiate", "--store", str(nix_store), str(D / "cases.nix")],
                         capture_output=True, text=True, env=env, check=True).stdout.split()
    drvs = sorted(p.split("!")[0] for p in out)
    assert drvs == sorted(GOLDEN[a]["drv"] for a in DRV_ATTRS)
    for dp in (nix_store / "nix" / "store").glob("*.drv"):
        ours = root / "nix" / "store" / dp.name
        assert ours.read_bytes() == dp.read_bytes(), dp.name


@needs_nix
@pytest.mark.slow
@pytest.mark.parametrize("attr", ["level3", "strings", "fod_rec_sha1_sri", "multi", "drv_path_ref"])
def test_show_derivation_json_equals_nix_show_derivation(tmp_path, instantiated, attr):
    root, _ = instantiated
    env = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")
    nix_store = tmp_path / "nix"
    drv = subprocess.run(["nix-instantiate", "--store", str(nix_store), str(D / "cases.nix"), "-A", attr],
                         capture_output=True, text=True, env=env, check=True).stdout.strip().split("!")[0]
    nix_json = json.loads(subprocess.run(["nix", "show-derivation", "-r", "--store", str(nix_store), drv],
                                         capture_output=True, text=True, env=env, check=True).stdout)
    ours = json.loads(run_pure("show-derivation", "-r", drv, root=root, store_dir="/nix/store").stdout)
    assert ours == nix_json
