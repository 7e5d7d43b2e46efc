"""JSON that must equal Nix 2.8's byte for byte (.ls NAR listings, `nar ls --json`, `cache ls
--json`, `show-derivation`) escapes control characters as Nix does: backspace and form feed as
\\u0008 and \\u000c, where Python's json writes \\b and \\f.  Golden files made by Nix 2.8:
tests/data/nar/control/ (a tree whose names and symlink target hold control characters) and
tests/data/drv/control/ (a derivation whose strings do)."""

from __future__ import annotations

import io
import json
import os
import subprocess

import pytest

from conftest import DATA, needs_nix, run_pure
from purestore.formats import nix_json

NAR = DATA / "nar" / "control"
DRV = DATA / "drv" / "control"
DRV_NAME = "dvj9r7q6ybf1yqnpnw2fv7ws62s5lj0b-control.drv"
NIX_ENV = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command"}

NAMES = [b"a\x01", b"b\nc", b"d\te", b"f\\b", b'h"i', b"j\x7f", b"k\x08", b"l\x0c", b"m\r", b"n\x1f", b"o\\\x08"]


def make_tree(d) -> None:
    """The tree tests/data/nar/control/t.nar was dumped from."""
    os.mkdir(d)
    for n in NAMES:
        with open(os.path.join(os.fsencode(d), n), "wb") as f:
            f.write(b"x")
    os.symlink(b"tgt\x08\x0c\\f", os.path.join(os.fsencode(d), b"sym"))


def test_dumps_writes_nix_s_escapes_and_leaves_escaped_backslashes_alone():
    assert nix_json.dumps(["\b\f", "\\b", "\\\b", "\\\\f\f", "\x01\n\r\t\x7f\"é"]) == \
        '["\\u0008\\u000c", "\\\\b", "\\\\\\u0008", "\\\\\\\\f\\u000c", "\\u0001\\n\\r\\t\x7f\\"é"]'
    assert json.loads(nix_json.dumps(["\b\\b\f"])) == ["\b\\b\f"]


def test_nar_listing_equals_nix_s():
    from purestore.cache.nar_jobs import nar_listing
    assert nar_listing(io.BytesIO((NAR / "t.nar").read_bytes())) == (NAR / "t.ls").read_bytes()


def test_nar_ls_json_equals_nix_s():
    out = run_pure("nar", "ls", "--json", "-R", NAR / "t.nar", "/", input=b"").stdout
    assert out == (NAR / "t.ls.json").read_bytes() + b"\n"


def test_cache_ls_json_equals_nix_s(tmp_path):
    """A cache holding the tree (no narinfo signature checked), listed from its .ls and from the NAR."""
    from purestore.formats.hash import Hash
    from purestore.formats.narinfo import NarInfo
    from purestore.formats.store_path import StorePath
    nar = (NAR / "t.nar").read_bytes()
    h = Hash.of_bytes(nar)
    sp = StorePath.from_base_name("v18xfinp001awfggrx45panrfvvwwj72-t")
    (tmp_path / "nar").mkdir()
    (tmp_path / "nar" / f"{h.nix32}.nar").write_bytes(nar)
    (tmp_path / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    ni = NarInfo(store_path=sp, url=f"nar/{h.nix32}.nar", compression="none", file_hash=h, file_size=len(nar),
                 nar_hash=h, nar_size=len(nar))
    (tmp_path / f"{sp.hash_part}.narinfo").write_text(ni.render("/nix/store"))
    want = (NAR / "t.ls.json").read_bytes() + b"\n"
    url, path = f"file://{tmp_path}", f"/nix/store/{sp.base_name}"
    assert run_pure("cache", "ls", "--no-check-sigs", "--no-listing", "--json", "-R", url, path,
                    input=b"").stdout == want
    (tmp_path / f"{sp.hash_part}.ls").write_bytes((NAR / "t.ls").read_bytes())
    assert run_pure("cache", "ls", "--no-check-sigs", "--json", "-R", url, path, input=b"").stdout == want


def test_show_derivation_equals_nix_s(tmp_path):
    from test_cache_support import open_store
    with open_store(tmp_path / "root", "/nix/store") as store:
        store.add_text("control.drv", (DRV / DRV_NAME).read_bytes())
    out = run_pure("show-derivation", f"/nix/store/{DRV_NAME}", root=tmp_path / "root", store_dir="/nix/store",
                   input=b"").stdout
    assert out == (DRV / "control.json").read_bytes()


@needs_nix
def test_the_golden_files_are_what_nix_writes(tmp_path):
    def nix(*args) -> bytes:
        return subprocess.run([str(a) for a in args], env=NIX_ENV, capture_output=True, check=True).stdout

    make_tree(tmp_path / "t")
    assert nix("nix-store", "--dump", tmp_path / "t") == (NAR / "t.nar").read_bytes()
    assert nix("nix", "nar", "ls", "--json", "-R", NAR / "t.nar", "/") == (NAR / "t.ls.json").read_bytes()
    store = tmp_path / "nix"
    path = nix("nix-store", "--store", store, "--add", tmp_path / "t").decode().strip()
    nix("nix", "copy", "--store", store, "--to", f"file://{tmp_path}/cache?write-nar-listing=1&compression=none", path)
    assert (tmp_path / "cache" / f"{os.path.basename(path)[:32]}.ls").read_bytes() == (NAR / "t.ls").read_bytes()
    drv = nix("nix-instantiate", "--store", store, DRV / "control.nix").decode().strip()
    assert os.path.basename(drv) == DRV_NAME
    assert nix("nix", "show-derivation", "--store", store, drv) == (DRV / "control.json").read_bytes()
