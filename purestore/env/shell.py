"""``pure shell`` and ``pure run``: environments built from a closure.

The *environment paths* of a set of built packages are, in this order: the packages' outputs,
the outputs of the input derivations of the packages' derivations (a ``devshell`` derivation's
tools, like ``nix-shell``'s build inputs), then the rest of the runtime closure of all of these
(dependents before their dependencies).  From them (only those that have the directory):

    PATH             <p>/bin
    CPATH            <p>/include
    LIBRARY_PATH     <p>/lib
    PKG_CONFIG_PATH  <p>/lib/pkgconfig and <p>/share/pkgconfig
    MANPATH          <p>/share/man

Without ``--pure`` these are put in front of the caller's values (an unset ``MANPATH`` gets a
trailing ``:``, man's default path); with ``--pure`` the caller's
environment is cleared except ``HOME USER LOGNAME DISPLAY TERM TZ PAGER SHLVL`` and ``PURE_*``
(so ``pure`` inside the shell still finds its store), and PATH holds store paths only.
``IN_PURE_SHELL`` is ``pure`` or ``impure``; ``PURE_STORE`` and ``PURE_STORE_DIR`` name this store
(given with ``--store``/``--store-dir`` or not), so that ``pure`` inside uses it.  A derivation's ``shellHook`` attribute is run by
the shell before the command (or before the prompt), as in ``nix-shell``; an interactive shell
reads :func:`interactive_rc` first.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import attrs

from ..errors import ShellError
from ..formats.store_path import StorePath
from .installable import Built
from .profiles import host_path

KEEP_WHEN_PURE = ("HOME", "USER", "LOGNAME", "DISPLAY", "TERM", "TZ", "PAGER", "SHLVL")
SEARCH_VARS = (
    ("PATH", ("bin",)),
    ("CPATH", ("include",)),
    ("LIBRARY_PATH", ("lib",)),
    ("PKG_CONFIG_PATH", ("lib/pkgconfig", "share/pkgconfig")),
    ("MANPATH", ("share/man",)),
)


@attrs.frozen
class ShellEnv:
    paths: tuple[StorePath, ...]   # environment paths, in order
    env: dict                      # the full environment for the program
    shell: str                     # the shell to run (logical path, or a host shell)
    hook: str = ""                 # the derivations' shellHook attributes, joined
    path_dirs: str = ""            # the environment's own part of PATH (its bin directories)
    pure: bool = False


def shell_hook(store, built: Iterable[Built]) -> str:
    """The ``shellHook`` attributes of the built derivations (run by the shell first, as
    ``nix-shell`` does), joined by newlines."""
    from ..expr.loader import read_derivation

    hooks = []
    for b in built:
        if b.drv is None or not store.is_valid(b.drv):
            continue
        try:
            h = read_derivation(store, b.drv).env.get("shellHook")
        except Exception:  # noqa: BLE001 - not a readable derivation: no hook
            continue
        if h:
            hooks.append(h)
    return "\n".join(hooks)


def environment_paths(store, built: Iterable[Built]) -> list[StorePath]:
    """The environment paths of ``built`` (see the module docstring), all of them temporary
    roots of this process: a build input's output is in the environment though the packages do
    not refer to it, and a ``pure gc`` during the session would otherwise delete it."""
    built = list(built)
    first: list[StorePath] = [p for b in built for p in b.outputs]
    for b in built:
        if b.drv is None or not store.is_valid(b.drv):
            continue
        for inp in _input_outputs(store, b.drv):
            first.append(inp)
    first = list(dict.fromkeys(first))
    store.add_temp_roots(first)  # (before they are found valid: then a gc keeps them, closures too)
    first = [p for p in first if store.is_valid(p)]
    closure = store.query_closure(first)
    rest = [p for p in reversed(store.topo_sort(closure)) if p not in set(first)]
    return first + rest


def _input_outputs(store, drv: StorePath) -> list[StorePath]:
    from ..expr.loader import read_derivation

    try:
        d = read_derivation(store, drv)
    except Exception:  # noqa: BLE001 - not readable as a derivation: no build inputs then
        return []
    out = []
    for inp_drv, names in sorted(d.input_drvs.items()):
        try:
            outs = store.query_derivation_outputs(store.parse_path(inp_drv))
        except (ValueError, OSError):
            continue
        out.extend(outs[n] for n in sorted(names) if n in outs)
    return out


def make_environment(store, paths: list[StorePath], *, pure: bool,
                     base: Mapping[str, str] | None = None, shell: bool = True) -> dict:
    """The environment of a shell of ``paths`` (see the module docstring); with ``shell=False``
    that of ``pure run``'s program: the caller's with only ``PATH`` extended, and no
    ``IN_PURE_SHELL`` (it is not in a shell: a prompt or script that looks at it would say
    so)."""
    base = dict(os.environ if base is None else base)
    if pure:
        env = {k: v for k, v in base.items() if k in KEEP_WHEN_PURE or k.startswith("PURE_")}
    else:
        env = dict(base)
    for var, subdirs in SEARCH_VARS if shell else SEARCH_VARS[:1]:
        dirs = _search_dirs(store, paths, subdirs)
        old = env.get(var) if not pure else None
        if dirs or old:
            env[var] = ":".join(dirs + ([old] if old else []))
        if var == "MANPATH" and dirs and not pure and not old:
            # an unset MANPATH means man's default search path, which a MANPATH of the
            # environment's directories alone would replace (`man ls` found nothing): a
            # trailing ':' appends it (man-db and mandoc)
            env[var] += ":"
    if pure and "PATH" not in env:
        env["PATH"] = ""
    if shell:
        env["IN_PURE_SHELL"] = "pure" if pure else "impure"
    # `pure` inside finds this store, also when it was named with --store/--store-dir (not the
    # host's store, whose state dir would otherwise go with this store's files)
    settings = getattr(store, "settings", None)
    if settings is not None:
        env["PURE_STORE"] = settings.root
        env["PURE_STORE_DIR"] = settings.store_dir
    return env


def _search_dirs(store, paths: list[StorePath], subdirs: tuple[str, ...]) -> list[str]:
    return [f"{store.print_path(p)}/{s}" for p in paths for s in subdirs
            if _isdir(store, f"{store.real_path(p)}/{s}")]


def _isdir(store, real: str) -> bool:
    p = host_path(store, real)
    return p is not None and os.path.isdir(p)


def _executable(store, real: str) -> bool:
    p = host_path(store, real)
    return p is not None and os.path.isfile(p) and os.access(p, os.X_OK)


def find_shell(store, paths: list[StorePath]) -> str:
    """``bash``, else ``sh``, from the environment paths; else the host's ``/bin/sh``."""
    for prog in ("bash", "sh"):
        for p in paths:
            if _executable(store, f"{store.real_path(p)}/bin/{prog}"):
                return f"{store.print_path(p)}/bin/{prog}"
    for host in ("/bin/bash", "/bin/sh"):
        if os.access(host, os.X_OK):
            return host
    raise ShellError("no shell found: the environment has no bin/bash or bin/sh and the host has no /bin/sh")


def shell_environment(store, built: list[Built], *, pure: bool, base: Mapping[str, str] | None = None) -> ShellEnv:
    paths = environment_paths(store, built)
    env = make_environment(store, paths, pure=pure, base=base)
    return ShellEnv(tuple(paths), env, find_shell(store, paths), shell_hook(store, built),
                    ":".join(_search_dirs(store, paths, ("bin",))), pure)


def interactive_rc(senv: ShellEnv, env: Mapping[str, str]) -> str:
    """The file an interactive shell of ``senv`` reads first (bash's ``--rcfile``, sh's
    ``$ENV``), as ``nix-shell``'s: without ``--pure`` the user's own (``~/.bashrc`` for bash, the
    caller's ``$ENV`` for sh; with ``--pure`` none); then ``PATH`` made the environment's again
    (an rc file, or the system's ``/etc/bash.bashrc`` that bash reads first, may set it: a
    ``--pure`` shell's PATH is the store's only, an impure one's starts with the environment's
    directories) and ``PS1`` set to ``env``'s; then the derivations' ``shellHook``.  ``env`` is
    the shell's environment (``senv.env`` with its ``PS1``), before ``ENV`` names this file: for
    sh it is set back to the caller's (or unset), so that a shell started inside does not read
    this file again."""
    import shlex

    lines = []
    if not senv.shell.endswith("/bash"):
        # $ENV names this file for sh: the shells started in it get the caller's again
        lines.append(f"ENV={shlex.quote(env['ENV'])}" if env.get("ENV") else "unset ENV")
    if not senv.pure:
        if senv.shell.endswith("/bash"):
            lines.append('[ -e "$HOME/.bashrc" ] && . "$HOME/.bashrc"')
        elif env.get("ENV"):
            lines.append(f"[ -r {shlex.quote(env['ENV'])} ] && . {shlex.quote(env['ENV'])}")
    if senv.pure:
        lines.append(f"PATH={shlex.quote(env.get('PATH', ''))}")
    elif senv.path_dirs:  # (left alone when it starts with them: a PATH only appended to)
        d = shlex.quote(senv.path_dirs)
        lines.append(f'case "$PATH" in {d}|{d}:*) ;; *) PATH={d}"${{PATH:+:$PATH}}" ;; esac')
    if "PS1" in env:
        lines.append(f"PS1={shlex.quote(env['PS1'])}")
    if senv.hook:
        lines.append(senv.hook)
    return "\n".join(lines) + "\n"


def find_program(store, built: Built, program: str | None) -> str:
    """The program ``pure run`` starts, from the ``bin/`` of the first output that has programs
    there (``out`` first; a package may keep them in a ``bin`` output): ``--program`` (from
    any output), else the only one there, else the one named like the package without its
    version."""
    found = [_programs(store, out) for out in built.outputs]
    out, bindir, host_bin, names = next((f for f in found if f[3]), found[0])
    if program is not None:
        out, bindir, host_bin, names = next((f for f in found if program in f[3]),
                                            (out, bindir, host_bin, names))
        if "/" in program:
            raise ShellError(f"--program takes a name in {store.print_path(out)}/bin, got {program!r}")
        if program not in names:
            import difflib
            close = difflib.get_close_matches(program, names, n=3)
            raise ShellError(f"{store.print_path(out)}/bin has no program {program!r}; it has "
                             f"{_program_names(names, host_bin or bindir)}",
                             hint=f"did you mean {' or '.join(map(repr, close))}?" if close else None)
        return f"{store.print_path(out)}/bin/{program}"
    if len(names) == 1:
        return f"{store.print_path(out)}/bin/{names[0]}"
    if not names:  # nothing to choose from: --program would not help
        where = ("its bin/ has no executable file" if host_bin and os.path.isdir(host_bin)
                 else "it has no bin/ directory")
        raise ShellError(f"{store.print_path(out)} has no program to run: {where}",
                         hint="pure run runs a program of the package's bin/; "
                              "`pure shell` gives an environment with it instead")
    import re

    m = re.match(r"(.+?)-\d", built.name)
    pname = m.group(1) if m else built.name
    if pname in names:
        return f"{store.print_path(out)}/bin/{pname}"
    raise ShellError(f"do not know which program of {store.print_path(out)} to run: its bin/ has "
                     f"{_program_names(names, host_bin or bindir)}", hint="choose one with --program NAME")


def _programs(store, out: StorePath) -> tuple[StorePath, str, str | None, list[str]]:
    """(output, its bin/ (real path), where that is on the host or None, its programs)."""
    bindir = f"{store.real_path(out)}/bin"
    host_bin = host_path(store, bindir)
    try:
        names = sorted(n for n in os.listdir(host_bin) if _executable(store, f"{bindir}/{n}")) if host_bin else []
    except (FileNotFoundError, NotADirectoryError):
        names = []
    return out, bindir, host_bin, names


def _program_names(names: list[str], bindir: str, most: int = 20) -> str:
    """'a, b, c', or past ``most`` names the first of them and how many more (and where to see
    them all: a package may have hundreds of programs)."""
    if not names:
        return "nothing"
    if len(names) <= most:
        return ", ".join(names)
    return (f"{len(names)} programs: {', '.join(names[:most])} and {len(names) - most} more "
            f"(all of them: ls {bindir})")
