"""Hashes and their encodings (FORMATS.md section 1).

Encodings: base16 (lowercase hex), nix32 (Nix's own base 32), base64, SRI (``sha256-<base64>``)
and the typed form ``algo:<base16|nix32|base64>``.  ``fold20`` XOR-folds a digest to 20 bytes for
store path hashes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

import attrs

from ..errors import BadHash

ALGOS: dict[str, int] = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}

NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_NIX32_INDEX = {c: i for i, c in enumerate(NIX32_ALPHABET)}


def nix32_len(nbytes: int) -> int:
    """Length of the nix32 encoding of ``nbytes`` bytes."""
    return (8 * nbytes - 1) // 5 + 1


# two digits at a time (10 bits): half the big-integer shifts of one digit at a time
_NIX32_PAIRS = [a + b for a in NIX32_ALPHABET for b in NIX32_ALPHABET]


class _NotNix32(dict):
    def __missing__(self, _key: int) -> str:
        return "x"  # (a character outside the alphabet: no digit of base 32, int() refuses it)


_NIX32_AS_BASE32 = _NotNix32({ord(c): "0123456789abcdefghijklmnopqrstuv"[i] for i, c in enumerate(NIX32_ALPHABET)})


def nix32_encode(data: bytes) -> str:
    """Encode bytes in nix32: the digest read as a little-endian integer, most significant digit first."""
    n = int.from_bytes(data, "little")
    length = nix32_len(len(data))
    out = []
    if length & 1:
        out.append(NIX32_ALPHABET[(n >> (5 * (length - 1))) & 31])
    pairs = _NIX32_PAIRS
    for k in range((length & ~1) - 2, -1, -2):
        out.append(pairs[(n >> (5 * k)) & 1023])
    return "".join(out)


def nix32_decode(text: str, nbytes: int | None = None) -> bytes:
    """Decode nix32 text; ``nbytes`` defaults to the largest size whose encoding has this length.

    Raises :class:`BadHash` on a character outside the alphabet or non-zero unused high bits.
    """
    if nbytes is None:
        nbytes = (len(text) * 5) // 8
    if len(text) != nix32_len(nbytes):
        raise BadHash(f"nix32 string {text!r} has length {len(text)}, expected {nix32_len(nbytes)}")
    try:  # (the digits as those of int()'s base 32, read in one go: no Python loop)
        n = int(text.translate(_NIX32_AS_BASE32), 32) if text else 0
    except ValueError:
        c = next(c for c in text if c not in _NIX32_INDEX)
        raise BadHash(f"invalid character {c!r} in nix32 string {text!r}") from None
    if n >> (8 * nbytes):
        raise BadHash(f"nix32 string {text!r} has non-zero padding bits")
    return n.to_bytes(nbytes, "little")


def fold20(digest: bytes, size: int = 20) -> bytes:
    """XOR-fold a digest to ``size`` bytes: ``out[i % size] ^= digest[i]`` (not a truncation)."""
    out = bytearray(size)
    for i, b in enumerate(digest):
        out[i % size] ^= b
    return bytes(out)


def _check_algo(algo: str) -> str:
    if algo not in ALGOS:
        raise BadHash(f"unknown hash algorithm {algo!r}, expected one of {', '.join(ALGOS)}")
    return algo


@attrs.frozen
class Hash:
    """A digest with its algorithm."""

    algo: str = attrs.field(validator=lambda _i, _a, v: _check_algo(v))
    digest: bytes = attrs.field(repr=lambda d: d.hex())

    def __attrs_post_init__(self):
        if len(self.digest) != ALGOS[self.algo]:
            raise BadHash(
                f"{self.algo} digest must be {ALGOS[self.algo]} bytes, got {len(self.digest)}"
            )

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def of_bytes(cls, data: bytes, algo: str = "sha256") -> "Hash":
        """Hash ``data`` with ``algo``."""
        return cls(algo, hashlib.new(_check_algo(algo), data).digest())

    @classmethod
    def parse(cls, text: str, algo: str | None = None) -> "Hash":
        """Parse any of the encodings.

        Accepts SRI (``sha256-<base64>``), typed (``sha256:<base16|nix32|base64>``) and, when
        ``algo`` is given, a bare base16, nix32 or base64 digest.  The encoding of a bare or typed
        digest is told apart by its length.  Raises :class:`BadHash` when nothing fits.
        """
        if not isinstance(text, str):
            raise BadHash(f"expected a hash string, got {type(text).__name__}")
        given_algo = algo
        body = text
        sri = False
        if ":" in text:
            prefix, body = text.split(":", 1)
            if prefix not in ALGOS:
                raise BadHash(f"hash {text!r} is of unknown algorithm {prefix!r}, expected one of {', '.join(ALGOS)}")
            algo = prefix
        elif "-" in text and text.split("-", 1)[0] in ALGOS:
            prefix, body = text.split("-", 1)
            algo = prefix
            sri = True
        elif re.fullmatch(r"[a-z][a-z0-9]*-.+", text):  # SRI of another algorithm ('-' is in no digest)
            raise BadHash(f"hash {text!r} is of unknown algorithm {text.split('-', 1)[0]!r}, expected one "
                          f"of {', '.join(ALGOS)}")
        if algo is None:
            raise BadHash(f"hash {text!r} does not say its algorithm (use 'sha256:…' or SRI 'sha256-…')")
        if given_algo is not None and given_algo != algo:
            raise BadHash(f"hash {text!r} is {algo}, expected {given_algo}")
        size = ALGOS[algo]
        if sri:
            return cls(algo, _b64decode(body, size, text))
        if len(body) == 2 * size:
            try:
                if body != body.lower():
                    raise ValueError
                return cls(algo, bytes.fromhex(body))
            except ValueError:
                raise BadHash(f"invalid base16 in hash {text!r}") from None
        if len(body) == nix32_len(size):
            try:
                return cls(algo, nix32_decode(body, size))
            except BadHash as e:
                raise BadHash(f"invalid nix32 in hash {text!r}: {e}") from None
        if len(body) == 4 * ((size + 2) // 3):
            return cls(algo, _b64decode(body, size, text))
        raise BadHash(
            f"hash {text!r} has the wrong length for {algo}: expected {2 * size} (base16), "
            f"{nix32_len(size)} (nix32) or {4 * ((size + 2) // 3)} (base64) characters"
        )

    # -- encodings ----------------------------------------------------------------------------

    @property
    def base16(self) -> str:
        return self.digest.hex()

    @property
    def nix32(self) -> str:
        return nix32_encode(self.digest)

    @property
    def base64(self) -> str:
        return base64.b64encode(self.digest).decode()

    @property
    def sri(self) -> str:
        return f"{self.algo}-{self.base64}"

    def typed(self, encoding: str = "nix32") -> str:
        """``algo:<encoding>``; encoding is base16, nix32 or base64."""
        return f"{self.algo}:{self.encode(encoding)}"

    def encode(self, encoding: str) -> str:
        """The digest in ``encoding``: base16, nix32 (alias base32), base64 or sri."""
        if encoding == "base16":
            return self.base16
        if encoding in ("nix32", "base32"):
            return self.nix32
        if encoding == "base64":
            return self.base64
        if encoding == "sri":
            return self.sri
        raise BadHash(f"unknown hash encoding {encoding!r}, expected base16, nix32, base64 or sri")

    def __str__(self) -> str:
        return self.sri


def _b64decode(body: str, size: int, text: str) -> bytes:
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise BadHash(f"invalid base64 in hash {text!r}") from None
    if len(raw) != size or base64.b64encode(raw).decode() != body:
        raise BadHash(f"base64 in hash {text!r} decodes to {len(raw)} bytes, expected {size}")
    return raw


class HashSink:
    """A writable sink that hashes what is written to it and counts the bytes."""

    __slots__ = ("_h", "algo", "size")

    def __init__(self, algo: str = "sha256"):
        self.algo = _check_algo(algo)
        self._h = hashlib.new(algo)
        self.size = 0

    def write(self, data) -> int:
        self._h.update(data)
        n = len(data)
        self.size += n
        return n

    def finish(self) -> Hash:
        return Hash(self.algo, self._h.digest())
