"""`pure report` after a real sequence: a substitution, three builds (one a fetch), a --check that
reproduces, and a --rounds 2 of a derivation that does not."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from conftest import BUSYBOX, run_pure, sandbox_build_reason
from purestore.formats.signing import SecretKey

REASON = sandbox_build_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

EXPR = '''
import os
from purestore.expr import derivation, source, fetchurl
bb = source("bb", name="busybox")
B = f"{bb}/bin/busybox"
src = fetchurl(url="file://" + os.path.join(os.path.dirname(__file__), "data.txt"), sha256="@SHA@")
dep = derivation(name="dep-1.0", system="x86_64-linux", builder=B, args=["sh", "-c", "echo dep > $out"])
app = derivation(name="app-1.0", system="x86_64-linux", builder=B,
                 args=["sh", "-c", f"{B} cat {src} {dep} > $out"])
noisy = derivation(name="noisy-1.0", system="x86_64-linux", builder=B,
                   args=["sh", "-c", f"{B} cat /proc/sys/kernel/random/uuid > $out"])
cached = derivation(name="cached-1.0", system="x86_64-linux", builder=B, args=["sh", "-c", "echo c > $out"])
'''


def test_report_after_builds_checks_and_a_substitution(tmp_path):
    proj = tmp_path / "proj"
    (proj / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, proj / "bb" / "bin" / "busybox")
    (proj / "data.txt").write_bytes(b"data\n")
    (proj / "expr.py").write_text(EXPR.replace("@SHA@", hashlib.sha256(b"data\n").hexdigest()))
    a_root, b_root = tmp_path / "a", tmp_path / "b"
    a_root.mkdir()
    b_root.mkdir()
    key = SecretKey.generate("c-1")
    (tmp_path / "sk").write_text(key.render())

    # store A builds `cached` and pushes it; store B fetches it: one substitution in B
    cached = run_pure("build", "expr.py", "-A", "cached", "--no-link", root=a_root, cwd=proj).stdout.split()[-1]
    url = f"file://{tmp_path / 'cache'}"
    run_pure("copy", "--to", url, "--secret-key-file", tmp_path / "sk", cached, root=a_root)
    b = lambda *args, **kw: run_pure(*args, root=b_root, cwd=proj, **kw)
    b("copy", "--from", url, "--trusted-public-keys", key.public_key().render(), cached)

    b("build", "expr.py", "-A", "app", "--no-link")                    # 3 builds: fetch, dep, app
    b("build", "expr.py", "-A", "app", "--no-link", "--check")          # reproducible
    p = b("build", "expr.py", "-A", "noisy", "--no-link", "--rounds", "2", check=False)
    assert p.returncode != 0                                            # not reproducible

    r = json.loads(b("report", "--json").stdout)
    assert r["builds"]["total"] == 4 and r["builds"]["fixedOutput"] == 1
    assert r["builds"]["byStatus"] == {"built": 4}
    assert r["builtWithoutNetwork"]["withoutNetwork"] == 3
    assert r["builtWithoutNetwork"]["share"] == pytest.approx(0.75)
    assert r["builtWithoutNetwork"]["nonFixedOutputWithNetwork"] == []
    assert r["fixedOutputPinned"]["share"] == 1.0
    assert r["fixedOutputPinned"]["derivations"][0].endswith("-data.txt.drv")
    rp = r["reproducibility"]
    assert (rp["reproducible"], rp["runs"]) == (1, 2)
    assert len(rp["failing"]) == 1 and rp["failing"][0]["drv"].endswith("-noisy-1.0.drv")
    assert rp["failing"][0]["kind"] == "rounds"
    c = r["cache"]
    assert (c["substituted"], c["built"]) == (1, 4) and c["hitRate"] == pytest.approx(0.2)
    assert r["sandboxRefusals"]["count"] == 0

    text = b("report").stdout
    assert "reproducible (--check/--rounds): 50.0% (1 of 2 runs)" in text
    assert "-noisy-1.0.drv" in text and "first difference at byte" in text
    assert "cache hit rate:                  20.0% (1 of 5 derivations substituted, 4 built)" in text


def test_a_build_killed_with_sigkill_is_abandoned_not_running_forever(tmp_path, store_root, pure):
    """A `pure build` killed with kill -9 cannot record how its build ended: its record said
    'running' for good.  The report tells it from a build really running (the process that
    recorded it is alive), and calls it 'abandoned' once that process is gone."""
    from test_build import HEADER
    from test_build_crash import _RUN, running_sandbox, start_build, wait_gone
    bb = tmp_path / "bb" / "bin"
    bb.mkdir(parents=True)
    shutil.copy(BUSYBOX, bb / "busybox")
    # unique to this run: with pytest's pid, REPORTKILL123 was in the command line of another
    # run's builder, REPORTKILL1234, running on the same machine (waited for, or taken for this one)
    marker = f"REPORTKILL{_RUN}"
    f = tmp_path / "e.py"
    f.write_text(HEADER + f'default = sh("slow", ": {marker}; $B sleep 60; echo x > $out")\n')
    p = start_build(store_root, tmp_path, f, "--no-link")
    try:
        running_sandbox(marker)
        r = json.loads(pure("report", "--json").stdout)
        assert r["builds"]["byStatus"] == {"running": 1}
    finally:
        p.kill()  # SIGKILL: no clean-up, nothing recorded
        p.wait(timeout=30)
    assert wait_gone(marker) == [], "the builder outlived pure"
    r = json.loads(pure("report", "--json").stdout)
    assert r["builds"]["total"] == 1 and r["builds"]["byStatus"] == {"abandoned": 1}
    assert "builds run:                      1 (1 abandoned;" in pure("report").stdout
