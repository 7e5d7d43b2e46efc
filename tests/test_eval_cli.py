"""The pure eval / instantiate / show-derivation commands as a user runs them."""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import DATA, HAVE_NIX, run_pure


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


EXPR = """
    from purestore.expr import derivation
    import helpers
    a = derivation(name="a-1.0", system="x86_64-linux", builder="/bin/sh", outputs=["out", "dev"])
    b = derivation(name="b", system="x86_64-linux", builder="/bin/sh", args=["-c", f"echo {a.outputs['dev']}"],
                   note=helpers.NOTE)
    default = [a, b]
    tools = {"b": b, "numbers": [1, 2]}
"""


def test_eval_text_and_json(tmp_path, pure):
    write(tmp_path / "inc" / "helpers.py", "NOTE = 'included'\n")
    f = write(tmp_path / "e" / "expr.py", EXPR)
    text = pure("eval", f, "-I", tmp_path / "inc").stdout.splitlines()
    assert len(text) == 2 and text[0].endswith("-a-1.0") and text[1].endswith("-b")
    j = json.loads(pure("eval", f, "-A", "tools", "--json", env={"PURE_PATH": str(tmp_path / "inc")}).stdout)
    assert j["numbers"] == [1, 2]
    assert j["b"]["type"] == "derivation" and j["b"]["name"] == "b" and j["b"]["drvPath"].endswith("-b.drv")
    dev = json.loads(pure("eval", f, "-A", "default.0.dev", "--json", "-I", tmp_path / "inc").stdout)
    assert dev["type"] == "output" and dev["output"] == "dev" and dev["path"].endswith("-a-1.0-dev")


def test_an_include_dir_that_does_not_exist_is_warned_of_once(tmp_path, pure):
    """`-I DIR` naming no directory was ignored without a word (Nix warns): each such root is
    named once on stderr, the evaluation goes on; existing roots give no warning."""
    write(tmp_path / "inc" / "helpers.py", "NOTE = 'included'\n")
    f = write(tmp_path / "e" / "expr.py", EXPR)
    (tmp_path / "afile").write_text("")
    nope = tmp_path / "nope"
    r = pure("eval", f, "-A", "tools.numbers", "-I", nope, "-I", tmp_path / "inc", "-I", nope,
             "-I", tmp_path / "afile", env={"PURE_PATH": f"{tmp_path / 'gone'}:{tmp_path / 'inc'}"})
    assert r.stdout == "1\n2\n"
    assert r.stderr.splitlines() == [
        f"warning: -I '{nope}' does not exist; ignoring it",
        f"warning: -I '{tmp_path / 'afile'}' is not a directory; ignoring it",
        f"warning: PURE_PATH entry '{tmp_path / 'gone'}' does not exist; ignoring it"], r.stderr
    assert pure("eval", f, "-I", tmp_path / "inc").stderr == ""


def test_a_quoted_name_in_an_attribute_path_selects_a_key_with_dots(tmp_path, pure):
    """`-A 'a."b.c"'` (as in Nix) selects the dict key 'b.c', which `-A a.b.c` could not; a quote
    not closed or an empty name is a usage error saying where, before the expression runs."""
    f = write(tmp_path / "expr.py", """
        pkgs = {"lib.v2": {"n": [10, 20]}, "": 5}
    """)
    assert pure("eval", f, "-A", 'pkgs."lib.v2".n.1').stdout == "20\n"
    assert pure("eval", f, "-A", 'pkgs.""').stdout == "5\n"
    r = pure("eval", f, "-A", "pkgs.lib.v2", check=False)
    assert r.returncode == 1 and 'pkgs has no \'lib\'; available: "lib.v2", ""' in r.stderr, r.stderr
    r = pure("eval", f, "-A", 'pkgs."lib.v2".x', check=False)
    assert "attribute 'pkgs.\"lib.v2\".x' not found: pkgs.\"lib.v2\" has no 'x'" in r.stderr, r.stderr
    for bad, why in (('pkgs."lib.v2', "has a quote not closed (opened at position 6)"),
                     ("pkgs..n", "has an empty name at position 6")):
        r = pure("eval", f, "-A", bad, check=False)
        assert r.returncode == 2 and r.stderr.startswith(f"error: attribute path {bad!r} {why}\n"), r.stderr


def test_what_an_expression_prints_goes_to_stderr_not_into_the_commands_stdout(tmp_path, pure):
    """A debugging print() (or sys.stdout.write) in an expression or a module it imports went to
    stdout, into the output paths a script reads and the --json of eval and instantiate; it goes
    to stderr, and pure's own stdout is as without it."""
    write(tmp_path / "inc" / "helpers.py", "NOTE = 'included'\nprint('debug from helpers')\n")
    f = write(tmp_path / "e" / "expr.py", "import sys\nprint('debug', 42)\nsys.stdout.write('raw\\n')\n"
              + textwrap.dedent(EXPR))
    text = pure("eval", f, "-I", tmp_path / "inc")
    assert len(text.stdout.splitlines()) == 2 and text.stdout.splitlines()[0].endswith("-a-1.0")
    assert "debug from helpers\n" in text.stderr and "debug 42\nraw\n" in text.stderr
    j = pure("eval", f, "-A", "tools", "--json", "-I", tmp_path / "inc")
    assert json.loads(j.stdout)["numbers"] == [1, 2] and "debug 42" in j.stderr
    drvs = pure("instantiate", f, "-I", tmp_path / "inc", "--json").stdout
    assert [d.endswith(".drv") for d in json.loads(drvs)] == [True, True]


def test_eval_json_is_json_also_for_nan_and_infinity(tmp_path, pure):
    """Non-finite floats were printed bare (NaN, Infinity), which no JSON parser accepts; they
    are strings, as other values JSON has no form for."""
    f = write(tmp_path / "e.py", "default = {'nan': float('nan'), 'inf': [float('inf'), -float('inf')], 'x': 1.5}\n")
    out = pure("eval", "--json", f).stdout
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}")) == {
        "nan": "nan", "inf": ["inf", "-inf"], "x": 1.5}


def test_instantiate_prints_one_drv_per_line_and_show_derivation_reads_them(tmp_path, pure):
    write(tmp_path / "inc" / "helpers.py", "NOTE = 'included'\n")
    f = write(tmp_path / "e" / "expr.py", EXPR)
    lines = pure("instantiate", f, "-I", tmp_path / "inc").stdout.splitlines()
    assert [l.rsplit("-", 1)[-1] for l in lines] == ["1.0.drv", "b.drv"]
    shown = json.loads(pure("show-derivation", lines[1]).stdout)
    assert shown[lines[1]]["inputDrvs"] == {lines[0]: ["dev"]}
    assert shown[lines[1]]["env"]["note"] == "included"
    from_file = json.loads(pure("show-derivation", f, "-A", "tools.b", "-I", tmp_path / "inc").stdout)
    assert from_file == shown
    # --json: the same paths as a list, as its help says (it said "{attr: drv path}")
    assert json.loads(pure("instantiate", f, "-I", tmp_path / "inc", "--json").stdout) == lines
    assert "as a JSON list" in pure("instantiate", "--help").stdout


def test_show_derivation_errors(tmp_path, pure):
    p = pure("show-derivation", "/pure/store/" + "a" * 32 + "-x.drv", check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    p = pure("show-derivation", "/pure/store/" + "a" * 32 + "-x.drv", "-A", "x", check=False)
    assert p.returncode == 2 and "-A selects from an expression file" in p.stderr


EXPERIMENTAL = DATA / "drv" / "experimental"


@pytest.mark.parametrize("name, feature", [("hdyqbrhfmn62yy8bji2jnh3k8x419znd-cafloat.drv", "ca-derivations"),
                                           ("063k7v39p1qr74jc37ms4y5rpkw9dsbc-imp.drv", "impure-derivations")])
def test_a_drv_of_nix_s_experimental_features_is_said_to_be_one_not_damaged(tmp_path, name, feature):
    """A .drv Nix 2.8 wrote for a floating content-addressed or an impure derivation (an output
    with a hash algorithm but no hash, or the hash 'impure') is refused naming the feature; it
    was called damaged, with a hint to repair it from its expression."""
    from purestore.formats.store_path import StorePath
    from test_cache_support import open_store
    with open_store(tmp_path / "root", "/nix/store") as store:
        sp = store.add_text(name[33:-4] + ".drv", (EXPERIMENTAL / name).read_bytes())
        assert sp == StorePath.from_base_name(name)
    for args in (["show-derivation"], ["build", "--no-link"]):
        p = run_pure(*args, f"/nix/store/{name}", root=tmp_path / "root", store_dir="/nix/store", check=False)
        assert p.returncode == 1, p.stderr
        assert f"(Nix's {feature}), which purestore does not support" in p.stderr
        assert "damaged" not in p.stderr and "Traceback" not in p.stderr


def test_a_deferred_output_is_shown_as_nix_shows_it(tmp_path):
    """An output whose path Nix deferred (a derivation with a floating content-addressed input)
    is ``{}`` in `nix show-derivation`; it was shown as ``{"path": ""}``."""
    from test_cache_support import open_store
    ca, uses = "hdyqbrhfmn62yy8bji2jnh3k8x419znd-cafloat.drv", "35i92dyg89glf7qdh04w6xja5m1nwn7x-usesca.drv"
    with open_store(tmp_path / "root", "/nix/store") as store:
        (ca_p,) = store.add_texts([("cafloat.drv", (EXPERIMENTAL / ca).read_bytes(), ())])
        store.add_texts([("usesca.drv", (EXPERIMENTAL / uses).read_bytes(), [ca_p])])
    p = run_pure("show-derivation", f"/nix/store/{uses}", root=tmp_path / "root", store_dir="/nix/store")
    assert p.stdout == (EXPERIMENTAL / "usesca.json").read_text()  # byte for byte


@pytest.mark.skipif(not HAVE_NIX, reason="Nix (nix-bin) is not installed")
def test_the_experimental_golden_drvs_are_what_nix_writes(tmp_path):
    import os
    import subprocess
    env = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command ca-derivations "
                                       "impure-derivations"}
    out = subprocess.run(["nix-instantiate", "--store", str(tmp_path / "nix"), EXPERIMENTAL / "experimental.nix"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert sorted(os.path.basename(d) for d in out) == sorted(f.name for f in EXPERIMENTAL.glob("*.drv"))
    for d in out:
        assert (tmp_path / "nix" / d.lstrip("/")).read_bytes() == (EXPERIMENTAL / os.path.basename(d)).read_bytes()


def test_help_texts_exist():
    for cmd in ("eval", "instantiate", "show-derivation"):
        p = run_pure(cmd, "--help")
        assert "-A ATTR" in p.stdout and "-I DIR" in p.stdout
        # examples, and the description wrapped (it was one line of 200 columns)
        assert f"examples:\n  pure {cmd} " in p.stdout
        assert max(map(len, p.stdout.splitlines())) <= 100


def test_show_derivation_accepts_physical_paths_and_base_names(tmp_path, pure, store_root):
    f = write(tmp_path / "e" / "expr.py", """
        from purestore.expr import derivation
        default = derivation(name="a", system="x86_64-linux", builder="/bin/sh")
    """)
    [drv] = pure("instantiate", f).stdout.split()
    want = json.loads(pure("show-derivation", drv).stdout)
    physical = str(store_root) + drv
    assert json.loads(pure("show-derivation", physical).stdout) == want
    assert json.loads(pure("show-derivation", drv.rsplit("/", 1)[1]).stdout) == want


def test_a_damaged_drv_is_named_with_a_hint_and_instantiate_repair_writes_it_again(tmp_path, pure, store_root):
    """A registered .drv whose file was truncated (or removed) by hand: `pure build` and
    `show-derivation` fail with a hint saying what to do; `pure instantiate --repair` writes it
    again from the expression (naming it), after which the store verifies clean; a .drv intact
    is left alone."""
    import os
    write(tmp_path / "inc" / "helpers.py", "NOTE = 'included'\n")
    f = write(tmp_path / "e" / "expr.py", EXPR)
    a_drv, b_drv = pure("instantiate", f, "-I", tmp_path / "inc").stdout.splitlines()
    real = store_root / a_drv.lstrip("/")
    good = real.read_bytes()
    for damage in ("truncate", "remove"):
        os.chmod(real.parent, 0o755)
        if damage == "truncate":
            os.chmod(real, 0o644)
            real.write_bytes(good[:50])
        else:
            real.unlink()
        for args in (["build", f, "-I", tmp_path / "inc", "-A", "tools.b"], ["show-derivation", a_drv]):
            p = pure(*args, check=False)
            assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
            assert a_drv in p.stderr and "hint: the store's copy of this derivation is damaged" in p.stderr, p.stderr
            assert "pure instantiate --repair EXPR" in p.stderr
        assert pure("store", "verify", "--check-contents", check=False).returncode == 1
        r = pure("instantiate", "--repair", f, "-I", tmp_path / "inc")
        assert r.stdout.splitlines() == [a_drv, b_drv]
        assert r.stderr == f"repaired {a_drv!r}\n"
        assert real.read_bytes() == good and oct(real.stat().st_mode & 0o777) == "0o444"
        pure("store", "verify", "--check-contents")
        pure("show-derivation", a_drv)
    r = pure("instantiate", "--repair", f, "-I", tmp_path / "inc")
    assert r.stderr == "" and r.stdout.splitlines() == [a_drv, b_drv]


def test_show_derivation_of_an_output_path_shows_the_derivation_that_has_it(tmp_path, pure, store_root):
    """`pure show-derivation ./result` (or an output path) read the path as an expression file
    ("expression file ... does not exist"); like `nix show-derivation`, it shows the .drv the
    store records for that output, and says so plainly when there is none."""
    f = write(tmp_path / "e" / "expr.py", """
        from purestore.expr import derivation
        default = derivation(name="a", system="x86_64-linux", builder="/bin/sh", outputs=["out", "dev"])
    """)
    [drv] = pure("instantiate", f).stdout.split()
    want = json.loads(pure("show-derivation", drv).stdout)
    dev = want[drv]["outputs"]["dev"]["path"]
    (tmp_path / "result-dev").symlink_to(f"{store_root}{dev}")
    for name in (dev, dev.rsplit("/", 1)[1], tmp_path / "result-dev"):
        assert json.loads(pure("show-derivation", name).stdout) == want, name
    # an expression file inside the store (a source tree added there) is still evaluated
    tree = pure("store", "add", f.parent).stdout.strip()
    assert json.loads(pure("show-derivation", f"{store_root}{tree}/expr.py").stdout) == want
    src = tmp_path / "data.txt"
    src.write_text("x\n")
    added = pure("store", "add", src).stdout.strip()
    p = pure("show-derivation", added, check=False)
    assert p.returncode == 1 and p.stderr.startswith(
        f"error: {added!r} is not a .drv, and the store knows no valid derivation that has it as an output\nhint: ")


def test_a_directory_given_as_the_expression_file_is_said_to_be_one(tmp_path, pure):
    """`pure eval expressions/mylib` (a package of the set) was "does not exist or is not a
    file"; it says it is a directory and names the __init__.py to give."""
    write(tmp_path / "pkg" / "__init__.py", "default = 1\n")
    p = pure("eval", tmp_path / "pkg", check=False)
    assert p.returncode == 1 and p.stderr == (f"error: expression file '{tmp_path}/pkg' is a directory\n"
                                              f"hint: give its '{tmp_path}/pkg/__init__.py'\n")


def test_eval_of_an_empty_list_prints_no_line(tmp_path, pure):
    """An empty list or dict printed one empty line, which a script reading the output paths
    line by line took for a path; an empty string is still its one (empty) line."""
    assert pure("eval", write(tmp_path / "l.py", "default = []\n")).stdout == ""
    assert pure("eval", write(tmp_path / "d.py", "default = {'a': []}\n")).stdout == ""
    assert pure("eval", write(tmp_path / "s.py", "default = ''\n")).stdout == "\n"
