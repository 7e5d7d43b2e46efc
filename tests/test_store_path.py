"""formats/store_path.py: the FORMATS.md vectors, name validation, parsing."""

import pytest
from hypothesis import given, strategies as st

from purestore.errors import InvalidStorePath
from purestore.formats.hash import NIX32_ALPHABET, Hash
from purestore.formats.store_path import (
    StorePath, check_name, check_store_dir, content_address, make_fixed_output_path, make_source_path,
    make_text_path,
)

NIX = "/nix/store"
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?="

hash_parts = st.text(alphabet=NIX32_ALPHABET, min_size=32, max_size=32)
names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=211).filter(
    lambda n: n not in (".", "..") and not n.startswith(".-") and not n.startswith("..-")
)


def test_text_path_vector():
    p = make_text_path("plain.txt", b"plain\n", [], NIX)
    assert p.absolute(NIX) == "/nix/store/ay7hdmlhc2d9pn7k2mwjh6cq4csccv3x-plain.txt"


def test_flat_fixed_output_vector():
    h = Hash.of_bytes(b"hello\n")
    p = make_fixed_output_path("h.txt", h, False, NIX)
    assert p.absolute(NIX) == "/nix/store/pihdd9cadryc4gkk8zsdbvpvilql139b-h.txt"
    assert content_address(h, False) == "fixed:sha256:" + h.nix32


def test_recursive_sha256_fixed_output_is_a_source_path():
    h = Hash.parse("sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
    assert make_fixed_output_path("x", h, True, NIX) == make_source_path("x", h, [], NIX)


def test_store_dir_changes_the_path():
    a = make_text_path("plain.txt", b"plain\n", [], NIX)
    b = make_text_path("plain.txt", b"plain\n", [], "/pure/store")
    assert a.name == b.name and a.hash_part != b.hash_part


@pytest.mark.parametrize("bad, normal", [("/nix/store/../x", "/nix/x"), ("/pure/./store", "/pure/store"),
                                         ("/a/..", "/")])
def test_a_store_dir_with_dot_components_is_refused(bad, normal):
    """`--store-dir /nix/store/../x` was taken as it is: part of every hash (so no cache's paths
    match), and its files went to /nix/x; it names the normal form to write instead."""
    with pytest.raises(InvalidStorePath, match=rf"store dir '{bad}' must not have '\.' or '\.\.' components "
                                               rf"\(write it as '{normal}'\)"):
        check_store_dir(bad)
    assert check_store_dir("/nix/store") == "/nix/store" and check_store_dir("/a/.b/c..d") == "/a/.b/c..d"


def test_references_change_the_path_and_their_order_does_not():
    r1 = StorePath("0" * 32, "a")
    r2 = StorePath("1" * 32, "b")
    base = make_text_path("t", b"x", [], NIX)
    p12 = make_text_path("t", b"x", [r1, r2], NIX)
    p21 = make_text_path("t", b"x", [r2, r1], NIX)
    assert p12 == p21 != base


@given(hash_parts, names)
def test_base_name_round_trip(h, name):
    p = StorePath(h, name)
    assert StorePath.from_base_name(p.base_name) == p
    assert StorePath.parse(p.absolute(NIX), NIX) == p
    assert StorePath.parse_prefix(p.absolute(NIX) + "/bin/x", NIX) == (p, "/bin/x")


@pytest.mark.parametrize("name", ["", ".", "..", ".-x", "..-x", "a/b", "a b", "é", "a:b", "x" * 212, "a\0"])
def test_invalid_names_are_rejected(name):
    with pytest.raises(InvalidStorePath) as ei:
        check_name(name)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("name", ["a", "x" * 211, "...", ".a", "a.-b", "foo-1.2+git?=_"])
def test_valid_names_are_accepted(name):
    assert check_name(name) == name


@pytest.mark.parametrize("text", [
    "/nix/store/short-x",
    "/nix/store/" + "e" * 32 + "-x",        # 'e' is not nix32
    "/nix/store/" + "0" * 32 + "x",         # no dash
    "/nix/store/" + "0" * 32 + "-",         # empty name
    "/other/" + "0" * 32 + "-x",            # wrong store dir
    "/nix/store/" + "0" * 32 + "-x/sub",    # a subpath
])
def test_bad_store_paths_are_rejected(text):
    with pytest.raises(InvalidStorePath):
        StorePath.parse(text, NIX)


@given(st.lists(st.tuples(st.text(NIX32_ALPHABET, min_size=32, max_size=32),
                          st.sampled_from(["a", "b", "a-1", "a.b", "z"])), max_size=20))
def test_store_paths_order_by_hash_part_then_name(parts):
    paths = [StorePath(h, n) for h, n in parts]
    assert [(p.hash_part, p.name) for p in sorted(paths)] == sorted(parts)
    for a in paths[:5]:
        for b in paths[:5]:
            key_a, key_b = (a.hash_part, a.name), (b.hash_part, b.name)
            assert (a < b, a <= b, a > b, a >= b) == (key_a < key_b, key_a <= key_b, key_a > key_b, key_a >= key_b)
    with pytest.raises(TypeError):
        _ = StorePath("0" * 32, "x") < ("0" * 32, "x")
