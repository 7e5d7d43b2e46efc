"""`pure provenance` / `pure provenance verify` on a real build: round trip and every refusal."""

from __future__ import annotations

import base64
import json
import shutil

import pytest

from conftest import BUSYBOX, run_pure, sandbox_build_reason
from purestore.formats.hash import Hash
from purestore.formats.provenance import Envelope, sign_statement
from purestore.formats.signing import SecretKey

REASON = sandbox_build_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

EXPR = '''
import os
from purestore.expr import derivation, source, fetchurl

bb = source("bb", name="busybox")
B = f"{bb}/bin/busybox"
src = fetchurl(url="file://" + os.path.join(os.path.dirname(__file__), "data.txt"), sha256="@SHA@")
dep = derivation(name="dep-1.0", system="x86_64-linux", builder=B,
                 args=["sh", "-c", f"echo dep > $out"])
app = derivation(name="app-1.0", system="x86_64-linux", builder=B,
                 args=["sh", "-c", f"{B} cat {src} {dep} > $out"])
other = derivation(name="other-1.0", system="x86_64-linux", builder=B, args=["sh", "-c", "echo other > $out"])
default = app
'''
DATA = b"pinned input\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prov")
    root = tmp / "root"
    root.mkdir()
    proj = tmp / "proj"
    (proj / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, proj / "bb" / "bin" / "busybox")
    (proj / "data.txt").write_bytes(DATA)
    (proj / "expr.py").write_text(EXPR.replace("@SHA@", Hash.of_bytes(DATA).base16))
    app = run_pure("build", "expr.py", cwd=proj, root=root).stdout.split()[-1]
    other = run_pure("build", "expr.py", "-A", "other", "--no-link", cwd=proj, root=root).stdout.split()[-1]
    key = SecretKey.generate("builder-1")
    (tmp / "sk").write_text(key.render())
    (tmp / "pk").write_text(key.public_key().render())
    return dict(root=root, proj=proj, app=app, other=other, key=key, tmp=tmp)


def pure(b, *args, **kw):
    kw.setdefault("root", b["root"])
    kw.setdefault("cwd", b["proj"])
    return run_pure(*args, **kw)


def statement_of(path):
    env = json.loads(open(path).read())
    return json.loads(base64.b64decode(env["payload"]))


@pytest.fixture(scope="module")
def signed(built):
    out = built["tmp"] / "app.provenance"
    p = pure(built, "provenance", built["app"], "--key-file", built["tmp"] / "sk", "-o", out)
    assert "signed provenance" in p.stderr
    return out


def test_round_trip_sign_then_verify(built, signed):
    pk = built["key"].public_key().render()
    p = pure(built, "provenance", "verify", signed, "--trusted-key", pk, built["app"])
    assert p.stdout.startswith(f"ok: {signed} is signed by 'builder-1'")
    # without PATH every subject is checked against the store; a key file works as well as text
    pure(built, "provenance", "verify", signed, "--trusted-key", built["tmp"] / "pk")


def test_statement_is_slsa_v1_with_the_derivation_inputs_and_times(built, signed):
    st = statement_of(signed)
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://slsa.dev/provenance/v1"
    (subject,) = st["subject"]
    assert subject["name"] == built["app"]
    nar = pure(built, "hash", "path", "--base16", str(built["root"]) + built["app"]).stdout.strip()
    assert subject["digest"] == {"sha256": nar}
    bd = st["predicate"]["buildDefinition"]
    assert bd["buildType"] == "urn:purestore:build-type:derivation:v1"
    drv = bd["externalParameters"]["derivation"]
    assert drv.endswith("-app-1.0.drv") and bd["externalParameters"]["output"] == "out"
    assert bd["externalParameters"]["derivationJson"]["outputs"]["out"]["path"] == built["app"]
    deps = {d["name"]: d for d in bd["resolvedDependencies"]}
    assert drv in deps and all("sha256" in d.get("digest", {}) for d in deps.values())
    fetched = [d for d in deps.values() if d.get("uri", "").startswith("file://")]
    assert len(fetched) == 1 and fetched[0]["annotations"]["fixedOutputHash"] == \
        "sha256:" + Hash.of_bytes(DATA).base16
    rd = st["predicate"]["runDetails"]
    assert rd["builder"]["id"] == "urn:purestore:builder:builder-1"
    assert rd["builder"]["version"]["purestore"]
    assert rd["metadata"]["startedOn"] <= rd["metadata"]["finishedOn"]
    assert rd["metadata"]["startedOn"].endswith("Z")


def test_modified_statement_fails_with_a_clear_error(built, signed):
    env = json.loads(signed.read_text())
    st = json.loads(base64.b64decode(env["payload"]))
    st["predicate"]["runDetails"]["builder"]["id"] = "urn:purestore:builder:someone-else"
    env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    bad = built["tmp"] / "modified.provenance"
    bad.write_text(json.dumps(env))
    p = pure(built, "provenance", "verify", bad, "--trusted-key", built["key"].public_key().render(),
             built["app"], check=False)
    assert p.returncode == 1
    assert p.stderr.startswith("error: ") and "does not verify" in p.stderr and "Traceback" not in p.stderr


def test_wrong_key_fails(built, signed):
    other = SecretKey.generate("builder-1").public_key().render()  # same name, other key
    p = pure(built, "provenance", "verify", signed, "--trusted-key", other, check=False)
    assert p.returncode == 1 and "does not verify" in p.stderr
    stranger = SecretKey.generate("stranger").public_key().render()
    p = pure(built, "provenance", "verify", signed, "--trusted-key", stranger, check=False)
    assert p.returncode == 1 and "untrusted key 'builder-1'" in p.stderr


def test_bad_key_files_are_errors_that_name_them(built, signed, tmp_path):
    """Signing and verifying read key files as the cache commands do: a binary, missing or
    malformed file is an error naming it (no traceback, no secret quoted); a missing file is
    not taken for a malformed key."""
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00key")
    (tmp_path / "pub-as-secret").write_text(built["key"].public_key().render())
    for f, says in [("binary", "is not text"), ("missing", "No such file or directory"),
                    ("pub-as-secret", "pub-as-secret")]:
        p = pure(built, "provenance", built["app"], "--key-file", tmp_path / f, "-o", tmp_path / "out",
                 "--allow-unrecorded", check=False)
        assert p.returncode != 0 and f"{tmp_path / f}" in p.stderr and says in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()
    for f, says in [("binary", "is not text"), ("missing", "cannot read trusted key file"),
                    ("pub-as-secret", None), (".", "Is a directory")]:
        p = pure(built, "provenance", "verify", signed, "--trusted-key", tmp_path / f, check=False)
        if says is None:  # a public key file is what --trusted-key wants
            assert p.returncode == 0, p.stderr
            continue
        assert p.returncode != 0 and says in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_subject_that_does_not_match_the_store_fails(built, signed):
    pk = built["key"].public_key().render()
    # a valid statement about the app, checked against another path
    p = pure(built, "provenance", "verify", signed, "--trusted-key", pk, built["other"], check=False)
    assert p.returncode == 1 and "is not a subject" in p.stderr
    # a correctly signed statement whose digest is not the store's NAR hash of the path
    st = statement_of(signed)
    st["subject"][0]["digest"]["sha256"] = Hash.of_bytes(b"other content").base16
    forged = built["tmp"] / "forged.provenance"
    forged.write_bytes(sign_statement(st, built["key"]).render())
    for extra in ([built["app"]], []):
        p = pure(built, "provenance", "verify", forged, "--trusted-key", pk, *extra, check=False)
        assert p.returncode == 1 and "not about this content" in p.stderr, p.stderr


def test_a_subject_without_a_usable_digest_fails_and_ok_names_only_what_was_checked(built, signed):
    """Without PATH, subjects whose digest has no well-formed sha256 were left out unchecked: a
    statement whose only subject had {} or {"sha512": ...} "matched the store for" nothing, and
    exited 0.  With PATH, such a subject was "not a subject".  And with PATH, the "ok" line
    named every subject, also those not checked (and not even in the store)."""
    pk = built["key"].public_key().render()
    for digest in ({}, {"sha512": "ab" * 64}, {"sha256": "00"}, {"sha256": "zz" * 32}, {"sha256": 5}):
        st = statement_of(signed)
        st["subject"][0]["digest"] = digest
        bad = built["tmp"] / "no-digest.provenance"
        bad.write_bytes(sign_statement(st, built["key"]).render())
        for extra in ([built["app"]], []):
            p = pure(built, "provenance", "verify", bad, "--trusted-key", pk, *extra, check=False)
            assert p.returncode == 1 and p.stdout == "", (digest, extra, p.stdout)
            assert p.stderr.startswith(f"error: {bad}: subject {built['app']!r} has no sha256 digest"), p.stderr
    # a second subject that is not in this store: verifying PATH checks PATH, and says only that
    st = statement_of(signed)
    ghost = "/pure/store/00000000000000000000000000000000-ghost"
    st["subject"].append({"name": ghost, "digest": {"sha256": "0" * 64}})
    two = built["tmp"] / "two.provenance"
    two.write_bytes(sign_statement(st, built["key"]).render())
    p = pure(built, "provenance", "verify", two, "--trusted-key", pk, built["app"])
    assert p.stdout == f"ok: {two} is signed by 'builder-1' and matches the store for {built['app']}\n"
    p = pure(built, "provenance", "verify", two, "--trusted-key", pk, check=False)
    assert p.returncode == 1 and f"subject {ghost!r} is not valid in this store" in p.stderr


def test_provenance_is_kept_in_the_store_state(built, signed):
    from purestore.formats.store_path import StorePath
    sp = StorePath.parse(built["app"], "/pure/store")
    kept = built["root"] / "pure" / "var" / "pure" / "provenance" / f"{sp.hash_part}.provenance"
    assert Envelope.parse(kept.read_bytes()).payload == Envelope.parse(signed.read_bytes()).payload


def test_usage_errors(built):
    p = pure(built, "provenance", built["app"], check=False)
    assert p.returncode == 2 and "--key-file" in p.stderr
    p = pure(built, "provenance", "verify", "nothing.json", check=False)
    assert p.returncode == 2 and "trusted key" in p.stderr
    p = pure(built, "provenance", "/pure/store/00000000000000000000000000000000-x", "--key-file",
             built["tmp"] / "sk", check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: ")
    # a .drv is not a build output: it was said to be "added, not built"
    drv = json.loads(pure(built, "store", "path-info", "--json", built["app"]).stdout)[0]["deriver"]
    p = pure(built, "provenance", drv, "--key-file", built["tmp"] / "sk", check=False)
    assert p.returncode == 1 and p.stderr.startswith(
        f"error: cannot make provenance of '{drv}': it is a derivation") and "pass one of its outputs" in p.stderr


REGISTRY_EXPR = '''
from purestore.expr import derivation, source

bb = source("bb", name="busybox")
B = f"{bb}/bin/busybox"
src = derivation(name="data.tar.gz", system="x86_64-linux", builder="builtin:fetch-apt", kind="source",
                 package="data", version="1.0-1", file="data_1.0.orig.tar.gz", sha256="@SHA@",
                 outputHash="@SHA@", outputHashAlgo="sha256", outputHashMode="flat")
app = derivation(name="app-1.0", system="x86_64-linux", builder=B, args=["sh", "-c", f"{B} cat {src} > $out"])
default = app
'''


def test_an_input_fetched_by_a_registry_client_has_its_purl_as_uri(tmp_path):
    """A builtin:fetch-apt / fetch-pip input has no URL: the statement names it by its package
    URL, as the SBOM does, instead of leaving it without any uri."""
    root, proj = tmp_path / "root", tmp_path / "proj"
    (proj / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, proj / "bb" / "bin" / "busybox")
    (proj / "data.tar.gz").write_bytes(DATA)
    (proj / "expr.py").write_text(REGISTRY_EXPR.replace("@SHA@", Hash.of_bytes(DATA).base16))
    # the fixed-output path is already valid (the same path as a flat add): nothing is fetched
    run_pure("store", "add", "--flat", proj / "data.tar.gz", root=root)
    app = run_pure("build", "expr.py", "--no-link", cwd=proj, root=root).stdout.split()[-1]
    key = SecretKey.generate("builder-1")
    (tmp_path / "sk").write_text(key.render())
    out = tmp_path / "app.provenance"
    run_pure("provenance", app, "--key-file", tmp_path / "sk", "-o", out, root=root)
    deps = statement_of(out)["predicate"]["buildDefinition"]["resolvedDependencies"]
    (fetched,) = [d for d in deps if d["name"].endswith("-data.tar.gz")]
    assert fetched["uri"] == "pkg:deb/debian/data@1.0-1?arch=source"
    assert fetched["annotations"]["fixedOutputHash"] == "sha256:" + Hash.of_bytes(DATA).base16
    sbom = json.loads(run_pure("sbom", app, root=root).stdout)
    (comp,) = [c for c in sbom["components"] if c["bom-ref"] == fetched["name"]]
    assert comp["purl"] == fetched["uri"]


NOISY_EXPR = '''
from purestore.expr import derivation, source

bb = source("bb", name="busybox")
B = f"{bb}/bin/busybox"
default = derivation(name="noisy-1.0", system="x86_64-linux", builder=B,
                     args=["sh", "-c", f"{B} cat /proc/sys/kernel/random/uuid > $out"])
'''


@pytest.mark.parametrize("how", ["store delete", "gc"])
def test_a_deleted_path_loses_its_kept_provenance(tmp_path, how):
    """The statement kept in the state dir stayed when its path was deleted (`pure store
    delete`, `pure gc`): a rebuild of the path with other contents then went up with `pure copy
    --to` next to the old statement, which a --require-provenance client refuses ("not about
    this content").  The kept statement now goes with the path."""
    root, proj = tmp_path / "root", tmp_path / "proj"
    (proj / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, proj / "bb" / "bin" / "busybox")
    (proj / "expr.py").write_text(NOISY_EXPR)
    key = SecretKey.generate("builder-1")
    (tmp_path / "sk").write_text(key.render())
    out = run_pure("build", "expr.py", "--no-link", cwd=proj, root=root).stdout.split()[-1]
    hash_part = out.rsplit("/", 1)[-1][:32]
    kept = root / "pure" / "var" / "pure" / "provenance" / f"{hash_part}.provenance"
    run_pure("provenance", out, "--key-file", tmp_path / "sk", "-o", tmp_path / "old", root=root)
    assert kept.exists()
    if how == "gc":
        assert out in run_pure("gc", root=root).stdout.split()
    else:
        run_pure("store", "delete", out, root=root)
    assert not kept.exists()
    # built again, with other contents: nothing says it has provenance, and nothing is uploaded
    assert run_pure("build", "expr.py", "--no-link", cwd=proj, root=root).stdout.split()[-1] == out
    run_pure("copy", "--to", f"file://{tmp_path / 'cache'}", out, root=root)
    assert not (tmp_path / "cache" / f"{hash_part}.provenance").exists()
    # the old statement is about the old contents
    p = run_pure("provenance", "verify", tmp_path / "old", "--trusted-key", key.public_key().render(), out,
                 root=root, check=False)
    assert p.returncode == 1 and "not about this content" in p.stderr
    run_pure("store", "verify", "--check-contents", root=root)


def test_a_derivation_that_cannot_be_read_is_an_error_naming_it(tmp_path):
    """A .drv of the store that cannot be read (here a directory in its place; or no
    permission) ended `pure provenance` in an IsADirectoryError traceback: only a missing .drv
    was an error.  The output's own derivation and an input derivation are both named."""
    root, proj = tmp_path / "root", tmp_path / "proj"
    (proj / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, proj / "bb" / "bin" / "busybox")
    (proj / "data.txt").write_bytes(DATA)
    (proj / "expr.py").write_text(EXPR.replace("@SHA@", Hash.of_bytes(DATA).base16))
    app = run_pure("build", "expr.py", "--no-link", cwd=proj, root=root).stdout.split()[-1]
    (tmp_path / "sk").write_text(SecretKey.generate("builder-1").render())
    drv = json.loads(run_pure("store", "path-info", "--json", app, root=root).stdout)[0]["deriver"]
    info = json.loads(run_pure("show-derivation", drv, root=root).stdout)
    (dep_drv,) = [d for d in info[drv]["inputDrvs"] if d.endswith("-dep-1.0.drv")]
    store = root / "pure" / "store"
    store.chmod(0o755)
    for bad, says in ((dep_drv, "cannot read input derivation"), (drv, "cannot read its derivation")):
        real = store / bad.rsplit("/", 1)[-1]
        real.unlink()
        real.mkdir()
        p = run_pure("provenance", app, "--key-file", tmp_path / "sk", root=root, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr == f"error: cannot make provenance of {app!r}: {says} {bad!r}: Is a directory\n"
