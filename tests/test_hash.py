"""formats/hash.py: encodings, the FORMATS.md vectors, strict parsing."""

import base64
import hashlib
import re

import pytest
from hypothesis import given, settings, strategies as st

from purestore.errors import BadHash
from purestore.formats.hash import (
    ALGOS, NIX32_ALPHABET, Hash, HashSink, fold20, nix32_decode, nix32_encode, nix32_len,
)

HELLO_SHA256 = hashlib.sha256(b"hello\n").digest()

algos = st.sampled_from(sorted(ALGOS))


@st.composite
def hashes(draw):
    algo = draw(algos)
    return Hash(algo, draw(st.binary(min_size=ALGOS[algo], max_size=ALGOS[algo])))


def test_formats_md_vectors():
    """The vectors of FORMATS.md section 1."""
    assert nix32_encode(HELLO_SHA256) == "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
    assert fold20(HELLO_SHA256).hex() == "3b3e8165a0537de02bf94eb210fbd9d21bb4fc71"
    h = Hash.of_bytes(b"hello\n")
    assert h.base16 == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    assert h.sri == "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM="


def test_nix32_lengths():
    assert [nix32_len(n) for n in (16, 20, 32, 64)] == [26, 32, 52, 103]


def test_fold20_is_a_fold_not_a_truncation():
    d = bytes(range(32))
    want = bytearray(d[:20])
    for i in range(20, 32):
        want[i - 20] ^= d[i]
    assert fold20(d) == bytes(want) != d[:20]


@given(st.binary(max_size=80))
def test_nix32_round_trip(data):
    text = nix32_encode(data)
    assert len(text) == nix32_len(len(data)) if data else True
    assert set(text) <= set(NIX32_ALPHABET)
    if data:
        assert nix32_decode(text, len(data)) == data


@given(st.binary(min_size=1, max_size=64))
def test_nix32_is_little_endian_base32_most_significant_digit_first(data):
    n = int.from_bytes(data, "little")
    text = nix32_encode(data)
    assert sum(NIX32_ALPHABET.index(c) << (5 * k) for k, c in enumerate(reversed(text))) == n


@given(st.binary(min_size=1, max_size=64), st.data())
def test_nix32_decode_names_any_character_outside_the_alphabet(data, draw):
    """Even those that Python's int() would take as digits or let through (decode reads the
    digits with it): upper case, other scripts' digits, '_', white space, a sign."""
    text = list(nix32_encode(data))
    i = draw.draw(st.integers(0, len(text) - 1))
    bad = draw.draw(st.sampled_from(["e", "o", "t", "u", "A", "V", "\u0663", "_", " ", "+", "-", "\n"]))
    text[i] = bad
    with pytest.raises(BadHash, match=f"invalid character {re.escape(repr(bad))} in nix32 string"):
        nix32_decode("".join(text), len(data))


@given(hashes(), st.sampled_from(["base16", "nix32", "base64"]))
def test_every_encoding_parses_back(h, enc):
    typed = f"{h.algo}:{h.encode(enc)}"
    assert Hash.parse(typed) == h
    assert Hash.parse(h.encode(enc), h.algo) == h
    assert Hash.parse(h.sri) == h
    assert Hash.parse(h.typed(enc)) == h


@given(hashes())
def test_encodings_agree_with_the_standard_library(h):
    assert h.base16 == h.digest.hex()
    assert h.base64 == base64.b64encode(h.digest).decode()
    assert str(h) == h.sri == f"{h.algo}-{h.base64}"


def test_nix32_rejects_nonzero_padding_bits():
    """52 nix32 digits hold 260 bits; a sha256 uses 256: the top digit may only be 0 or 1."""
    good = nix32_encode(HELLO_SHA256)
    assert good[0] in "01"
    bad = "z" + good[1:]
    with pytest.raises(BadHash, match="padding"):
        nix32_decode(bad, 32)
    with pytest.raises(BadHash):
        Hash.parse("sha256:" + bad)


@pytest.mark.parametrize("text", [
    "sha256:" + "e" * 52,              # 'e' is not in the nix32 alphabet
    "sha256:" + "0" * 51,              # wrong length
    "sha256:" + "A" * 64,              # uppercase base16
    "sha256:" + "g" * 64,              # not hex
    "sha256-" + "!" * 44,              # not base64
    "sha256-" + base64.b64encode(b"x" * 31).decode(),  # too short digest
    "sha257:" + "0" * 64,              # unknown algorithm
    "0" * 64,                          # no algorithm
    "",
])
def test_bad_hashes_raise_badhash_naming_the_input(text):
    with pytest.raises(BadHash) as ei:
        Hash.parse(text)
    assert isinstance(ei.value, ValueError)
    assert str(ei.value)[0].islower()


def test_algorithm_mismatch_is_an_error():
    h = Hash.of_bytes(b"x")
    with pytest.raises(BadHash, match="expected sha512"):
        Hash.parse(h.sri, "sha512")


@pytest.mark.parametrize("text", ["blake3-AAAA", "blake3:AAAA", "sha3:" + "0" * 64])
def test_a_hash_of_an_unknown_algorithm_is_named_with_it(text):
    """An SRI hash of another algorithm ('blake3-...') was 'does not say its algorithm', and a
    typed one did not name the hash."""
    with pytest.raises(BadHash, match=rf"hash '{text}' is of unknown algorithm '{re.split('[:-]', text)[0]}', "
                                      r"expected one of md5, sha1, sha256, sha512"):
        Hash.parse(text)


def test_digest_length_is_checked():
    with pytest.raises(BadHash, match="32 bytes"):
        Hash("sha256", b"x" * 20)
    with pytest.raises(BadHash, match="unknown hash algorithm"):
        Hash("sha3", b"x" * 32)


@given(st.lists(st.binary(max_size=300), max_size=8), algos)
def test_hashsink_hashes_and_counts(chunks, algo):
    s = HashSink(algo)
    for c in chunks:
        s.write(c)
    data = b"".join(chunks)
    assert s.size == len(data)
    assert s.finish() == Hash(algo, hashlib.new(algo, data).digest())


@settings(max_examples=300)
@given(st.text(max_size=120))
def test_parse_never_raises_anything_but_badhash(text):
    try:
        Hash.parse(text)
    except BadHash:
        pass
