"""The example expressions evaluate, and mini-graph.py gives Nix's paths."""

from __future__ import annotations

import json

from conftest import REPO, run_pure

EX = REPO / "expressions" / "examples"


def test_examples_evaluate_with_the_documented_shape(tmp_path):
    out = json.loads(run_pure("eval", "--json", EX / "features.py", root=tmp_path / "r").stdout)
    assert set(out) == {"lib", "app"}
    assert set(out["lib"]["outputs"]) == {"out", "dev", "doc"}
    shown = json.loads(run_pure("show-derivation", EX / "features.py", "-A", "app", root=tmp_path / "r").stdout)
    [app] = shown.values()
    assert app["inputDrvs"][out["lib"]["drvPath"]] == ["dev"]  # only the output mentioned
    hello = json.loads(run_pure("eval", "--json", EX / "hello-busybox.py", root=tmp_path / "r").stdout)
    assert hello["name"] == "hello-busybox-1.0" and hello["version"] == "1.0"


def test_mini_graph_example_gives_nix_paths(tmp_path):
    p = run_pure("instantiate", EX / "mini-graph.py", "-A", "top", root=tmp_path / "r", store_dir="/nix/store")
    assert p.stdout.strip() == "/nix/store/lchmkny4jliss67w78hfw9xhgy07skhn-top.drv"
