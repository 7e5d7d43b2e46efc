"""Signed build provenance: in-toto Statement v1, SLSA Provenance v1, DSSE envelopes.

Pure functions over bytes and JSON values; no I/O.  The layers::

    DSSE envelope   {"payloadType": "application/vnd.in-toto+json",
                     "payload": base64(statement JSON),
                     "signatures": [{"keyid": KEYNAME, "sig": base64(ed25519 signature)}]}
    signed bytes    PAE = "DSSEv1" SP len(type) SP type SP len(payload) SP payload
                    (lengths in ASCII decimal, of the UTF-8 type and of the raw payload bytes)
    statement       {"_type": "https://in-toto.io/Statement/v1",
                     "subject": [{"name": STORE PATH, "digest": {"sha256": hex(NAR sha256)}}],
                     "predicateType": "https://slsa.dev/provenance/v1",
                     "predicate": {"buildDefinition": {...}, "runDetails": {...}}}

The subject digest is the sha256 of the output's NAR serialisation (the store's NarHash, the
same digest ``pure hash path`` prints), so it can be checked against a store or a narinfo.  Keys
are the Ed25519 keys of the binary caches (``name:base64``, :mod:`purestore.formats.signing`); the
DSSE ``keyid`` is the key name.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Iterable, Mapping

import attrs

from ..errors import ProvenanceError
from .hash import Hash
from .signing import PublicKey, SecretKey, Signature

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
#: purestore's own SLSA build type: "an output of a derivation realised by purestore".  A URN,
#: since purestore owns no web domain; SLSA only asks for a URI.  Its parameters are documented
#: in docs/evidence.md.
BUILD_TYPE = "urn:purestore:build-type:derivation:v1"
BUILDER_ID_PREFIX = "urn:purestore:builder:"
#: file name of a path's provenance next to its narinfo in a binary cache and in the state dir.
FILE_SUFFIX = ".provenance"
#: directory (relative to the state dir) where a local store keeps provenance of its paths.
STATE_SUBDIR = "provenance"


def provenance_file_name(hash_part: str) -> str:
    """``<hashpart>.provenance``: the name of a path's provenance in a cache or the state dir."""
    return hash_part + FILE_SUFFIX


# -- DSSE ------------------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: the bytes that are actually signed."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@attrs.frozen
class Envelope:
    """A DSSE envelope: a typed payload and the signatures over its PAE."""

    payload_type: str
    payload: bytes = attrs.field(repr=False)
    signatures: tuple[Signature, ...] = ()

    @classmethod
    def sign(cls, payload: bytes, key: SecretKey, payload_type: str = PAYLOAD_TYPE) -> "Envelope":
        return cls(payload_type, payload, (key.sign(pae(payload_type, payload)),))

    def render(self) -> bytes:
        """The envelope as compact JSON bytes with a final newline."""
        obj = {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode(),
            "signatures": [
                {"keyid": s.name, "sig": base64.b64encode(s.sig).decode()} for s in self.signatures
            ],
        }
        return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes | str, where: str = "provenance") -> "Envelope":
        """Parse a DSSE envelope strictly; raise :class:`ProvenanceError` naming what is wrong."""
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ProvenanceError(f"{where}: not a DSSE envelope: invalid JSON ({e})") from e
        except RecursionError:  # (JSON nested deeper than the decoder goes: no envelope is)
            raise ProvenanceError(f"{where}: not a DSSE envelope: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise ProvenanceError(f"{where}: expected a JSON object (DSSE envelope), got {type(obj).__name__}")
        for k in ("payloadType", "payload", "signatures"):
            if k not in obj:
                raise ProvenanceError(f"{where}: DSSE envelope has no {k!r} field")
        ptype, payload, sigs = obj["payloadType"], obj["payload"], obj["signatures"]
        if not isinstance(ptype, str):
            raise ProvenanceError(f"{where}: 'payloadType' must be a string")
        if not isinstance(payload, str):
            raise ProvenanceError(f"{where}: 'payload' must be a base64 string")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ProvenanceError(f"{where}: 'payload' is not valid base64") from e
        if not isinstance(sigs, list):
            raise ProvenanceError(f"{where}: 'signatures' must be a list")
        out = []
        for i, s in enumerate(sigs):
            if not isinstance(s, dict) or not isinstance(s.get("sig"), str) or not isinstance(s.get("keyid"), str):
                raise ProvenanceError(f"{where}: signature {i} must be an object with string 'keyid' and 'sig'")
            try:
                sig = base64.b64decode(s["sig"], validate=True)
                out.append(Signature(s["keyid"], sig))
            except (binascii.Error, ValueError) as e:
                raise ProvenanceError(
                    f"{where}: signature {i} by {s['keyid']!r} is malformed: {e}") from e
        return cls(ptype, raw, tuple(out))

    def verify(self, trusted: Mapping[str, PublicKey], where: str = "provenance") -> str:
        """Return the name of a trusted key whose signature over the PAE verifies.

        Raises :class:`ProvenanceError` when there is no signature, when all signatures are by
        keys not in ``trusted`` (named in the message) or when none verifies (the statement or
        the signature was modified, or it was made with another key of the same name).
        """
        if not self.signatures:
            raise ProvenanceError(f"{where}: the envelope has no signature")
        msg = pae(self.payload_type, self.payload)
        untrusted, bad = [], []
        for sig in self.signatures:
            key = trusted.get(sig.name)
            if key is None:
                untrusted.append(sig.name)
            elif key.verify(msg, sig):
                return sig.name
            else:
                bad.append(sig.name)
        parts = []
        if bad:
            parts.append(f"the signature by {', '.join(map(repr, bad))} does not verify "
                         "(the statement or signature was modified, or another key was used)")
        if untrusted:
            parts.append(f"signed only by untrusted key{'s' if len(untrusted) > 1 else ''} "
                         f"{', '.join(map(repr, untrusted))}")
        raise ProvenanceError(f"{where}: " + "; ".join(parts),
                              hint="pass the signer's public key with --trusted-key" if untrusted and not bad else None)


# -- in-toto statement with a SLSA provenance predicate ---------------------------------------


@attrs.frozen
class Subject:
    """A statement subject: a store path and the sha256 of its NAR."""

    name: str
    nar_hash: Hash

    def to_json(self) -> dict:
        return {"name": self.name, "digest": {"sha256": self.nar_hash.base16}}


def resource(name: str, nar_hash: Hash | None = None, uri: str | None = None,
             annotations: Mapping[str, Any] | None = None, **extra_digests: str) -> dict:
    """An in-toto ResourceDescriptor for a store object (``digest.sha256`` = its NAR hash)."""
    r: dict[str, Any] = {"name": name}
    digest = {}
    if nar_hash is not None:
        digest[nar_hash.algo] = nar_hash.base16
    digest.update(extra_digests)
    if digest:
        r["digest"] = digest
    if uri is not None:
        r["uri"] = uri
    if annotations:
        r["annotations"] = dict(annotations)
    return r


def make_statement(
    subjects: Iterable[Subject],
    *,
    external_parameters: Mapping[str, Any],
    internal_parameters: Mapping[str, Any] | None = None,
    resolved_dependencies: Iterable[Mapping[str, Any]] = (),
    builder_id: str,
    builder_version: Mapping[str, str] | None = None,
    invocation_id: str | None = None,
    started_on: str | None = None,
    finished_on: str | None = None,
    byproducts: Iterable[Mapping[str, Any]] = (),
) -> dict:
    """Build the in-toto Statement v1 (a JSON value) with a SLSA Provenance v1 predicate.

    Times are RFC 3339 strings (``2026-01-01T00:00:00Z``); fields left ``None`` are omitted.
    """
    subjects = [s.to_json() for s in subjects]
    if not subjects:
        raise ProvenanceError("a provenance statement needs at least one subject")
    build_def: dict[str, Any] = {
        "buildType": BUILD_TYPE,
        "externalParameters": dict(external_parameters),
    }
    if internal_parameters:
        build_def["internalParameters"] = dict(internal_parameters)
    deps = [dict(d) for d in resolved_dependencies]
    if deps:
        build_def["resolvedDependencies"] = deps
    builder: dict[str, Any] = {"id": builder_id}
    if builder_version:
        builder["version"] = dict(builder_version)
    metadata = {k: v for k, v in (("invocationId", invocation_id), ("startedOn", started_on),
                                  ("finishedOn", finished_on)) if v is not None}
    run: dict[str, Any] = {"builder": builder}
    if metadata:
        run["metadata"] = metadata
    bp = [dict(b) for b in byproducts]
    if bp:
        run["byproducts"] = bp
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": SLSA_PROVENANCE_V1,
        "predicate": {"buildDefinition": build_def, "runDetails": run},
    }


def render_statement(statement: Mapping[str, Any]) -> bytes:
    """Canonical-ish JSON bytes of a statement (sorted keys, compact): the DSSE payload."""
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


def sign_statement(statement: Mapping[str, Any], key: SecretKey) -> Envelope:
    """Wrap a statement in a DSSE envelope signed by ``key``."""
    check_statement(statement)
    return Envelope.sign(render_statement(statement), key)


def check_statement(statement: Any, where: str = "provenance") -> dict:
    """Check the shape of an in-toto v1 statement with a SLSA v1 predicate; return it."""
    if not isinstance(statement, dict):
        raise ProvenanceError(f"{where}: the statement must be a JSON object")
    if statement.get("_type") != STATEMENT_TYPE:
        raise ProvenanceError(
            f"{where}: statement '_type' is {statement.get('_type')!r}, expected {STATEMENT_TYPE!r}")
    if statement.get("predicateType") != SLSA_PROVENANCE_V1:
        raise ProvenanceError(
            f"{where}: 'predicateType' is {statement.get('predicateType')!r}, expected {SLSA_PROVENANCE_V1!r}")
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise ProvenanceError(f"{where}: the statement has no subject")
    for i, s in enumerate(subjects):
        if (not isinstance(s, dict) or not isinstance(s.get("name"), str)
                or not isinstance(s.get("digest"), dict)):
            raise ProvenanceError(f"{where}: subject {i} must have a string 'name' and a 'digest' object")
    pred = statement.get("predicate")
    if not isinstance(pred, dict) or not isinstance(pred.get("buildDefinition"), dict) \
            or not isinstance(pred.get("runDetails"), dict):
        raise ProvenanceError(f"{where}: the SLSA predicate needs 'buildDefinition' and 'runDetails'")
    bd = pred["buildDefinition"]
    if not isinstance(bd.get("buildType"), str) or not isinstance(bd.get("externalParameters"), dict):
        raise ProvenanceError(f"{where}: 'buildDefinition' needs 'buildType' and 'externalParameters'")
    rd = pred["runDetails"]
    if not isinstance(rd.get("builder"), dict) or not isinstance(rd["builder"].get("id"), str):
        raise ProvenanceError(f"{where}: 'runDetails' needs a 'builder' with an 'id'")
    return statement


@attrs.frozen
class VerifiedStatement:
    """What :func:`verify_envelope` returns: the statement and the key that signed it."""

    statement: dict
    key_name: str

    def subject_digests(self) -> dict[str, Hash]:
        """Subject name → its sha256 digest (subjects without a well-formed sha256 are left out)."""
        out = {}
        for s in self.statement["subject"]:
            h = _sha256_of(s)
            if h is not None:
                out[s["name"]] = h
        return out

    def subject_names(self) -> list[str]:
        """The names of every subject, in the statement's order, each once."""
        return list(dict.fromkeys(s["name"] for s in self.statement["subject"]))


def _sha256_of(subject: dict) -> Hash | None:
    """A subject's ``digest.sha256`` (64 hex digits), or None when it has none or it is malformed."""
    hexd = subject["digest"].get("sha256")
    if not isinstance(hexd, str) or len(hexd) != 64:
        return None
    try:
        return Hash("sha256", bytes.fromhex(hexd))
    except ValueError:
        return None


def verify_envelope(data: bytes | str, trusted: Mapping[str, PublicKey],
                    where: str = "provenance") -> VerifiedStatement:
    """Parse a DSSE envelope, check a trusted signature, then parse and check its statement.

    Raises :class:`ProvenanceError` for a malformed envelope, a wrong payload type, a missing,
    untrusted or invalid signature, or a statement that is not in-toto v1 + SLSA v1.
    """
    env = Envelope.parse(data, where)
    if env.payload_type != PAYLOAD_TYPE:
        raise ProvenanceError(
            f"{where}: payload type is {env.payload_type!r}, expected {PAYLOAD_TYPE!r}")
    key_name = env.verify(trusted, where)
    try:
        statement = json.loads(env.payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProvenanceError(f"{where}: the signed payload is not JSON") from e
    except RecursionError:
        raise ProvenanceError(f"{where}: the signed payload is JSON nested too deeply for a statement") from None
    return VerifiedStatement(check_statement(statement, where), key_name)


def check_subject(verified: VerifiedStatement, path: str, nar_hash: Hash,
                  where: str = "provenance") -> None:
    """Raise :class:`ProvenanceError` unless ``path`` is a subject with digest ``nar_hash``.

    Every subject entry naming ``path`` must have a well-formed sha256 digest equal to it.
    """
    entries = [s for s in verified.statement["subject"] if s["name"] == path]
    if not entries:
        names = ", ".join(repr(n) for n in verified.subject_names()) or "none"
        raise ProvenanceError(f"{where}: {path!r} is not a subject of the statement (subjects: {names})")
    if nar_hash.algo != "sha256":
        raise ProvenanceError(f"{where}: cannot compare a {nar_hash.algo} NAR hash with a sha256 subject")
    for s in entries:
        got = _sha256_of(s)
        if got is None:
            raise ProvenanceError(
                f"{where}: subject {path!r} has no sha256 digest of 64 hex digits to check "
                f"(its digest: {json.dumps(s['digest'])[:200]})")
        if got.digest != nar_hash.digest:
            raise ProvenanceError(
                f"{where}: subject {path!r} has digest sha256:{got.base16} but the store's NAR hash is "
                f"sha256:{nar_hash.base16}: the statement is not about this content")


def verify_for_path(data: bytes | str, trusted: Mapping[str, PublicKey], path: str, nar_hash: Hash,
                    where: str = "provenance") -> VerifiedStatement:
    """What a substituter checks before accepting ``path``: the envelope carries a valid
    signature by a trusted key, and ``path`` is a subject whose digest is ``nar_hash`` (the
    narinfo's NarHash).  Raises :class:`ProvenanceError` otherwise."""
    v = verify_envelope(data, trusted, where)
    check_subject(v, path, nar_hash, where)
    return v
