"""The functions expression files call: ``derivation``, ``source``, ``to_file``, ``fetchurl``.

``derivation()`` mirrors Nix's ``derivation`` builtin attribute for attribute, so a derivation
written in Python gets the hashes Nix gives the same derivation.  Every keyword other than
``args`` becomes an environment variable, converted like Nix does: ``True`` -> ``"1"``,
``False``/``None`` -> ``""``, ints in decimal, floats as ``%f``, lists space-joined (elements
converted the same way), a derivation, output or source -> its store path.

Dependencies ("string context", DESIGN.md) are found by scanning every string of the derivation
(builder, system, args, env values) for the 32-character hash part of a path this evaluation
made: an output makes its derivation an input (with that output), a source or text an input
source, and a ``.drv`` path the whole closure of that derivation (as Nix does for ``drvPath``).

These functions work only inside an evaluation: :func:`purestore.expr.loader.evaluate`, or
``with evaluating(store_dir): ...`` in library code and tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
from typing import Iterator

from ..errors import DerivationArgumentError, EvalError
from ..formats.derivation import (
    Derivation,
    DerivationOutput,
    drv_store_path,
    fill_output_paths,
    modulo_of_unmasked,
    render_aterm,
)
from ..formats.hash import ALGOS, Hash
from ..formats.store_path import check_name, make_source_path, make_text_path, StorePath
from ..errors import BadHash, InvalidStorePath
from .values import Drv, Output, Source

__all__ = ["EvalContext", "evaluating", "current_context", "derivation", "source", "to_file", "fetchurl"]

_HASH_RUN = re.compile(r"[0-9a-df-np-sv-z]{32,}")


class EvalContext:
    """The state of one evaluation: store dir, every path made so far (by hash part), the
    derivations (by ``.drv`` path), the hashDerivationModulo cache and the host paths given to
    ``source()`` (which pure evaluation then allows reading)."""

    def __init__(self, store_dir: str):
        self.store_dir = store_dir
        self.known: dict[str, object] = {}          # hash part -> Output | Source | Drv
        self.drvs: dict[str, Drv] = {}              # drv path -> Drv (creation order)
        self.modulo: dict[str, bytes] = {}          # drv path -> unmasked modulo hash
        self.sources: dict[tuple[str, str], Source] = {}
        self.texts: dict[str, Source] = {}
        self.source_roots: list[str] = []           # host paths source() may read

    def lookup(self, drv_path: str) -> Derivation:
        return self.drvs[drv_path].drv

    def abs(self, sp: StorePath) -> str:
        return f"{self.store_dir}/{sp.hash_part}-{sp.name}"


_CURRENT: contextvars.ContextVar[EvalContext | None] = contextvars.ContextVar("purestore_eval", default=None)


def current_context() -> EvalContext:
    ctx = _CURRENT.get()
    if ctx is None:
        raise EvalError("derivation(), source(), to_file() and fetchurl() work only during an evaluation "
                        "(pure eval/instantiate, purestore.expr.loader.evaluate, or "
                        "`with purestore.expr.evaluating(store_dir):`)")
    return ctx


@contextlib.contextmanager
def evaluating(store_dir: str, context: EvalContext | None = None) -> Iterator[EvalContext]:
    """Make ``context`` (a new one for ``store_dir`` by default) the current evaluation."""
    ctx = context or EvalContext(store_dir)
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


# -- conversions ----------------------------------------------------------------------------------


def _type_name(v) -> str:
    return type(v).__name__


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def coerce(v, drv_name: str, field: str) -> str:
    """Convert an attribute value to its environment string, as Nix's coerceToString does."""
    if isinstance(v, str):
        return v
    if v is True:
        return "1"
    if v is False or v is None:
        return ""
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "%f" % v
    if isinstance(v, (Drv, Output, Source)):
        return str(v)
    if isinstance(v, (list, tuple)):
        parts = []
        n = len(v)
        for i, x in enumerate(v):
            parts.append(coerce(x, drv_name, field))
            if i < n - 1 and not (isinstance(x, (list, tuple)) and len(x) == 0):
                parts.append(" ")
        return "".join(parts)
    if isinstance(v, os.PathLike):
        raise DerivationArgumentError(
            f"derivation {drv_name!r}: attribute {field!r} is a host path {_show(v)}; "
            f"expected a string, or source(path) to add the file to the store")
    raise DerivationArgumentError(
        f"derivation {drv_name!r}: attribute {field!r} must be a string, bool, None, int, float, list, "
        f"derivation, output or source, got {_type_name(v)} {_show(v)}")


def _scan(ctx: EvalContext, texts: list[str]) -> list[object]:
    """Every known object whose hash part occurs in ``texts``."""
    found: dict[int, object] = {}
    known = ctx.known
    for text in texts:
        if len(text) < 32:
            continue
        for m in _HASH_RUN.finditer(text):
            run = m.group()
            for i in range(len(run) - 31):
                obj = known.get(run[i:i + 32])
                if obj is not None:
                    found[id(obj)] = obj
    return list(found.values())


def _drv_closure(d: Drv) -> list[Drv]:
    seen: dict[str, Drv] = {}
    stack = [d]
    while stack:
        x = stack.pop()
        if x.drv_path in seen:
            continue
        seen[x.drv_path] = x
        stack.extend(x.input_drvs.values())
    return list(seen.values())


# -- derivation -------------------------------------------------------------------------------------

_MISSING = object()
_UNSUPPORTED = ("__structuredAttrs", "__contentAddressed", "__impure", "__json")


def derivation(*, name=_MISSING, system=_MISSING, builder=_MISSING, args=(), outputs=None, **attrs) -> Drv:
    """Nix's ``derivation`` builtin: returns a :class:`Drv` whose output and ``.drv`` paths are the
    ones Nix computes for the same attributes.

    Raises :class:`DerivationArgumentError` naming the field, the expected type and the value.
    """
    ctx = current_context()
    shown = name if isinstance(name, str) else "?"
    for field, val in (("name", name), ("system", system), ("builder", builder)):
        if val is _MISSING:
            raise DerivationArgumentError(f"derivation {shown!r}: required attribute {field!r} is missing")
    if not isinstance(name, str):
        raise DerivationArgumentError(f"derivation: attribute 'name' must be a string, got "
                                      f"{_type_name(name)} {_show(name)}")
    try:
        check_name(name)
    except InvalidStorePath as e:
        raise DerivationArgumentError(f"derivation {name!r}: attribute 'name' is not a valid store path name: {e}") from None
    if name.endswith(".drv"):
        raise DerivationArgumentError(f"derivation {name!r}: attribute 'name' must not end in '.drv'")

    raw = dict(name=name, system=system, builder=builder, args=args, **attrs)
    if outputs is not None:
        raw["outputs"] = outputs
    env: dict[str, str] = {}
    ignore_nulls = bool(attrs.pop("__ignoreNulls", False))
    for key in _UNSUPPORTED:
        if attrs.get(key):
            raise DerivationArgumentError(f"derivation {name!r}: attribute {key!r} is not supported by purestore")
    env["name"] = name
    builder_s = coerce(builder, name, "builder")
    system_s = coerce(system, name, "system")
    env["builder"] = builder_s
    env["system"] = system_s
    if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
        raise DerivationArgumentError(f"derivation {name!r}: attribute 'args' must be a list, got "
                                      f"{_type_name(args)} {_show(args)}")
    args_s = tuple(coerce(a, name, f"args[{i}]") for i, a in enumerate(args))

    out_names = ["out"]
    if outputs is not None:
        if not isinstance(outputs, (list, tuple)) or not all(isinstance(o, str) for o in outputs):
            raise DerivationArgumentError(f"derivation {name!r}: attribute 'outputs' must be a list of strings, "
                                          f"got {_type_name(outputs)} {_show(outputs)}")
        if not outputs:
            raise DerivationArgumentError(f"derivation {name!r}: attribute 'outputs' must not be empty")
        seen = set()
        for o in outputs:
            if o in seen:
                raise DerivationArgumentError(f"derivation {name!r}: duplicate output {o!r} in 'outputs'")
            if o == "drv" or not o:
                raise DerivationArgumentError(f"derivation {name!r}: invalid output name {o!r} in 'outputs'")
            try:
                check_name(name if o == "out" else f"{name}-{o}")
            except InvalidStorePath as e:
                raise DerivationArgumentError(f"derivation {name!r}: invalid output name {o!r}: {e}") from None
            seen.add(o)
        out_names = list(outputs)
        env["outputs"] = " ".join(outputs)

    for key, val in attrs.items():
        if ignore_nulls and val is None:
            continue
        env[key] = coerce(val, name, key)

    # dependencies by string scanning
    input_drvs: dict[str, Drv] = {}
    used: dict[str, set[str]] = {}
    input_srcs: dict[str, object] = {}
    for obj in _scan(ctx, [builder_s, system_s, *args_s, *env.values()]):
        if isinstance(obj, Output):
            d = obj.derivation
            input_drvs[d.drv_path] = d
            used.setdefault(d.drv_path, set()).add(obj.name)
        elif isinstance(obj, Source):
            input_srcs[obj.path] = obj
        elif isinstance(obj, Drv):  # a .drv path: the derivation's whole closure, like Nix's drvPath
            for x in _drv_closure(obj):
                input_srcs[x.drv_path] = x
                input_srcs.update(x.input_srcs)
                input_drvs[x.drv_path] = x
                used.setdefault(x.drv_path, set()).update(x.outputs)

    fixed = "outputHash" in env
    if fixed:
        if out_names != ["out"]:
            raise DerivationArgumentError(f"derivation {name!r}: a fixed-output derivation (outputHash given) "
                                          f"must have the single output 'out', got outputs {out_names!r}")
        mode = env.get("outputHashMode", "flat")
        if mode not in ("flat", "recursive"):
            raise DerivationArgumentError(f"derivation {name!r}: attribute 'outputHashMode' must be 'flat' or "
                                          f"'recursive', got {mode!r}")
        algo = env.get("outputHashAlgo", "")
        if algo and algo not in ALGOS:
            raise DerivationArgumentError(f"derivation {name!r}: attribute 'outputHashAlgo' must be one of "
                                          f"{', '.join(ALGOS)} (or empty with an SRI hash), got {algo!r}")
        try:
            h = Hash.parse(env["outputHash"], algo or None)
        except BadHash as e:
            raise DerivationArgumentError(f"derivation {name!r}: attribute 'outputHash' "
                                          f"(outputHashAlgo {algo!r}) is not a valid hash: {e}") from None
        outs = {"out": DerivationOutput("", ("r:" if mode == "recursive" else "") + h.algo, h.base16)}
    else:
        outs = {o: DerivationOutput("") for o in out_names}
    for o in out_names:
        env[o] = ""

    drv = Derivation(
        outputs=outs,
        input_drvs={p: frozenset(o) for p, o in used.items()},
        input_srcs=frozenset(input_srcs),
        system=system_s,
        builder=builder_s,
        args=args_s,
        env=env,
    )
    drv = fill_output_paths(drv, ctx.lookup, ctx.store_dir, ctx.modulo)
    aterm = render_aterm(drv)
    drv_path = ctx.abs(drv_store_path(drv, ctx.store_dir, aterm))
    existing = ctx.drvs.get(drv_path)
    if existing is not None:
        return existing
    value = Drv(name, drv, drv_path, aterm, out_names, input_drvs, input_srcs, raw)
    ctx.drvs[drv_path] = value
    ctx.modulo[drv_path] = modulo_of_unmasked(drv, ctx.modulo, aterm)
    for o in value.outputs.values():
        ctx.known[_hash_part(o.path)] = o
    ctx.known[_hash_part(drv_path)] = value
    return value


def _hash_part(path: str) -> str:
    i = path.rfind("/") + 1
    return path[i:i + 32]


# -- sources and texts --------------------------------------------------------------------------------


def _caller_dir(depth: int) -> str:
    f = sys._getframe(depth + 1)
    file = f.f_globals.get("__file__") or f.f_code.co_filename
    return os.path.dirname(os.path.abspath(file))


def source(path, name: str | None = None, *, base: str | None = None) -> Source:
    """A file or directory added to the store as a ``source`` path (Nix's ``builtins.path``).

    A relative ``path`` is relative to the directory of the file that calls ``source()`` (or to
    ``base``).  ``name`` defaults to the last path component.  Evaluation only hashes the tree;
    ``pure instantiate`` copies it into the store.
    """
    ctx = current_context()
    if not isinstance(path, (str, os.PathLike)):
        raise DerivationArgumentError(f"source(): 'path' must be a string or path, got {_type_name(path)} {_show(path)}")
    p = os.fspath(path)
    if not os.path.isabs(p):
        p = os.path.join(base or _caller_dir(1), p)
    p = os.path.normpath(p)
    given = name is not None
    if name is None:
        name = os.path.basename(p)
    try:
        check_name(name)
    except InvalidStorePath as e:
        # "pass name=" helps only where the name came from the path, not where it was passed
        raise DerivationArgumentError(f"source({path!r}): the name {name!r} is not a valid store path name "
                                      f"({e})" + ("" if given else "; it is the path's base name: pass name=... "
                                                  "to choose a valid one")) from None
    key = (p, name)
    got = ctx.sources.get(key)
    if got is not None:
        return got
    real = os.path.realpath(p)
    ctx.source_roots.extend((p, real))
    if not os.path.lexists(p):
        raise EvalError(f"source(): {p!r} does not exist")
    from ..store.fsnar import hash_path
    from .purity import suspended
    with suspended():  # the path is allowed; fsnar may open entries relative to directory fds
        nar_hash, _size = hash_path(p)
    sp = make_source_path(name, nar_hash, (), ctx.store_dir)
    src = Source(ctx.abs(sp), name, "source", host_path=p)
    ctx.sources[key] = src
    ctx.known[sp.hash_part] = src
    return src


def to_file(name: str, text: str) -> Source:
    """A text file in the store (Nix's ``builtins.toFile``).  Its references are the sources and
    texts its text mentions; it may not mention derivation outputs (as in Nix)."""
    ctx = current_context()
    if not isinstance(name, str):
        raise DerivationArgumentError(f"to_file(): 'name' must be a string, got {_type_name(name)} {_show(name)}")
    try:
        check_name(name)
    except InvalidStorePath as e:
        raise DerivationArgumentError(f"to_file({name!r}): not a valid store path name: {e}") from None
    if isinstance(text, bytes):
        data = text
        text = text.decode("utf-8", "surrogateescape")
    elif isinstance(text, str):
        data = text.encode("utf-8", "surrogateescape")
    else:
        raise DerivationArgumentError(f"to_file({name!r}): 'text' must be a string, got {_type_name(text)} {_show(text)}")
    refs = []
    for obj in _scan(ctx, [text]):
        if isinstance(obj, Source):
            refs.append(obj)
        else:
            raise EvalError(f"to_file({name!r}): the text refers to {obj!r}; files made by to_file can only "
                            f"refer to sources and other to_file texts, not to derivations or their outputs "
                            f"(write the file in a derivation instead)")
    refs.sort(key=lambda s: s.path)
    sp = make_text_path(name, data, [StorePath.parse(r.path, ctx.store_dir) for r in refs], ctx.store_dir)
    src = Source(ctx.abs(sp), name, "text", text=data, references=tuple(refs))
    ctx.texts[src.path] = src
    ctx.known[sp.hash_part] = src
    return src


def fetchurl(*, url: str, hash: str = "", md5: str = "", sha1: str = "", sha256: str = "", sha512: str = "",
             name: str | None = None, unpack: bool = False, executable: bool = False, **extra) -> Drv:
    """A fixed-output derivation fetched by the builtin fetcher, identical to Nix's
    ``import <nix/fetchurl.nix>`` with the same arguments (``hash`` may be SRI or typed; or give
    ``sha256=``/``sha1=``/``sha512=``/``md5=``).  ``unpack=True`` unpacks an archive and hashes the
    tree (recursive); ``executable=True`` makes the file executable (recursive)."""
    if not isinstance(url, str):
        raise DerivationArgumentError(f"fetchurl(): 'url' must be a string, got {_type_name(url)} {_show(url)}")
    if hash:
        output_hash, algo, arg = hash, "", "hash"
    elif sha512:
        output_hash, algo, arg = sha512, "sha512", "sha512"
    elif sha1:
        output_hash, algo, arg = sha1, "sha1", "sha1"
    elif md5:
        output_hash, algo, arg = md5, "md5", "md5"
    elif sha256:
        output_hash, algo, arg = sha256, "sha256", "sha256"
    else:
        raise DerivationArgumentError(f"fetchurl({url!r}): no hash given; expected hash= (SRI or 'sha256:...') "
                                      f"or sha256=/sha1=/sha512=/md5=")
    if isinstance(output_hash, str):  # (checked here to name fetchurl's argument, not outputHash)
        try:
            Hash.parse(output_hash, algo or None)
        except BadHash as e:
            raise DerivationArgumentError(f"fetchurl({url!r}): {arg}={output_hash!r} is not a valid hash: "
                                          f"{e}") from None
    if name is None:
        name = url.rstrip("/").rsplit("/", 1)[-1]
    return derivation(
        builder="builtin:fetchurl",
        outputHashAlgo=algo,
        outputHash=output_hash,
        outputHashMode="recursive" if unpack or executable else "flat",
        name=name,
        url=url,
        executable=executable,
        unpack=unpack,
        system="builtin",
        preferLocalBuild=True,
        impureEnvVars=["http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy"],
        urls=[url],
        **extra,
    )
