"""formats/derivation.py: ATerm round trips, hashDerivationModulo and paths against Nix's vectors."""

from __future__ import annotations

import re

import attrs
import pytest
from hypothesis import given, settings, strategies as st

from conftest import DATA
from purestore.errors import DerivationError
from purestore.formats.derivation import (
    Derivation,
    DerivationOutput,
    drv_references,
    drv_store_path,
    fill_output_paths,
    from_json,
    hash_derivation_modulo,
    parse_aterm,
    render_aterm,
    to_json,
)
from purestore.formats.hash import Hash

MINI = (DATA / "drv" / "mini-graph.md").read_text()
PATHS = dict(re.findall(r"-- mini (\w+)\.drv path:\n(\S+)", MINI))
TEXTS = {k: v.encode() for k, v in re.findall(r"-- mini (\w+)\.drv text:\n(.+)", MINI)}
MODULO = {
    (k, m == "true"): v
    for k, m, v in re.findall(r"-- mini (\w+) hashDerivationModulo\(maskOutputs=(\w+)\)[^\n]*\n(\w+)", MINI)
}
GRAPH = {PATHS[n]: parse_aterm(TEXTS[n], n) for n in ("fod", "dep", "top")}


@pytest.mark.parametrize("name", ["fod", "dep", "top"])
def test_mini_graph_round_trips_and_drv_paths_match_nix(name):
    drv = parse_aterm(TEXTS[name], name)
    assert render_aterm(drv) == TEXTS[name]
    assert drv_store_path(drv, "/nix/store").absolute("/nix/store") == PATHS[name]
    assert drv.name == name


@pytest.mark.parametrize("name", ["fod", "dep", "top"])
@pytest.mark.parametrize("mask", [True, False])
def test_hash_derivation_modulo_matches_nix(name, mask):
    cache: dict = {}
    got = hash_derivation_modulo(GRAPH[PATHS[name]], GRAPH.__getitem__, mask, cache)
    assert got.hex() == MODULO[(name, mask)]


def test_masked_aterm_of_top_is_what_nix_hashes():
    masked = re.search(r"top masked\+modulo ATerm[^\n]*\n(.+)", MINI).group(1).encode()
    top = GRAPH[PATHS["top"]]
    cache: dict = {}
    hash_derivation_modulo(top, GRAPH.__getitem__, True, cache)
    pairs = sorted((cache[p].hex(), o) for p, o in top.input_drvs.items())
    assert render_aterm(top, mask_outputs=True, input_drvs=pairs) == masked


@pytest.mark.parametrize("name", ["fod", "dep", "top"])
def test_fill_output_paths_reproduces_nix_outputs(name):
    drv = GRAPH[PATHS[name]]
    blank = attrs.evolve(
        drv,
        outputs={k: DerivationOutput("", o.hash_algo, o.hash) for k, o in drv.outputs.items()},
        env={k: ("" if k in drv.outputs else v) for k, v in drv.env.items()},
    )
    assert fill_output_paths(blank, GRAPH.__getitem__, "/nix/store") == drv


def test_lookup_is_called_once_per_input_with_a_shared_cache():
    calls = []

    def lookup(p):
        calls.append(p)
        return GRAPH[p]

    cache: dict = {}
    top = GRAPH[PATHS["top"]]
    hash_derivation_modulo(top, lookup, True, cache)
    hash_derivation_modulo(top, lookup, False, cache)
    assert sorted(calls) == sorted(top.input_drvs)


def test_deep_chain_does_not_hit_the_recursion_limit():
    graph = {}
    prev = None
    cache: dict = {}
    for i in range(3000):
        d = Derivation(
            outputs={"out": DerivationOutput("")}, input_drvs={prev: frozenset({"out"})} if prev else {},
            input_srcs=frozenset(), system="x", builder="/b", args=(), env={"name": f"n{i}", "out": ""},
        )
        d = fill_output_paths(d, graph.__getitem__, "/nix/store", cache)
        prev = drv_store_path(d, "/nix/store").absolute("/nix/store")
        graph[prev] = d
    # a fresh cache must walk all 3000 inputs iteratively
    hash_derivation_modulo(graph[prev], graph.__getitem__, False, {})


def test_fixed_output_hash_and_references():
    fod = GRAPH[PATHS["fod"]]
    assert fod.is_fixed_output
    h, rec = fod.fixed_output_hash()
    assert h == Hash.parse("sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
    assert rec is False
    top = GRAPH[PATHS["top"]]
    assert not top.is_fixed_output
    with pytest.raises(DerivationError, match="not fixed-output"):
        top.fixed_output_hash()
    assert [r.absolute("/nix/store") for r in drv_references(top, "/nix/store")] == sorted(
        [PATHS["fod"], PATHS["dep"]], key=lambda p: p.split("/")[-1]
    )


def test_json_has_the_nix_show_derivation_shape_and_inverts():
    j = to_json(PATHS["top"], GRAPH[PATHS["top"]])
    inner = j[PATHS["top"]]
    assert set(inner) == {"outputs", "inputSrcs", "inputDrvs", "system", "builder", "args", "env"}
    assert inner["inputDrvs"] == {PATHS["fod"]: ["out"], PATHS["dep"]: ["out"]}
    assert to_json(PATHS["fod"], GRAPH[PATHS["fod"]])[PATHS["fod"]]["outputs"]["out"]["hashAlgo"] == "sha256"
    assert from_json(inner) == GRAPH[PATHS["top"]]


# -- strictness and round trips -----------------------------------------------------------------

_SP = "/nix/store/" + "a" * 32 + "-x"


def _drv(**kw) -> Derivation:
    base = dict(outputs={"out": DerivationOutput(_SP)}, input_drvs={}, input_srcs=frozenset(),
                system="x86_64-linux", builder="/bin/sh", args=(), env={"name": "x"})
    base.update(kw)
    return Derivation(**base)


def test_escapes_are_nix_escapes():
    d = _drv(args=('a"b\\c\nd\te\rf$g é',), env={"name": "x", "k\n": 'v"'})
    text = render_aterm(d)
    assert b'["a\\"b\\\\c\\nd\\te\\rf$g \xc3\xa9"]' in text
    assert b'("k\\n","v\\"")' in text
    assert parse_aterm(text) == d


@pytest.mark.parametrize(
    "text, msg",
    [
        (b"Derive([],[],[],\"s\",\"b\",[],[])", "no outputs"),
        (TEXTS["dep"] + b" ", "expected the end"),
        (TEXTS["dep"].replace(b"echo dep", b"echo\\x"), "escapes"),
        (TEXTS["dep"].replace(b"echo dep", b"echo\tdep"), "escaped tab"),
        (TEXTS["dep"].replace(b'("builder","/bin/sh"),("name","dep")', b'("name","dep"),("builder","/bin/sh")'),
         "environment keys are not sorted"),
        (TEXTS["dep"].replace(b"Derive(", b"Derive ("), "expected 'Derive\\('"),
        (TEXTS["dep"].replace(b"/nix/store/z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep\",\"\"", b"relative\",\"\""),
         "not an absolute store path"),
        (TEXTS["fod"].replace(b'"sha256","2cf2', b'"sha256","zzf2'), "lowercase base16"),
        (TEXTS["top"][:-30], "expected"),
    ],
)
def test_parse_rejects_with_a_message_naming_the_problem(text, msg):
    with pytest.raises(DerivationError, match=msg) as ei:
        parse_aterm(text, "test.drv")
    assert "test.drv" in str(ei.value)


_strs = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
_names = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
_paths = st.from_regex(r"/nix/store/[0-9a-df-np-sv-z]{32}-[a-z0-9][a-z0-9.]{0,7}", fullmatch=True)


@st.composite
def derivations(draw):
    outs = draw(st.dictionaries(_names, _paths, min_size=1, max_size=3))
    return Derivation(
        outputs={n: DerivationOutput(p) for n, p in outs.items()},
        input_drvs={p + ".drv": frozenset(draw(st.sets(_names, min_size=1, max_size=2)))
                    for p in draw(st.sets(_paths, max_size=3))},
        input_srcs=frozenset(draw(st.sets(_paths, max_size=3))),
        system=draw(_names),
        builder=draw(_strs),
        args=tuple(draw(st.lists(_strs, max_size=4))),
        env=draw(st.dictionaries(_strs, _strs, max_size=5)),
    )


@settings(max_examples=100, deadline=None)
@given(derivations())
def test_render_parse_round_trip(drv):
    text = render_aterm(drv)
    assert parse_aterm(text) == drv
    assert render_aterm(parse_aterm(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_corruption_raises_the_format_error_or_round_trips(pos, byte):
    data = bytearray(TEXTS["top"])
    data[pos % len(data)] = byte
    try:
        d = parse_aterm(bytes(data))
    except DerivationError:
        return
    assert render_aterm(d) == bytes(data)


def test_drv_references_are_unique_when_a_drv_is_both_source_and_input():
    dp = "/nix/store/" + "b" * 32 + "-dep.drv"
    d = _drv(input_drvs={dp: frozenset({"out"})}, input_srcs=frozenset({dp, _SP}))
    refs = drv_references(d, "/nix/store")
    assert [r.absolute("/nix/store") for r in refs] == sorted({dp, _SP})
