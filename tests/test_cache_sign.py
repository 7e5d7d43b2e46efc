"""pure cache sign: signatures added to a cache's narinfos in place (key rotation), only to
narinfos a trusted key signed (or whose NAR checks out, with --check-contents), nothing changed
when one is refused, over file:// and HTTP (with the upload token), and Nix takes the new key."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import HAVE_NIX, run_pure
from test_cache_mirror import NIX_CACHE, NIX_PATHS, files, source
from test_cache_support import PUB, narinfo_file, nix_copy_from, rewrite_narinfo, start_server, stop_server


def new_key(tmp_path, name="new-1"):
    sec, pub = tmp_path / f"{name}.sec", tmp_path / f"{name}.pub"
    run_pure("key", "generate", "--name", name, "--secret-out", sec, "--public-out", pub)
    return sec, pub.read_text().strip()


def contents(cache):
    return {n: (cache / n).read_bytes() for n in files(cache)}


def sig_names(text):
    return sorted(line.split()[1].split(":")[0] for line in text.splitlines() if line.startswith("Sig: "))


def test_a_new_key_signs_every_narinfo_and_substitutes_alone(tmp_path):
    a, p = source(tmp_path)
    sec, pub = new_key(tmp_path)
    before = contents(a)
    out = json.loads(run_pure("cache", "sign", f"file://{a}", "--key-file", sec,
                              "--trusted-public-keys", PUB, "--json").stdout)
    assert sorted(out["signed"]) == sorted(q.absolute("/pure/store") for q in p.values())
    assert out["unchanged"] == []
    for q in p.values():
        text = narinfo_file(a, q).read_text()
        assert sig_names(text) == ["new-1", "test-key-1"]
        old = before[narinfo_file(a, q).name].decode()
        assert [x for x in text.splitlines() if not x.startswith("Sig: ")] == \
            [x for x in old.splitlines() if not x.startswith("Sig: ")]
    assert {n: d for n, d in contents(a).items() if not n.endswith(".narinfo")} == \
        {n: d for n, d in before.items() if not n.endswith(".narinfo")}
    # the new key alone is enough now
    root = tmp_path / "fresh"
    run_pure("copy", "--from", f"file://{a}", "--trusted-public-keys", pub, p["app"].absolute("/pure/store"),
             root=root)
    run_pure("store", "verify", "--check-contents", root=root)
    again = run_pure("cache", "sign", f"file://{a}", "--key-file", sec, "--trusted-public-keys", pub)
    assert "signed 0 paths" in again.stderr and "3 had the signatures already" in again.stderr


@pytest.mark.parametrize("how", ["untrusted", "corrupt nar"])
def test_a_refused_narinfo_changes_nothing(tmp_path, how):
    a, p = source(tmp_path, listing=False)
    sec, _pub = new_key(tmp_path)
    extra = []
    if how == "untrusted":
        other, _ = new_key(tmp_path, "other-1")
        rewrite_narinfo(a, p["lone"], sign_with=other.read_text())
        reason = "not trusted, so not signed"
    else:
        nar = a / rewrite_narinfo(a, p["lone"]).url
        data = bytearray(nar.read_bytes())
        data[len(data) // 2] ^= 1
        nar.write_bytes(bytes(data))
        extra = ["--check-contents"]
        reason = "FileHash says"
    before = contents(a)
    r = run_pure("cache", "sign", f"file://{a}", "--key-file", sec, "--trusted-public-keys", PUB, *extra,
                 check=False)
    assert r.returncode == 1
    assert f"error: cannot sign '{p['lone'].absolute('/pure/store')}'" in r.stderr and reason in r.stderr
    assert "nothing was signed" in r.stderr
    assert contents(a) == before
    # the other paths alone can be signed
    run_pure("cache", "sign", f"file://{a}", "--key-file", sec, "--trusted-public-keys", PUB, *extra,
             p["app"].absolute("/pure/store"), "-r")
    assert sig_names(narinfo_file(a, p["lib"]).read_text()) == ["new-1", "test-key-1"]
    assert narinfo_file(a, p["lone"]).read_bytes() == before[narinfo_file(a, p["lone"]).name]


def test_unsigned_paths_are_signed_only_when_asked(tmp_path):
    a, p = source(tmp_path)
    for q in p.values():
        rewrite_narinfo(a, q, drop_sigs=True)
    sec, pub = new_key(tmp_path)
    r = run_pure("cache", "sign", f"file://{a}", "--key-file", sec, "--trusted-public-keys", PUB, check=False)
    assert r.returncode == 1 and "no signature" in r.stderr
    r = run_pure("cache", "sign", f"file://{a}", "--key-file", sec, check=False, env={"PURE_CONFIG": "/dev/null"})
    assert r.returncode == 1 and "no trusted public keys" in r.stderr and "--no-check-sigs" in r.stderr
    run_pure("cache", "sign", f"file://{a}", "--key-file", sec, "--no-check-sigs", "--check-contents")
    assert all(sig_names(narinfo_file(a, q).read_text()) == ["new-1"] for q in p.values())
    run_pure("cache", "verify", "--trusted-public-keys", pub, f"file://{a}")


def test_nix_cache_signed_over_http_with_the_upload_token(tmp_path):
    """Nix's golden cache behind `pure cache serve`: without the token the PUT is refused and
    nothing changes; with it, each narinfo gains the new signature and Nix accepts the new key."""
    a = tmp_path / "nixcache"
    shutil.copytree(NIX_CACHE, a)
    sec, pub = new_key(tmp_path)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    proc, url = start_server(a, token_file=token)
    try:
        r = run_pure("cache", "sign", url, "--key-file", sec, "--trusted-public-keys", PUB, *NIX_PATHS,
                     check=False)
        assert r.returncode == 1 and "refused (HTTP 401 Unauthorized" in r.stderr
        r = run_pure("cache", "sign", url, "--key-file", sec, "--no-check-sigs", check=False)
        assert r.returncode == 1 and "cannot be listed over HTTP" in r.stderr
        assert contents(a) == contents(NIX_CACHE)
        run_pure("cache", "sign", url + f"?token-file={token}", "--key-file", sec, "--trusted-public-keys", PUB,
                 *NIX_PATHS)
    finally:
        stop_server(proc)
    for path in NIX_PATHS:
        name = path.split("/")[-1][:32] + ".narinfo"
        assert sig_names((a / name).read_text()) == ["new-1", "test-key-1"]
        old, new = (NIX_CACHE / name).read_text(), (a / name).read_text()
        assert [x for x in new.splitlines() if not x.startswith("Sig: ")] == \
            [x for x in old.splitlines() if not x.startswith("Sig: ")]
    if HAVE_NIX:
        p = nix_copy_from(tmp_path, f"file://{a}", NIX_PATHS[1], "--option", "trusted-public-keys", pub)
        assert p.returncode == 0, p.stderr


def test_usage(tmp_path):
    sec, _ = new_key(tmp_path)
    r = run_pure("cache", "sign", f"file://{tmp_path}", "--key-file", sec, "-r", check=False)
    assert r.returncode == 2 and "-r needs PATHs" in r.stderr
    r = run_pure("cache", "sign", f"file://{tmp_path}/none", "--key-file", tmp_path / "missing.sec", check=False)
    assert r.returncode == 1 and "cannot read secret key file" in r.stderr


def test_signings_at_the_same_time_keep_both_keys_signatures(tmp_path):
    """Two `cache sign` runs with different keys over one directory at once (each reads every
    narinfo, then writes it back with its signature): every narinfo ends with both signatures.
    Before, the last writer of a narinfo replaced the other's signature and both said 'signed'."""
    import trio

    from purestore.cache.sign import sign_cache
    from purestore.formats.signing import SecretKey
    from test_cache_support import settings_for
    a, p = source(tmp_path)
    keys = [SecretKey.generate("two-1"), SecretKey.generate("three-1")]
    settings = settings_for(tmp_path / "unused")

    async def both():
        async with trio.open_nursery() as n:
            for k in keys:
                n.start_soon(lambda k=k: sign_cache(settings, f"file://{a}", [k], trusted_keys=[PUB]))
    trio.run(both)
    for q in p.values():
        assert sig_names(narinfo_file(a, q).read_text()) == ["test-key-1", "three-1", "two-1"]
    run_pure("cache", "verify", f"file://{a}", "--trusted-public-keys", keys[0].public_key().render())
    run_pure("cache", "verify", f"file://{a}", "--trusted-public-keys", keys[1].public_key().render())


def test_a_narinfo_written_again_keeps_the_signatures_of_the_same_contents():
    """merge_sigs: the well-formed signatures of the narinfo replaced are kept when it describes
    the same contents, not when the contents differ (another build of the path), nor from
    garbage; the new text is kept as it is but for its sorted Sig lines."""
    import attrs

    from purestore.formats.narinfo import NarInfo, merge_sigs
    from purestore.formats.signing import SecretKey
    sd = "/nix/store"
    name = next(n for n in files(NIX_CACHE) if n.endswith(".narinfo"))
    old = NarInfo.parse((NIX_CACHE / name).read_bytes(), sd)
    k = SecretKey.generate("a-new-1")
    new = attrs.evolve(old, sigs=(k.sign(old.fingerprint(sd)).render(),), url="nar/other.nar.xz")
    old_b, new_b = old.render(sd).encode(), new.render(sd).encode()
    merged = merge_sigs(new_b, old_b)
    assert merged == attrs.evolve(new, sigs=(*old.sigs, *new.sigs)).render(sd).encode()  # as Nix writes it
    assert merge_sigs(new_b, None) is new_b and merge_sigs(new_b, b"garbage") is new_b
    assert merge_sigs(old_b, old_b) is old_b  # nothing to add
    other_b = attrs.evolve(new, nar_size=new.nar_size + 1).render(sd).encode()
    assert merge_sigs(other_b, old_b) is other_b
    # a compression pure does not read, fields it does not know: the text is kept
    odd = new_b.replace(b"Compression: xz", b"Compression: lz4") + b"Future: 1\n"
    assert merge_sigs(odd, old_b) == merged.replace(b"Compression: xz", b"Compression: lz4") + b"Future: 1\n"
    # a garbage signature of the old narinfo is not carried on
    garbage = old_b.replace(b"Sig: ", b"Sig: junk-1:!!\nSig: ", 1)
    assert merge_sigs(new_b, garbage) == merged
