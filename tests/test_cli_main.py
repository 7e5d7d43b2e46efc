"""The CLI frame: lazy command registration stays in step with the command modules."""

import argparse

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


def test_command_word_skips_global_options():
    assert cli_main._command_word(["--store", "/x", "--offline", "hash", "path", "p"]) == "hash"
    assert cli_main._command_word(["--store-dir=/nix/store", "build"]) == "build"
    assert cli_main._command_word(["--version"]) is None


def test_unknown_command_is_a_usage_error():
    p = run_pure("frobnicate", check=False)
    assert p.returncode == 2
    assert "invalid choice" in p.stderr and "Traceback" not in p.stderr


def test_top_level_help_lists_all_commands():
    out = run_pure("--help").stdout
    for name in ("build", "store", "hash", "copy", "gc", "sbom"):
        assert name in out
