"""Ed25519 signing keys and signatures in Nix's text formats (FORMATS.md section 5).

Formats::

    secret key file   keyname:base64(32-byte seed + 32-byte public key)
    public key        keyname:base64(32-byte public key)
    signature         keyname:base64(64-byte detached Ed25519 signature)

Signatures are plain Ed25519 (not the pre-hashed variant) over a fingerprint string; verifiers pick
the key by the signature's name.  Key names may not be empty nor contain ``:``.  Parsers are
strict: wrong lengths, bad base64 and mismatched halves of a secret key raise :class:`KeyError_`.
PyNaCl is imported only to sign, verify or derive a key: parsing public keys (every command
that loads a config with ``trusted-public-keys`` checks them) costs no import of it.
"""

from __future__ import annotations

import base64
import binascii
import functools
from typing import Iterable, Mapping

import attrs

from ..errors import KeyError_, SignatureError


def _split(text: str, what: str, size: int, *, secret: bool = False) -> tuple[str, bytes]:
    """(name, decoded bytes) of ``name:base64``; messages quote the text, except of a secret
    key (where the text may be the secret itself): only its name, when it has one."""
    if not isinstance(text, str):
        raise KeyError_(f"{what} must be text, got {type(text).__name__}")
    text = text.strip()
    if text.startswith("\ufeff"):  # str.strip() keeps it: it would be part of the key's name
        raise KeyError_(f"{what} starts with a byte-order mark (U+FEFF)",
                        hint="save the file without one (some editors add it to UTF-8 text)")
    name, sep, b64 = text.partition(":")
    shown = "" if secret else f" {_short(text)!r}"
    if not sep:
        raise KeyError_(f"{what}{shown} is not of the form 'name:base64'")
    if not name:
        raise KeyError_(f"{what}{shown} has an empty key name")
    if any(c.isspace() for c in name):
        raise KeyError_(f"{what} name {name!r} contains white space")
    if not name.isprintable():  # control characters, U+FEFF and other invisible ones
        raise KeyError_(f"{what} name {name!r} contains a character that is not printable")
    if b64[:1].isspace():  # 'name: base64', as a YAML or HTTP header line is written
        raise KeyError_(f"{what} {name!r} has white space after its ':'",
                        hint="write it as NAME:BASE64, with nothing between the ':' and the key")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        several = "," in b64 or ";" in b64 or ":" in b64 or (secret and any(c.isspace() for c in b64))
        raise KeyError_(f"{what} {name!r} has invalid base64",
                        hint=("this looks like several keys in one: give one key here (lists of keys "
                              "are separated by spaces)") if several else None) from None
    if len(raw) != size:
        swapped = {(64, 32): "32 bytes are a public key (or only the first half of a secret key): "
                             "give the whole secret key, as 'pure key generate' writes it",
                   (32, 64): "this is a secret key: give its public key ('pure key public < FILE')"}
        raise KeyError_(f"{what} {name!r} decodes to {len(raw)} bytes, expected {size}",
                        hint=swapped.get((size, len(raw))))
    return name, raw


def _short(text: str) -> str:
    return text if len(text) <= 24 else text[:20] + "…"


def _check_name(name: str) -> str:
    if not name or ":" in name or any(c.isspace() for c in name) or not name.isprintable():
        raise KeyError_(f"key name {name!r} must be non-empty, without ':', white space or characters "
                        "that are not printable (control characters, U+FEFF)")
    return name


@attrs.frozen
class PublicKey:
    """A named Ed25519 verification key."""

    name: str = attrs.field(validator=lambda _i, _a, v: _check_name(v))
    key: bytes = attrs.field(repr=False)

    def __attrs_post_init__(self):
        if len(self.key) != 32:
            raise KeyError_(f"public key {self.name!r} is {len(self.key)} bytes, expected 32")

    @classmethod
    def parse(cls, text: str) -> "PublicKey":
        """Parse ``name:base64(32 bytes)``; raise :class:`KeyError_` if malformed."""
        name, raw = _split(text, "public key", 32)
        return cls(name, raw)

    def render(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def verify(self, fingerprint: str | bytes, sig: "Signature") -> bool:
        """True if ``sig`` is this key's valid signature of ``fingerprint``."""
        if sig.name != self.name:
            return False
        data = fingerprint.encode() if isinstance(fingerprint, str) else fingerprint
        import nacl.exceptions
        import nacl.signing
        try:
            nacl.signing.VerifyKey(self.key).verify(data, sig.sig)
        except (nacl.exceptions.BadSignatureError, ValueError):
            return False
        return True

    def __str__(self) -> str:
        return self.render()


@attrs.frozen
class Signature:
    """A named detached signature."""

    name: str = attrs.field(validator=lambda _i, _a, v: _check_name(v))
    sig: bytes = attrs.field(repr=False)

    def __attrs_post_init__(self):
        if len(self.sig) != 64:
            raise KeyError_(f"signature by {self.name!r} is {len(self.sig)} bytes, expected 64")

    @classmethod
    def parse(cls, text: str) -> "Signature":
        """Parse ``name:base64(64 bytes)``; raise :class:`KeyError_` if malformed."""
        name, raw = _split(text, "signature", 64)
        return cls(name, raw)

    def render(self) -> str:
        return f"{self.name}:{base64.b64encode(self.sig).decode()}"

    def __str__(self) -> str:
        return self.render()


@attrs.frozen
class SecretKey:
    """A named Ed25519 signing key (seed and public half)."""

    name: str = attrs.field(validator=lambda _i, _a, v: _check_name(v))
    seed: bytes = attrs.field(repr=False)

    def __attrs_post_init__(self):
        if len(self.seed) != 32:
            raise KeyError_(f"secret key {self.name!r} seed is {len(self.seed)} bytes, expected 32")

    @classmethod
    def generate(cls, name: str) -> "SecretKey":
        """A fresh random key named ``name``."""
        _check_name(name)
        import nacl.signing
        return cls(name, bytes(nacl.signing.SigningKey.generate()))

    @classmethod
    def parse(cls, text: str) -> "SecretKey":
        """Parse ``name:base64(seed + public)``; the public half must match the seed."""
        name, raw = _split(text, "secret key", 64, secret=True)
        key = cls(name, raw[:32])
        if key.public_key().key != raw[32:]:
            raise KeyError_(f"secret key {name!r}: the public half does not match the seed")
        return key

    def render(self) -> str:
        return f"{self.name}:{base64.b64encode(self.seed + self.public_key().key).decode()}"

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, bytes(_signing_key(self.seed).verify_key))

    def sign(self, fingerprint: str | bytes) -> Signature:
        data = fingerprint.encode() if isinstance(fingerprint, str) else fingerprint
        return Signature(self.name, _signing_key(self.seed).sign(data).signature)


@functools.lru_cache(maxsize=16)
def _signing_key(seed: bytes) -> "nacl.signing.SigningKey":  # noqa: F821
    """The expanded key of a seed (deriving it costs about as much as a signature; a push signs
    one narinfo per path with the same key)."""
    import nacl.signing
    return nacl.signing.SigningKey(seed)


@attrs.frozen
class KeySet:
    """Several trusted keys of one name (a key being replaced by a new one under its name): a
    signature by that name is good when any of them made it."""

    name: str
    keys: tuple[PublicKey, ...]

    def verify(self, fingerprint: str | bytes, sig: "Signature") -> bool:
        return any(k.verify(fingerprint, sig) for k in self.keys)


def parse_public_keys(texts: Iterable[str]) -> dict[str, PublicKey | KeySet]:
    """Parse trusted public keys into a name → key map (what :func:`verify_any` takes).

    Every key listed is trusted: keys that share a name make a :class:`KeySet` (Nix 2.8 keeps
    the first key of a name and drops the others without a word; a key listed again once more
    is one key)."""
    out: dict[str, PublicKey | KeySet] = {}
    for t in texts:
        k = PublicKey.parse(t)
        have = out.get(k.name)
        if have is None:
            out[k.name] = k
        elif isinstance(have, KeySet):
            if k not in have.keys:
                out[k.name] = KeySet(k.name, (*have.keys, k))
        elif have != k:
            out[k.name] = KeySet(k.name, (have, k))
    return out


def verify_any(fingerprint: str, sigs: Iterable[str], trusted: Mapping[str, PublicKey | KeySet]) -> str:
    """Return the name of a trusted key with a valid signature among ``sigs``.

    Raises :class:`SignatureError` saying why none qualifies: no signature at all, only
    signatures by keys not in ``trusted`` (named), or signatures that do not verify.
    A signature that is not ``NAME:BASE64`` of 64 bytes is said as malformed, with its text.
    """
    sigs = list(sigs)
    if not sigs:
        raise SignatureError("it has no signature")
    untrusted: list[str] = []
    bad: list[str] = []
    malformed: list[str] = []
    for text in sigs:
        try:
            sig = Signature.parse(text)
        except KeyError_:
            malformed.append(text)
            continue
        key = trusted.get(sig.name)
        if key is None:
            untrusted.append(sig.name)
        elif key.verify(fingerprint, sig):
            return sig.name
        else:
            bad.append(sig.name)
    parts = []
    if bad:
        parts.append(f"invalid signature by {', '.join(repr(n) for n in bad)}")
    if malformed:
        shown = ", ".join(repr(t[:40]) + ("..." if len(t) > 40 else "") for t in malformed)
        parts.append(f"malformed signature{'s' if len(malformed) > 1 else ''} {shown} "
                     "(expected NAME:BASE64 of 64 bytes)")
    if untrusted:
        which = (f"the trusted ones are {', '.join(repr(n) for n in sorted(trusted))}" if trusted
                 else "no key is trusted")
        parts.append(f"signed only by untrusted key{'s' if len(untrusted) > 1 else ''} "
                     f"{', '.join(repr(n) for n in untrusted)} ({which})")
    raise SignatureError("; ".join(parts))
