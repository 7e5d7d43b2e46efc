"""The CLI frame: lazy command registration stays in step with the command modules."""

import argparse

import pytest

from purestore.cli import main as cli_main
from conftest import run_pure


def _top_level_names(modules):
    parser = cli_main.make_parser(modules)
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(subs.choices)


def test_every_command_has_its_owner_table_entry():
    for mod in cli_main.COMMAND_MODULES:
        for name in _top_level_names([mod]):
            assert mod in cli_main.COMMAND_OWNERS.get(name, ()), f"{name!r} (from {mod}) missing in COMMAND_OWNERS"


def test_owner_table_names_only_real_commands():
    assert set(cli_main.COMMAND_OWNERS) == _top_level_names(None)


def _group_commands(modules, group):
    parser = cli_main.make_parser(modules)
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if group not in subs.choices:
        return set()
    gsubs = next(a for a in subs.choices[group]._actions if isinstance(a, argparse._SubParsersAction))
    return set(gsubs.choices)


def test_subcommand_owner_table_names_each_group_command_and_its_module():
    """Every command of a group that several modules add to (store, cache) is in
    SUBCOMMAND_OWNERS with the module that registers it, and nothing else is."""
    groups = {g for g, mods in cli_main.COMMAND_OWNERS.items() if len(mods) > 1}
    real = {(g, c): mod for g in groups for mod in cli_main.COMMAND_OWNERS[g] for c in _group_commands([mod], g)}
    assert cli_main.SUBCOMMAND_OWNERS == real


def test_only_the_module_of_a_group_command_is_loaded():
    assert cli_main._modules_for(["store", "path-info", "/x"]) == ["store_cmd"]
    assert cli_main._modules_for(["--store", "/r", "store", "realise", "d"]) == ["build_cmd"]
    assert cli_main._modules_for(["cache", "serve"]) == ["serve_cmd"]
    # the group alone, its help, or a word it does not know: all its modules (for the listing)
    for argv in (["store"], ["store", "--help"], ["store", "-h", "path-info"], ["store", "frob"]):
        assert cli_main._modules_for(argv) == list(cli_main.COMMAND_OWNERS["store"])
    assert cli_main._modules_for(["hash", "path", "p"]) == ["hash_cmd"]
    assert cli_main._modules_for(["--version"]) == []
    assert cli_main._modules_for(["--help"]) is None and cli_main._modules_for([]) is None


def test_command_word_skips_global_options():
    assert cli_main._command_word(["--store", "/x", "--offline", "hash", "path", "p"]) == "hash"
    assert cli_main._command_word(["--store-dir=/nix/store", "build"]) == "build"
    assert cli_main._command_word(["--version"]) is None


def test_the_global_options_with_a_value_are_all_known_to_command_word():
    parser = cli_main.make_parser([])
    with_value = {s for a in parser._actions if a.option_strings and a.nargs is None
                  and not isinstance(a, (argparse._StoreTrueAction, argparse._VersionAction, argparse._HelpAction))
                  for s in a.option_strings}
    assert with_value == cli_main._GLOBAL_OPTS_WITH_VALUE


def test_unknown_command_is_a_usage_error():
    p = run_pure("frobnicate", check=False)
    assert p.returncode == 2
    assert "invalid choice" in p.stderr and "Traceback" not in p.stderr
    # purestore's form of errors, not argparse's usage block
    assert p.stderr.startswith("error: argument COMMAND: invalid choice: 'frobnicate'")
    assert p.stderr.rstrip().endswith("hint: see 'pure --help'")
    p = run_pure("store", "add", "--bogus", "x", check=False)  # the command's own help is named
    assert p.returncode == 2 and p.stderr == ("error: unrecognized arguments: --bogus\n"
                                              "hint: see 'pure store add --help'\n")
    p = run_pure("key", "generate", check=False)
    assert p.returncode == 2 and p.stderr == ("error: the following arguments are required: --name\n"
                                              "hint: see 'pure key generate --help'\n")
    # pure shell's --command option is not taken for the command's name
    for cmd in (["--command", "true"], []):
        p = run_pure("shell", "a.py", "b.py", *cmd, check=False)
        assert p.returncode == 2 and p.stderr == ("error: unrecognized arguments: b.py\n"
                                                  "hint: see 'pure shell --help'\n")


def test_a_global_option_after_the_command_is_told_to_go_before_it(tmp_path):
    """`pure store ls --store ROOT` (as Nix takes it) said only "see 'pure store ls --help'", whose
    help does not list --store; the hint says where the option goes, with its arguments."""
    p = run_pure("store", "path-info", "x", "--store", tmp_path, check=False)
    assert p.returncode == 2 and p.stderr == (
        f"error: unrecognized arguments: --store {tmp_path}\n"
        "hint: --store is an option of pure itself: put it before the command ('pure --store ROOT "
        "store path-info ...')\n")
    p = run_pure("hash", "path", "--offline", "--option", "cores", "1", "x", check=False)
    assert p.returncode == 2 and p.stderr.endswith(
        "hint: --offline is an option of pure itself: put it before the command ('pure --offline hash path ...')\n")
    p = run_pure("store", "ls", "--bogus", check=False)  # not a global option: the command's help
    assert p.returncode == 2 and p.stderr.endswith("hint: see 'pure store ls --help'\n")


def test_extra_substituters_and_keys_add_to_the_configured_ones(tmp_path):
    """As Nix's --extra-substituters and --extra-trusted-public-keys: added, not replacing."""
    conf = tmp_path / "pure.conf"
    conf.write_text("substituters = file:///a\ntrusted-public-keys = k-1:" + "A" * 43 + "=\n")
    env = {"PURE_CONFIG": str(conf)}
    r = run_pure("--extra-substituters", "file:///b", "--extra-trusted-public-keys", "k-2:" + "B" * 43 + "=",
                 "cache", "info", "--json", check=False, env=env)
    import json
    info = json.loads(r.stdout)
    assert [c["url"] for c in info["caches"]] == ["file:///a", "file:///b"]
    assert info["trustedPublicKeys"] == ["k-1", "k-2"]
    r = run_pure("--extra-trusted-public-keys", "k-2:!!", "cache", "info", check=False, env=env)
    assert r.returncode == 2 and "error: --extra-trusted-public-keys: public key 'k-2' has invalid base64" in r.stderr


def test_top_level_help_lists_all_commands():
    out = run_pure("--help").stdout
    for name in ("build", "store", "hash", "copy", "gc", "sbom"):
        assert name in out


def test_run_skips_teardown_but_runs_atexit_and_flushes(tmp_path):
    """``pure`` exits through os._exit after the command: the atexit functions still run and
    block-buffered stdout (a file) is written out, with the command's status."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    marker = tmp_path / "atexit-ran"
    script = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "from purestore.cli.main import run\n"
        "sys.argv[1:] = sys.argv[2:]\n"  # drop the marker argument given to python -c
        "run()\n"
        "raise SystemExit('run() returned')\n"
    )
    src = tmp_path / "files"
    src.mkdir()
    for i in range(3):  # a few lines: left in stdout's buffer until the exit flushes it
        (src / f"f{i:03d}").write_text("x" * i)
    out = tmp_path / "out.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered stdout
    with open(out, "w") as f:
        p = subprocess.run([sys.executable, "-c", script, "-", "--store", str(tmp_path / "store"),
                            "hash", "file", *sorted(map(str, src.iterdir()))],
                           stdout=f, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert marker.read_text() == "yes"
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and all(line.startswith("sha256") for line in lines), lines[-3:]
    # a failing command keeps its status
    p = subprocess.run([sys.executable, "-c", script, "-", "hash", "file", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 1 and "error:" in p.stderr and "run() returned" not in p.stderr


def test_json_gives_an_error_object_when_a_command_fails_outright(tmp_path):
    """A script reading `--json` output gets one JSON object saying what went wrong, not an
    empty stdout; the error line on stderr and the exit status stay as they are."""
    import json
    store = str(tmp_path / "store")
    missing = "/pure/store/" + "a" * 32 + "-missing"
    p = run_pure("store", "path-info", "--json", missing, root=store, check=False)
    assert p.returncode == 1
    ev = json.loads(p.stdout)
    assert ev["type"] == "error" and ev["exitStatus"] == 1 and missing in ev["error"]
    assert f"error: {ev['error']}" in p.stderr
    # with a hint
    p = run_pure("copy", "--json", "--from", "127.0.0.1:1", missing, root=store, check=False)
    ev = json.loads(p.stdout)
    assert p.returncode == ev["exitStatus"] != 0
    assert ev["hint"] and f"hint: {ev['hint']}" in p.stderr
    # without --json stdout stays empty
    p = run_pure("store", "path-info", missing, root=store, check=False)
    assert p.returncode == 1 and p.stdout == ""
    # a usage error (argparse's) too, with status 2
    for args in (["cache", "verify", "--json", "file:///nowhere", "--bogus"], ["copy", "--json", "--to", "file:///x"]):
        p = run_pure(*args, root=store, check=False)
        ev = json.loads(p.stdout)
        assert p.returncode == ev["exitStatus"] == 2 and f"error: {ev['error']}" in p.stderr
        assert ev["hint"] == f"see 'pure {args[0]}{' verify' if args[0] == 'cache' else ''} --help'"
    p = run_pure("copy", "--to", "file:///x", root=store, check=False)
    assert p.returncode == 2 and p.stdout == ""


def _pure_into_closed_pipe(*args, root, stderr_too=False):
    """`pure ARGS` whose stdout (and stderr with ``stderr_too``) is a pipe nobody reads any more,
    as after `pure ARGS | head -1` once head has exited; returns (status, stderr)."""
    import os
    import subprocess
    import sys

    from conftest import pure_env
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "purestore.cli.main", *map(str, args)], stdout=w,
                           stderr=w if stderr_too else subprocess.PIPE, env=pure_env(root), timeout=120)
    finally:
        os.close(w)
    return p.returncode, (p.stderr or b"").decode()


def test_a_reader_that_goes_away_ends_pure_quietly_by_sigpipe(tmp_path):
    """`pure report --json | head -1`: when the reader of the output has gone, pure stops as a
    Unix tool does (ended by SIGPIPE, which a shell shows as status 141), with nothing on stderr:
    not exit status 1, not a BrokenPipeError traceback.  The same for every command, and when the
    error of a failing command cannot be printed either (`2>&1 | head`)."""
    import signal
    root = tmp_path / "store"
    for args in (["report", "--json"], ["report"], ["hash", "path", __file__]):
        status, err = _pure_into_closed_pipe(*args, root=root)
        assert (status, err) == (-signal.SIGPIPE, ""), args
    status, _ = _pure_into_closed_pipe("hash", "file", tmp_path / "missing", root=root, stderr_too=True)
    assert status == -signal.SIGPIPE
    # main() itself (what a library user calls) returns the shell's status of that end
    assert cli_main.SIGPIPE_STATUS == 128 + signal.SIGPIPE


def test_cores_option_overrides_the_setting_also_with_zero():
    """--cores 0 means all cores even when the config file sets cores = N (as in Nix); without
    --cores the setting is used; a negative count is a usage error."""
    import pytest
    from purestore.cli import build_cmd
    from purestore.errors import UsageError
    from purestore.store.settings import Settings
    parser = cli_main.make_parser(["build_cmd"])
    settings = Settings(cores=4)

    def cores(*argv):
        return build_cmd._options(parser.parse_args(["build", "f.py", *argv]), settings).cores
    assert cores() == 4
    assert cores("--cores", "2") == 2
    assert cores("--cores", "0") == 0
    with pytest.raises(UsageError, match="--cores"):
        cores("--cores", "-1")


def test_a_removed_working_directory_is_an_error_not_a_traceback(tmp_path):
    """pure started in a directory removed meanwhile: a relative path made absolute raised
    FileNotFoundError from os.getcwd(), a traceback (pure eval, pure build's ./result after the
    build); it is an error saying so, with --json an error object; an absolute path still works."""
    import json
    import os
    import subprocess
    import sys
    from conftest import pure_env
    expr = tmp_path / "e.py"
    expr.write_text("default = {'x': 1}\n")
    gone = tmp_path / "gone"

    def pure_in_gone(*args):
        gone.mkdir()
        return subprocess.run([sys.executable, "-m", "purestore.cli.main", *map(str, args)],
                              cwd=gone, preexec_fn=lambda: os.rmdir(gone), capture_output=True, text=True,
                              env=pure_env(tmp_path / "root"), timeout=120)
    for args in (["eval", "e.py"], ["eval", "--json", "e.py"]):
        p = pure_in_gone(*args)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.startswith("error: the working directory no longer exists"), p.stderr
    assert json.loads(p.stdout)["error"].startswith("the working directory no longer exists")
    p = pure_in_gone("eval", "--json", expr)
    assert p.returncode == 0 and json.loads(p.stdout) == {"x": 1}


def test_provenance_verify_help_is_the_help_not_a_usage_error():
    # everything after 'provenance' is parsed again (positionals on both sides of options), so a
    # --help there was an 'unrecognized arguments' error before
    for argv in (["provenance", "verify", "--help"], ["provenance", "verify", "x.provenance", "-h"]):
        p = run_pure(*argv)
        assert p.stdout.startswith("usage: pure provenance PATH --key-file KEY"), p.stdout
        assert "pure provenance verify FILE --trusted-key PUB" in p.stdout and p.stderr == ""


def test_every_help_fits_in_100_columns(monkeypatch):
    """Every command's and group's --help, laid out for a 100-column terminal, has no longer line
    (hand-wrapped descriptions and examples are printed as written, and some were 131 wide)."""
    import argparse

    from purestore.cli.main import make_parser

    monkeypatch.setenv("COLUMNS", "100")
    too_long = []

    def walk(p: argparse.ArgumentParser, name: str) -> None:
        too_long.extend(f"{name}: {line}" for line in p.format_help().splitlines() if len(line) > 100)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for word, sub in action.choices.items():
                    walk(sub, f"{name} {word}")

    walk(make_parser(), "pure")
    assert not too_long, "\n".join(too_long)


# Ctrl-C at the very start: the moment is made exact by raising SIGINT from a hook at a chosen
# point of pure's start-up (an import, the building of the parser), in a real process.
_SIGINT_WHEN_PARSER_IS_BUILT = """
import signal, sys
import purestore.cli.main as m
make_parser = m.make_parser
def interrupted_make_parser(*a, **kw):
    signal.raise_signal(signal.SIGINT)  # Ctrl-C while the command modules load
    return make_parser(*a, **kw)
m.make_parser = interrupted_make_parser
sys.argv = ["pure", "store", "ls"]
m.run()
"""

_SIGINT_WHEN_MAIN_IMPORTS = """
import _signal, runpy, sys
class InterruptOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == MODULE:  # imported by purestore.cli.main as it loads
            _signal.raise_signal(_signal.SIGINT)
        return None
sys.meta_path.insert(0, InterruptOnImport())
sys.argv = ["pure", "store", "ls"]
runpy.run_module("purestore.cli.main", run_name="__main__", alter_sys=True)
"""


def _run_python(code, tmp_path):
    import subprocess
    import sys
    from conftest import pure_env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=pure_env(tmp_path), timeout=120)


def test_ctrl_c_while_the_arguments_are_parsed_is_an_interruption_not_a_traceback(tmp_path):
    """Ctrl-C in the first tens of milliseconds, while pure loaded its command modules and
    parsed the arguments, ended in a KeyboardInterrupt traceback out of argparse or an import
    (seen under a stress run sending signals at random moments).  Nothing is open then: pure
    ends as an interrupted command does."""
    r = _run_python(_SIGINT_WHEN_PARSER_IS_BUILT, tmp_path)
    assert "Traceback" not in r.stderr, r.stderr
    assert (r.returncode, r.stderr) == (130, "error: interrupted\n")


@pytest.mark.parametrize("module", ["argparse", "purestore._visible"])
def test_ctrl_c_while_python_m_loads_the_cli_module_is_an_interruption_not_a_traceback(tmp_path, module):
    """Under `python -m purestore.cli.main` the start-up handler is in place before the module's
    imports."""
    r = _run_python(f"MODULE = {module!r}\n" + _SIGINT_WHEN_MAIN_IMPORTS, tmp_path)
    assert "Traceback" not in r.stderr, r.stderr
    assert (r.returncode, r.stderr) == (130, "error: interrupted\n")


def test_ctrl_c_ignored_at_start_stays_ignored_while_the_arguments_are_parsed(tmp_path):
    """A background job of a script starts with SIGINT ignored: the start-up handler is not
    put in its place, and the command runs to its end."""
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" + _SIGINT_WHEN_PARSER_IS_BUILT
    r = _run_python(code, tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_ctrl_c_once_the_command_runs_is_still_a_keyboard_interrupt_for_its_clean_up(tmp_path):
    """The start-up handler is gone when the command starts: Ctrl-C is Python's
    KeyboardInterrupt again, which the command's clean-up sees."""
    code = _SIGINT_WHEN_PARSER_IS_BUILT.replace(
        "m.make_parser = interrupted_make_parser",
        "def check(args, ctx):\n"
        "    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "m._check_key_options = lambda args: check(args, None)")
    r = _run_python(code, tmp_path)
    assert (r.returncode, r.stderr) == (130, "error: interrupted\n"), r.stderr
