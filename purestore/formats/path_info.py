"""Path info: what a store knows about one valid path (DESIGN.md "Words").

A plain value: NAR hash and size, references, deriver, signatures, content address and
registration time.  It does no I/O; the store fills it in from its database, a binary cache from a
narinfo.  :meth:`PathInfo.to_json` renders the shape of ``nix path-info --json`` (Nix 2.8): keys
in Nix's order, optional keys left out when empty.
"""

from __future__ import annotations

from typing import Iterable

import attrs

from ..errors import FormatError
from .hash import Hash
from .store_path import StorePath


def _frozen_paths(value: Iterable[StorePath]) -> frozenset[StorePath]:
    return value if isinstance(value, frozenset) else frozenset(value)


def _frozen_strs(value: Iterable[str]) -> frozenset[str]:
    if isinstance(value, str):
        raise FormatError(f"PathInfo.sigs must be a collection of signature strings, got the string {value!r}")
    return value if isinstance(value, frozenset) else frozenset(value)


def _check_hash(_inst, _attr, value) -> None:
    if not isinstance(value, Hash):
        raise FormatError(f"PathInfo.nar_hash must be a Hash, got {type(value).__name__}")
    if value.algo != "sha256":
        raise FormatError(f"PathInfo.nar_hash must be sha256, got {value.algo}")


def _check_size(_inst, attr, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FormatError(f"PathInfo.{attr.name} must be a non-negative integer, got {value!r}")


def _check_path(_inst, attr, value) -> None:
    if not isinstance(value, StorePath):
        raise FormatError(f"PathInfo.{attr.name} must be a StorePath, got {type(value).__name__}")


@attrs.frozen
class PathInfo:
    """What the store records for a valid path.

    ``references`` may contain ``path`` itself (a self-reference).  ``ca`` is the content address
    (``fixed:r:sha256:<nix32>``, ``fixed:sha256:<nix32>`` or ``text:sha256:<nix32>``) for
    content-addressed paths, else None.  ``registration_time`` is seconds since the epoch.
    Raises :class:`FormatError` when a field has the wrong type.
    """

    path: StorePath = attrs.field(validator=_check_path)
    nar_hash: Hash = attrs.field(validator=_check_hash)
    nar_size: int = attrs.field(validator=_check_size)
    references: frozenset[StorePath] = attrs.field(default=frozenset(), converter=_frozen_paths)
    deriver: StorePath | None = attrs.field(
        default=None, validator=attrs.validators.optional(_check_path))
    sigs: frozenset[str] = attrs.field(default=frozenset(), converter=_frozen_strs)
    ca: str | None = None
    registration_time: int = attrs.field(default=0, validator=_check_size)

    def __attrs_post_init__(self):
        for r in self.references:
            if not isinstance(r, StorePath):
                raise FormatError(f"PathInfo.references must hold StorePaths, got {type(r).__name__}")

    @property
    def self_referencing(self) -> bool:
        return self.path in self.references

    def references_without_self(self) -> frozenset[StorePath]:
        return self.references - {self.path}

    def evolve(self, **kw) -> "PathInfo":
        return attrs.evolve(self, **kw)

    def to_json(self, store_dir: str, closure_size: int | None = None) -> dict:
        """The ``nix path-info --json`` object for this path (keys in Nix 2.8's order).

        ``closureSize`` is included only when ``closure_size`` is given.
        """
        out: dict = {
            "path": self.path.absolute(store_dir),
            "narHash": self.nar_hash.sri,
            "narSize": self.nar_size,
            "references": sorted(r.absolute(store_dir) for r in self.references),
        }
        if self.ca:
            out["ca"] = self.ca
        if closure_size is not None:
            out["closureSize"] = closure_size
        if self.deriver is not None:
            out["deriver"] = self.deriver.absolute(store_dir)
        if self.registration_time:  # as Nix: not for a path not registered (a cache's)
            out["registrationTime"] = self.registration_time
        if self.sigs:
            out["signatures"] = sorted(self.sigs)
        return out

    @classmethod
    def from_json(cls, obj: dict, store_dir: str) -> "PathInfo":
        """Parse the object :meth:`to_json` writes.  Raises :class:`FormatError` saying which key is wrong."""
        if not isinstance(obj, dict):
            raise FormatError(f"path info JSON must be an object, got {type(obj).__name__}")

        def need(key, typ):
            if key not in obj:
                raise FormatError(f"path info JSON lacks the key {key!r}")
            v = obj[key]
            if not isinstance(v, typ) or isinstance(v, bool):
                raise FormatError(f"path info JSON key {key!r} must be {typ.__name__}, got {v!r}")
            return v

        path = StorePath.parse(need("path", str), store_dir)
        refs = need("references", list)
        deriver = obj.get("deriver")
        return cls(
            path=path,
            nar_hash=Hash.parse(need("narHash", str), "sha256"),
            nar_size=need("narSize", int),
            references=frozenset(StorePath.parse(r, store_dir) for r in refs),
            deriver=StorePath.parse(deriver, store_dir) if deriver else None,
            sigs=frozenset(obj.get("signatures") or ()),
            ca=obj.get("ca"),
            registration_time=obj.get("registrationTime", 0),
        )
