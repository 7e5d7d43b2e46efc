"""Settings: config file parsing, environment and overrides, and what they switch."""

import os

import pytest

from purestore.errors import UsageError
from purestore.store.local import LocalStore
from purestore.store.settings import load_settings, parse_config


def test_config_file_keys_and_types(tmp_path):
    conf = tmp_path / "pure.conf"
    conf.write_text("# comment\nsubstituters = file:///a http://127.0.0.1:1\nmax-jobs = 3\n"
                    "keep-outputs = true\nfsync-store-paths = false\n")
    s = load_settings(env={"PURE_CONFIG": str(conf)})
    assert s.substituters == ("file:///a", "http://127.0.0.1:1")
    assert (s.max_jobs, s.keep_outputs, s.fsync_store_paths) == (3, True, False)


def test_max_jobs_auto_is_the_number_of_cores(tmp_path):
    """`max-jobs = auto`, Nix's usual setting (and `pure build -j auto`), is the number of cores;
    it was refused ("max-jobs must be an integer, got 'auto'")."""
    from conftest import run_pure
    conf = tmp_path / "pure.conf"
    conf.write_text("max-jobs = auto\n")
    assert load_settings(env={"PURE_CONFIG": str(conf)}).max_jobs == (os.cpu_count() or 1)
    p = run_pure("build", "-j", "auto", "--dry-run", "--json", tmp_path / "none.py", root=tmp_path, check=False)
    assert p.returncode == 1 and "none.py' does not exist" in p.stderr  # (-j auto taken)
    p = run_pure("build", "-j", "many", tmp_path / "none.py", root=tmp_path, check=False)
    assert p.returncode == 2 and "argument -j/--max-jobs: invalid int or 'auto' value: 'many'" in p.stderr


def test_environment_and_overrides_win_over_the_file(tmp_path):
    conf = tmp_path / "pure.conf"
    conf.write_text("max-jobs = 3\n")
    s = load_settings(env={"PURE_CONFIG": str(conf), "PURE_STORE": str(tmp_path / "r"),
                           "PURE_STORE_DIR": "/nix/store"}, max_jobs=5)
    assert (s.max_jobs, s.store_dir, s.root) == (5, "/nix/store", str(tmp_path / "r"))
    assert s.real_store_dir == str(tmp_path / "r" / "nix" / "store")
    assert s.state_dir == str(tmp_path / "r" / "nix" / "var" / "pure")


def test_a_config_file_named_by_pure_config_must_exist(tmp_path):
    """A mistyped PURE_CONFIG is an error, not the same as no config; the default files may be
    missing."""
    with pytest.raises(UsageError, match=r"config file '.*/typo.conf' \(named by PURE_CONFIG\) does not exist"):
        load_settings(env={"PURE_CONFIG": str(tmp_path / "typo.conf")})
    assert load_settings(env={"PURE_CONFIG": "/dev/null"}).substituters == ()
    assert load_settings(env={"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "none")}).max_jobs >= 1


@pytest.mark.parametrize("text, message", [
    ("max-jobs = many\n", "pure.conf:1: max-jobs must be an integer, got 'many'"),
    ("keep-outputs = maybe\n", "pure.conf:1: keep-outputs: expected true or false, got 'maybe'"),
    ("substitute = maybe\n", "pure.conf:1: substitute: expected true or false, got 'maybe'"),
    ("frobnicate = 1\n", "pure.conf:1: unknown setting 'frobnicate'"),
    ("\njust words\n", "pure.conf:2: expected 'key = value', got 'just words'"),
    ("sandbox = false\n", "pure.conf:1: sandbox = false is not supported: purestore always builds in the sandbox"),
    ("# keys\ntrusted-public-keys = garbage\n",
     "pure.conf:2: trusted-public-keys: public key 'garbage' is not of the form 'name:base64'"),
    ("trusted-public-keys = a:" + "A" * 43 + "= b:!!\n", "pure.conf:1: trusted-public-keys: public key 'b' has invalid base64"),
    # lines end at "\n" only (form feeds, lone CRs and the like do not count lines)
    ("# section\x0c\nfoo = 1\n", "pure.conf:2: unknown setting 'foo'"),
    ("max-jobs = 1\rfoo = 1\n", "pure.conf:1: max-jobs must be an integer, got '1\\rfoo = 1'"),
    ("\nstore-dir = relative\n", "pure.conf:2: store dir 'relative' must be an absolute path without a trailing '/'"),
    ("store =\n", "pure.conf:1: store is empty"),  # (it was the current directory)
])
def test_bad_config_lines_name_file_and_line(text, message):
    with pytest.raises(UsageError) as e:
        parse_config(text, "pure.conf")
    assert str(e.value) == message


def test_a_secret_key_given_as_a_trusted_key_is_said_to_be_one(tmp_path):
    """A secret key pasted where public keys go (the option, or the config file) gets the hint
    that it is a secret key and how to get its public half, as the key parser says; the generic
    hint about separating keys replaced it."""
    from conftest import run_pure
    from test_cache_support import PUB, SEC
    conf = tmp_path / "pure.conf"
    conf.write_text(f"trusted-public-keys = {SEC}\n")
    for args, env in ((["--trusted-public-keys", SEC], None), ([], {"PURE_CONFIG": str(conf)})):
        r = run_pure(*args, "cache", "info", f"file://{tmp_path}", root=tmp_path / "root", env=env, check=False)
        assert r.returncode == 2
        assert "public key 'test-key-1' decodes to 64 bytes, expected 32" in r.stderr
        assert "hint: this is a secret key: give its public key ('pure key public < FILE')" in r.stderr, r.stderr
        assert SEC.split(":")[1].strip() not in r.stderr
    r = run_pure("--trusted-public-keys", PUB + "," + PUB, "cache", "info", f"file://{tmp_path}", check=False)
    assert "hint: this looks like several keys in one" in r.stderr, r.stderr


def test_a_config_file_that_is_not_utf8_is_read_as_nix_reads_it(tmp_path):
    """Bytes that are not UTF-8 (here in a comment and a path) are no crash: they are kept."""
    conf = tmp_path / "pure.conf"
    conf.write_bytes(b"# caf\xe9\nsubstituters = file:///tmp/x\nnetrc-file = /srv/n\xe9trc\n")
    s = load_settings(env={"PURE_CONFIG": str(conf)})
    assert s.substituters == ("file:///tmp/x",)
    assert os.fsencode(s.netrc_file) == b"/srv/n\xe9trc"


def test_fsync_setting_controls_store_durability(tmp_path):
    for value, expected in (("true", True), ("false", False)):
        conf = tmp_path / f"{value}.conf"
        conf.write_text(f"fsync-store-paths = {value}\n")
        s = load_settings(env={"PURE_CONFIG": str(conf)}, root=str(tmp_path / value))
        with LocalStore.open(s) as store:
            assert store.durable is expected


K1 = "k1:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
K2 = "k2:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="


def test_nix_extra_settings_add_to_the_lists_and_substitute_false_is_offline(tmp_path):
    """Nix's extra-substituters / extra-trusted-public-keys append (a later plain setting
    replaces, as in Nix); `substitute = false` means no substituters (offline)."""
    conf = tmp_path / "pure.conf"
    conf.write_text(f"substituters = file:///a\nextra-substituters = file:///b file:///c\n"
                    f"extra-trusted-public-keys = {K1}\ntrusted-public-keys = {K2}\nsubstitute = false\n")
    s = load_settings(env={"PURE_CONFIG": str(conf)})
    assert s.substituters == ("file:///a", "file:///b", "file:///c")
    assert s.trusted_public_keys == (K2,) and s.offline is True
    assert parse_config("substitute = true\n", "x") == {"offline": False}
    # an extra- alone adds to the default (and to what files read before set)
    home = tmp_path / "home"
    (home / "pure").mkdir(parents=True)
    (home / "pure" / "pure.conf").write_text(f"extra-trusted-public-keys = {K1}\n")
    s = load_settings(env={"XDG_CONFIG_HOME": str(home)})
    assert K1 in s.trusted_public_keys
    with pytest.raises(UsageError, match=r"pure.conf:1: extra-trusted-public-keys: "):
        parse_config("extra-trusted-public-keys = nonsense\n", "pure.conf")
    with pytest.raises(UsageError, match="unknown setting 'extra-max-jobs'"):
        parse_config("extra-max-jobs = 3\n", "pure.conf")


def test_a_setting_that_is_not_utf8_is_printed_as_its_bytes(tmp_path):
    """A substituter named with bytes that are not UTF-8 (kept as they are) is printed as those
    bytes, even where stdout would be strict UTF-8: no traceback."""
    import subprocess
    import sys

    from conftest import pure_env
    conf = tmp_path / "pure.conf"
    conf.write_bytes(b"substituters = file://" + os.fsencode(tmp_path) + b"/caf\xe9\n")
    r = subprocess.run([sys.executable, "-m", "purestore.cli.main", "cache", "info"], capture_output=True,
                       env=pure_env(None, extra={"PURE_CONFIG": str(conf), "PYTHONIOENCODING": "utf-8"}))
    assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr
    assert b"/caf\xe9  not used: " in r.stdout and b"does not exist" in r.stdout


def test_option_sets_any_setting_over_the_file_and_under_dedicated_options(tmp_path):
    """--option NAME VALUE: any setting as the file would have it, over the file, under the
    dedicated options; extra- lists add; a bad one names the --option; an unknown name suggests
    the nearest."""
    conf = tmp_path / "pure.conf"
    conf.write_text("max-jobs = 3\nsubstituters = file:///a\ncores = 2\n")
    env = {"PURE_CONFIG": str(conf)}
    s = load_settings(env=env, options=[("max-jobs", "7"), ("extra-substituters", "file:///b"),
                                        ("max-silent-time", " 60 "), ("keep-outputs", "true")], cores=1)
    assert (s.max_jobs, s.substituters, s.max_silent_time, s.keep_outputs, s.cores) == \
        (7, ("file:///a", "file:///b"), 60, True, 1)
    with pytest.raises(UsageError) as e:
        load_settings(env=env, options=[("timeout", "-2")])
    assert str(e.value) == "--option: timeout must be at least 0, got '-2'"
    with pytest.raises(UsageError) as e:
        load_settings(env=env, options=[("max-silent-timeout", "3")])
    assert str(e.value) == "--option: unknown setting 'max-silent-timeout'"
    assert e.value.hint == "did you mean 'max-silent-time'?"


def test_every_setting_is_in_the_settings_table_of_docs_store_md():
    """docs/store.md's Settings table lists every setting the config file accepts (and no other)."""
    import re
    from pathlib import Path

    import attrs

    from purestore.store.settings import Settings, parse_setting
    doc = (Path(__file__).parent.parent / "docs" / "store.md").read_text()
    table = doc.split("## Settings", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", table, re.M))
    fields = {f.name.replace("_", "-") for f in attrs.fields(Settings)} - {"root"} | {"store"}
    fields |= {"extra-substituters", "extra-trusted-public-keys"}
    assert documented == fields
    for name in documented:  # each one the config file takes
        try:
            parse_setting(name, "x", "t", {})
        except UsageError as e:
            assert "unknown setting" not in str(e), name


def test_option_on_the_command_line(tmp_path):
    """`pure --option NAME VALUE COMMAND`: the two words after --option are not taken for the
    command (the parsers of `store ls` alone are built for it)."""
    from conftest import run_pure
    p = run_pure("--option", "max-jobs", "x", "store", "ls", root=tmp_path, check=False)
    assert p.returncode == 2 and "error: --option: max-jobs must be an integer, got 'x'" in p.stderr
    # a boolean's error names the setting too, and the hint to drop one fits an --option
    p = run_pure("--option", "offline", "maybe", "store", "ls", root=tmp_path, check=False)
    assert p.returncode == 2 and "error: --option: offline: expected true or false, got 'maybe'" in p.stderr
    p = run_pure("--option", "sandbox", "false", "store", "ls", root=tmp_path, check=False)
    assert p.returncode == 2 and "hint: drop this --option (see docs/building.md)" in p.stderr
    p = run_pure("--option", "substitute", "false", "--option", "cores", "3", "store", "ls", root=tmp_path)
    assert p.returncode == 0


def test_an_empty_store_root_is_an_error_not_the_current_directory(tmp_path):
    """`pure --store '' ...` (an unset variable in a script) made a store under the current
    directory; it is an error, and nothing is created."""
    from conftest import run_pure
    p = run_pure("--store", "", "store", "ls", cwd=tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: --store: the store root is empty\n")
    p = run_pure("--option", "store", "", "store", "ls", cwd=tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: --option: store is empty\n")
    assert list(tmp_path.iterdir()) == []


def test_a_store_dir_that_is_not_utf8_is_a_usage_error(tmp_path):
    """A store dir given with bytes that are not UTF-8 (--store-dir, PURE_STORE_DIR, --option
    store-dir) cannot be hashed into store paths: it was a UnicodeEncodeError traceback when the
    store's database recorded it; it is refused saying so."""
    import subprocess
    import sys

    from conftest import pure_env
    with pytest.raises(UsageError, match="must be UTF-8 text"):
        load_settings(env={"PURE_CONFIG": "/dev/null"}, store_dir="/p\udcff")
    for args, extra in ([[b"--store-dir", b"/p\xff"], {}], [[b"--option", b"store-dir", b"/p\xff"], {}],
                        [[], {"PURE_STORE_DIR": "/p\udcff"}]):
        r = subprocess.run([sys.executable, "-m", "purestore.cli.main", *args, b"store", b"ls"],
                           capture_output=True, env=pure_env(None, extra={"PURE_STORE": str(tmp_path), **extra}))
        assert r.returncode != 0 and b"Traceback" not in r.stderr, r.stderr
        assert b"must be UTF-8 text" in r.stderr, r.stderr
