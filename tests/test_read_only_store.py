"""A store this user may read but not write (another user's, a read-only mount): queries, and
builds and shells of what is valid already, work; a write fails with an error that says why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import BUSYBOX, pure_env, sandbox_build_reason

REASON = sandbox_build_reason()
EXPR = '''\
from purestore.expr import derivation, source
bb = source("bb")
B = f"{bb}/bin/busybox"
default = derivation(name="hello", system="x86_64-linux", builder=B, B=B, args=["sh", "-c",
    "$B mkdir -p $out/bin; printf '#!%s sh\\\\necho hi\\\\n' $B > $out/bin/hi; $B chmod +x $out/bin/hi"])
'''
# root without the capabilities that let it write what is not its own: as another user would be
DROP = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner",
        "--inh-caps", "-dac_override,-dac_read_search,-fowner"]
NOBODY = 65534


def _as_reader(args, root, cwd, check=True):
    p = subprocess.run([*DROP, sys.executable, "-m", "purestore.cli.main", *map(str, args)],
                       capture_output=True, text=True, env=pure_env(root), cwd=cwd, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture
def reader_store(tmp_path, store_root):
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (to read a store as a user who may not write it)")
    if REASON is not None:
        pytest.skip(REASON)
    probe = tmp_path / "probe"
    probe.mkdir()
    os.chown(probe, NOBODY, NOBODY)
    if subprocess.run([*DROP, "touch", str(probe / "x")], capture_output=True).returncode == 0:
        pytest.skip("dropping capabilities does not take write access away here")
    (tmp_path / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, tmp_path / "bb" / "bin" / "busybox")
    (tmp_path / "e.py").write_text(EXPR)
    p = subprocess.run([sys.executable, "-m", "purestore.cli.main", "build", "e.py", "--no-link"],
                       capture_output=True, text=True, env=pure_env(store_root), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout.strip()
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(store_root)], check=True)
    return store_root, out


def test_queries_and_valid_builds_work_on_a_store_this_user_may_only_read(reader_store, tmp_path):
    root, out = reader_store
    db = root / "pure" / "var" / "pure" / "db" / "db.sqlite"
    before = (sorted(os.listdir(db.parent)), db.stat().st_mtime_ns)
    ls = _as_reader(["store", "ls"], root, tmp_path).stdout.split()
    assert out in ls and any(p.endswith("-hello.drv") for p in ls)
    assert _as_reader(["store", "path-info", "-r", out], root, tmp_path).stdout.split()[-1] == out
    assert "no problems" in _as_reader(["store", "verify", "--check-contents"], root, tmp_path).stderr
    assert '"components"' in _as_reader(["sbom", out], root, tmp_path).stdout
    _as_reader(["report"], root, tmp_path)
    # evaluation of an unchanged expression writes nothing; its outputs are valid: no build
    assert _as_reader(["build", "e.py", "--no-link"], root, tmp_path).stdout.strip() == out
    # a shell or program of a rooted store needs a mount point: one of its own, removed after
    assert _as_reader(["run", "e.py"], root, tmp_path).stdout == "hi\n"
    assert _as_reader(["shell", "e.py", "-c", "hi"], root, tmp_path).stdout == "hi\n"
    assert (sorted(os.listdir(db.parent)), db.stat().st_mtime_ns) == before  # nothing written


def test_a_write_to_a_store_this_user_may_only_read_says_why_it_failed(reader_store, tmp_path):
    root, out = reader_store
    (tmp_path / "f").write_text("x")
    why = "is read-only for this user (uid 0): its database"
    for args in (["store", "add", tmp_path / "f"], ["gc"], ["store", "optimise"], ["store", "delete", out]):
        p = _as_reader(args, root, tmp_path, check=False)
        assert p.returncode == 1 and p.stderr.startswith("error: ") and why in p.stderr, (args, p.stderr)
    # a build that must build: the expression changed
    (tmp_path / "e.py").write_text(EXPR.replace("echo hi", "echo bye"))
    p = _as_reader(["build", "e.py", "--no-link"], root, tmp_path, check=False)
    assert p.returncode == 1 and why in p.stderr
    assert "no problems" in _as_reader(["store", "verify", "--check-contents"], root, tmp_path).stderr
