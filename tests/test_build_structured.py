"""A derivation Nix 2.8 wrote with structured attributes (``__structuredAttrs``: its attributes,
name included, are JSON in ``__json``, for the builder to read from ``.attrs.json``): pure shows
it, takes its outputs when they are there (valid or substituted), and refuses to build it,
saying why, rather than running its builder without the files it reads.  Golden .drv from Nix
2.8 in tests/data/drv/structured/."""

from __future__ import annotations

import os

from conftest import DATA, run_pure
from test_cache_support import open_store

D = DATA / "drv" / "structured"
DRV = "pffc1rqwqkvq972dn4qvr8fjsq5qg12w-sa.drv"
OUTS = {"out": "/nix/store/v0x1awfqp846y6l0lzki4si575dp7ghx-sa", "lib": "/nix/store/qg22wvbbnvfnvjdalfjm1xfvglaix5x5-sa-lib"}


def _store_with_drv(root, outputs_valid: bool):
    from purestore.formats.path_info import PathInfo
    from purestore.formats.store_path import StorePath
    from purestore.store.fsnar import hash_path
    from purestore.store.fstree import canonicalise_path
    with open_store(root, "/nix/store") as store:
        drv = store.add_text("sa.drv", (D / DRV).read_bytes())
        if outputs_valid:
            for path in OUTS.values():
                sp = StorePath.parse(path, "/nix/store")
                tmp = store.temp_name(sp)
                os.makedirs(tmp)
                canonicalise_path(tmp)
                h, n = hash_path(tmp)
                with store.lock_path(sp):
                    store.install_path(tmp, sp)
                    store.register([PathInfo(sp, h, n, deriver=drv)])
    return f"/nix/store/{drv.base_name}"


def test_a_structured_attrs_derivation_is_not_built_and_says_why(tmp_path):
    """Nix's .drv has no 'name' in its environment (it is in __json): this failed with 'derivation
    has no 'name' attribute in its environment' before the builder could refuse it."""
    drv = _store_with_drv(tmp_path / "root", outputs_valid=False)
    p = run_pure("build", "--no-link", drv, root=tmp_path / "root", store_dir="/nix/store", check=False)
    assert p.returncode == 1
    assert f"{drv} uses structured attributes (__json), which purestore does not support" in p.stderr
    assert "Traceback" not in p.stderr
    log = run_pure("log", drv, root=tmp_path / "root", store_dir="/nix/store", check=False)
    assert log.returncode != 0  # no builder ran


def test_its_outputs_when_valid_are_taken_and_it_is_shown(tmp_path):
    drv = _store_with_drv(tmp_path / "root", outputs_valid=True)
    p = run_pure("build", "--no-link", drv, root=tmp_path / "root", store_dir="/nix/store")
    assert sorted(p.stdout.split()) == sorted(OUTS.values())
    shown = run_pure("show-derivation", drv, root=tmp_path / "root", store_dir="/nix/store").stdout
    assert shown == (D / "structured.json").read_text()
