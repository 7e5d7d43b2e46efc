"""After a build: check the outputs, canonicalise them, scan references, hash, register.

Everything here is blocking (file trees, hashing, SQLite); the scheduler calls it from a worker
thread.  FORMATS.md section 6 is the contract:

* every declared output must exist; group- or world-writable files are refused;
* metadata is made canonical (mtime 1, modes 0444/0555, no setuid/setgid/sticky, no xattrs);
* references are the hash parts, found in the NAR serialisation, of the input closure and of the
  derivation's own outputs (a self-reference is kept; a cycle between outputs is an error);
* a fixed-output derivation's output must hash to the declared hash and refer to nothing.
"""

from __future__ import annotations

import os

import attrs

from ..errors import BuildError, HashMismatch, StoreError
from ..formats.derivation import Derivation
from ..formats.hash import Hash
from ..formats.path_info import PathInfo
from ..formats.store_path import StorePath, content_address
from ..store import fsnar, fstree


@attrs.frozen
class BuiltOutput:
    """One checked output, still at its temporary ``host_path``."""

    name: str
    info: PathInfo
    host_path: str


def _fod_hash(path: str, algo: str, recursive: bool) -> Hash:
    if recursive:
        return fsnar.hash_path(path, algo)[0]
    if os.path.islink(path) or not os.path.isfile(path):
        raise BuildError(f"the output {path!r} of a flat fixed-output derivation must be a regular file")
    return fsnar.hash_file(path, algo)


def check_outputs(drv: Derivation, drv_path: StorePath, host_paths: dict[str, str],
                  input_closure: set[StorePath], store_dir: str, drv_label: str) -> dict[str, BuiltOutput]:
    """Check, canonicalise, hash and scan every output of ``drv`` (at ``host_paths``).

    Returns output name -> :class:`BuiltOutput`.  Raises :class:`BuildError` for a missing or
    suspicious output or a reference cycle between outputs, :class:`HashMismatch` when a
    fixed-output derivation's output does not have its declared hash.
    """
    own = {n: StorePath.parse(o.path, store_dir) for n, o in drv.outputs.items()}
    candidates = {sp.hash_part: sp for sp in input_closure}
    candidates.update({sp.hash_part: sp for sp in own.values()})
    result: dict[str, BuiltOutput] = {}
    for name, sp in sorted(own.items()):
        path = host_paths[name]
        if not os.path.lexists(path):
            raise BuildError(f"builder for {drv_label} did not create its output {name!r} "
                             f"({sp.absolute(store_dir)})")
        try:
            fstree.canonicalise_path(path, reject_writable=True)
        except StoreError as e:
            msg = str(e).replace(os.path.dirname(path) + "/", store_dir + "/")
            raise BuildError(f"output {name!r} of {drv_label}: {msg}") from e
        ca = None
        if drv.is_fixed_output:
            want, recursive = drv.fixed_output_hash()
            got = _fod_hash(path, want.algo, recursive)
            if got != want:
                raise HashMismatch(
                    f"hash mismatch in fixed-output derivation {drv_label}:\n"
                    f"  specified: {want.sri} ({want.typed()})\n"
                    f"       got: {got.sri} ({got.typed()})",
                    hint=f"if the new content is right, declare hash {got.sri!r}")
            ca = content_address(want, recursive)
        nar_hash, nar_size, found = fsnar.nar_hash_and_scan(path, candidates)
        refs = frozenset(candidates[h] for h in found)
        if drv.is_fixed_output and refs - {sp}:
            raise BuildError(f"fixed-output derivation {drv_label} must not refer to store paths, "
                             f"but its output refers to {', '.join(sorted(r.absolute(store_dir) for r in refs))}")
        result[name] = BuiltOutput(name, PathInfo(path=sp, nar_hash=nar_hash, nar_size=nar_size,
                                                  references=refs, deriver=drv_path, ca=ca), path)
    _check_no_cycles(result, store_dir, drv_label)
    return result


def _check_no_cycles(outs: dict[str, BuiltOutput], store_dir: str, label: str) -> None:
    by_path = {o.info.path: n for n, o in outs.items()}
    edges = {n: {by_path[r] for r in o.info.references if r in by_path and r != o.info.path}
             for n, o in outs.items()}
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        state[n] = 1
        for m in edges[n]:
            if state.get(m) == 1:
                cyc = trail[trail.index(m):] + [n, m] if m in trail else [n, m]
                raise BuildError(f"cycle between the outputs of {label}: {' -> '.join(cyc)}")
            if m not in state:
                visit(m, trail + [n])
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [])


def move_outputs(store, outs: dict[str, BuiltOutput]) -> list[BuiltOutput]:
    """Rename outputs that are not yet valid into the store (caller holds their path locks);
    returns the moved ones.  They are not valid until :func:`register_outputs`."""
    new = [o for o in outs.values() if not store.is_valid(o.info.path)]
    for o in new:
        store.install_path(o.host_path, o.info.path)
    return new


def register_outputs(store, outs: dict[str, BuiltOutput], new: list[BuiltOutput], drv_path: StorePath) -> None:
    """Register moved outputs and the derivation's output names in ONE transaction (after the
    caller made the files durable)."""
    with store.db.transaction():
        store.register([o.info for o in new])
        store.register_derivation_outputs(drv_path, {n: o.info.path for n, o in outs.items()})


def install_outputs(store, outs: dict[str, BuiltOutput], drv_path: StorePath) -> None:
    """:func:`move_outputs`, flush the file system when the store is durable, :func:`register_outputs`."""
    new = move_outputs(store, outs)
    if new and store.durable:
        from ..store.local import _syncfs
        _syncfs(store.real_store_dir)
    register_outputs(store, outs, new, drv_path)
