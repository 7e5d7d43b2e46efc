"""Values an expression handles: derivations (:class:`Drv`), their outputs (:class:`Output`) and
store objects made from host files or text (:class:`Source`).

All three turn into their store path with ``str()`` (so ``f"{dep}/bin/cc"`` works) and are plain
data: they do no I/O.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..formats.derivation import Derivation


class _PathLike:
    """Shared string behaviour: ``str(x)`` is the store path; ``x + "/bin"`` and ``"-I" + x`` work."""

    __slots__ = ()

    def __add__(self, other):
        if isinstance(other, (str, _PathLike)):
            return str(self) + str(other)
        return NotImplemented

    def __radd__(self, other):
        if isinstance(other, str):
            return other + str(self)
        return NotImplemented

    def __fspath__(self):  # pragma: no cover - guard against treating store paths as host paths
        raise TypeError(f"{self!r} is a store path, not a host path; use str() to get the text")


class Output(_PathLike):
    """One output of a derivation: ``str(o)`` is its path; ``o.derivation`` the :class:`Drv`."""

    __slots__ = ("derivation", "name", "path")

    def __init__(self, derivation: "Drv", name: str, path: str):
        self.derivation = derivation
        self.name = name
        self.path = path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"<output {self.name!r} of {self.derivation.name!r}: {self.path}>"

    def __eq__(self, other):
        return isinstance(other, Output) and other.path == self.path

    def __hash__(self):
        return hash(self.path)


class Drv(_PathLike):
    """A derivation value, as returned by ``derivation()``.

    - ``str(d)``: the path of its first output (``out`` unless ``outputs=`` says otherwise);
    - ``d.outputs["dev"]``: an :class:`Output`; ``d.out_path``; ``d.drv_path`` (the ``.drv`` path);
    - ``d.name``, ``d.version`` (the ``version=`` attribute, else parsed from the name like Nix's
      ``parseDrvName``), ``d.system``;
    - ``d.attrs``: the environment (every attribute as a string, as in the ``.drv``);
    - ``d.drv``: the :class:`purestore.formats.derivation.Derivation`;
    - ``d.args``: the original keyword arguments given to ``derivation()`` (unconverted), so that
      helpers can derive a changed copy.
    """

    __slots__ = ("name", "drv", "drv_path", "outputs", "version", "aterm", "input_drvs",
                 "input_srcs", "args", "__weakref__")

    def __init__(self, name: str, drv: "Derivation", drv_path: str, aterm: bytes, output_names,
                 input_drvs: dict, input_srcs: dict, args: dict):
        self.name = name
        self.drv = drv
        self.drv_path = drv_path
        self.aterm = aterm
        self.outputs = {o: Output(self, o, drv.outputs[o].path) for o in output_names}
        #: drv path -> Drv of every input derivation
        self.input_drvs = input_drvs
        #: store path -> Source of every input source or text
        self.input_srcs = input_srcs
        self.args = args
        v = drv.env.get("version")
        self.version = v if v is not None else parse_version(name)

    @property
    def attrs(self) -> dict[str, str]:
        return self.drv.env

    @property
    def system(self) -> str:
        return self.drv.system

    @property
    def out(self) -> Output:
        return next(iter(self.outputs.values()))

    @property
    def out_path(self) -> str:
        return self.out.path

    def __str__(self) -> str:
        return self.out.path

    def __repr__(self) -> str:
        return f"<derivation {self.drv_path}>"

    def __eq__(self, other):
        return isinstance(other, Drv) and other.drv_path == self.drv_path

    def __hash__(self):
        return hash(self.drv_path)

    def __getitem__(self, output: str) -> Output:
        try:
            return self.outputs[output]
        except KeyError:
            raise KeyError(f"derivation {self.name!r} has no output {output!r}; it has "
                           f"{', '.join(self.outputs)}") from None


class Source(_PathLike):
    """A store object made at evaluation time: a host file or tree (``kind == "source"``,
    ``host_path`` set) or a text (``kind == "text"``, ``text`` and ``references`` set)."""

    __slots__ = ("path", "name", "kind", "host_path", "text", "references")

    def __init__(self, path: str, name: str, kind: str, host_path: str | None = None,
                 text: bytes | None = None, references: tuple["Source", ...] = ()):
        self.path = path
        self.name = name
        self.kind = kind
        self.host_path = host_path
        self.text = text
        self.references = references

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        what = self.host_path if self.kind == "source" else "text"
        return f"<{self.kind} {self.path} from {what}>"

    def __eq__(self, other):
        return isinstance(other, Source) and other.path == self.path

    def __hash__(self):
        return hash(self.path)


_VERSION_START = re.compile(r"-(?=[^A-Za-z])")


def parse_version(name: str) -> str:
    """Nix's ``parseDrvName``: the version starts after the first ``-`` followed by a non-letter."""
    m = _VERSION_START.search(name)
    return name[m.end():] if m else ""
