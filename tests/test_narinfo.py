"""narinfo parse/render/fingerprint, checked against narinfo files written by Nix 2.8."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from purestore.errors import NarInfoError
from purestore.formats.hash import Hash
from purestore.formats.narinfo import NarInfo, fingerprint
from purestore.formats.signing import SecretKey, verify_any, parse_public_keys
from purestore.formats.store_path import StorePath

from conftest import DATA

GOLD = DATA / "cache" / "nix-cache"
PUB = (DATA / "cache" / "test-key-1.pub").read_text()
SEC = (DATA / "cache" / "test-key-1.sec").read_text()
NIXSD = "/nix/store"


def golden():
    return sorted(GOLD.glob("*.narinfo"))


@pytest.mark.parametrize("path", golden(), ids=lambda p: p.name)
def test_nix_narinfo_round_trips_byte_for_byte(path):
    text = path.read_text()
    ni = NarInfo.parse(text, NIXSD, where=path.name)
    assert ni.render(NIXSD) == text
    assert ni.store_path.hash_part == path.stem
    # Nix's signature verifies against our fingerprint
    assert verify_any(ni.fingerprint(NIXSD), ni.sigs, parse_public_keys([PUB])) == "test-key-1"


@pytest.mark.parametrize("path", golden(), ids=lambda p: p.name)
def test_our_signature_equals_nix_signature(path):
    """Ed25519 is deterministic: signing our fingerprint with the same key gives Nix's Sig line."""
    ni = NarInfo.parse(path.read_text(), NIXSD)
    sig = SecretKey.parse(SEC).sign(ni.fingerprint(NIXSD)).render()
    assert ni.sigs == (sig,)


def test_fingerprint_vector():
    p = StorePath.from_base_name("pihdd9cadryc4gkk8zsdbvpvilql139b-h.txt")
    h = Hash.parse("sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
    assert fingerprint(NIXSD, p, h, 120, []) == (
        "1;/nix/store/pihdd9cadryc4gkk8zsdbvpvilql139b-h.txt;"
        "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw;120;")
    r1 = StorePath.from_base_name("ay7hdmlhc2d9pn7k2mwjh6cq4csccv3x-plain.txt")
    fp = fingerprint(NIXSD, p, h, 120, [r1, p])
    assert fp.endswith(";120;/nix/store/ay7hdmlhc2d9pn7k2mwjh6cq4csccv3x-plain.txt,"
                       "/nix/store/pihdd9cadryc4gkk8zsdbvpvilql139b-h.txt")


BASE = GOLD.joinpath("hp4xhizqijy1k440fq06xfq6xpl37pf6.narinfo").read_text() if golden() else ""


@pytest.mark.parametrize("mutate,msg", [
    (lambda t: t.replace("StorePath: /nix/store/", "StorePath: /pure/store/"), "not in the store dir"),
    (lambda t: t.replace("NarSize: 120", "NarSize: 0120"), "bad NarSize"),
    (lambda t: t.replace("NarSize: 120", "NarSize: -1"), "bad NarSize"),
    (lambda t: t.replace("NarSize: 120", "NarSize: 0"), "NarSize is 0"),
    (lambda t: t.replace("NarHash: sha256:04", "NarHash: sha256:e4"), "bad NarHash"),
    (lambda t: t.replace("NarHash: sha256:", "NarHash: md5:"), "bad NarHash"),
    (lambda t: t.replace("Compression: zstd", "Compression: lz5"), "unknown compression"),
    (lambda t: t.replace("References: ", "References: ../etc"), "bad References"),
    (lambda t: "\n".join(l for l in t.split("\n") if not l.startswith("NarHash")), "missing field 'NarHash'"),
    (lambda t: t + "NarSize: 120\n", "duplicate field 'NarSize'"),
    (lambda t: t.rstrip("\n"), "not terminated"),
    (lambda t: t + "garbage line\n", "expected 'Key: value'"),
    (lambda t: t.replace("URL: nar/", "URL: nar/ x"), "bad URL"),
])
def test_malformed_narinfo_is_rejected_with_line(mutate, msg):
    with pytest.raises(NarInfoError, match=msg):
        NarInfo.parse(mutate(BASE), NIXSD, where="x.narinfo")


def test_unknown_keys_ignored_and_compression_defaults_to_bzip2():
    text = BASE.replace("Compression: zstd\n", "System: x86_64-linux\n")
    ni = NarInfo.parse(text, NIXSD)
    assert ni.compression == "bzip2"


_paths = st.builds(
    StorePath,
    st.text("0123456789abcdfghijklmnpqrsvwxyz", min_size=32, max_size=32),
    st.from_regex(r"[a-z][A-Za-z0-9+._?=-]{0,20}", fullmatch=True),
)


@given(
    path=_paths, refs=st.lists(_paths, max_size=5), nar=st.binary(min_size=32, max_size=32),
    size=st.integers(1, 1 << 40), comp=st.sampled_from(["none", "zstd", "xz"]),
    deriver=st.none() | _paths.map(lambda p: StorePath(p.hash_part, "d.drv")),
    ca=st.none() | st.just("fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"),
)
def test_round_trip(path, refs, nar, size, comp, deriver, ca):
    key = SecretKey.parse(SEC)
    ni = NarInfo(path, "nar/x.nar", Hash("sha256", nar), size, comp, Hash("sha256", nar[::-1]),
                 size // 2, refs, deriver, (), ca)
    ni = ni.with_sigs([key.sign(ni.fingerprint("/pure/store")).render()])
    text = ni.render("/pure/store")
    back = NarInfo.parse(text, "/pure/store")
    assert back == ni
    assert back.render("/pure/store") == text
    verify_any(back.fingerprint("/pure/store"), back.sigs, {"test-key-1": key.public_key()})


@given(st.binary(max_size=600), st.integers(0, 10_000))
def test_random_corruption_raises_only_narinfo_error(junk, pos):
    raw = bytearray(BASE.encode())
    i = pos % (len(raw) + 1)
    mutated = bytes(raw[:i]) + junk + bytes(raw[i + len(junk) // 2:])
    try:
        NarInfo.parse(mutated, NIXSD)
    except NarInfoError:
        pass


def test_references_are_read_as_nix_reads_them():
    """Several spaces between references, or a repeated one, are accepted as Nix accepts them
    (Nix 2.8 tokenizes the line into a set)."""
    from purestore.formats.narinfo import NarInfo
    a, b = "0" * 31 + "1-a", "0" * 31 + "2-b"
    base = ("StorePath: /nix/store/" + "0" * 31 + "3-c\nURL: nar/x.nar\nCompression: none\n"
            "NarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 1\n")
    ni = NarInfo.parse(base + f"References:  {a}  {b} {a} \n", "/nix/store")
    assert [r.base_name for r in ni.references] == [a, b]
