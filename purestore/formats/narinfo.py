"""narinfo files of binary caches and the signature fingerprint (FORMATS.md section 5).

A narinfo is one ``Key: value`` line per field, rendered in this order (as Nix does)::

    StorePath: /nix/store/<hash>-<name>
    URL: nar/<nix32 file hash>.nar.zst
    Compression: zstd
    FileHash: sha256:<nix32>
    FileSize: <bytes>
    NarHash: sha256:<nix32>
    NarSize: <bytes>
    References: <sorted base names, space-separated; may be empty>
    Deriver: <base name>            (only if known)
    Sig: <keyname:base64>           (one line each, sorted)
    CA: <content address>           (content-addressed paths only)

Parsing is strict where it matters for trust (every known field is validated; duplicated fields,
missing mandatory fields, non-canonical numbers and paths outside the store dir are errors, naming
the line) and lenient only where Nix is (unknown keys are ignored; ``Compression`` defaults to
``bzip2``).  The signature covers :func:`fingerprint`: store path, NAR hash, NAR size and
references; URL, compression and file hash are not signed and must be checked against the data.
"""

from __future__ import annotations

import re
from typing import Iterable

import attrs

from ..errors import BadHash, InvalidStorePath, NarInfoError
from .hash import Hash
from .path_info import PathInfo
from .store_path import StorePath

# method → the NAR file's extension, as Nix names them (gzip NARs are plain ``.nar``)
COMPRESSIONS = {"none": "", "zstd": ".zst", "xz": ".xz", "bzip2": ".bz2", "br": ".br", "gzip": "",
                "lz4": ".lz4", "lzip": ".lzip"}
_INT_RE = re.compile(r"(0|[1-9][0-9]{0,18})\Z")
_MAX_SIZE = 1 << 62


def fingerprint(store_dir: str, path: StorePath, nar_hash: Hash, nar_size: int,
                references: Iterable[StorePath]) -> str:
    """What a path signature signs: ``1;<path>;sha256:<nix32>;<size>;<sorted full refs, comma-joined>``."""
    if nar_hash.algo != "sha256":
        raise NarInfoError(f"signing {path}: NAR hash must be sha256, got {nar_hash.algo}")
    refs = ",".join(sorted(r.absolute(store_dir) for r in references))
    return f"1;{path.absolute(store_dir)};{nar_hash.typed('nix32')};{nar_size};{refs}"


def _sorted_refs(refs: Iterable[StorePath]) -> tuple[StorePath, ...]:
    return tuple(sorted(set(refs), key=lambda p: p.base_name))


@attrs.frozen
class NarInfo:
    """The parsed content of a ``<hashpart>.narinfo`` file (store dir given when rendered)."""

    store_path: StorePath
    url: str
    nar_hash: Hash
    nar_size: int
    compression: str = "none"
    file_hash: Hash | None = None
    file_size: int | None = None
    references: tuple[StorePath, ...] = attrs.field(default=(), converter=_sorted_refs)
    deriver: StorePath | None = None
    sigs: tuple[str, ...] = attrs.field(default=(), converter=lambda s: tuple(sorted(set(s))))
    ca: str | None = None

    def fingerprint(self, store_dir: str) -> str:
        return fingerprint(store_dir, self.store_path, self.nar_hash, self.nar_size, self.references)

    def render(self, store_dir: str) -> str:
        """The narinfo text, byte for byte as Nix writes it."""
        lines = [
            f"StorePath: {self.store_path.absolute(store_dir)}",
            f"URL: {self.url}",
            f"Compression: {self.compression}",
        ]
        if self.file_hash is not None:
            lines.append(f"FileHash: {self.file_hash.typed('nix32')}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines.append(f"NarHash: {self.nar_hash.typed('nix32')}")
        lines.append(f"NarSize: {self.nar_size}")
        lines.append("References: " + " ".join(r.base_name for r in self.references))
        if self.deriver is not None:
            lines.append(f"Deriver: {self.deriver.base_name}")
        lines.extend(f"Sig: {s}" for s in self.sigs)
        if self.ca:
            lines.append(f"CA: {self.ca}")
        return "\n".join(lines) + "\n"

    def with_sigs(self, sigs: Iterable[str]) -> "NarInfo":
        return attrs.evolve(self, sigs=tuple(self.sigs) + tuple(sigs))

    def path_info(self) -> PathInfo:
        """What a store registers for this path (no registration time yet)."""
        return PathInfo(path=self.store_path, nar_hash=self.nar_hash, nar_size=self.nar_size,
                        references=self.references, deriver=self.deriver, sigs=self.sigs, ca=self.ca)

    @classmethod
    def parse(cls, text: str | bytes, store_dir: str, where: str = "narinfo") -> "NarInfo":
        """Parse narinfo text; raise :class:`NarInfoError` naming ``where`` and the line."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise NarInfoError(f"{where}: not UTF-8 text (byte {e.start})") from None
        if text and not text.endswith("\n"):
            raise NarInfoError(f"{where}: last line is not terminated by a newline")
        fields: dict[str, object] = {}
        sigs: list[str] = []
        for lineno, line in enumerate(text.split("\n")[:-1], 1):
            loc = f"{where}:{lineno}"
            key, sep, value = line.partition(": ")
            if not sep:
                if line.endswith(":") and ":" not in line[:-1]:
                    key, value = line[:-1], ""  # 'References:' with nothing after it
                else:
                    raise NarInfoError(f"{loc}: expected 'Key: value', got {line[:60]!r}")
            if key == "Sig":
                sigs.append(value)
                continue
            if key not in _FIELDS:
                continue  # unknown keys (System, ...) are ignored, as Nix does
            if key in fields:
                raise NarInfoError(f"{loc}: duplicate field {key!r}")
            try:
                fields[key] = _FIELDS[key](value, store_dir)
            except (BadHash, InvalidStorePath, ValueError) as e:
                raise NarInfoError(f"{loc}: bad {key} {value[:80]!r}: {e}") from None
        for key in ("StorePath", "URL", "NarHash", "NarSize"):
            if key not in fields:
                raise NarInfoError(f"{where}: missing field {key!r}")
        if fields["NarSize"] == 0:
            raise NarInfoError(f"{where}: NarSize is 0")
        if "FileHash" in fields and fields["FileHash"].algo != "sha256":  # type: ignore[union-attr]
            raise NarInfoError(f"{where}: FileHash must be sha256")
        return cls(
            store_path=fields["StorePath"], url=fields["URL"], nar_hash=fields["NarHash"],
            nar_size=fields["NarSize"], compression=fields.get("Compression", "bzip2"),
            file_hash=fields.get("FileHash"), file_size=fields.get("FileSize"),
            references=fields.get("References", ()), deriver=fields.get("Deriver"),
            sigs=sigs, ca=fields.get("CA"),
        )  # type: ignore[arg-type]


def _int(value: str, _sd: str) -> int:
    if not _INT_RE.match(value) or int(value) > _MAX_SIZE:
        raise ValueError("expected a non-negative decimal integer")
    return int(value)


def _sha256(value: str, _sd: str) -> Hash:
    h = Hash.parse(value)
    if h.algo != "sha256":
        raise ValueError(f"expected a sha256 hash, got {h.algo}")
    return h


def narinfo_fields(text: bytes) -> list[tuple[bytes, bytes]] | None:
    """The ``Key: value`` lines of a narinfo, read leniently (any key, any value: what a cache
    server stores is whatever Nix writes, compressions pure does not read included); None when
    ``text`` is not lines of that form."""
    if not text.endswith(b"\n"):
        return None
    out = []
    for line in text[:-1].split(b"\n"):
        k, sep, v = line.partition(b": ")
        if not sep or not k:
            return None
        out.append((k, v))
    return out


MAX_SIZE = 16 << 20  # bytes of a narinfo read or stored at most (200,000 references would fit)

_SAME_CONTENTS = (b"StorePath", b"NarHash", b"NarSize", b"References")


def first_fields(fields: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Each key's first value (what a reader takes)."""
    first: dict[bytes, bytes] = {}
    for k, v in fields:
        first.setdefault(k, v)
    return first


def _contents(fields: list[tuple[bytes, bytes]]):
    first = first_fields(fields)
    got: dict[bytes, object] = {k: first.get(k) for k in _SAME_CONTENTS}
    got[b"References"] = tuple(sorted((first.get(b"References") or b"").split()))
    return got if got[b"StorePath"] is not None and got[b"NarHash"] is not None else None


def same_contents(a: list[tuple[bytes, bytes]] | None, b: list[tuple[bytes, bytes]] | None) -> bool:
    """Two narinfos (:func:`narinfo_fields`) describe the same path with the same contents: path,
    NAR hash and size, references (as text: Nix writes them one way)."""
    if a is None or b is None:
        return False
    ca = _contents(a)
    return ca is not None and ca == _contents(b)


def merge_sigs(new: bytes, old: bytes | None) -> bytes:
    """The narinfo ``new`` that is to replace ``old``, with ``old``'s well-formed signatures
    added when both describe the same contents (:func:`same_contents`): two writers of one path
    at once (pushes with different keys, ``cache sign``) then keep each other's signatures.
    Otherwise (other contents, nothing to add, or either is no narinfo) ``new`` as it is.  The
    text of ``new`` is kept but for its ``Sig`` lines, which stay where they were, sorted as Nix
    writes them (before ``CA``, else at the end, when it had none).  Garbage signatures are not
    carried on (nor are signatures ever removed this way: a replaced narinfo's go on)."""
    from .signing import Signature

    if not old:
        return new
    a, b = narinfo_fields(new), narinfo_fields(old)
    if not same_contents(a, b):
        return new
    have = {v for k, v in a if k == b"Sig"}
    add = set()
    for k, v in b:
        if k == b"Sig" and v not in have:
            try:
                Signature.parse(v.decode())
            except (ValueError, UnicodeDecodeError):  # (KeyError_ is a ValueError)
                continue  # garbage is not carried on
            add.add(v)
    if not add:
        return new
    sigs = [(b"Sig", v) for v in sorted(have | add)]
    rest = [(k, v) for k, v in a if k != b"Sig"]
    at = next((i for i, (k, _v) in enumerate(a) if k == b"Sig"), None)
    if at is None:
        at = next((i for i, (k, _v) in enumerate(rest) if k == b"CA"), len(rest))
    else:
        at = sum(1 for k, _v in a[:at] if k != b"Sig")
    out = rest[:at] + sigs + rest[at:]
    return b"".join(k + b": " + v + b"\n" for k, v in out)


def _url(value: str, _sd: str) -> str:
    if not value:
        raise ValueError("URL is empty")
    # (the usual URL, printable ASCII without a space, needs no scan character by character:
    # that scan was a quarter of a narinfo's parse)
    if not (value.isascii() and value.isprintable() and " " not in value) and \
            any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError("URL contains white space or control characters")
    return value


def _refs(value: str, _sd: str) -> tuple[StorePath, ...]:
    # as Nix reads them: words between spaces (several spaces are one), a set (a repeated one
    # counts once; the signed fingerprint is made from the set either way)
    refs = [StorePath.from_base_name(n) for n in value.split(" ") if n]
    return tuple(dict.fromkeys(refs))


def _deriver(value: str, _sd: str) -> StorePath | None:
    if value == "unknown-deriver":
        return None
    p = StorePath.from_base_name(value)
    if not p.name.endswith(".drv"):
        raise ValueError("deriver must be a .drv path")
    return p


def _compression(value: str, _sd: str) -> str:
    if value not in COMPRESSIONS:
        raise ValueError(f"unknown compression, expected one of {', '.join(COMPRESSIONS)}")
    return value


def _ca(value: str, _sd: str) -> str:
    if not (value.startswith("fixed:") or value.startswith("text:")):
        raise ValueError("expected 'fixed:…' or 'text:…'")
    return value


_FIELDS = {
    "StorePath": lambda v, sd: StorePath.parse(v, sd),
    "URL": _url,
    "Compression": _compression,
    "FileHash": _sha256,
    "FileSize": _int,
    "NarHash": _sha256,
    "NarSize": _int,
    "References": _refs,
    "Deriver": _deriver,
    "CA": _ca,
}
