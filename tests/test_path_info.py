"""PathInfo: a plain value rendered like `nix path-info --json`."""

import json

import pytest
from hypothesis import given, strategies as st

from purestore.errors import FormatError
from purestore.formats.hash import Hash
from purestore.formats.path_info import PathInfo
from purestore.formats.store_path import NIX32_ALPHABET, StorePath

SD = "/nix/store"
P = StorePath("pihdd9cadryc4gkk8zsdbvpvilql139b", "h.txt")
Q = StorePath("69v9qnz5ql2sfax879wjf25dqgim5sjs", "src")
H = Hash.parse("sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=")


def test_to_json_matches_nix_path_info_json_for_a_flat_file():
    """Byte-for-byte the object `nix path-info --json` (Nix 2.8) printed for the same path."""
    info = PathInfo(P, H, 120, ca="fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
                    registration_time=1795670429)
    nix = ('{"path":"/nix/store/pihdd9cadryc4gkk8zsdbvpvilql139b-h.txt","narHash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=",'
           '"narSize":120,"references":[],"ca":"fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",'
           '"closureSize":120,"registrationTime":1795670429}')
    assert json.dumps(info.to_json(SD, closure_size=120), separators=(",", ":")) == nix


def test_optional_keys_appear_only_when_set_and_references_are_sorted_full_paths():
    info = PathInfo(Q, H, 5, references={P, Q}, deriver=StorePath("a" * 32, "x.drv"), sigs={"k:abc", "a:def"})
    j = info.to_json(SD)
    assert j["references"] == sorted([f"{SD}/{Q}", f"{SD}/{P}"])
    assert j["deriver"] == f"{SD}/{'a' * 32}-x.drv"
    assert j["signatures"] == ["a:def", "k:abc"]
    assert "ca" not in j and "closureSize" not in j
    assert info.self_referencing and info.references_without_self() == {P}


def test_invalid_fields_raise_format_error_naming_the_field():
    with pytest.raises(FormatError, match="nar_size"):
        PathInfo(P, H, -1)
    with pytest.raises(FormatError, match="nar_hash"):
        PathInfo(P, "sha256:abc", 1)
    with pytest.raises(FormatError, match="sha256"):
        PathInfo(P, Hash.of_bytes(b"x", "sha1"), 1)
    with pytest.raises(FormatError, match="references"):
        PathInfo(P, H, 1, references={"/nix/store/x"})
    with pytest.raises(FormatError, match="sigs"):
        PathInfo(P, H, 1, sigs="k:abc")


def test_from_json_rejects_missing_and_mistyped_keys():
    good = PathInfo(P, H, 120).to_json(SD)
    for key in ("path", "narHash", "narSize", "references"):
        bad = dict(good)
        del bad[key]
        with pytest.raises(FormatError, match=key):
            PathInfo.from_json(bad, SD)
    with pytest.raises(FormatError, match="narSize"):
        PathInfo.from_json(dict(good, narSize="120"), SD)


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789+-._?=", min_size=1, max_size=30).filter(
    lambda n: n not in (".", "..") and not n.startswith(".-") and not n.startswith("..-"))
paths = st.builds(StorePath, st.text(alphabet=NIX32_ALPHABET, min_size=32, max_size=32), names)


@given(path=paths, refs=st.frozensets(paths, max_size=4), deriver=st.none() | paths,
       digest=st.binary(min_size=32, max_size=32), size=st.integers(0, 2**62),
       sigs=st.frozensets(st.from_regex(r"[a-z]{1,8}:[A-Za-z0-9+/]{4,12}=?", fullmatch=True), max_size=3),
       ca=st.none() | st.just("fixed:r:sha256:0sccip3r987a1ckwv1b2w1faz6a40798rv5kl4rzpi84y380dz6g"),
       rtime=st.integers(0, 2**40))
def test_json_round_trip(path, refs, deriver, digest, size, sigs, ca, rtime):
    info = PathInfo(path, Hash("sha256", digest), size, refs, deriver, sigs, ca, rtime)
    again = PathInfo.from_json(json.loads(json.dumps(info.to_json("/pure/store"))), "/pure/store")
    assert again == info
