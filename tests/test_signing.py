"""Ed25519 keys and signatures in Nix's text formats (FORMATS.md section 5)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, strategies as st

from purestore.errors import KeyError_, SignatureError
from purestore.formats.signing import (
    PublicKey, SecretKey, Signature, parse_public_keys, verify_any,
)

SECRET = "test-key-1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8DoQe/884Qvh1w3RjnS8CZZ+TWMJulDV8d3IZkElUxuA=="
PUBLIC = "test-key-1:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
FP = ("1;/nix/store/pihdd9cadryc4gkk8zsdbvpvilql139b-h.txt;"
      "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw;120;")
SIG = "test-key-1:VMqCrauBUeqtmIRicPC6i8/D6LY15nC5dWqS2CulLtaYxVi5gk5dLCrQYmlXPdi01F51pwwI0zNs2J823cv7Cg=="


def test_vector_sign_and_verify():
    """The FORMATS.md vector: the secret key signs the fingerprint to the given Sig line."""
    sk = SecretKey.parse(SECRET)
    assert sk.public_key().render() == PUBLIC
    assert sk.render() == SECRET
    assert sk.sign(FP).render() == SIG
    assert PublicKey.parse(PUBLIC).verify(FP, Signature.parse(SIG))
    assert not PublicKey.parse(PUBLIC).verify(FP + "x", Signature.parse(SIG))


def test_key_file_with_trailing_newline_is_accepted():
    assert SecretKey.parse(SECRET + "\n").name == "test-key-1"


def test_generated_keys_round_trip():
    sk = SecretKey.generate("cache.example-1")
    assert SecretKey.parse(sk.render()) == sk
    pk = PublicKey.parse(sk.public_key().render())
    assert pk.verify("abc", sk.sign("abc"))


@pytest.mark.parametrize("text,msg", [
    ("nocolon", "not of the form"),
    (":AAAA", "empty key name"),
    ("k:!!!!", "invalid base64"),
    ("k:" + base64.b64encode(b"x" * 31).decode(), "expected 32"),
])
def test_malformed_public_keys(text, msg):
    with pytest.raises(KeyError_, match=msg):
        PublicKey.parse(text)


def test_a_key_file_starting_with_a_byte_order_mark_says_so():
    """strip() keeps U+FEFF: it would have become the first character of the key's name."""
    for parse, text in ((SecretKey.parse, SECRET), (PublicKey.parse, PUBLIC)):
        with pytest.raises(KeyError_, match="starts with a byte-order mark") as e:
            parse("\ufeff" + text + "\n")
        assert "without one" in e.value.hint


@pytest.mark.parametrize("name", ["a\x01b", "\ufeffx", "x\ufeff", "x\u200by", "k\x7f", "\u202ek"])
def test_key_names_with_characters_that_are_not_printable_are_refused(name):
    """Control characters, U+FEFF and other invisible characters make names that look alike."""
    with pytest.raises(KeyError_, match="not printable"):
        SecretKey.generate(name)
    said = "byte-order mark" if name.startswith("\ufeff") else "not printable"
    with pytest.raises(KeyError_, match=said):
        PublicKey.parse(name + PUBLIC[len("test-key-1"):])
    with pytest.raises(KeyError_, match=said):
        Signature.parse(name + SIG[len("test-key-1"):])


def test_several_keys_given_as_one_get_a_hint():
    two = "k1:" + base64.b64encode(b"x" * 32).decode() + ",k2:" + base64.b64encode(b"y" * 32).decode()
    with pytest.raises(KeyError_, match="has invalid base64") as e:
        PublicKey.parse(two)
    assert "separated by spaces" in e.value.hint
    with pytest.raises(KeyError_, match="has invalid base64") as e:
        SecretKey.parse(SECRET + "\n" + SECRET)
    assert "separated by spaces" in e.value.hint and SECRET.split(":", 1)[1][:8] not in str(e.value)
    with pytest.raises(KeyError_) as e:
        PublicKey.parse("k:!!!!")
    assert e.value.hint is None


def test_a_space_after_the_colon_is_said_to_be_one():
    """``name: base64`` (a secret key file written by hand) is refused for the space after the
    ':', not with the hint that several keys were given in one."""
    for parse, text in ((SecretKey.parse, SECRET), (PublicKey.parse, PUBLIC)):
        name, b64 = text.split(":", 1)
        with pytest.raises(KeyError_) as e:
            parse(f"{name}: {b64}")
        assert str(e.value).endswith(f"key {name!r} has white space after its ':'")
        assert e.value.hint == "write it as NAME:BASE64, with nothing between the ':' and the key"
        assert b64[:8] not in str(e.value)


def test_a_public_key_given_for_a_secret_one_and_back_says_so():
    """The two keys of a pair are easy to swap: the error's hint says which one was given, and
    never shows any of the secret."""
    with pytest.raises(KeyError_, match="decodes to 32 bytes, expected 64") as e:
        SecretKey.parse(PUBLIC)
    assert e.value.hint.startswith("32 bytes are a public key (or only the first half of a secret key)")
    with pytest.raises(KeyError_, match="decodes to 64 bytes, expected 32") as e:
        PublicKey.parse(SECRET)
    assert "pure key public" in e.value.hint
    assert SECRET.split(":", 1)[1][:8] not in str(e.value)
    with pytest.raises(KeyError_) as e:
        PublicKey.parse("k:" + base64.b64encode(b"x" * 31).decode())
    assert e.value.hint is None


def test_secret_key_with_mismatched_public_half_is_rejected():
    raw = base64.b64decode(SECRET.split(":", 1)[1])
    bad = "test-key-1:" + base64.b64encode(raw[:32] + bytes(32)).decode()
    with pytest.raises(KeyError_, match="public half does not match"):
        SecretKey.parse(bad)


def test_verify_any_reasons():
    trusted = parse_public_keys([PUBLIC])
    assert verify_any(FP, [SIG], trusted) == "test-key-1"
    with pytest.raises(SignatureError, match="no signature"):
        verify_any(FP, [], trusted)
    other = SecretKey.generate("other-1")
    with pytest.raises(SignatureError, match="untrusted key 'other-1'"):
        verify_any(FP, [other.sign(FP).render()], trusted)
    with pytest.raises(SignatureError, match="invalid signature by 'test-key-1'"):
        verify_any(FP.replace("120", "121"), [SIG], trusted)
    # a forged signature under the trusted name
    forged = Signature("test-key-1", other.sign(FP).sig).render()
    with pytest.raises(SignatureError, match="invalid signature"):
        verify_any(FP, [forged], trusted)
    # one good signature among bad ones is enough
    assert verify_any(FP, ["garbage", forged, SIG], trusted) == "test-key-1"
    # a Sig line that is no signature (an empty one, a name alone, bad base64) is said as such,
    # with its text: it was "invalid signature by '?'" ('test-key-1' for a name alone)
    for text in ("", "test-key-1", "test-key-1:abc", SIG[:-4]):
        with pytest.raises(SignatureError) as e:
            verify_any(FP, [text], trusted)
        assert str(e.value) == f"malformed signature {text[:40]!r}{'...' if len(text) > 40 else ''} " \
                               "(expected NAME:BASE64 of 64 bytes)"
    with pytest.raises(SignatureError, match=r"^invalid signature by 'test-key-1'; malformed signature ''"):
        verify_any(FP, [forged, ""], trusted)


@given(st.binary(min_size=0, max_size=100), st.integers(0, 87))
def test_corrupted_signature_never_verifies_and_never_crashes(data, pos):
    """Random corruption of a Sig line either fails to parse (KeyError_) or fails to verify."""
    text = bytearray(SIG.encode())
    text[pos % len(text)] ^= 1 + (data[0] % 255 if data else 0)
    try:
        s = text.decode()
        sig = Signature.parse(s)
    except (KeyError_, UnicodeDecodeError):
        return
    if sig.render() == SIG:
        return  # corruption hit base64 padding bits equivalently; cannot happen with validate=True
    assert not PublicKey.parse(PUBLIC).verify(FP, sig)


@given(st.text(min_size=1, max_size=20).filter(lambda n: ":" not in n and not any(c.isspace() for c in n)
                                               and n.isprintable()),
       st.binary(min_size=32, max_size=32))
def test_public_key_round_trip(name, key):
    pk = PublicKey(name, key)
    assert PublicKey.parse(pk.render()) == pk


def test_every_trusted_key_of_a_name_is_trusted():
    """Two keys listed under one name (a key being replaced): a signature by either is good,
    whichever comes first (Nix 2.8 keeps the first key of a name and drops the other without a
    word); a third key of the name is still refused, and a key listed twice is one key."""
    new = SecretKey.generate("test-key-1")
    new_sig = new.sign(FP).render()
    for order in ([PUBLIC, new.public_key().render()], [new.public_key().render(), PUBLIC]):
        trusted = parse_public_keys(order)
        assert verify_any(FP, [SIG], trusted) == "test-key-1"
        assert verify_any(FP, [new_sig], trusted) == "test-key-1"
        with pytest.raises(SignatureError, match="invalid signature by 'test-key-1'"):
            verify_any(FP, [SecretKey.generate("test-key-1").sign(FP).render()], trusted)
    assert parse_public_keys([PUBLIC, PUBLIC]) == {"test-key-1": PublicKey.parse(PUBLIC)}
