"""Store paths and the four ways to compute one (FORMATS.md section 2).

A store path is ``<store_dir>/<hash32>-<name>``.  The path hash is the nix32 of the 20-byte fold
of ``sha256(fingerprint)`` where::

    fingerprint = TYPE ":sha256:" hex(INNER) ":" store_dir ":" name
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import Iterable

import attrs

from ..errors import BadHash, InvalidStorePath
from .hash import Hash, fold20, nix32_encode, NIX32_ALPHABET

DEFAULT_STORE_DIR = "/pure/store"
HASH_LEN = 32
NAME_MAX = 211
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+\Z")
_HASH_RE = re.compile(f"[{NIX32_ALPHABET}]{{32}}\\Z")


def check_name(name: str) -> str:
    """Validate a store path name; raise :class:`InvalidStorePath` saying what is wrong."""
    if not isinstance(name, str):
        raise InvalidStorePath(f"store path name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidStorePath("store path name is empty")
    if len(name) > NAME_MAX:
        raise InvalidStorePath(f"store path name {name[:40]!r}… is {len(name)} characters, at most {NAME_MAX} allowed")
    if not _NAME_RE.match(name):
        bad = next(c for c in name if not _NAME_RE.match(c))
        raise InvalidStorePath(
            f"store path name {name!r} contains {bad!r}; allowed are letters, digits and +-._?="
        )
    if name in (".", "..") or name.startswith(".-") or name.startswith("..-"):
        raise InvalidStorePath(f"store path name {name!r} is not allowed")
    return name


def check_store_dir(store_dir: str) -> str:
    if not store_dir.startswith("/") or store_dir != "/" and store_dir.endswith("/") or "//" in store_dir:
        raise InvalidStorePath(f"store dir {store_dir!r} must be an absolute path without a trailing '/'")
    if any(part in (".", "..") for part in store_dir.split("/")):
        # part of every hash, and its files are found through it: '/nix/store/../x' is not
        # Nix's store and its files would land in /nix/x
        raise InvalidStorePath(f"store dir {store_dir!r} must not have '.' or '..' components "
                               f"(write it as {posixpath.normpath(store_dir)!r})")
    try:
        store_dir.encode()
    except UnicodeEncodeError:  # (bytes of the command line or environment that are not UTF-8)
        raise InvalidStorePath(f"store dir {store_dir!r} must be UTF-8 text (it is hashed into every store "
                               "path as UTF-8); it has bytes that are not") from None
    return store_dir


@attrs.frozen
class StorePath:
    """A store path: hash part and name, relative to a store dir given when printed.  Ordered
    by hash part, then name."""

    hash_part: str
    name: str

    # (written out: the methods of attrs' ``order=True`` build a tuple of each side through a
    # generator for every comparison, and sorting 200 paths took 2 ms)
    def __lt__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.hash_part, self.name) < (other.hash_part, other.name)

    def __le__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.hash_part, self.name) <= (other.hash_part, other.name)

    def __gt__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.hash_part, self.name) > (other.hash_part, other.name)

    def __ge__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.hash_part, self.name) >= (other.hash_part, other.name)

    def __attrs_post_init__(self):
        if not _HASH_RE.match(self.hash_part):
            raise InvalidStorePath(f"{self.hash_part!r} is not a 32-character nix32 store path hash")
        check_name(self.name)

    @property
    def base_name(self) -> str:
        return f"{self.hash_part}-{self.name}"

    def absolute(self, store_dir: str) -> str:
        return f"{store_dir}/{self.base_name}"

    def __str__(self) -> str:
        return self.base_name

    @classmethod
    def from_base_name(cls, base: str) -> "StorePath":
        if len(base) < HASH_LEN + 2 or base[HASH_LEN] != "-":
            raise InvalidStorePath(f"{base!r} is not a store path base name (<hash>-<name>)")
        return cls(base[:HASH_LEN], base[HASH_LEN + 1 :])

    @classmethod
    def parse(cls, text: str, store_dir: str) -> "StorePath":
        """Parse an absolute store path under ``store_dir`` (no subpath)."""
        prefix = store_dir + "/"
        if not text.startswith(prefix):
            raise InvalidStorePath(f"path {text!r} is not in the store dir {store_dir!r}")
        base = text[len(prefix) :]
        if "/" in base:
            raise InvalidStorePath(f"path {text!r} is inside a store path, not a store path itself")
        return cls.from_base_name(base)

    @classmethod
    def parse_prefix(cls, text: str, store_dir: str) -> tuple["StorePath", str]:
        """Split ``<store_dir>/<base>/sub/path`` into the store path and ``/sub/path`` ('' if none)."""
        prefix = store_dir + "/"
        if not text.startswith(prefix):
            raise InvalidStorePath(f"path {text!r} is not in the store dir {store_dir!r}")
        base, sep, rest = text[len(prefix) :].partition("/")
        return cls.from_base_name(base), (sep + rest if sep else "")


def make_store_path(type_: str, inner: bytes, name: str, store_dir: str) -> StorePath:
    """The generic path computation from a type string and an INNER sha256 digest."""
    check_name(name)
    fingerprint = f"{type_}:sha256:{inner.hex()}:{store_dir}:{name}"
    digest = hashlib.sha256(fingerprint.encode()).digest()
    return StorePath(nix32_encode(fold20(digest)), name)


def _type_with_refs(kind: str, references: Iterable[StorePath], store_dir: str, self_ref: bool) -> str:
    parts = [kind]
    parts.extend(sorted(r.absolute(store_dir) for r in references))
    if self_ref:
        parts.append("self")
    return ":".join(parts)


def make_text_path(name: str, contents: bytes, references: Iterable[StorePath], store_dir: str) -> StorePath:
    """Path of a text object (a ``.drv`` or ``to_file``): kind ``text``, never self-referencing."""
    inner = hashlib.sha256(contents).digest()
    return make_store_path(_type_with_refs("text", references, store_dir, False), inner, name, store_dir)


def make_source_path(
    name: str, nar_hash: Hash, references: Iterable[StorePath], store_dir: str, self_ref: bool = False
) -> StorePath:
    """Path of a tree added recursively with sha256 (``source`` kind)."""
    if nar_hash.algo != "sha256":
        raise InvalidStorePath("source paths need a sha256 NAR hash")
    return make_store_path(
        _type_with_refs("source", references, store_dir, self_ref), nar_hash.digest, name, store_dir
    )


def fixed_inner(hash_: Hash, recursive: bool) -> bytes:
    """INNER of a fixed-output path: ``sha256("fixed:out:" [r:] algo ":" hex ":")``."""
    text = f"fixed:out:{'r:' if recursive else ''}{hash_.algo}:{hash_.base16}:"
    return hashlib.sha256(text.encode()).digest()


def make_fixed_output_path(name: str, hash_: Hash, recursive: bool, store_dir: str,
                           references: Iterable[StorePath] = ()) -> StorePath:
    """Path of a fixed-hash object.  Recursive sha256 is a ``source`` path; the rest ``output:out``."""
    if recursive and hash_.algo == "sha256":
        return make_source_path(name, hash_, references, store_dir)
    return make_store_path("output:out", fixed_inner(hash_, recursive), name, store_dir)


def output_path_name(drv_name: str, output: str) -> str:
    return drv_name if output == "out" else f"{drv_name}-{output}"


def make_output_path(output: str, drv_hash: bytes, drv_name: str, store_dir: str) -> StorePath:
    """Path of output ``output`` of an input-addressed derivation with modulo hash ``drv_hash``."""
    return make_store_path(f"output:{output}", drv_hash, output_path_name(drv_name, output), store_dir)


def content_address(hash_: Hash, recursive: bool) -> str:
    """The ``CA`` field of a fixed-output path: ``fixed:[r:]algo:nix32``."""
    return f"fixed:{'r:' if recursive else ''}{hash_.algo}:{hash_.nix32}"


def path_from_ca(ca: str, path: StorePath, references: Iterable[StorePath], store_dir: str) -> StorePath:
    """The store path that the content address ``ca`` (a ``CA`` field: ``text:sha256:…``,
    ``fixed:r:sha256:…``, ``fixed:ALGO:…``) gives a path named like ``path`` with ``references``
    (which may hold ``path`` itself: a self-reference).  ``path`` is content-addressed, and so
    needs no signature to be trusted, when the result equals it (what Nix's
    ``isContentAddressed`` checks).  Raises :class:`InvalidStorePath` for a malformed ``ca``."""
    kind, _, rest = ca.partition(":")
    recursive = kind == "fixed" and rest.startswith("r:")
    if recursive:
        rest = rest[2:]
    algo, _, digest = rest.partition(":")
    if kind not in ("text", "fixed") or not digest:
        raise InvalidStorePath(f"malformed content address {ca!r}")
    try:
        h = Hash.parse(digest, algo)
    except BadHash as e:
        raise InvalidStorePath(f"malformed content address {ca!r}: {e}") from None
    others = [r for r in references if r != path]
    self_ref = len(others) != len(list(references))
    if kind == "text":
        if h.algo != "sha256" or self_ref:
            raise InvalidStorePath(f"content address {ca!r}: a text path has a sha256 hash and no self-reference")
        return make_store_path(_type_with_refs("text", others, store_dir, False), h.digest, path.name, store_dir)
    if recursive and h.algo == "sha256":
        return make_source_path(path.name, h, others, store_dir, self_ref)
    if others or self_ref:
        raise InvalidStorePath(f"content address {ca!r}: a fixed-output path of this kind has no references")
    return make_store_path("output:out", fixed_inner(h, recursive), path.name, store_dir)
