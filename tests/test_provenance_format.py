"""formats/provenance: DSSE signing and verification, statement shape, subject checks."""

import base64
import json

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from purestore.errors import ProvenanceError
from purestore.formats.hash import Hash
from purestore.formats.provenance import (
    BUILD_TYPE, Envelope, Subject, VerifiedStatement, check_subject, make_statement, pae,
    sign_statement, verify_envelope,
)
from purestore.formats.signing import SecretKey, parse_public_keys

# FORMATS.md's test key.
SECRET = "test-key-1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8DoQe/884Qvh1w3RjnS8CZZ+TWMJulDV8d3IZkElUxuA=="
PUBLIC = "test-key-1:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
PATH = "/pure/store/pihdd9cadryc4gkk8zsdbvpvilql139b-h.txt"
NAR = Hash.parse("sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")


def statement():
    return make_statement(
        [Subject(PATH, NAR)],
        external_parameters={"derivation": {"path": "/pure/store/x.drv"}},
        resolved_dependencies=[{"name": "/pure/store/dep", "digest": {"sha256": "00" * 32}}],
        builder_id="urn:purestore:builder:test",
        builder_version={"purestore": "0.1.0"},
        started_on="2026-01-01T00:00:00Z", finished_on="2026-01-01T00:00:05Z",
    )


def test_pae_matches_the_dsse_spec_example():
    # From the DSSE protocol document.
    assert pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_round_trip_sign_then_verify_gives_the_statement_and_key_name():
    env = sign_statement(statement(), SecretKey.parse(SECRET))
    v = verify_envelope(env.render(), parse_public_keys([PUBLIC]))
    assert v.key_name == "test-key-1"
    assert v.statement == statement()
    assert v.statement["predicate"]["buildDefinition"]["buildType"] == BUILD_TYPE
    check_subject(v, PATH, NAR)  # does not raise


def test_modified_statement_fails_verification():
    env = json.loads(sign_statement(statement(), SecretKey.parse(SECRET)).render())
    st_ = json.loads(base64.b64decode(env["payload"]))
    st_["subject"][0]["digest"]["sha256"] = "11" * 32
    env["payload"] = base64.b64encode(json.dumps(st_).encode()).decode()
    with pytest.raises(ProvenanceError, match="does not verify"):
        verify_envelope(json.dumps(env), parse_public_keys([PUBLIC]))


def test_wrong_key_with_the_same_name_fails_and_untrusted_name_is_named():
    other = SecretKey.generate("test-key-1")
    env = sign_statement(statement(), other).render()
    with pytest.raises(ProvenanceError, match="does not verify"):
        verify_envelope(env, parse_public_keys([PUBLIC]))
    env2 = sign_statement(statement(), SecretKey.generate("someone-else")).render()
    with pytest.raises(ProvenanceError, match="untrusted key 'someone-else'"):
        verify_envelope(env2, parse_public_keys([PUBLIC]))


def test_subject_mismatch_and_missing_subject_are_refused():
    v = VerifiedStatement(statement(), "test-key-1")
    with pytest.raises(ProvenanceError, match="not about this content"):
        check_subject(v, PATH, Hash.of_bytes(b"other"))
    with pytest.raises(ProvenanceError, match="not a subject"):
        check_subject(v, "/pure/store/pihdd9cadryc4gkk8zsdbvpvilql139b-other", NAR)


def test_envelope_without_signatures_and_wrong_payload_type_are_refused():
    env = Envelope("application/vnd.in-toto+json", b"{}", ())
    with pytest.raises(ProvenanceError, match="no signature"):
        verify_envelope(env.render(), parse_public_keys([PUBLIC]))
    env = Envelope.sign(b"{}", SecretKey.parse(SECRET), payload_type="text/plain")
    with pytest.raises(ProvenanceError, match="payload type"):
        verify_envelope(env.render(), parse_public_keys([PUBLIC]))


def test_signed_payload_that_is_not_a_slsa_statement_is_refused():
    env = Envelope.sign(json.dumps({"_type": "x"}).encode(), SecretKey.parse(SECRET))
    with pytest.raises(ProvenanceError, match="_type"):
        verify_envelope(env.render(), parse_public_keys([PUBLIC]))


def test_json_nested_too_deeply_is_a_provenance_error():
    """An envelope (from a cache, not trusted yet) or a signed payload nested deeper than the
    JSON decoder goes was a RecursionError, not the format's error."""
    deep = b"[" * 100000 + b"]" * 100000
    with pytest.raises(ProvenanceError, match="nested too deeply"):
        Envelope.parse(deep)
    with pytest.raises(ProvenanceError, match="nested too deeply"):
        Envelope.parse(b'{"payloadType": "x", "payload": "", "signatures": ' + deep + b"}")
    env = Envelope.sign(deep, SecretKey.parse(SECRET))
    with pytest.raises(ProvenanceError, match="nested too deeply"):
        verify_envelope(env.render(), parse_public_keys([PUBLIC]))


@hsettings(max_examples=50, deadline=None)
@given(st.data())
def test_random_corruption_raises_provenance_error_only(data):
    raw = bytearray(sign_statement(statement(), SecretKey.parse(SECRET)).render())
    i = data.draw(st.integers(0, len(raw) - 1))
    b = data.draw(st.integers(0, 255))
    if raw[i] == b:
        return
    raw[i] = b
    try:
        v = verify_envelope(bytes(raw), parse_public_keys([PUBLIC]))
    except ProvenanceError:
        return
    # A change that survives verification must not have changed what was signed.
    assert v.statement == statement()
