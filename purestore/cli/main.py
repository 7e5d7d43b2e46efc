"""Entry point of ``pure``: global options, command registration, the one error handler.

Each command group lives in its own module under ``purestore.cli`` and exposes
``register(cli: Registry)``.  Library code is imported inside command functions so that
``pure --help`` and quick commands start fast.
"""

from __future__ import annotations

from . import _startup

if __name__ == "__main__":  # python -m purestore.cli.main: the imports below are covered too
    _startup.begin()

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Callable

from .. import __version__
from .._visible import visible
from ..errors import PurestoreError

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = [
    "hash_cmd",      # pure hash
    "nar_cmd",       # pure nar
    "store_cmd",     # pure store add/path-info/ls/references/requisites/verify/delete
    "eval_cmd",      # pure eval / instantiate / show-derivation
    "build_cmd",     # pure build / log / store realise
    "key_cmd",       # pure key generate/public, store sign
    "copy_cmd",      # pure copy
    "serve_cmd",     # pure cache serve, store serve
    "cache_cmd",     # pure cache verify/info/path-info/sign/prune/ls/cat
    "env_cmd",       # pure shell / run / profile / gc
    "evidence_cmd",  # pure sbom / provenance / report / why-depends
]

# Which modules register each top-level command or group, in COMMAND_MODULES order (the order
# of a group's commands in its --help).  Only those are imported when a command runs, so
# `pure hash path` does not pay for building every other parser.
# (tests/test_cli_main.py checks this table against what the modules really register.)
COMMAND_OWNERS: dict[str, tuple[str, ...]] = {
    "hash": ("hash_cmd",),
    "nar": ("nar_cmd",),
    "store": ("store_cmd", "build_cmd", "key_cmd", "serve_cmd"),
    "eval": ("eval_cmd",), "instantiate": ("eval_cmd",), "show-derivation": ("eval_cmd",),
    "build": ("build_cmd",), "log": ("build_cmd",),
    "key": ("key_cmd",), "copy": ("copy_cmd",), "cache": ("serve_cmd", "cache_cmd"),
    "gc": ("env_cmd",), "profile": ("env_cmd",), "shell": ("env_cmd",), "run": ("env_cmd",),
    "sbom": ("evidence_cmd",), "provenance": ("evidence_cmd",), "report": ("evidence_cmd",),
    "why-depends": ("evidence_cmd",),
}
# Which module registers each command of a group that several modules add to, so that
# `pure store path-info` builds only store_cmd's parsers, not those of build_cmd, key_cmd and
# serve_cmd too (`pure store` alone, or with an option or an unknown word next, builds them all).
# (tests/test_cli_main.py checks this table too.)
SUBCOMMAND_OWNERS: dict[tuple[str, str], str] = {
    **{("store", c): "store_cmd" for c in ("add", "path-info", "ls", "references", "referrers",
                                           "requisites", "verify", "copy-sigs", "delete",
                                           "optimise")},
    ("store", "realise"): "build_cmd", ("store", "sign"): "key_cmd", ("store", "serve"): "serve_cmd",
    ("cache", "serve"): "serve_cmd",
    **{("cache", c): "cache_cmd" for c in ("verify", "info", "path-info", "sign", "prune", "ls", "cat")},
}
_GLOBAL_OPTS_WITH_VALUE = {"--store", "--store-dir", "--substituters", "--trusted-public-keys",
                           "--extra-substituters", "--extra-trusted-public-keys", "--post-build-hook",
                           "--max-silent-time", "--timeout", "--max-build-log-size"}


def _command_word(argv: list[str]) -> str | None:
    """The first positional word of argv (the command), skipping global options."""
    i = _command_index(argv)
    return None if i is None else argv[i]


def _command_index(argv: list[str]) -> int | None:
    """Where :func:`_command_word` is in argv."""
    it = iter(enumerate(argv))
    for i, word in it:
        if word == "--":
            return None
        if word.startswith("-"):
            if word in _GLOBAL_OPTS_WITH_VALUE:
                next(it, None)
            elif word == "--option":  # NAME VALUE
                next(it, None)
                next(it, None)
            continue
        return i
    return None


def _modules_for(argv: list[str]) -> list[str] | None:
    """The command modules whose parsers ``argv`` needs (None: all of them)."""
    if argv == ["--version"]:  # needs no command's parser (all of them cost 20 ms of imports and set-up)
        return []
    i = _command_index(argv)
    if i is None:
        return None
    owners = COMMAND_OWNERS.get(argv[i])
    if not owners:
        return None
    # a group's command named right after the group: only the module that registers it
    sub = SUBCOMMAND_OWNERS.get((argv[i], argv[i + 1])) if len(owners) > 1 and i + 1 < len(argv) else None
    return [sub] if sub else list(owners)


class _Parser(argparse.ArgumentParser):
    """argparse with purestore's form of errors: ``error: …`` and where to read more (status 2),
    not a usage block first."""

    argv: list[str] = []  # the command line being parsed (set by :func:`main`)

    def error(self, message: str, hint: str | None = None):
        hint = hint or f"see '{self.prog} --help'"
        print(f"error: {message}", file=sys.stderr)
        print(f"hint: {hint}", file=sys.stderr)
        if "--json" in self._option_string_actions and any(
                len(a) > 3 and "--json".startswith(a) for a in self.argv):  # (argparse takes "--js")
            # a script reading stdout gets the error object there too (see _JsonWatch)
            import json
            try:
                print(json.dumps({"type": "error", "error": message, "hint": hint, "exitStatus": 2}), flush=True)
            except (OSError, ValueError):
                pass
        sys.exit(2)


class Registry:
    """What a command module registers into: top-level commands and named groups (``store``…)."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self._top = parser.add_subparsers(dest="command", metavar="COMMAND")
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def command(self, name: str, help: str, func: Callable, group: str | None = None,
                description: str | None = None, **kw) -> argparse.ArgumentParser:
        """Add a command; ``func(args, ctx) -> int | None`` runs it."""
        subs = self._top if group is None else self.group(group)
        p = subs.add_parser(name, help=help, description=description or help,
                            formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        p.set_defaults(func=func)
        return p

    def group(self, name: str, help: str | None = None) -> argparse._SubParsersAction:
        if name not in self._groups:
            p = self._top.add_parser(name, help=help or f"{name} commands", description=help)
            p.set_defaults(func=lambda args, ctx: _group_help(p))
            self._groups[name] = p.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
        return self._groups[name]


def _group_help(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


class Context:
    """What a command gets besides its arguments: settings (loaded on first use) and output helpers."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._settings = None

    @property
    def settings(self):
        if self._settings is None:
            from ..store.settings import load_settings
            self._settings = load_settings(
                options=getattr(self.args, "global_option", None) or (),
                root=self.args.store, store_dir=self.args.store_dir,
                substituters=_split_opt(getattr(self.args, "global_substituters", None)),
                trusted_public_keys=_split_opt(getattr(self.args, "global_trusted_public_keys", None)),
                offline=True if getattr(self.args, "global_offline", False) else None,
                fallback=getattr(self.args, "global_fallback", None),
                post_build_hook=getattr(self.args, "global_post_build_hook", None),
                max_silent_time=getattr(self.args, "global_max_silent_time", None),
                timeout=getattr(self.args, "global_timeout", None),
                max_build_log_size=getattr(self.args, "global_max_build_log_size", None),
            )
            more = {k: (*getattr(self._settings, k), *v) for k in ("substituters", "trusted_public_keys")
                    if (v := _split_opt(getattr(self.args, f"global_extra_{k}", None)))}
            if more:  # --extra-…: added to what the config files and the plain option set
                import attrs
                self._settings = attrs.evolve(self._settings, **more)
        return self._settings

    def open_store(self):
        from ..store.local import LocalStore
        store = LocalStore.open(self.settings)
        if store.read_only:  # (an error of a write then says why it failed: see _run_command)
            self.read_only = store.db.read_only
        return store

    read_only: str | None = None

    @staticmethod
    def info(msg: str) -> None:
        """Progress and status for people: stderr, so stdout stays parseable."""
        print(msg, file=sys.stderr, flush=True)


def _limit(text: str) -> int:
    """An option's whole number of at least 0 (argparse names the option in its error)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number (0: no limit), got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (no limit) or more, got {text!r}")
    from ..store.settings import INT_SETTING_MAX
    if n > INT_SETTING_MAX:
        raise argparse.ArgumentTypeError(f"expected at most {INT_SETTING_MAX}, got {text!r}")
    return n


def _split_opt(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value.split())


def make_parser(modules: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the commands of ``modules`` (default: all command modules)."""
    parser = _Parser(
        prog="pure",
        description="purestore: hermetic, reproducible builds and a Nix-compatible package store.",
        epilog="Run 'pure COMMAND --help' for a command's options. Docs: docs/ in the source tree.",
    )
    parser.add_argument("--version", action="version", version=f"pure (purestore) {__version__}")
    parser.add_argument("--store", metavar="ROOT", default=None,
                        help="use a rooted store under ROOT (env PURE_STORE); hashes stay the same")
    parser.add_argument("--store-dir", metavar="DIR", default=None,
                        help="logical store dir (env PURE_STORE_DIR, default /pure/store); "
                             "/nix/store gives Nix's paths")
    # binary caches (docs/caches.md); dests are prefixed so no command's own option can clash
    parser.add_argument("--substituters", dest="global_substituters", metavar="URLS", default=None,
                        help="space-separated binary cache URLs, replacing the config file's")
    parser.add_argument("--trusted-public-keys", dest="global_trusted_public_keys", metavar="KEYS",
                        default=None, help="space-separated NAME:BASE64 keys trusted for substitution")
    parser.add_argument("--extra-substituters", dest="global_extra_substituters", metavar="URLS", default=None,
                        help="binary cache URLs added to the configured ones (as Nix's option)")
    parser.add_argument("--extra-trusted-public-keys", dest="global_extra_trusted_public_keys",
                        metavar="KEYS", default=None, help="keys added to the trusted ones")
    parser.add_argument("--offline", dest="global_offline", action="store_true",
                        help="do not ask the substituters (builds and shells use what the store has); "
                             "a cache named explicitly (copy --from/--to) is still used")
    parser.add_argument("--fallback", dest="global_fallback", action=argparse.BooleanOptionalAction, default=None,
                        help="build what a cache lists but cannot give (the default; `fallback` setting); "
                             "--no-fallback fails the build instead, as Nix does without --fallback")
    parser.add_argument("--post-build-hook", dest="global_post_build_hook", metavar="PROGRAM", default=None,
                        help="run PROGRAM after each build, with DRV_PATH and OUT_PATHS set (e.g. to push "
                             "the outputs to a binary cache; docs/building.md); '' turns the setting off")
    parser.add_argument("--max-silent-time", dest="global_max_silent_time", metavar="SECONDS", type=_limit,
                        default=None, help="fail a build whose builder writes nothing for SECONDS "
                                           "(setting max-silent-time; 0: no limit, the default)")
    parser.add_argument("--timeout", dest="global_timeout", metavar="SECONDS", type=_limit, default=None,
                        help="fail a build whose builder runs longer than SECONDS (setting timeout; 0: no limit)")
    parser.add_argument("--max-build-log-size", dest="global_max_build_log_size", metavar="BYTES", type=_limit,
                        default=None, help="fail a build whose builder writes more than BYTES of log "
                                           "(setting max-build-log-size; 0: no limit)")
    parser.add_argument("--option", dest="global_option", nargs=2, action="append", metavar=("NAME", "VALUE"),
                        help="set a setting as the config file would (NAME = VALUE), over the config "
                             "file; repeatable (e.g. --option max-jobs 4; docs/store.md lists them)")
    reg = Registry(parser)
    for name in COMMAND_MODULES if modules is None else modules:
        importlib.import_module(f"{__package__}.{name}").register(reg)
    return parser


def _tune_runtime() -> None:
    """Process-wide settings for a short-lived command that streams a lot of data.

    - glibc's malloc serves buffers above 128 KiB (and then above its moving threshold) with
      fresh mmaps and gives freed memory back at once, so every 1 MiB chunk of a NAR cost 256
      page faults and as many zeroed pages (a substitution of 370 MB took 77,000 faults, Nix
      3,000).  Keeping such buffers in the heap brings that down fivefold.
    - The objects alive now (modules, classes) are frozen out of the cyclic collector, and its
      youngest generation is collected less often: restoring a NAR makes many short-lived
      objects, and collections showed in its profile.
    """
    import gc
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 16 << 20)
    mallopt(M_TRIM_THRESHOLD, 64 << 20)


def _stop_on_sigterm() -> None:
    """SIGTERM (what ``timeout``, systemd and CI runners send) stops a command as Ctrl-C does:
    its clean-up runs (partial files in a cache or the store removed, builders killed) instead of
    the process just vanishing.  Where Ctrl-C is ignored, SIGTERM keeps its default action and
    ends the process (a ``pure shell`` waiting for its shell), except in the trio runs of the
    commands, which then listen for SIGTERM themselves (:mod:`._trio`: a background job of a
    non-interactive shell inherits SIGINT ignored).  Started with SIGTERM ignored, pure leaves it
    so (and so does the program of ``pure run``/``pure shell``, as across an exec)."""
    import signal

    def on_term(signum, frame):
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # raise_signal, not os.kill: an expression being evaluated (pure mode) may not
            # os.kill, and the refusal came out of its frame as a purity error
            signal.raise_signal(signal.SIGTERM)
            return
        _startup.terminated = True
        signal.raise_signal(signal.SIGINT)  # handled as Ctrl-C: by trio's handler within trio.run

    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
            return  # started with it ignored: it stays so (and so for `pure run`'s program)
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (main() called by a library user)
        pass


def _check_key_options(args: argparse.Namespace) -> None:
    """Every --trusted-public-keys given (global or a command's) well-formed, else an error that
    names the option (a key's own error does not say where it came from)."""
    given = [(dest, v) for dest, v in vars(args).items()
             if v and (dest.endswith("trusted_public_keys") or dest.endswith("_trusted_keys"))]
    if given:
        from ..store.settings import check_public_keys
        for dest, value in given:
            option = "--extra-trusted-public-keys" if "extra" in dest else "--trusted-public-keys"
            check_public_keys(tuple(value.split()), option)


class _JsonWatch:
    """Stands in for stdout under ``--json`` and notes whether the command printed anything.

    A command that fails outright (an unknown path, a cache that cannot be read) has no result
    to print; a script reading its stdout would get nothing at all.  It then gets one line,
    ``{"type": "error", "error": MESSAGE, "hint": HINT, "exitStatus": N}``, as well as the
    ``error:`` line on stderr.  A command that printed (JSON lines of ``build``, or its result
    before failing) gets the same line after them only when it streams lines (``json_lines`` set
    by its parser); one that already printed its single object is left alone, so stdout stays
    one JSON document.
    """

    def __init__(self, stream, lines: bool):
        self._stream = stream
        self._lines = lines
        self.written = False

    @classmethod
    def install(cls, args: argparse.Namespace) -> _JsonWatch | None:
        if not getattr(args, "json", False) or sys.stdout is None:
            return None
        sys.stdout = watch = cls(sys.stdout, lines=getattr(args, "json_lines", False))
        return watch

    def write(self, text: str) -> int:
        if text:
            self.written = True
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def error(self, e: PurestoreError) -> None:
        if self.written and not self._lines:
            return
        import json
        try:
            print(json.dumps({"type": "error", "error": str(e), "hint": e.hint,
                              "exitStatus": e.exit_status}), file=self._stream, flush=True)
        except (OSError, ValueError):  # stdout closed or a broken pipe: stderr has it
            pass


def _global_option_hint(parser: argparse.ArgumentParser, command: argparse.ArgumentParser,
                        extra: list[str]) -> str | None:
    """For a global option given after the command (`pure store ls --store ROOT`), where it goes."""
    for word in extra:
        opt = word.split("=", 1)[0]
        if (opt.startswith("--") and opt in parser._option_string_actions
                and opt not in command._option_string_actions and opt not in ("--help", "--version")):
            action = parser._option_string_actions[opt]
            takes = " ".join(action.metavar) if isinstance(action.metavar, tuple) else action.metavar
            given = f"{opt} {takes}" if action.nargs != 0 and takes else opt
            return (f"{opt} is an option of pure itself: put it before the command "
                    f"('pure {given} {command.prog[5:]} ...')")
    return None


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command ``args`` are for (``pure store add``'s, say), for its errors."""
    dest = "command"
    while True:
        subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        word = getattr(args, dest, None)
        if subs is None or word not in subs.choices:
            return parser
        parser, dest = subs.choices[word], f"{word}_command"


SIGPIPE_STATUS = 128 + 13  # what a shell shows for a process ended by SIGPIPE
_output_gone = False


def _die_by(signum: int) -> None:
    """End this process by ``signum``, without a core dump of pure's own."""
    import resource
    import signal
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ValueError, OSError):
        pass
    try:
        signal.signal(signum, signal.SIG_DFL)
    except (ValueError, OSError):  # SIGKILL, SIGSTOP: their action is the default one
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    signal.raise_signal(signum)


def _output_closed() -> bool:
    """Whether the reader of stdout or stderr has gone (``pure … | head -1`` once head exits).

    A pipe's write end polls as POLLERR once no reader is left (a socket's as POLLHUP): this
    tells a closed output from a BrokenPipeError of some other pipe (a builder's, a cache
    connection's), which would be a bug of purestore's to show as one.
    """
    import select
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            fd = stream.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0)):
                return True
        except (AttributeError, ValueError, OSError):  # no stream, or a closed one
            continue
    return False


def _stop_output() -> int:
    """The reader of the output has gone: stop quietly, as a Unix tool ended by SIGPIPE does
    (:func:`run` ends the process with that signal; :func:`main` returns its shell status).

    Whatever is still buffered for stdout or stderr is sent to /dev/null, so the final flush
    does not fail again (nor print "Exception ignored" at the interpreter's exit).
    """
    global _output_gone
    _output_gone = True
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return SIGPIPE_STATUS
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            os.dup2(null, stream.fileno())
        except (AttributeError, ValueError, OSError):
            pass
    os.close(null)
    return SIGPIPE_STATUS


def main(argv: list[str] | None = None) -> int:
    """Run the command of ``argv`` (default ``sys.argv[1:]``); returns its exit status.

    When the reader of stdout goes away (``pure report --json | head -1``) the command stops
    without a message and the status is 141, a shell's for a process ended by SIGPIPE.
    """
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(sys.stdout, "reconfigure"):  # names that are not UTF-8 are printed as their bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    parser = make_parser(_modules_for(argv))
    _Parser.argv = list(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse gives an optional list of positionals (nargs="*") nothing once an option
        # follows the positional before it (`URL --opt PATH`): such commands name the list in
        # ``intermixed`` and take the stray positionals into it
        into = getattr(args, "intermixed", None)
        if into is None or any(a.startswith("-") for a in extra):
            command = _command_parser(parser, args)
            command.error(f"unrecognized arguments: {' '.join(extra)}", _global_option_hint(parser, command, extra))
        setattr(args, into, [*getattr(args, into), *extra])
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    args.raw_argv = list(argv)  # (for a command that must see where '--' was: pure run)
    ctx = Context(args)
    _tune_runtime()
    _stop_on_sigterm()
    out = _JsonWatch.install(args)
    try:
        return _run_command(args, ctx, out)
    except BrokenPipeError:  # (printing the error of a failed command too: `2>&1 | head -1`)
        if not _output_closed():
            raise  # a pipe of purestore's own: a bug, shown as one
        return _stop_output()


def _run_command(args: argparse.Namespace, ctx: Context, out: _JsonWatch | None) -> int:
    """The command's function, and its error (or interruption) printed as ``error: …``."""
    try:
        _startup.end()  # from here on Ctrl-C is a KeyboardInterrupt, seen by the clean-up
        _check_key_options(args)
        rc = args.func(args, ctx)
    except PurestoreError as e:
        if ctx.read_only and not e.hint and getattr(e.__cause__, "errno", None) in (
                errno.EACCES, errno.EPERM, errno.EROFS):
            e.hint = ctx.read_only  # (a lock or temporary file of a store this user only reads)
        # (a message may quote what a builder wrote, the tail of its log: control sequences
        # are shown, not sent to the terminal; see purestore._visible)
        print(f"error: {visible(str(e))}", file=sys.stderr)
        if e.hint:
            print(f"hint: {visible(e.hint)}", file=sys.stderr)
        if out is not None:
            out.error(e)
        return e.exit_status
    except FileNotFoundError:
        if not _cwd_gone():
            raise  # a bug of purestore's: shown as one
        # a relative path made absolute (os.getcwd()) in a directory removed meanwhile
        gone = PurestoreError("the working directory no longer exists (removed before or while pure ran)",
                              hint="cd to an existing directory and run the command again")
        print(f"error: {gone}\nhint: {gone.hint}", file=sys.stderr)
        if out is not None:
            out.error(gone)
        return gone.exit_status
    except KeyboardInterrupt as e:
        from .._run import Terminated
        stopped = PurestoreError("terminated (SIGTERM)" if _startup.terminated or isinstance(e, Terminated) else "interrupted")
        stopped.exit_status = 143 if stopped.message.startswith("terminated") else 130
        print(f"error: {stopped}", file=sys.stderr)
        if out is not None:  # a --json reader learns of it too (build: as the last event)
            out.error(stopped)
        return stopped.exit_status
    return rc or 0


def _cwd_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def run() -> None:
    """The ``pure`` executable: :func:`main`, then the process exits without the interpreter's
    teardown.

    Tearing down the ~300 modules a command imports (trio, the store, the cache) took 15-20 ms
    after every command, about a tenth of a quick one, with nothing left to do by then: each
    command closes its files, databases and child processes before it returns.  What a normal
    exit still does is done here too: the ``atexit`` functions run (temporary files left to
    finalizers are removed) and the standard streams are flushed.  A non-daemon thread still
    running gets the normal exit, which waits for it.
    """
    _startup.begin()
    status = main()
    import threading
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(status)
    import atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # closed when the process started (`pure … >&-`)
            continue
        try:
            stream.flush()
        except BrokenPipeError:  # `pure … | head -1`: the reader has gone
            status = _stop_output()
        except (OSError, ValueError):  # a closed stream, a full disk
            status = status or 1
    # `pure run`/`pure shell` whose program was killed by a signal (spawn's ExitStatus says
    # which) end by the same signal, as if pure had exec'ed the program: a shell's loop stops
    # at Ctrl-C only when its command died of SIGINT (an exit status of 130 tells it that the
    # command handled the signal)
    if getattr(status, "signal", None):
        _die_by(status.signal)  # (returns only for a signal that does not end a process)
    if _output_gone:  # end as a C program does when its reader goes: by SIGPIPE, quietly
        import signal
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.raise_signal(signal.SIGPIPE)
    os._exit(status)


if __name__ == "__main__":
    run()
