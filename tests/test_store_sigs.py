"""Trust of local paths: `pure store verify --sigs-needed N [-s URL]` and `pure store copy-sigs`.

The scene: a builder (store ``a``) builds a closure, signs it and pushes it to a file:// cache;
this machine (store ``b``) built the same closure itself, so it has the same paths with the same
NAR hashes but no signature.  Signatures by trusted keys that the cache holds for those very
contents count for `verify -s`, and `copy-sigs` stores them; anything else does not.
"""

from __future__ import annotations

import json

import pytest

from conftest import needs_nix, run_pure
from test_cache_support import (PUB, SEC, make_closure, make_path, nix_copy_from, open_store,
                                rewrite_narinfo)

KEYS = ("--trusted-public-keys", PUB)


def _scene(tmp_path, store_dir="/pure/store"):
    """Push a signed closure from store a; build the same closure unsigned in store b."""
    cache = tmp_path / "cache"
    (tmp_path / "k.sec").write_text(SEC)
    with open_store(tmp_path / "a", store_dir) as a:
        lib, app = make_closure(a)
        app_p = a.print_path(app)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", tmp_path / "k.sec", app_p,
             root=tmp_path / "a", store_dir=store_dir)
    with open_store(tmp_path / "b", store_dir) as b:
        assert make_closure(b) == (lib, app)
        assert not b.query_path_info(app).sigs
    return cache, lib, app, app_p


def _b(tmp_path, *args, check=False, store_dir="/pure/store"):
    return run_pure(*args, root=tmp_path / "b", store_dir=store_dir, check=check)


def _sigs(tmp_path, sp):
    with open_store(tmp_path / "b") as b:
        return b.query_path_info(sp).sigs


def test_verify_sigs_needed_counts_local_and_cache_signatures(tmp_path):
    cache, lib, app, app_p = _scene(tmp_path)
    p = _b(tmp_path, *KEYS, "store", "verify", "--sigs-needed", "1", "--json")
    assert p.returncode == 1
    report = json.loads(p.stdout)
    assert report["checked"] == 2 and not report["ok"]
    assert {(x["kind"], x["path"].rsplit("/", 1)[1]) for x in report["problems"]} == {
        ("untrusted", lib.base_name), ("untrusted", app.base_name)}
    assert all("needs 1 valid signature by trusted keys and has 0 (no signatures)" in x["message"]
               for x in report["problems"])
    # the cache's signatures over the same contents count, and are not stored
    p = _b(tmp_path, *KEYS, "store", "verify", "--sigs-needed", "1", "-s", f"file://{cache}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "checked 2 paths: no problems" in p.stderr
    assert not _sigs(tmp_path, app)
    # one key counts once: two are needed, the cache has one
    p = _b(tmp_path, *KEYS, "store", "verify", "--sigs-needed", "2", "-s", f"file://{cache}", app_p)
    assert p.returncode == 1
    assert "needs 2 valid signatures by trusted keys and has 1 (valid signature by trusted key 'test-key-1')" in p.stdout
    assert "checked 1 path: 1 problem\n" in p.stderr  # (not "1 paths: 1 problem(s)")
    # plain verify (no --sigs-needed) does not judge trust
    assert _b(tmp_path, "store", "verify").returncode == 0


def test_copy_sigs_adds_trusted_signatures_for_the_same_contents(tmp_path):
    from purestore.formats.narinfo import NarInfo

    cache, lib, app, app_p = _scene(tmp_path)
    p = _b(tmp_path, *KEYS, "store", "copy-sigs", "-r", "-s", f"file://{cache}", app_p, check=True)
    assert p.stdout.count("added the signature by 'test-key-1'") == 2
    assert "added 2 signatures to 2 of 2 paths" in p.stderr
    for sp in (app, lib):
        ni = NarInfo.parse((cache / f"{sp.hash_part}.narinfo").read_text(), "/pure/store")
        assert _sigs(tmp_path, sp) == frozenset(ni.sigs) != frozenset()
    # now trusted without asking the cache; a second copy adds nothing
    assert _b(tmp_path, *KEYS, "store", "verify", "--sigs-needed", "1").returncode == 0
    p = _b(tmp_path, *KEYS, "store", "copy-sigs", "-r", "-s", f"file://{cache}", app_p, "--json", check=True)
    assert [x["added"] for x in json.loads(p.stdout)] == [[], []]
    assert "added 0 signatures to 0 of 2 paths" in p.stderr


def test_copy_sigs_leaves_out_untrusted_and_invalid_signatures(tmp_path):
    from purestore.formats.signing import SecretKey

    cache, lib, app, app_p = _scene(tmp_path)
    other = SecretKey.generate("other-1")
    rewrite_narinfo(cache, app, sign_with=other.render())  # signed only by a key not trusted here
    ni = rewrite_narinfo(cache, lib)
    forged = SecretKey.generate("test-key-1").sign(ni.fingerprint("/pure/store")).render()
    rewrite_narinfo(cache, lib, sigs=(forged,))  # test-key-1's name, another key
    p = _b(tmp_path, *KEYS, "store", "copy-sigs", "-r", "-s", f"file://{cache}", app_p, "--json", check=True)
    out = {x["path"].rsplit("/", 1)[1]: x for x in json.loads(p.stdout)}
    assert out[app.base_name]["added"] == [] and out[lib.base_name]["added"] == []
    assert out[app.base_name]["leftOut"] == [{"key": "other-1", "cache": f"file://{cache}",
                                              "reason": "not a trusted key"}]
    assert out[lib.base_name]["leftOut"][0]["reason"] == "the signature does not verify"
    assert f"{app_p}: left out the signature by 'other-1' from file://{cache}: not a trusted key" in p.stderr
    assert not _sigs(tmp_path, app) and not _sigs(tmp_path, lib)
    # verify -s tells the same story
    p = _b(tmp_path, *KEYS, "store", "verify", "--sigs-needed", "1", "-s", f"file://{cache}", "-r", app_p)
    assert p.returncode == 1
    assert "signed by key 'other-1', not trusted here" in p.stdout
    assert "invalid signature by 'test-key-1'" in p.stdout


def test_a_cache_with_other_contents_gives_no_signature(tmp_path):
    """A narinfo for the same path with another NAR hash, validly signed over its own contents:
    its signature is no evidence for ours, and the difference is reported."""
    from purestore.formats.hash import Hash

    cache, lib, app, app_p = _scene(tmp_path)
    other = Hash.of_bytes(b"another build")
    rewrite_narinfo(cache, app, sign_with=SEC, nar_hash=other)
    p = _b(tmp_path, *KEYS, "store", "copy-sigs", "-s", f"file://{cache}", app_p, check=True)
    assert f"warning: file://{cache} holds other contents for {app_p}: its NarHash is {other.typed()}" in p.stderr
    assert "added 0 signatures to 0 of 1 path" in p.stderr
    assert not _sigs(tmp_path, app)
    p = _b(tmp_path, *KEYS, "store", "verify", "--sigs-needed", "1", "-s", f"file://{cache}", app_p)
    assert p.returncode == 1 and "has 0 (no signatures)" in p.stdout
    # and with other references
    rewrite_narinfo(cache, app, sign_with=SEC, nar_hash=_info(tmp_path, app).nar_hash, references=())
    p = _b(tmp_path, *KEYS, "store", "copy-sigs", "-s", f"file://{cache}", app_p, check=True)
    assert f"its References differ (only here: {lib.base_name})" in p.stderr


def _info(tmp_path, sp):
    with open_store(tmp_path / "b") as b:
        return b.query_path_info(sp)


def test_content_addressed_paths_need_no_signature(tmp_path, pure):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("hello\n")
    (tmp_path / "flat").write_text("flat file\n")
    tree = pure("store", "add", src).stdout.strip()
    flat = pure("store", "add", "--flat", tmp_path / "flat").stdout.strip()
    p = pure(*KEYS, "store", "verify", "--sigs-needed", "3", tree, flat)
    assert "checked 2 paths: no problems" in p.stderr
    # a path whose CA field does not give back its path is not content-addressed
    from purestore.store.verify import is_content_addressed, path_trust
    with open_store(tmp_path / "root") as store:
        info = store.query_path_info(store.parse_path(tree))
        assert is_content_addressed(info, store.store_dir)
        fake = make_path(store, "fake", {"": b"x"})
        finfo = store.query_path_info(fake).evolve(ca=info.ca)
        assert not is_content_addressed(finfo, store.store_dir)
        assert not path_trust(finfo.evolve(ca="fixed:r:sha256:garbage"), store.store_dir, {}).enough(1)


def test_path_from_ca_gives_back_the_paths_of_every_kind():
    from purestore.formats.hash import Hash
    from purestore.formats.store_path import (StorePath, content_address, make_fixed_output_path,
                                              make_text_path, path_from_ca)
    from purestore.errors import InvalidStorePath

    sd = "/nix/store"
    h = Hash.of_bytes(b"contents")
    dep = make_text_path("dep", b"dep", [], sd)
    text = make_text_path("t.drv", b"contents", [dep], sd)
    assert path_from_ca(f"text:sha256:{h.nix32}", text, [dep], sd) == text
    for recursive in (True, False):
        fixed = make_fixed_output_path("src", h, recursive, sd)
        assert path_from_ca(content_address(h, recursive), fixed, [], sd) == fixed
    sha1 = Hash.of_bytes(b"contents", "sha1")
    fixed = make_fixed_output_path("f", sha1, True, sd)
    assert path_from_ca(content_address(sha1, True), fixed, [], sd) == fixed
    # a source path with references and a self-reference
    from purestore.formats.store_path import make_source_path
    selfref = make_source_path("s", h, [dep], sd, self_ref=True)
    assert path_from_ca(content_address(h, True), selfref, [dep, selfref], sd) == selfref
    some = StorePath.from_base_name(dep.base_name)
    for bad in ("", "fixed", "text:sha256:", "fixed:r:sha256:zz", "nar:sha256:" + h.nix32):
        with pytest.raises(InvalidStorePath, match="content address"):
            path_from_ca(bad, some, [], sd)
    with pytest.raises(InvalidStorePath, match="no references"):
        path_from_ca(content_address(h, False), some, [dep], sd)


def test_sig_errors_are_clear(tmp_path):
    cache, lib, app, app_p = _scene(tmp_path)
    p = _b(tmp_path, "store", "verify", "--sigs-needed", "1")
    assert p.returncode != 0
    assert "error: --sigs-needed needs trusted keys, and none are set" in p.stderr
    assert "--trusted-public-keys" in p.stderr
    p = _b(tmp_path, "store", "copy-sigs", "-s", f"file://{cache}", app_p)
    assert p.returncode != 0 and "error: copy-sigs (it copies only signatures by trusted keys) needs trusted keys" in p.stderr
    p = _b(tmp_path, *KEYS, "store", "copy-sigs", app_p)
    assert p.returncode != 0 and "error: no binary cache to take signatures from" in p.stderr
    p = _b(tmp_path, *KEYS, "store", "verify", "-s", f"file://{cache}")
    assert p.returncode != 0 and "use it with --sigs-needed N" in p.stderr
    p = _b(tmp_path, "store", "verify", "-r")
    assert p.returncode != 0 and "--recursive needs PATHs" in p.stderr
    p = _b(tmp_path, "store", "verify", "--sigs-needed", "-1")
    assert p.returncode != 0 and "expected a number of signatures" in p.stderr
    # a cache that cannot be used is an error naming it; nothing is added
    gone = tmp_path / "nowhere"
    p = _b(tmp_path, *KEYS, "store", "copy-sigs", "-s", f"file://{gone}", app_p)
    assert p.returncode != 0 and "error:" in p.stderr and str(gone) in p.stderr
    assert "Traceback" not in p.stderr
    # a narinfo that cannot be read is a warning naming it; the other paths go on
    (cache / f"{lib.hash_part}.narinfo").write_text("StorePath: nonsense\n")
    p = _b(tmp_path, *KEYS, "store", "copy-sigs", "-r", "-s", f"file://{cache}", app_p, check=True)
    assert f"warning: cannot read file://{cache} for /pure/store/{lib.base_name}: " in p.stderr
    assert "StorePath" in p.stderr
    assert "added 1 signature to 1 of 2 paths" in p.stderr
    # a path that is not valid here
    p = _b(tmp_path, *KEYS, "store", "copy-sigs", "-s", f"file://{cache}", "/pure/store/" + "0" * 32 + "-x")
    assert p.returncode != 0 and "error:" in p.stderr and "not valid" in p.stderr


@needs_nix
def test_copied_signatures_are_accepted_by_nix(tmp_path):
    """Signatures taken by copy-sigs travel on: pushed again without any key, the narinfos carry
    them, and Nix (trusting the builder's key) substitutes from that second cache."""
    sd = "/nix/store"
    cache, lib, app, app_p = _scene(tmp_path, sd)
    _b(tmp_path, *KEYS, "store", "copy-sigs", "-r", "-s", f"file://{cache}", app_p, check=True, store_dir=sd)
    second = tmp_path / "second"
    _b(tmp_path, "copy", "--to", f"file://{second}", app_p, check=True, store_dir=sd)
    assert "Sig: test-key-1:" in (second / f"{app.hash_part}.narinfo").read_text()
    p = nix_copy_from(tmp_path, f"file://{second}", app_p)
    assert p.returncode == 0, p.stderr


def test_copy_sigs_from_the_configured_substituters_skips_an_unusable_one(tmp_path):
    cache, lib, app, app_p = _scene(tmp_path)
    gone = tmp_path / "gone"
    p = run_pure("--substituters", f"file://{gone} file://{cache}", *KEYS, "store", "copy-sigs", "-r", app_p,
                 root=tmp_path / "b")
    assert p.stderr.count(f"warning: not using binary cache 'file://{gone}'") == 1, p.stderr
    assert "added 2 signatures to 2 of 2 paths" in p.stderr
    # named with -s, the same cache is an error
    p = run_pure(*KEYS, "store", "copy-sigs", "-s", f"file://{gone}", "-s", f"file://{cache}", app_p,
                 root=tmp_path / "b", check=False)
    assert p.returncode != 0 and f"error: binary cache 'file://{gone}'" in p.stderr
