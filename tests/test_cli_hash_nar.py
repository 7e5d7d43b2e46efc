"""`pure hash` and `pure nar` as real processes, against Nix's golden outputs."""

import json
import subprocess

import pytest

from conftest import DATA, needs_nix, run_pure
from test_fsnar import NIX_ENV

GOLDEN = DATA / "nar"
HASHES = {line.split("\t")[0]: line.split("\t")[1:] for line in (GOLDEN / "hashes.tsv").read_text().splitlines()}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden") / "t"
    subprocess.run(["bash", str(GOLDEN / "make-golden.sh"), "trees", str(d)], check=True)
    return d


def out(*args, **kw) -> str:
    return run_pure(*args, **kw).stdout


def fails(*args, status=None, **kw):
    p = run_pure(*args, check=False, **kw)
    assert p.returncode != 0
    if status is not None:
        assert p.returncode == status
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    return p.stderr


def test_hash_path_all_encodings_and_types(trees):
    names = ["tree", "hello", "dangling-symlink", "empty-dir"]
    paths = [str(trees / n) for n in names]
    assert out("hash", "path", *paths).split() == [HASHES[n][1] for n in names]
    assert out("hash", "path", "--sri", *paths).split() == [HASHES[n][1] for n in names]
    assert out("hash", "path", "--base32", *paths).split() == [HASHES[n][2] for n in names]
    assert out("hash", "path", "--type", "sha1", "--base16", *paths).split() == [HASHES[n][3] for n in names]
    assert out("hash", "path", "--type", "sha512", "--base64", *paths).split() == [HASHES[n][4] for n in names]
    assert out("hash", "path", "--type", "md5", "--nix32", *paths).split() == [HASHES[n][5] for n in names]


def test_hash_path_json(trees):
    got = json.loads(out("hash", "path", "--json", str(trees / "tree")))
    assert got == [{"path": str(trees / "tree"), "hash": HASHES["tree"][1], "narSize": int(HASHES["tree"][0])}]


def test_hash_file(trees):
    rows = [line.split("\t") for line in (GOLDEN / "files.tsv").read_text().splitlines()]
    files = [str(trees / r[0]) for r in rows]
    assert out("hash", "file", *files).split() == [r[1] for r in rows]
    assert out("hash", "file", "--base32", *files).split() == [r[2] for r in rows]
    assert out("hash", "file", "--type", "sha1", "--base16", *files).split() == [r[3] for r in rows]


def test_hash_convert():
    sri = "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM="
    n32 = "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
    hexd = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    assert out("hash", "convert", "--to", "nix32", sri).strip() == n32
    assert out("hash", "convert", "--to", "base32", sri).strip() == n32
    assert out("hash", "convert", "--to", "base16", f"sha256:{n32}").strip() == hexd
    assert out("hash", "convert", "--to", "sri", "--type", "sha256", hexd).strip() == sri
    assert out("hash", "convert", "--from", "nix32", "--to", "sri", f"sha256:{n32}").strip() == sri
    assert out("hash", "convert", "--to", "base64", sri, f"sha256:{hexd}").split() == [sri[7:]] * 2
    assert "is in base16, expected nix32" in fails("hash", "convert", "--from", "nix32", "--to", "sri", f"sha256:{hexd}")
    err = fails("hash", "convert", "--to", "sri", hexd)
    assert "does not say its algorithm" in err and "hint: for a bare digest, name its algorithm with --type" in err
    assert "non-zero padding" in fails("hash", "convert", "--to", "sri", "sha256:z" + n32[1:])
    assert "expected sha1" in fails("hash", "convert", "--to", "sri", "--type", "sha1", sri)


def test_hash_errors(tmp_path):
    assert "No such file or directory" in fails("hash", "path", str(tmp_path / "missing"))
    assert "directory" in fails("hash", "file", str(tmp_path))
    import os
    os.mkfifo(tmp_path / "fifo")
    assert "FIFO" in fails("hash", "path", str(tmp_path / "fifo"))
    p = run_pure("hash", "path", "--type", "sha3", str(tmp_path), check=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr


@pytest.mark.parametrize("name", sorted(HASHES))
def test_nar_dump_is_byte_identical(trees, name):
    p = run_pure("nar", "dump", str(trees / name), input=b"")
    assert p.stdout == (GOLDEN / f"{name}.nar").read_bytes()


def test_nar_restore_round_trip(tmp_path):
    nar = (GOLDEN / "tree.nar").read_bytes()
    run_pure("nar", "restore", str(tmp_path / "out"), input=nar)
    assert run_pure("nar", "dump", str(tmp_path / "out"), input=b"").stdout == nar
    p = run_pure("nar", "restore", str(tmp_path / "out"), input=nar, check=False)
    assert p.returncode == 1 and "already exists" in p.stderr.decode()


def test_nar_restore_rejects_bad_nars_without_traceback(tmp_path):
    nar = (GOLDEN / "tree.nar").read_bytes()
    for i, bad in enumerate([nar[:1000], nar + b"\0" * 8, b"garbage" * 10, b""]):
        p = run_pure("nar", "restore", str(tmp_path / f"o{i}"), input=bad, check=False)
        err = p.stderr.decode()
        assert p.returncode == 1 and err.startswith("error: ") and "NAR offset" in err, err
        assert "Traceback" not in err
        assert not (tmp_path / f"o{i}").exists()


@pytest.mark.parametrize("args", [["nar", "restore", "OUT"], ["nar", "ls", "-", "/"]])
def test_nar_commands_with_standard_input_closed_say_so(tmp_path, args):
    """`pure nar restore DEST <&-` (and `nar ls -`): an error saying stdin is closed, with a
    hint, no traceback and nothing written."""
    import os
    import sys

    from conftest import pure_env
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    p = subprocess.run([sys.executable, "-m", "purestore.cli.main", *args], capture_output=True, text=True,
                       env=pure_env(None, None, None), stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0))
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("error: cannot read the NAR from standard input: it is closed\nhint: "), p.stderr
    assert not (tmp_path / "out").exists()


def test_nar_ls_json_matches_nix(tmp_path):
    for name in sorted(HASHES):
        got = json.loads(out("nar", "ls", "--json", "-R", str(GOLDEN / f"{name}.nar"), "/"))
        assert got == json.loads((GOLDEN / f"{name}.ls.json").read_text()), name


def test_nar_ls_text(tmp_path):
    nar = str(GOLDEN / "tree.nar")
    lines = out("nar", "ls", nar).splitlines()
    assert lines[:3] == ["./ space", "./-", "./..."] and "./é" in lines and "./sub" in lines
    assert "./sub/inner" not in lines
    rec = out("nar", "ls", "-R", nar, "/sub").splitlines()
    assert rec == ["./inner", "./inner/empty", "./inner/file", "./inner/tool", "./with space",
                   "./with space/up", "./ü", "./ü/ö"]
    long = out("nar", "ls", "-l", nar, "/sub/inner").splitlines()
    assert long == ["dr-xr-xr-x                    0 ./empty",
                    "-r--r--r--                   11 ./file",
                    "-r-xr-xr-x                   10 ./tool"]
    assert out("nar", "ls", "-l", nar, "/dir-link") == "lrwxrwxrwx                    0 dir-link -> sub\n"
    assert out("nar", "ls", nar, "/size-9") == "size-9\n"
    # the root of a NAR of one file or symlink has no name (base name of "/"), as Nix prints it;
    # it was shown as "."
    assert out("nar", "ls", str(GOLDEN / "hello.nar")) == "\n"
    assert out("nar", "ls", "-d", str(GOLDEN / "exec.nar"), "/") == "\n"
    assert out("nar", "ls", "-l", str(GOLDEN / "hello.nar"), "/") == "-r--r--r--                    6 \n"
    assert out("nar", "ls", "-l", str(GOLDEN / "dangling-symlink.nar")) == \
        "lrwxrwxrwx                    0  -> /does/not/exist\n"
    assert json.loads(out("nar", "ls", "--json", nar, "/sub")) == {
        "type": "directory", "entries": {"inner": {}, "with space": {}, "ü": {}}}
    assert "does not exist" in fails("nar", "ls", nar, "/nope")
    assert "not absolute" in fails("nar", "ls", nar, "sub")
    assert "cannot open" in fails("nar", "ls", str(tmp_path / "missing.nar"))


@needs_nix
def test_nar_ls_text_matches_nix():
    cases = [(args, "tree", path) for args, path in (
        (["-lR"], "/"), (["-R"], "/sub"), (["-l"], "/sub/inner"), ([], "/"), ([], "/size-9"), (["-l"], "/dir-link"),
        (["-l"], "/all-exec"), (["-d"], "/sub"), (["-ld"], "/size-9"), (["-d"], "/"))]
    # NARs of one file or symlink, listed at their root
    cases += [(args, name, "/") for name in ("hello", "exec", "dangling-symlink") for args in ([], ["-l"], ["-d"])]
    for args, name, path in cases:
        nar = str(GOLDEN / f"{name}.nar")
        nix = subprocess.run(["nix", "nar", "ls", *args, nar, path], capture_output=True,
                             text=True, env=NIX_ENV, check=True).stdout
        assert out("nar", "ls", *args, nar, path) == nix, (args, name, path)


def test_help_texts():
    for cmd in (["hash", "path"], ["hash", "file"], ["hash", "convert"], ["nar", "dump"],
                ["nar", "restore"], ["nar", "ls"]):
        p = run_pure(*cmd, "--help")
        assert "usage: pure" in p.stdout and len(p.stdout) > 200


def test_hash_path_stays_lean(tmp_path):
    """`pure hash path` is benchmarked against Nix with start-up included: it must not pull in
    the store, trio, compression or crypto."""
    import sys
    f = tmp_path / "f"
    f.write_text("x")
    code = ("import sys\nfrom purestore.cli.main import main\nmain(['hash', 'path', %r])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'trio', 'sqlite3', 'zstandard', 'nacl', 'asyncio', 'ssl', 'subprocess'}"
            " or m == 'purestore.store.local'))" % str(f))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.splitlines()[-1] == "[]", p.stdout


def test_nar_dump_refuses_a_terminal(tmp_path):
    import os
    import pty
    import sys
    from conftest import pure_env
    master, slave = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "purestore.cli.main", "nar", "dump", str(tmp_path)],
                           stdout=slave, stderr=subprocess.PIPE, env=pure_env(None), text=True)
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 2 and p.stderr.startswith("error: refusing to write a NAR to a terminal")


def test_a_dangling_symlink_is_said_to_be_one(tmp_path):
    """`hash file` and `store add --flat` follow a symlink; one whose target is missing was
    'No such file or directory', as if the link itself were not there."""
    (tmp_path / "link").symlink_to("gone.txt")
    err = fails("hash", "file", tmp_path / "link")
    assert err == f"error: cannot open '{tmp_path}/link': it is a symlink to 'gone.txt', which does not exist\n"
    err = fails("store", "add", "--flat", "-n", tmp_path / "link", root=tmp_path / "root")
    assert err == (f"error: cannot add '{tmp_path}/link' flat: it is a symlink to 'gone.txt', which does not "
                   "exist\nhint: without --flat the symlink itself is added\n")


@pytest.mark.parametrize("cmd", ["path", "file", "convert"])
def test_hash_commands_show_examples_in_their_help(cmd):
    out = run_pure("hash", cmd, "--help").stdout
    assert f"examples:\n  pure hash {cmd} " in out and max(map(len, out.splitlines())) <= 100


def test_restoring_under_a_missing_directory_names_that_directory(tmp_path):
    """`pure nar restore nodir/out` said "'nodir/out': No such file or directory", as if DEST
    had to exist, which it must not; the directory that is missing is named."""
    from purestore.formats.nar import nar_of_bytes
    p = run_pure("nar", "restore", tmp_path / "nodir" / "out", input=nar_of_bytes(b"x"), check=False)
    assert p.returncode == 1 and p.stderr.decode() == (
        f"error: cannot restore a NAR to '{tmp_path}/nodir/out': its parent directory '{tmp_path}/nodir': "
        "No such file or directory\n")
