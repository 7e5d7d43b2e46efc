"""Pure evaluation refuses reads outside the allowed roots, writes, network, subprocesses, exec."""

from __future__ import annotations

import os
import textwrap

import pytest

from conftest import run_pure
from purestore.errors import PurityError
from purestore.expr.loader import evaluate


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def ev(file, **kw):
    return evaluate(str(file), kw.pop("attr", None), store_dir="/pure/store", env={}, **kw)


CASES = {
    "read": ('x = open("/etc/passwd").read()', "refused to read '/etc/passwd'"),
    "listdir": ('import os\nx = os.listdir("/etc")', "refused to list the directory '/etc'"),
    "write": ('open("out.txt", "w").write("x")', "for writing"),
    "mkdir": ('import os\nos.mkdir("newdir")', "refused to change the file system"),
    "socket": ('import socket\nsocket.socket()', "refused network access (socket.__new__"),
    "connect": ('import socket\nsocket.create_connection(("127.0.0.1", 9))', "refused network access"),
    "urllib": ('import urllib.request\nurllib.request.urlopen("http://127.0.0.1:9/")', "refused network access"),
    "subprocess": ('import subprocess\nsubprocess.run(["true"])', "refused to run a process (subprocess.Popen"),
    "system": ('import os\nos.system("true")', "refused to run a process (os.system"),
    "exec": ('import os\nos.execv("/bin/true", ["true"])', "refused to run a process (os.exec"),
    "spawn": ('import os\nos.posix_spawn("/bin/true", ["true"], {})', "refused to run a process (os.posix_spawn"),
    "fork": ('import os\nos.fork()', "refused to run a process (os.fork"),
    # (not "to run a process": loading a library and signalling are refused for what they are)
    "ctypes": ('import ctypes\nctypes.CDLL("libc.so.6")', "refused to load a C library (ctypes.dlopen 'libc.so.6')"),
    "kill": ('import os\nos.kill(os.getpid(), 0)', "refused to send a signal (os.kill"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_refusal_names_what_and_where(tmp_path, kind):
    code, msg = CASES[kind]
    f = write(tmp_path / "e" / "expr.py", "x = 1\n" + code + "\ndefault = []\n")
    with pytest.raises(PurityError) as ei:
        ev(f)
    text = str(ei.value)
    assert msg in text
    assert f"(at {f}:" in text  # where in the expression
    assert not (tmp_path / "e" / "out.txt").exists() and not (tmp_path / "e" / "newdir").exists()


def test_a_caught_refusal_still_fails_the_evaluation(tmp_path):
    f = write(tmp_path / "expr.py", """
        try:
            open("/etc/hostname").read()
        except Exception:
            pass
        default = []
    """)
    with pytest.raises(PurityError, match="refused to read '/etc/hostname'"):
        ev(f)


def test_the_environment_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_FOR_TEST", "1")
    f = write(tmp_path / "expr.py", """
        import os
        from purestore.expr import derivation
        default = derivation(name="e", system="x", builder="/b", n=len(os.environ),
                             secret=os.environ.get("SECRET_FOR_TEST"), home=os.getenv("HOME"))
    """)
    r = ev(f)
    env = r.selected[0].attrs
    assert (env["n"], env["secret"], env["home"]) == ("0", "", "")
    assert os.environ["SECRET_FOR_TEST"] == "1"  # restored afterwards


def test_reads_inside_the_tree_includes_and_sources_are_allowed(tmp_path):
    write(tmp_path / "e" / "data" / "v.txt", "42\n")
    write(tmp_path / "inc" / "lib.py", "V = open(__file__).read().count('V')\n")
    write(tmp_path / "outside" / "f.txt", "from outside\n")
    f = write(tmp_path / "e" / "expr.py", f"""
        import os
        import lib
        from purestore.expr import derivation, source
        v = open(os.path.join(os.path.dirname(__file__), "data", "v.txt")).read().strip()
        s = source({str(tmp_path / "outside" / "f.txt")!r})
        default = derivation(name="ok", system="x", builder="/b", v=v, n=lib.V, s=s)
    """)
    r = ev(f, include_paths=[str(tmp_path / "inc")])
    assert r.selected[0].attrs["v"] == "42"
    # source() made the file readable, but only that file
    f2 = write(tmp_path / "e" / "expr2.py", f"""
        from purestore.expr import source
        s = source({str(tmp_path / "outside" / "f.txt")!r})
        x = open({str(tmp_path / "outside" / "other.txt")!r})
    """)
    write(tmp_path / "outside" / "other.txt", "no\n")
    with pytest.raises(PurityError, match="other.txt"):
        ev(f2)


def test_pure_mode_ends_with_the_evaluation(tmp_path, monkeypatch):
    """After an evaluation, this process is not left in pure mode: it may read outside the
    expression's tree again, its environment is back, and it writes bytecode as before."""
    import sys
    outside = write(tmp_path / "outside.txt", "mine\n")
    f = write(tmp_path / "e" / "expr.py", "default = []\n")
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # (PYTHONDONTWRITEBYTECODE may be set)
    environ = os.environ
    with pytest.raises(PurityError, match="outside.txt"):  # (what pure mode refuses)
        ev(write(tmp_path / "e" / "reads.py", f"x = open({str(outside)!r}).read()\n"))
    ev(f)
    assert outside.read_text() == "mine\n"
    assert os.environ is environ and os.environ.get("PATH") and sys.dont_write_bytecode is False


def test_cli_prints_error_and_exits_nonzero_without_traceback(tmp_path):
    f = write(tmp_path / "expr.py", 'import subprocess\nsubprocess.run(["true"])\n')
    p = run_pure("eval", f, root=tmp_path / "root", check=False)
    assert p.returncode == 1
    assert p.stderr.startswith("error: pure evaluation refused to run a process")
    assert "Traceback" not in p.stderr
    assert f'File "{f}", line 2' in p.stderr


def test_evaluation_writes_nothing(tmp_path):
    """eval and show-derivation of a file compute paths without creating the store."""
    write(tmp_path / "e" / "src" / "a.txt", "a\n")
    f = write(tmp_path / "e" / "expr.py", """
        from purestore.expr import derivation, source, to_file
        default = derivation(name="x", system="x", builder="/b", s=source("src"), t=to_file("t", "t"))
    """)
    root = tmp_path / "root"
    run_pure("eval", f, root=root)
    run_pure("show-derivation", f, root=root)
    assert not root.exists()
    assert sorted(os.listdir(tmp_path / "e")) == ["expr.py", "src"]  # no __pycache__ either
