"""Provenance through binary caches: `pure copy --to` uploads it next to the narinfo;
`pure copy --from --require-provenance` refuses paths whose statement is missing or invalid."""

from __future__ import annotations

import base64
import json
import shutil

import pytest

from conftest import BUSYBOX, run_pure, sandbox_build_reason
from purestore.formats.provenance import sign_statement
from purestore.formats.signing import SecretKey
from purestore.formats.store_path import StorePath

REASON = sandbox_build_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

EXPR = '''
from purestore.expr import derivation, source
bb = source("bb", name="busybox")
B = f"{bb}/bin/busybox"
dep = derivation(name="dep-1.0", system="x86_64-linux", builder=B, args=["sh", "-c", "echo dep > $out"])
app = derivation(name="app-1.0", system="x86_64-linux", builder=B,
                 args=["sh", "-c", f"{B} mkdir $out && echo {dep} > $out/uses"])
bare = derivation(name="bare-1.0", system="x86_64-linux", builder=B, args=["sh", "-c", "echo bare > $out"])
'''


def hp(path):
    return StorePath.parse(path, "/pure/store").hash_part


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Store A builds app (-> dep) and bare, signs provenance of app and dep only, pushes all."""
    tmp = tmp_path_factory.mktemp("pcache")
    root = tmp / "a"
    root.mkdir()
    proj = tmp / "proj"
    (proj / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, proj / "bb" / "bin" / "busybox")
    (proj / "expr.py").write_text(EXPR)
    key = SecretKey.generate("cache-1")
    (tmp / "sk").write_text(key.render())
    a = lambda *args, **kw: run_pure(*args, root=root, cwd=proj, **kw)
    app = a("build", "expr.py", "-A", "app", "--no-link").stdout.split()[-1]
    bare = a("build", "expr.py", "-A", "bare", "--no-link").stdout.split()[-1]
    dep = [r for r in a("store", "references", app).stdout.split() if r.endswith("-dep-1.0")][0]
    for p in (app, dep):
        a("provenance", p, "--key-file", tmp / "sk", "-o", tmp / f"{hp(p)}.provenance")
    url = f"file://{tmp / 'cache'}"
    a("copy", "--to", url, "--secret-key-file", tmp / "sk", app, bare)
    return dict(tmp=tmp, url=url, key=key, app=app, dep=dep, bare=bare, dir=tmp / "cache")


def fresh(cache, name):
    root = cache["tmp"] / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    return lambda *args, **kw: run_pure(*args, root=root, **kw)


def copy_from(b, cache, path, *extra):
    return b("copy", "--from", cache["url"], "--trusted-public-keys", cache["key"].public_key().render(),
             *extra, path, check=False)


def test_copy_uploads_provenance_next_to_the_narinfo(cache):
    d = cache["dir"]
    for p in (cache["app"], cache["dep"]):
        assert (d / f"{hp(p)}.narinfo").exists()
        assert (d / f"{hp(p)}.provenance").read_bytes() == (cache["tmp"] / f"{hp(p)}.provenance").read_bytes()
    assert not (d / f"{hp(cache['bare'])}.provenance").exists()


def test_require_provenance_accepts_a_valid_statement_and_keeps_it(cache):
    b = fresh(cache, "b")
    p = copy_from(b, cache, cache["app"], "--require-provenance")
    assert p.returncode == 0, p.stderr
    # the statement came along and verifies in the new store
    kept = cache["tmp"] / "b" / "pure" / "var" / "pure" / "provenance" / f"{hp(cache['app'])}.provenance"
    b("provenance", "verify", kept, "--trusted-key", cache["key"].public_key().render(), cache["app"])


def test_require_provenance_refuses_a_path_without_a_statement(cache):
    b = fresh(cache, "c")
    p = copy_from(b, cache, cache["bare"], "--require-provenance")
    assert p.returncode == 1 and "no provenance statement" in p.stderr, p.stderr
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    assert copy_from(b, cache, cache["bare"]).returncode == 0  # without the flag it is fine


def test_an_unrecorded_statement_does_not_replace_the_builders_kept_one(cache, tmp_path):
    """A store that fetched a path with its builder's statement, then signed one of its own with
    --allow-unrecorded, replaced the builder's (which `pure copy --to` then no longer published,
    and which consumers trusting the builder need).  Now the kept statement stays; the new one
    is printed, and kept only where the store had none."""
    b = fresh(cache, "unrec")
    assert copy_from(b, cache, cache["app"], "--require-provenance").returncode == 0
    assert copy_from(b, cache, cache["bare"]).returncode == 0
    b("instantiate", "expr.py", "-A", "app", cwd=cache["tmp"] / "proj")  # the .drvs a statement names
    b("instantiate", "expr.py", "-A", "bare", cwd=cache["tmp"] / "proj")
    other = SecretKey.generate("mirror-2")
    (tmp_path / "sk").write_text(other.render())
    kept = cache["tmp"] / "unrec" / "pure" / "var" / "pure" / "provenance"
    builders = (kept / f"{hp(cache['app'])}.provenance").read_bytes()
    p = b("provenance", cache["app"], "--key-file", tmp_path / "sk", "--allow-unrecorded", "-o", tmp_path / "mine")
    assert "not kept in the store" in p.stderr, p.stderr
    assert (kept / f"{hp(cache['app'])}.provenance").read_bytes() == builders
    assert json.loads((tmp_path / "mine").read_text())["signatures"][0]["keyid"] == "mirror-2"
    b("provenance", "verify", kept / f"{hp(cache['app'])}.provenance",
      "--trusted-key", cache["key"].public_key().render(), cache["app"])
    p = b("provenance", cache["bare"], "--key-file", tmp_path / "sk", "--allow-unrecorded", "-o", tmp_path / "bare")
    assert "kept in" in p.stderr and (kept / f"{hp(cache['bare'])}.provenance").read_bytes() == \
        (tmp_path / "bare").read_bytes()


def test_a_statement_signed_after_the_push_goes_up_with_the_next_push(cache, tmp_path):
    """`pure copy --to` skipped a path the cache had, its provenance with it: a statement
    signed after the first push never reached the cache.  Now it is uploaded where the cache
    has none; one the cache has is not replaced."""
    b = fresh(cache, "late")
    assert copy_from(b, cache, cache["bare"]).returncode == 0
    b("instantiate", "expr.py", "-A", "bare", cwd=cache["tmp"] / "proj")
    url2, dir2 = f"file://{tmp_path / 'c2'}", tmp_path / "c2"
    b("copy", "--to", url2, cache["bare"])
    name = f"{hp(cache['bare'])}.provenance"
    assert not (dir2 / name).exists()
    (tmp_path / "sk").write_text(cache["key"].render())
    b("provenance", cache["bare"], "--key-file", tmp_path / "sk", "--allow-unrecorded", "-o", tmp_path / "st")
    p = b("copy", "--to", url2, cache["bare"])
    assert "0 paths" in p.stderr and "1 already there" in p.stderr, p.stderr
    assert (dir2 / name).read_bytes() == (tmp_path / "st").read_bytes()
    kept = cache["tmp"] / "late" / "pure" / "var" / "pure" / "provenance" / name
    kept.write_bytes(b"another statement\n")
    b("copy", "--to", url2, cache["bare"])
    assert (dir2 / name).read_bytes() == (tmp_path / "st").read_bytes()


def test_a_mirror_carries_provenance_and_can_require_it(cache):
    """`pure copy --from A --to B`: the statements come along, byte for byte;
    --require-provenance refuses a path without one before anything is written."""
    pub = cache["key"].public_key().render()
    m = cache["tmp"] / "mirror"
    r = run_pure("copy", "--from", cache["url"], "--to", f"file://{m}", "--trusted-public-keys", pub,
                 "--require-provenance", cache["app"])
    for p in (cache["app"], cache["dep"]):
        assert (m / f"{hp(p)}.provenance").read_bytes() == (cache["dir"] / f"{hp(p)}.provenance").read_bytes()
    b = fresh(cache, "from-mirror")
    p = b("copy", "--from", f"file://{m}", "--trusted-public-keys", pub, "--require-provenance", cache["app"],
          check=False)
    assert p.returncode == 0, p.stderr
    m2 = cache["tmp"] / "mirror2"
    r = run_pure("copy", "--from", cache["url"], "--to", f"file://{m2}", "--trusted-public-keys", pub,
                 "--require-provenance", cache["bare"], check=False)
    assert r.returncode == 1 and "no provenance statement" in r.stderr and "nothing was written" in r.stderr
    assert not m2.exists()


def test_a_mirror_copies_the_statements_of_paths_the_destination_has_already(cache, tmp_path):
    """`pure copy --from A --to B` skipped a path B had, its provenance with it: a statement B
    lacked never followed.  Now it does (as with a push); one B has is not replaced."""
    pub = cache["key"].public_key().render()
    m, url = tmp_path / "m", f"file://{tmp_path / 'm'}"
    copy = lambda *extra: run_pure("copy", "--from", cache["url"], "--to", url, "--trusted-public-keys", pub,
                                   *extra, cache["app"])
    copy()
    app, dep = (f"{hp(cache[k])}.provenance" for k in ("app", "dep"))
    (m / app).unlink()
    (m / dep).write_bytes(b"the destination's own\n")
    p = copy()
    assert "0 paths" in p.stderr and "2 already there" in p.stderr, p.stderr
    assert (m / app).read_bytes() == (cache["dir"] / app).read_bytes()
    assert (m / dep).read_bytes() == b"the destination's own\n"
    (m / app).unlink()
    copy("--require-provenance")  # (the statements read for the check are the ones copied)
    assert (m / app).read_bytes() == (cache["dir"] / app).read_bytes()


@pytest.mark.parametrize("tamper", ["modified", "untrusted-key", "other-subject"])
def test_require_provenance_refuses_an_invalid_statement(cache, tamper):
    d, app = cache["dir"], cache["app"]
    f = d / f"{hp(app)}.provenance"
    good = f.read_bytes()
    env = json.loads(good)
    st = json.loads(base64.b64decode(env["payload"]))
    if tamper == "modified":
        st["predicate"]["buildDefinition"]["externalParameters"]["output"] = "dev"
        env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
        bad = json.dumps(env).encode()
    elif tamper == "untrusted-key":
        bad = sign_statement(st, SecretKey.generate("mallory")).render()
    else:  # correctly signed, but about the dependency's content
        bad = (d / f"{hp(cache['dep'])}.provenance").read_bytes()
    try:
        f.write_bytes(bad)
        b = fresh(cache, f"t-{tamper}")
        p = copy_from(b, cache, app, "--require-provenance")
        assert p.returncode == 1 and "provenance is not valid" in p.stderr, p.stderr
        assert copy_from(b, cache, app).returncode == 0  # the NAR itself is fine
    finally:
        f.write_bytes(good)


def test_build_with_require_provenance_substitutes_only_attested_paths(cache):
    conf = cache["tmp"] / "subst.conf"
    conf.write_text(f"substituters = {cache['url']}\n"
                    f"trusted-public-keys = {cache['key'].public_key().render()}\n")
    env = {"PURE_CONFIG": str(conf)}
    proj = cache["tmp"] / "proj"
    reports = {}
    for flag in ("--require-provenance", None):
        b = fresh(cache, f"builder{flag or ''}")
        for attr in ("app", "bare"):
            b("build", *([flag] if flag else []), "--no-link", "expr.py", "-A", attr, cwd=proj, env=env)
        reports[flag] = json.loads(b("report", "--json", env=env).stdout)
    # with the flag: app and dep come from the cache (attested); bare has no statement: built here
    r = reports["--require-provenance"]
    assert r["builds"]["total"] == 1 and r["cache"]["substituted"] >= 2, r
    # without it, everything is substituted
    assert reports[None]["builds"]["total"] == 0
