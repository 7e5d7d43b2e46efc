"""Derivations: the value, its ATerm text (``.drv``), hashDerivationModulo, paths, JSON.

FORMATS.md section 4.  The ATerm grammar (no spaces, no trailing newline)::

    drv     = "Derive(" "[" outputs "]," "[" inputdrvs "]," "[" srcs "]," str "," qstr ","
              "[" qstrs "]," "[" env "])"
    output  = "(" str "," str "," str "," str ")"          name, path, hashAlgo, hash (sorted by name)
    inputdrv= "(" str "," "[" str,* "]" ")"                 drv path, output names (both sorted)
    env     = "(" qstr "," qstr ")"                         sorted by key, no duplicates

``str`` is written as is between double quotes (output names, paths, hash algos and hashes, the
system); ``qstr`` (builder, args, env keys and values) escapes ``"`` ``\\`` newline CR and tab as
``\\"`` ``\\\\`` ``\\n`` ``\\r`` ``\\t`` and writes every other byte raw.  The parser is strict: it
accepts exactly what :func:`render_aterm` produces, so parse and render round-trip byte for byte.

Strings are Python ``str``; bytes that are not UTF-8 survive as surrogate escapes.

:class:`Derivation` holds dicts (``outputs``, ``input_drvs``, ``env``) for speed; treat them as
read-only (make a changed copy with :func:`attrs.evolve`).  A Derivation is therefore not hashable.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterable

import attrs

from ..errors import DerivationError
from .hash import ALGOS, Hash
from .store_path import (
    HASH_LEN,
    StorePath,
    make_fixed_output_path,
    make_output_path,
    make_text_path,
)

__all__ = [
    "DerivationOutput",
    "Derivation",
    "render_aterm",
    "parse_aterm",
    "hash_derivation_modulo",
    "drv_references",
    "drv_store_path",
    "fill_output_paths",
    "to_json",
    "from_json",
]

_BASE16_RE = re.compile(r"[0-9a-f]+\Z")
_SPECIAL = re.compile(r'["\\\n\r\t]')
_ESCAPES = str.maketrans({'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


@attrs.frozen
class DerivationOutput:
    """One output: its full store path ("" when masked or not yet computed) and, for a fixed-output
    derivation, ``hash_algo`` (``"sha256"``, ``"r:sha1"``, …) and ``hash`` (base16)."""

    path: str
    hash_algo: str = ""
    hash: str = ""

    @property
    def is_fixed(self) -> bool:
        return bool(self.hash_algo)


@attrs.frozen(eq=True, hash=False)
class Derivation:
    """A build recipe as stored in a ``.drv`` file.  Dict fields must not be mutated.

    ``input_drvs`` maps an input ``.drv`` path (full path string) to the set of its outputs used;
    ``input_srcs`` holds full store paths of sources and texts.
    """

    outputs: dict[str, DerivationOutput]
    input_drvs: dict[str, frozenset[str]]
    input_srcs: frozenset[str]
    system: str
    builder: str
    args: tuple[str, ...]
    env: dict[str, str]

    @property
    def name(self) -> str:
        """The derivation's name (``env["name"]``, or the ``name`` in ``__json`` when Nix wrote
        the attributes there: ``__structuredAttrs``)."""
        try:
            return self.env["name"]
        except KeyError:
            pass
        if self.structured_attrs:
            import json
            try:
                name = json.loads(self.env["__json"]).get("name")
            except (ValueError, AttributeError):
                name = None
            if isinstance(name, str):
                return name
        raise DerivationError("derivation has no 'name' attribute in its environment")

    @property
    def structured_attrs(self) -> bool:
        """Whether Nix wrote the attributes as JSON in ``__json`` (``__structuredAttrs = true``),
        for the builder to read from ``.attrs.json``/``.attrs.sh``, which purestore does not
        write: such a derivation is shown and its outputs substituted, but not built."""
        return "__json" in self.env

    @property
    def is_fixed_output(self) -> bool:
        """True for a fixed-output derivation: one output ``out`` with a declared hash."""
        return len(self.outputs) == 1 and "out" in self.outputs and self.outputs["out"].is_fixed

    def fixed_output_hash(self) -> tuple[Hash, bool]:
        """The declared hash of a fixed-output derivation and whether it is recursive (NAR)."""
        if not self.is_fixed_output:
            raise DerivationError(f"derivation {self.env.get('name', '?')!r} is not fixed-output")
        o = self.outputs["out"]
        algo = o.hash_algo
        recursive = algo.startswith("r:")
        if recursive:
            algo = algo[2:]
        if algo not in ALGOS:
            raise DerivationError(f"derivation output 'out' has unknown hash algorithm {o.hash_algo!r}")
        if not _BASE16_RE.match(o.hash) or len(o.hash) != 2 * ALGOS[algo]:
            raise DerivationError(f"derivation output 'out' has a hash that is not {2 * ALGOS[algo]} "
                                  f"lowercase base16 digits: {o.hash!r}")
        return Hash(algo, bytes.fromhex(o.hash)), recursive

    def output_paths(self) -> dict[str, str]:
        """Output name -> full output path."""
        return {k: v.path for k, v in self.outputs.items()}


# -- rendering ---------------------------------------------------------------------------------


def _q(s: str) -> str:
    if _SPECIAL.search(s) is None:  # the common case: nothing to escape
        return '"' + s + '"'
    return '"' + s.translate(_ESCAPES) + '"'


def _u(s: str) -> str:
    return '"' + s + '"'


def render_aterm(drv: Derivation, *, mask_outputs: bool = False,
                 input_drvs: Iterable[tuple[str, Iterable[str]]] | None = None) -> bytes:
    """The ATerm text of ``drv`` (exactly Nix's ``.drv`` bytes).

    ``mask_outputs`` blanks every output path and every ``env[output]``; ``input_drvs`` replaces
    the input derivation list (used by :func:`hash_derivation_modulo`; pairs are written in the
    order given, output names sorted).
    """
    parts = ["Derive(["]
    parts.append(",".join(
        f'({_u(n)},{_u("" if mask_outputs else o.path)},{_u(o.hash_algo)},{_u(o.hash)})'
        for n, o in sorted(drv.outputs.items())
    ))
    parts.append("],[")
    pairs = sorted(drv.input_drvs.items()) if input_drvs is None else input_drvs
    parts.append(",".join(
        f'({_u(p)},[{",".join(_u(o) for o in sorted(outs))}])' for p, outs in pairs
    ))
    parts.append("],[")
    parts.append(",".join(_u(s) for s in sorted(drv.input_srcs)))
    parts.append("],")
    parts.append(_u(drv.system))
    parts.append(",")
    parts.append(_q(drv.builder))
    parts.append(",[")
    parts.append(",".join(_q(a) for a in drv.args))
    parts.append("],[")
    outs = drv.outputs
    parts.append(",".join(
        f"({_q(k)},{_q('' if mask_outputs and k in outs else v)})" for k, v in sorted(drv.env.items())
    ))
    parts.append("])")
    return "".join(parts).encode("utf-8", "surrogateescape")


# -- parsing -----------------------------------------------------------------------------------


class _Parser:
    __slots__ = ("data", "pos", "where")

    def __init__(self, data: bytes, where: str):
        self.data = data
        self.pos = 0
        self.where = where

    def fail(self, what: str) -> DerivationError:
        near = self.data[self.pos : self.pos + 20]
        return DerivationError(f"{self.where}: malformed derivation at byte {self.pos}: expected {what}, "
                               f"got {near!r}")

    def lit(self, s: bytes) -> None:
        if not self.data.startswith(s, self.pos):
            raise self.fail(repr(s.decode()))
        self.pos += len(s)

    def peek(self, s: bytes) -> bool:
        return self.data.startswith(s, self.pos)

    def ustr(self) -> str:
        """A string written without escapes."""
        self.lit(b'"')
        end = self.data.find(b'"', self.pos)
        if end < 0:
            raise self.fail("a closing '\"'")
        raw = self.data[self.pos : end]
        if b"\\" in raw:
            raise self.fail("a string without backslashes")
        self.pos = end + 1
        return raw.decode("utf-8", "surrogateescape")

    def qstr(self) -> str:
        """A string with Nix's escapes; refuses anything render would not write."""
        self.lit(b'"')
        data = self.data
        start = self.pos
        out = []
        i = start
        while True:
            j = data.find(b'"', i)
            k = data.find(b"\\", i, j if j >= 0 else len(data))
            if j < 0:
                self.pos = len(data)
                raise self.fail("a closing '\"'")
            if k < 0:
                out.append(data[i:j])
                i = j + 1
                break
            out.append(data[i:k])
            if k + 1 >= len(data):
                self.pos = k
                raise self.fail("an escape after '\\'")
            c = data[k + 1 : k + 2]
            esc = {b'"': b'"', b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}.get(c)
            if esc is None:
                self.pos = k
                raise self.fail("one of the escapes \\\" \\\\ \\n \\r \\t")
            out.append(esc)
            i = k + 2
        raw = b"".join(out)
        for ch, name in ((b"\n", "newline"), (b"\r", "carriage return"), (b"\t", "tab")):
            if ch in data[start : i - 1]:
                self.pos = start + data[start:i].index(ch)
                raise self.fail(f"an escaped {name}, not a raw one")
        self.pos = i
        return raw.decode("utf-8", "surrogateescape")

    def list_of(self, item) -> list:
        self.lit(b"[")
        out = []
        if self.peek(b"]"):
            self.pos += 1
            return out
        while True:
            out.append(item())
            if self.peek(b","):
                self.pos += 1
                continue
            self.lit(b"]")
            return out


def _check_path(p: _Parser, path: str, what: str, allow_empty: bool = False) -> None:
    if allow_empty and path == "":
        return
    slash = path.rfind("/")
    if not path.startswith("/") or slash < 1:
        raise DerivationError(f"{p.where}: {what} {path!r} is not an absolute store path")
    try:
        StorePath.from_base_name(path[slash + 1 :])
    except DerivationError:
        raise
    except ValueError as e:
        raise DerivationError(f"{p.where}: {what} {path!r} is not a store path: {e}") from None


def _sorted_strict(p: _Parser, keys: list[str], what: str) -> None:
    for a, b in zip(keys, keys[1:]):
        if not a < b:
            raise DerivationError(f"{p.where}: {what} are not sorted and unique: {a!r} before {b!r}")


def parse_aterm(data: bytes, where: str = "derivation") -> Derivation:
    """Parse ``.drv`` bytes strictly; :class:`DerivationError` says where (``where``, byte offset)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DerivationError(f"{where}: expected bytes, got {type(data).__name__}")
    p = _Parser(bytes(data), where)
    p.lit(b"Derive(")

    def output():
        p.lit(b"(")
        n = p.ustr(); p.lit(b",")
        path = p.ustr(); p.lit(b",")
        algo = p.ustr(); p.lit(b",")
        h = p.ustr(); p.lit(b")")
        return n, DerivationOutput(path, algo, h)

    outs = p.list_of(output)
    p.lit(b",")

    def input_drv():
        p.lit(b"(")
        path = p.ustr(); p.lit(b",")
        names = p.list_of(p.ustr); p.lit(b")")
        return path, names

    inputs = p.list_of(input_drv)
    p.lit(b",")
    srcs = p.list_of(p.ustr)
    p.lit(b",")
    system = p.ustr()
    p.lit(b",")
    builder = p.qstr()
    p.lit(b",")
    args = p.list_of(p.qstr)
    p.lit(b",")

    def env_pair():
        p.lit(b"(")
        k = p.qstr(); p.lit(b",")
        v = p.qstr(); p.lit(b")")
        return k, v

    env = p.list_of(env_pair)
    p.lit(b")")
    if p.pos != len(p.data):
        raise p.fail("the end of the derivation")

    if not outs:
        raise DerivationError(f"{where}: derivation has no outputs")
    _sorted_strict(p, [n for n, _ in outs], "output names")
    for n, o in outs:
        if not n:
            raise DerivationError(f"{where}: empty output name")
        _check_path(p, o.path, f"path of output {n!r}", allow_empty=True)
        if o.hash_algo and not o.hash:  # (as Nix writes a floating content-addressed output)
            raise DerivationError(f"{where}: output {n!r} has hash algorithm {o.hash_algo!r} but no hash: "
                                  f"a content-addressed derivation (Nix's ca-derivations), which purestore "
                                  f"does not support")
        if bool(o.hash_algo) != bool(o.hash):
            raise DerivationError(f"{where}: output {n!r} has hash algorithm {o.hash_algo!r} "
                                  f"and hash {o.hash!r}; expected both or neither")
        if o.hash == "impure":  # (as Nix writes an impure derivation's output)
            raise DerivationError(f"{where}: output {n!r} is impure (Nix's impure-derivations), which "
                                  f"purestore does not support")
    _sorted_strict(p, [d for d, _ in inputs], "input derivations")
    for d, names in inputs:
        _check_path(p, d, "input derivation")
        if not d.endswith(".drv"):
            raise DerivationError(f"{where}: input derivation {d!r} does not end in '.drv'")
        if not names:
            raise DerivationError(f"{where}: input derivation {d!r} lists no outputs")
        _sorted_strict(p, names, f"output names of input {d!r}")
    _sorted_strict(p, srcs, "input sources")
    for s in srcs:
        _check_path(p, s, "input source")
    _sorted_strict(p, [k for k, _ in env], "environment keys")
    drv = Derivation(
        outputs=dict(outs),
        input_drvs={d: frozenset(names) for d, names in inputs},
        input_srcs=frozenset(srcs),
        system=system,
        builder=builder,
        args=tuple(args),
        env=dict(env),
    )
    if drv.is_fixed_output:
        try:
            drv.fixed_output_hash()  # validates algo and base16
        except DerivationError as e:
            raise DerivationError(f"{where}: {e}") from None
    return drv


# -- hashing and paths -------------------------------------------------------------------------


def _fixed_modulo(drv: Derivation) -> bytes:
    o = drv.outputs["out"]
    return hashlib.sha256(f"fixed:out:{o.hash_algo}:{o.hash}:{o.path}".encode()).digest()


def hash_derivation_modulo(drv: Derivation, lookup: Callable[[str], Derivation], mask_outputs: bool,
                           cache: dict[str, bytes] | None = None) -> bytes:
    """Nix's hashDerivationModulo: the sha256 digest that names input-addressed outputs.

    ``lookup(drv_path)`` returns an input derivation (called once per input when ``cache`` is kept
    between calls); ``cache`` maps ``.drv`` paths to their unmasked modulo hashes.  Inputs are
    walked iteratively, so deep chains do not hit the recursion limit.
    """
    if drv.is_fixed_output:
        return _fixed_modulo(drv)
    if cache is None:
        cache = {}
    # post-order over inputs not yet in the cache
    stack: list[tuple[str, Derivation, bool]] = [(p, None, False) for p in drv.input_drvs if p not in cache]
    on_path: set[str] = set()
    while stack:
        path, d, expanded = stack.pop()
        if path in cache:
            continue
        if d is None:
            d = lookup(path)
        if d.is_fixed_output:
            cache[path] = _fixed_modulo(d)
            continue
        if not expanded:
            if path in on_path:
                raise DerivationError(f"derivation {path!r} depends on itself")
            on_path.add(path)
            stack.append((path, d, True))
            for q in d.input_drvs:
                if q not in cache:
                    if q in on_path:
                        raise DerivationError(f"dependency cycle through derivation {q!r}")
                    stack.append((q, None, False))
            continue
        on_path.discard(path)
        cache[path] = _modulo_of(d, cache, False)
    return _modulo_of(drv, cache, mask_outputs)


def modulo_of_unmasked(drv: Derivation, cache: dict[str, bytes], aterm: bytes | None = None) -> bytes:
    """hashDerivationModulo(unmasked) of a non-fixed ``drv`` whose inputs are all in ``cache``;
    ``aterm`` (its rendering) saves a render when it has no input derivations."""
    if drv.is_fixed_output:
        return _fixed_modulo(drv)
    if aterm is not None and not drv.input_drvs:
        return hashlib.sha256(aterm).digest()
    return _modulo_of(drv, cache, False)


def _modulo_of(drv: Derivation, cache: dict[str, bytes], mask: bool) -> bytes:
    merged: dict[str, set[str]] = {}
    for p, outs in drv.input_drvs.items():
        merged.setdefault(cache[p].hex(), set()).update(outs)
    text = render_aterm(drv, mask_outputs=mask, input_drvs=sorted(merged.items()))
    return hashlib.sha256(text).digest()


def _store_path_of(full: str, store_dir: str) -> StorePath:
    return StorePath.parse(full, store_dir)


def drv_references(drv: Derivation, store_dir: str) -> list[StorePath]:
    """References of the ``.drv`` file: its input sources and input derivations (not outputs)."""
    paths = set(drv.input_srcs)
    paths.update(drv.input_drvs)  # a .drv may be both (a drvPath reference)
    return [_store_path_of(p, store_dir) for p in sorted(paths)]



def drv_store_path(drv: Derivation, store_dir: str, aterm: bytes | None = None) -> StorePath:
    """The ``.drv`` file's store path: a text path ``name.drv`` referring to inputs.
    Pass ``aterm`` if already rendered."""
    if aterm is None:
        aterm = render_aterm(drv)
    return make_text_path(drv.name + ".drv", aterm, drv_references(drv, store_dir), store_dir)


def fill_output_paths(drv: Derivation, lookup: Callable[[str], Derivation], store_dir: str,
                      cache: dict[str, bytes] | None = None) -> Derivation:
    """Compute output paths (as Nix's ``derivation`` builtin does) and return the completed
    derivation with ``outputs[o].path`` and ``env[o]`` set."""
    name = drv.name
    if drv.is_fixed_output:
        h, rec = drv.fixed_output_hash()
        path = make_fixed_output_path(name, h, rec, store_dir).absolute(store_dir)
        o = drv.outputs["out"]
        outputs = {"out": DerivationOutput(path, o.hash_algo, o.hash)}
        env = dict(drv.env)
        env["out"] = path
        return attrs.evolve(drv, outputs=outputs, env=env)
    for n, o in drv.outputs.items():
        if o.is_fixed:
            raise DerivationError(f"derivation {name!r}: only a single output 'out' may have a fixed hash, "
                                  f"got output {n!r}")
    h = hash_derivation_modulo(drv, lookup, True, cache)
    outputs = {}
    env = dict(drv.env)
    for n in drv.outputs:
        path = make_output_path(n, h, name, store_dir).absolute(store_dir)
        outputs[n] = DerivationOutput(path)
        env[n] = path
    return attrs.evolve(drv, outputs=outputs, env=env)


def check_output_paths(drv: Derivation, drv_path: str, lookup: Callable[[str], Derivation], store_dir: str,
                       cache: dict[str, bytes] | None = None) -> None:
    """Raise :class:`DerivationError` unless every output path of the ``.drv`` at ``drv_path`` is
    the one its contents give (and its environment variable says the same), as Nix's
    ``checkDerivationOutputs`` does before it builds: a hand-edited or hostile ``.drv`` could
    otherwise build anything into the path of another derivation's output."""
    base = drv_path.rsplit("/", 1)[-1]
    name = base.partition("-")[2].removesuffix(".drv")
    if drv.is_fixed_output:
        h, rec = drv.fixed_output_hash()
        expected = {"out": make_fixed_output_path(name, h, rec, store_dir).absolute(store_dir)}
    else:
        h = hash_derivation_modulo(drv, lookup, True, cache)
        expected = {n: make_output_path(n, h, name, store_dir).absolute(store_dir) for n in drv.outputs}
    for n, o in drv.outputs.items():
        if o.path != expected[n]:
            raise DerivationError(f"derivation {drv_path!r} has incorrect output {o.path!r}, "
                                  f"should be {expected[n]!r}")
        if drv.env.get(n) != o.path:
            raise DerivationError(f"derivation {drv_path!r} has incorrect environment variable {n!r}, "
                                  f"should be {o.path!r}")


# -- JSON ----------------------------------------------------------------------------------------


def to_json(drv_path: str, drv: Derivation) -> dict:
    """``{drv_path: {...}}`` in the shape of ``nix show-derivation`` (Nix 2.8)."""
    outputs = {}
    for n, o in sorted(drv.outputs.items()):
        d = {"path": o.path} if o.path else {}  # a deferred output has none: Nix prints {}
        if o.hash_algo:
            d["hashAlgo"] = o.hash_algo
            d["hash"] = o.hash
        outputs[n] = d
    return {
        drv_path: {
            "outputs": outputs,
            "inputSrcs": sorted(drv.input_srcs),
            "inputDrvs": {p: sorted(o) for p, o in sorted(drv.input_drvs.items())},
            "system": drv.system,
            "builder": drv.builder,
            "args": list(drv.args),
            "env": dict(sorted(drv.env.items())),
        }
    }


def from_json(obj: dict, where: str = "derivation JSON") -> Derivation:
    """The inverse of the inner object of :func:`to_json`."""
    try:
        return Derivation(
            outputs={n: DerivationOutput(o.get("path", ""), o.get("hashAlgo", ""), o.get("hash", ""))
                     for n, o in obj["outputs"].items()},
            input_drvs={p: frozenset(o) for p, o in obj["inputDrvs"].items()},
            input_srcs=frozenset(obj["inputSrcs"]),
            system=obj["system"],
            builder=obj["builder"],
            args=tuple(obj["args"]),
            env=dict(obj["env"]),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise DerivationError(f"{where}: not a derivation object ({type(e).__name__}: {e})") from e


def hash_part_of(path: str) -> str:
    """The 32-character hash part of a full store path string."""
    slash = path.rfind("/")
    return path[slash + 1 : slash + 1 + HASH_LEN]
