"""The expression API (derivation values, string context, sources, texts) and the import scheme."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from purestore.errors import DerivationArgumentError, EvalError
from purestore.expr import derivation, evaluating, fetchurl, source, to_file
from purestore.expr.loader import evaluate, find_pkgs_dir, instantiate, read_derivation
from purestore.expr.values import parse_version


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def mk(**kw):
    kw.setdefault("system", "x86_64-linux")
    kw.setdefault("builder", "/bin/sh")
    return derivation(**kw)


def test_drv_value_api():
    with evaluating("/nix/store"):
        d = mk(name="hello-2.10", outputs=["out", "dev"])
        v = mk(name="tool", version="1.0")
    assert str(d) == d.outputs["out"].path == d.out_path
    assert str(d.outputs["dev"]).endswith("-hello-2.10-dev") and d["dev"] is d.outputs["dev"]
    assert d.drv_path.endswith("-hello-2.10.drv") and d.name == "hello-2.10"
    assert (d.version, v.version) == ("2.10", "1.0")
    assert d.attrs["outputs"] == "out dev" and d.attrs["dev"] == str(d.outputs["dev"])
    assert d.drv.outputs["dev"].path == str(d.outputs["dev"])
    assert d + "/bin" == f"{d}/bin" and "-I" + d.outputs["dev"] == f"-I{d.outputs['dev']}"
    assert d.outputs["dev"].derivation is d
    with pytest.raises(KeyError, match="has no output 'lib'; it has out, dev"):
        d["lib"]


@pytest.mark.parametrize("name, version", [
    ("hello-2.10", "2.10"), ("gcc-wrapper-12.2.0", "12.2.0"), ("busybox", ""), ("foo-bar-1a", "1a"), ("a-b-c", ""),
])
def test_parse_version_like_nix(name, version):
    assert parse_version(name) == version


def test_string_context_records_the_outputs_used():
    with evaluating("/nix/store"):
        lib = mk(name="lib", outputs=["out", "dev"])
        other = mk(name="other")
        user = mk(name="user", args=["-c", f"cc -I{lib.outputs['dev']}/include"], x=[other, 1])
    assert user.drv.input_drvs == {lib.drv_path: frozenset({"dev"}), other.drv_path: frozenset({"out"})}
    assert set(user.input_drvs) == {lib.drv_path, other.drv_path}


def test_an_unknown_store_path_in_a_string_is_not_a_dependency():
    with evaluating("/nix/store"):
        d = mk(name="d", x="/nix/store/" + "a" * 32 + "-foreign")
    assert not d.drv.input_drvs and not d.drv.input_srcs


def test_same_attributes_give_the_same_value_and_a_new_evaluation_the_same_paths():
    with evaluating("/nix/store"):
        a = mk(name="x", v=1)
        b = mk(name="x", v=1)
    with evaluating("/nix/store"):
        c = mk(name="x", v=1)
    assert a is b and a == c and a.drv_path == c.drv_path


def test_store_dir_changes_every_path():
    with evaluating("/nix/store"):
        a = mk(name="x")
    with evaluating("/pure/store"):
        b = mk(name="x")
    assert a.drv_path.startswith("/nix/store/") and b.drv_path.startswith("/pure/store/")
    assert a.drv_path.split("/")[-1] != b.drv_path.split("/")[-1]


def test_to_file_refs_and_refusal_of_outputs(tmp_path):
    write(tmp_path / "f.txt", "f\n")
    with evaluating("/nix/store"):
        s = source(str(tmp_path / "f.txt"))
        t = to_file("t.sh", f"cat {s}\n")
        assert t.references == (s,)
        d = mk(name="d")
        with pytest.raises(EvalError, match=r"to_file\('bad'\): the text refers to .*can only refer to sources"):
            to_file("bad", f"{d}/bin")


@pytest.mark.parametrize("kw, said", [
    (dict(hash="sha256-xx"), "fetchurl('https://e.org/x'): hash='sha256-xx' is not a valid hash: invalid base64"),
    (dict(sha256="abc"), "fetchurl('https://e.org/x'): sha256='abc' is not a valid hash: hash 'abc' has the "
                         "wrong length"),
    (dict(md5="z" * 32), "fetchurl('https://e.org/x'): md5='zzzz"),
    ({}, "no hash given; expected hash= (SRI or 'sha256:...') or sha256=/sha1=/sha512=/md5="),
])
def test_fetchurl_errors_name_its_own_arguments(kw, said):
    """A bad hash was reported as the derivation's "attribute 'outputHash' (outputHashAlgo '')",
    which the expression never wrote; and md5= was missing from the list of hash arguments."""
    with evaluating("/pure/store"):
        with pytest.raises(DerivationArgumentError) as ei:
            fetchurl(url="https://e.org/x", **kw)
    assert said in str(ei.value) and "outputHash" not in str(ei.value)


def test_source_relative_to_the_calling_file_and_name_errors(tmp_path):
    write(tmp_path / "dir" / "a.txt", "a\n")
    f = write(tmp_path / "expr.py", """
        from purestore.expr import source
        default = [source("dir"), source("dir/a.txt"), source("dir", name="renamed")]
    """)
    r = evaluate(str(f), None, store_dir="/nix/store", env={}, allow_values=True)
    names = [s.path.split("-", 1)[1] for s in r.value]
    assert names == ["dir", "a.txt", "renamed"]
    with evaluating("/nix/store"):
        with pytest.raises(DerivationArgumentError, match=r"the name 'a b' is not a valid store path name") as ei:
            source(str(tmp_path / "dir"), name="a b")
        assert "pass name=" not in str(ei.value)  # (it was passed: that advice was no help)
        write(tmp_path / "a b" / "x", "x\n")
        with pytest.raises(DerivationArgumentError, match=r"the name 'a b' is not a valid store path name "
                           r".*it is the path's base name: pass name=\.\.\. to choose a valid one"):
            source(str(tmp_path / "a b"))
        with pytest.raises(EvalError, match="does not exist"):
            source(str(tmp_path / "missing"))


def test_package_set_siblings_include_roots_and_pure_path(tmp_path):
    pkgs = tmp_path / "pkgs"
    write(pkgs / "stdenv" / "__init__.py", """
        from purestore.expr import derivation
        def mk(name, **kw):
            return derivation(name=name, system="x86_64-linux", builder="/bin/sh", **kw)
    """)
    write(pkgs / "hello.py", "from pkgs.stdenv import mk\nhello = mk('hello-2.10')\n")
    write(tmp_path / "inc" / "extra.py", "VALUE = 'from -I'\n")
    write(tmp_path / "pp" / "viapath.py", "VALUE = 'from PURE_PATH'\n")
    write(tmp_path / "e" / "sibling.py", "import pkgs.stdenv\nlib = pkgs.stdenv.mk('lib')\n")
    f = write(tmp_path / "e" / "expr.py", """
        import extra, viapath, sibling
        from pkgs import hello
        from pkgs.stdenv import mk
        default = mk("app", deps=[hello.hello, sibling.lib], a=extra.VALUE, b=viapath.VALUE)
    """)
    env = {"PURE_PKGS": str(pkgs), "PURE_PATH": str(tmp_path / "pp")}
    r = evaluate(str(f), None, store_dir="/nix/store", include_paths=[str(tmp_path / "inc")], env=env)
    app = r.selected[0]
    assert (app.attrs["a"], app.attrs["b"]) == ("from -I", "from PURE_PATH")
    assert [d.name for d in r.graph.values()] == ["hello-2.10", "lib", "app"]
    # modules are forgotten: nothing leaks into sys.modules, and a changed file is seen next time
    assert not any(m == "pkgs" or m.startswith("pkgs.") or m in ("sibling", "extra", "expr") for m in sys.modules)
    write(tmp_path / "inc" / "extra.py", "VALUE = 'changed'\n")
    r2 = evaluate(str(f), None, store_dir="/nix/store", include_paths=[str(tmp_path / "inc")], env=env)
    assert r2.selected[0].attrs["a"] == "changed"


def test_the_repository_package_set_is_found_by_default():
    d = find_pkgs_dir({})
    assert d is not None and d.endswith("expressions") and os.path.isdir(d)


def test_instantiate_writes_sources_texts_and_drvs_with_references(tmp_path, settings):
    from purestore.store.local import LocalStore
    write(tmp_path / "e" / "src" / "x.txt", "x\n")
    f = write(tmp_path / "e" / "expr.py", """
        from purestore.expr import derivation, source, to_file
        src = source("src")
        script = to_file("build.sh", f"cp -r {src} $out\\n")
        dep = derivation(name="dep", system="x86_64-linux", builder="/bin/sh", outputs=["out", "dev"])
        default = derivation(name="top", system="x86_64-linux", builder="/bin/sh", args=[script],
                             d=dep.outputs["dev"])
    """)
    r = evaluate(str(f), None, settings)
    assert not os.path.exists(settings.real_store_dir)  # evaluation wrote nothing
    with LocalStore.open(settings, durable=False) as store:
        [top] = instantiate(store, r)
        assert store.print_path(top) == r.selected[0].drv_path
        dep = r.graph[next(p for p in r.graph if p.endswith("-dep.drv"))]
        script = store.parse_path(str(r.selected[0].drv.args[0]))
        assert store.query_references(top) == {script, store.parse_path(dep.drv_path)}
        src = store.parse_path(r.selected[0].input_srcs[str(r.selected[0].drv.args[0])].references[0].path)
        assert store.query_references(script) == {src}
        with open(os.path.join(store.real_path(src), "x.txt")) as fh:
            assert fh.read() == "x\n"
        assert read_derivation(store, top) == r.selected[0].drv
        assert store.query_derivation_outputs(store.parse_path(dep.drv_path)) == {
            o: store.parse_path(p.path) for o, p in dep.outputs.items()}
        # again: nothing changes
        assert instantiate(store, r) == [top]


def test_instantiate_refuses_a_store_with_another_store_dir(settings):
    from purestore.store.local import LocalStore
    with evaluating("/nix/store"):
        pass
    from purestore.expr.loader import EvalResult
    r = EvalResult(file="x", attr=None, store_dir="/nix/store", value=None, selected=(), graph={})
    with LocalStore.open(settings, durable=False) as store:
        with pytest.raises(EvalError, match="store dir '/nix/store' but the store's is '/pure/store'"):
            instantiate(store, r)
