"""Where expressions are found, and the import system that loads them (for :mod:`.loader`).

- :func:`find_pkgs_dir`, :func:`search_path`, :func:`missing_search_dirs`: the package set and
  the ``-I``/``PURE_PATH`` roots;
- :class:`ExprImporter`: the meta-path finder an evaluation installs: ``import pkgs`` is the
  package set, a plain ``import name`` finds ``name.py`` (or ``name/__init__.py``) in the
  expression's directory, then in each root; it compiles without writing ``__pycache__``, keeps
  the files it compiled (for tracebacks that show expression frames only) and reports import
  cycles as :class:`~purestore.errors.EvalError`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterable

from ..errors import EvalError


# -- where things are -----------------------------------------------------------------------------


def find_pkgs_dir(env: dict[str, str] | None = None) -> str | None:
    """The package set: ``$PURE_PKGS``, else ``<repo>/expressions`` next to the package."""
    env = os.environ if env is None else env
    if env.get("PURE_PKGS"):
        return os.path.abspath(env["PURE_PKGS"])
    here = Path(__file__).resolve().parent.parent.parent / "expressions"
    return str(here) if here.is_dir() else None


def search_path(include_paths: Iterable[str] = (), env: dict[str, str] | None = None) -> list[str]:
    """``-I`` roots first, then the colon-separated ``$PURE_PATH``."""
    env = os.environ if env is None else env
    roots = [os.path.abspath(p) for p in include_paths]
    roots += [os.path.abspath(p) for p in env.get("PURE_PATH", "").split(":") if p]
    return roots


def missing_search_dirs(include_paths: Iterable[str] = (), env: dict[str, str] | None = None) -> list[str]:
    """A warning for each root of :func:`search_path` that is not a directory (once each): the
    importer passes over it, so a misspelt ``-I`` was ignored without a word (Nix warns)."""
    env = os.environ if env is None else env
    given = [(p, "-I") for p in include_paths]
    given += [(p, "PURE_PATH entry") for p in env.get("PURE_PATH", "").split(":") if p]
    out, seen = [], set()
    for p, what in given:
        root = os.path.abspath(p)
        if root in seen or os.path.isdir(root):
            continue
        seen.add(root)
        why = "is not a directory" if os.path.exists(root) else "does not exist"
        out.append(f"{what} {p!r} {why}; ignoring it" + (f" ({root!r})" if root != p else ""))
    return out


# -- the importer ---------------------------------------------------------------------------------


class ExprImporter(importlib.abc.MetaPathFinder):
    def __init__(self, roots: list[str], pkgs_dir: str | None):
        self.roots = roots
        self.pkgs_dir = pkgs_dir
        self.owned: set[str] = set()     # top-level module names this importer provides
        self.loaded: list[str] = []      # every module name it created
        self.files: set[str] = set()     # every file it compiled
        self.stack: list[str] = []       # modules being executed (for cycle reports)

    # finder
    def find_spec(self, fullname, path, target=None):
        spec = self._find_spec(fullname, path)
        if spec is not None:
            self.loaded.append(fullname)
        return spec

    def _find_spec(self, fullname, path):
        top = fullname.partition(".")[0]
        if fullname == "pkgs":
            if self.pkgs_dir is None:
                return None
            self.owned.add("pkgs")
            init = os.path.join(self.pkgs_dir, "__init__.py")
            if os.path.isfile(init):
                return self._spec(fullname, init, package_dir=self.pkgs_dir)
            spec = importlib.machinery.ModuleSpec(fullname, _EmptyLoader(), is_package=True)
            spec.submodule_search_locations = [self.pkgs_dir]
            return spec
        if "." in fullname:
            if top not in self.owned or not path:
                return None
            dirs = list(path)
        else:
            dirs = self.roots
        last = fullname.rpartition(".")[2]
        for d in dirs:
            pkg_init = os.path.join(d, last, "__init__.py")
            if os.path.isfile(pkg_init):
                self.owned.add(top)
                return self._spec(fullname, pkg_init, package_dir=os.path.join(d, last))
            f = os.path.join(d, last + ".py")
            if os.path.isfile(f):
                self.owned.add(top)
                return self._spec(fullname, f)
        return None

    def _spec(self, fullname, file, package_dir=None):
        return importlib.util.spec_from_file_location(
            fullname, file, loader=ExprLoader(self, file),
            submodule_search_locations=[package_dir] if package_dir else None)

    def where(self) -> str:
        """`` (at file:line)`` of the innermost expression frame, or ``""``."""
        f = sys._getframe(1)
        while f is not None:
            if f.f_code.co_filename in self.files:
                return f" (at {f.f_code.co_filename}:{f.f_lineno})"
            f = f.f_back
        return ""

    def compile_file(self, file: str):
        with open(file, "rb") as fh:
            src = fh.read()
        self.files.add(file)
        try:
            return compile(src, file, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            if not isinstance(e, SyntaxError) or e.lineno is None:
                # a NUL byte: the compiler says so without a line (ValueError before 3.12)
                at = src.find(b"\0")
                lineno = src.count(b"\n", 0, at) + 1 if at >= 0 else 1
                raise EvalError(f"syntax error in {file}:{lineno}: {e}") from None
            line = (e.text or "").rstrip("\n")
            caret = ""
            if line and e.offset:
                stripped = line.lstrip()
                caret = "\n    " + " " * max(0, e.offset - 1 - (len(line) - len(stripped))) + "^"
                line = stripped
            raise EvalError(f"syntax error in {file}:{e.lineno}: {e.msg}"
                            + (f"\n    {line}{caret}" if line else "")) from None

    def run(self, module, file: str) -> None:
        code = self.compile_file(file)
        name = module.__name__
        self.stack.append(name)
        importer = self

        def __getattr__(attr):
            # only a module further up the import stack reading a name that is not defined yet
            # is a cycle; libraries probing dunders, or the module itself, get AttributeError
            if name in importer.stack and importer.stack[-1] != name and not attr.startswith("__"):
                i = importer.stack.index(name)
                cycle = " -> ".join(importer.stack[i:] + [name])
                raise EvalError(f"import cycle: {cycle}: {importer.stack[-1]!r} uses {name}.{attr} "
                                f"before {name!r} has finished loading")
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")

        module.__dict__["__getattr__"] = __getattr__
        try:
            exec(code, module.__dict__)
        finally:
            self.stack.pop()
            if module.__dict__.get("__getattr__") is __getattr__:
                del module.__dict__["__getattr__"]


class ExprLoader(importlib.abc.Loader):
    def __init__(self, importer: ExprImporter, file: str):
        self.importer = importer
        self.file = file

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.importer.run(module, self.file)


class _EmptyLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pass
