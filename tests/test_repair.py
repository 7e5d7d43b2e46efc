"""`pure store verify --check-contents --repair`: corrupted or missing paths come back from a
signed cache; without a (trusted) cache the path is reported and the exit status is non-zero."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import run_pure
from purestore.formats.signing import SecretKey


@pytest.fixture
def setup(tmp_path):
    """A store with a two-file tree (and a text referring to it), pushed to a signed file:// cache."""
    root = tmp_path / "root"
    root.mkdir()
    src = tmp_path / "tree"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (src / "README").write_text("a tree\n")
    key = SecretKey.generate("cache-1")
    (tmp_path / "sk").write_text(key.render())
    pure = lambda *a, **kw: run_pure(*a, root=root, **kw)
    path = pure("store", "add", src).stdout.strip()
    cache = tmp_path / "cache"
    pure("copy", "--to", f"file://{cache}", "--secret-key-file", tmp_path / "sk", path)
    conf = tmp_path / "pure.conf"
    conf.write_text(f"substituters = file://{cache}\ntrusted-public-keys = {key.public_key().render()}\n")
    real = root / path.lstrip("/")
    return dict(pure=pure, path=path, real=real, conf=conf, tmp=tmp_path, cache=cache, key=key)


def corrupt(real):
    f = real / "bin" / "tool"
    os.chmod(real / "bin", 0o755)
    os.chmod(f, 0o755)
    f.write_text("#!/bin/sh\necho evil\n")
    return f


def verify(s, *extra, conf=None):
    env = {"PURE_CONFIG": str(conf)} if conf else None
    return s["pure"]("store", "verify", "--check-contents", *extra, check=False, env=env)


def test_corrupted_file_is_reported_and_repaired_from_the_signed_cache(setup):
    s = setup
    f = corrupt(s["real"])
    p = verify(s)
    assert p.returncode == 1 and s["path"] in p.stdout and "hash" in p.stdout
    p = verify(s, "--repair", "--json", conf=s["conf"])
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["ok"] and out["repaired"] == [s["path"]] and out["problems"] == []
    assert f.read_text() == "#!/bin/sh\necho tool\n"
    assert verify(s).returncode == 0


def test_missing_path_is_repaired(setup):
    s = setup
    os.chmod(s["real"], 0o755)
    shutil.rmtree(s["real"])
    p = verify(s, "--repair", conf=s["conf"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"repaired {s['path']}" in p.stderr
    assert (s["real"] / "README").read_text() == "a tree\n"


def test_without_a_cache_the_path_is_reported_and_the_exit_status_is_1(setup):
    s = setup
    corrupt(s["real"])
    p = verify(s, "--repair")  # PURE_CONFIG=/dev/null: no substituters
    assert p.returncode == 1
    assert s["path"] in p.stdout and "not repaired: no substituter" in p.stdout
    assert "echo evil" in (s["real"] / "bin" / "tool").read_text()


def test_a_cache_signed_by_an_untrusted_key_is_not_used(setup):
    s = setup
    corrupt(s["real"])
    other = SecretKey.generate("cache-1").public_key().render()  # same name, different key
    conf = s["tmp"] / "other.conf"
    conf.write_text(f"substituters = file://{s['cache']}\ntrusted-public-keys = {other}\n")
    p = verify(s, "--repair", conf=conf)
    assert p.returncode == 1 and "not repaired" in p.stdout and "signature" in p.stdout
    assert "echo evil" in (s["real"] / "bin" / "tool").read_text()


def test_a_cache_whose_nar_was_tampered_with_is_refused(setup):
    s = setup
    corrupt(s["real"])
    for nar in (s["cache"] / "nar").iterdir():
        data = bytearray(nar.read_bytes())
        data[len(data) // 2] ^= 0xFF
        nar.write_bytes(bytes(data))
    p = verify(s, "--repair", conf=s["conf"])
    assert p.returncode == 1 and "not repaired" in p.stdout
    assert "echo evil" in (s["real"] / "bin" / "tool").read_text()
