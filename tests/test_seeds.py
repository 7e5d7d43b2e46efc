"""Bootstrap seeds: the lock file, the registry fetchers (real pip and apt-get), and fixed-output
checking through `pure build` (a seed with the wrong hash is refused)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import types
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, run_pure
from purestore.build import registry_fetch as rf
from purestore.errors import BuildError, HashMismatch

LOCK = REPO / "bootstrap" / "seeds.lock"
BUSYBOX_VERSION = "1:1.35.0-4+deb12u1+b1"
BUSYBOX_SHA = "3d9f2889d6782537624a4e1a10e68a2ddd53e0ee8bac02676f27308f42ec6bf6"
HELLO_SHA = "31e066137a962676e89f69d1b65382de95a7ef7d914b8cb956f41ea72e0f516b"

needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                               reason="apt-get/dpkg-deb not installed (Debian package client)")


def drv(**env):
    return types.SimpleNamespace(env={"name": "t", **env}, builder="builtin:test")


def pins_from_expression() -> dict:
    """PINS from expressions/seeds.py, read without evaluating it (it imports the expr API)."""
    tree = ast.parse((REPO / "expressions" / "seeds.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "PINS":
            out = {}
            for k, v in zip(node.value.keys, node.value.values):
                out[ast.literal_eval(k)] = {kw.arg: ast.literal_eval(kw.value) for kw in v.keywords}
            return out
    raise AssertionError("no PINS in expressions/seeds.py")


# --- the lock file -------------------------------------------------------------------------------


def test_lock_file_says_what_where_and_how_for_every_artifact():
    lock = json.loads(LOCK.read_text())
    entries = lock["seeds"] + lock["sources"]
    assert {e["name"] for e in lock["seeds"]} == {"busybox", "zig"}
    for e in entries:
        for key in ("name", "version", "source", "package", "package_version", "sha256",
                    "store_hash", "store_hash_mode", "obtain"):
            assert e.get(key), f"{e['name']}: lock entry lacks {key!r}"
        assert e["source"] in ("pip", "apt", "apt-source")
        assert len(e["sha256"]) == 64 and int(e["sha256"], 16) >= 0
        assert e.get("file") or e.get("member")
        if e["store_hash_mode"] == "flat":
            assert e["store_hash"] == "sha256:" + e["sha256"]
    # The task's own pin for GNU hello.
    assert any(e["sha256"] == HELLO_SHA and e["file"] == "hello_2.10.orig.tar.gz" for e in entries)


def test_lock_file_and_expression_pins_agree():
    lock = json.loads(LOCK.read_text())
    pins = pins_from_expression()
    entries = {e["name"]: e for e in lock["seeds"] + lock["sources"]}
    assert set(pins) == set(entries)
    for name, pin in pins.items():
        for key, value in pin.items():
            assert entries[name][key] == value, f"{name}.{key}: seeds.py {value!r} vs lock {entries[name][key]!r}"


def test_no_registry_host_name_in_the_bootstrap_files():
    """The repo names packages, never registry hosts: the clients know where to look."""
    texts = [LOCK.read_text(), (REPO / "expressions" / "seeds.py").read_text(),
             (REPO / "purestore" / "build" / "registry_fetch.py").read_text()]
    for t in texts:
        for host in ("pypi.org", "pythonhosted", "debian.org", "snapshot."):
            assert host not in t


# --- pure helpers --------------------------------------------------------------------------------


def test_deb_src_stanzas_mirror_debian_entries_only(tmp_path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://other.example/repo\nSuites: x\nComponents: main\n")
    (etc / "sources.list").write_text("deb http://mirror.example/debian-security bookworm-security main\n"
                                      "deb http://vendor.example/apt stable main\n")
    out = rf.deb_src_stanzas(etc)
    assert "Types: deb-src\nURIs: http://mirror.example/debian\n" in out
    assert "deb-src http://mirror.example/debian-security bookworm-security main" in out
    assert "other.example" not in out and "vendor.example" not in out


def test_deb_src_stanzas_empty_without_debian_entries(tmp_path):
    (tmp_path / "sources.list").write_text("deb http://vendor.example/apt stable main\n")
    assert rf.deb_src_stanzas(tmp_path) == ""


def _zip(path: Path, members: dict[str, tuple[bytes, int]]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, (data, mode) in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            z.writestr(info, data)
    return path


def test_unpack_wheel_keeps_exec_bits_and_contents(tmp_path):
    w = _zip(tmp_path / "x.whl", {"pkg/tool": (b"#!x\n", 0o100755), "pkg/data.txt": (b"d", 0o100644),
                                  "pkg.dist-info/RECORD": (b"r", 0o664)})
    rf.unpack_wheel(w, str(tmp_path / "out"))
    assert (tmp_path / "out/pkg/tool").read_bytes() == b"#!x\n"
    assert os.access(tmp_path / "out/pkg/tool", os.X_OK)
    assert not os.access(tmp_path / "out/pkg/data.txt", os.X_OK)
    assert (tmp_path / "out/pkg.dist-info/RECORD").read_bytes() == b"r"


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/abs/evil"])
def test_unpack_wheel_refuses_members_escaping_the_target(tmp_path, name):
    w = _zip(tmp_path / "x.whl", {name: (b"x", 0o100644)})
    with pytest.raises(rf.FetchError, match="escapes the target"):
        rf.unpack_wheel(w, str(tmp_path / "out"))
    assert not (tmp_path / "evil").exists()


def test_unpack_wheel_refuses_symlinks(tmp_path):
    w = _zip(tmp_path / "x.whl", {"link": (b"/etc/passwd", 0o120777)})
    with pytest.raises(rf.FetchError, match="not a regular file"):
        rf.unpack_wheel(w, str(tmp_path / "out"))


def _corrupt_wheel(path: Path, how: str) -> Path:
    data = bytearray(_zip(path, {"pkg/a.txt": (b"a" * 5000, 0o100644)}).read_bytes())
    if how == "truncated":
        data = data[:len(data) // 2]
    elif how == "not a zip":
        data = bytearray(b"<html>502 Bad Gateway</html>")
    elif how == "corrupted data":  # a byte of the member's contents: its CRC no longer matches
        i = data.index(b"aaaa")
        data[i] = ord("b")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how, said", [("truncated", "is not a valid zip archive"),
                                       ("not a zip", "is not a valid zip archive"),
                                       ("corrupted data", "is not a valid zip archive at member 'pkg/a.txt'")])
def test_unpack_wheel_of_a_broken_zip_is_a_fetch_error(tmp_path, how, said):
    """A truncated or corrupted wheel (fetched without a sha256 to check) came out of zipfile as
    BadZipFile: a traceback, not a build error."""
    w = _corrupt_wheel(tmp_path / "x.whl", how)
    with pytest.raises(rf.FetchError, match=f"wheel 'x.whl' {said}"):
        rf.unpack_wheel(w, str(tmp_path / "out"))


def test_unpack_wheel_with_a_member_both_file_and_directory_is_a_fetch_error(tmp_path):
    w = _zip(tmp_path / "x.whl", {"pkg": (b"file", 0o100644), "pkg/inside": (b"x", 0o100644)})
    with pytest.raises(rf.FetchError, match="wheel 'x.whl': cannot unpack member 'pkg/inside'"):
        rf.unpack_wheel(w, str(tmp_path / "out"))


def test_fetchers_reject_bad_attributes(tmp_path):
    with pytest.raises(BuildError, match="'package' is required"):
        rf.fetch_pip(drv(version="1"), str(tmp_path / "o"), lambda _: None)
    with pytest.raises(BuildError, match="package name or version"):
        rf.fetch_apt(drv(package="x; rm -rf /", version="1", member="a"), str(tmp_path / "o"), lambda _: None)
    with pytest.raises(BuildError, match="'binary' or 'source'"):
        rf.fetch_apt(drv(package="x", version="1", kind="other"), str(tmp_path / "o"), lambda _: None)


def test_seed_cache_is_used_only_when_its_hash_matches(tmp_path, monkeypatch):
    """PURE_SEED_CACHE serves artifacts by sha256; a corrupted entry is ignored, not trusted."""
    cache = tmp_path / "cache"
    cache.mkdir()
    data = b"artifact"
    sha = hashlib.sha256(data).hexdigest()
    (cache / f"sha256-{sha}").write_bytes(data)
    monkeypatch.setenv("PURE_SEED_CACHE", str(cache))
    rf.fetch_apt(drv(package="whatever", version="1", member="bin/x", sha256=sha, keepPath="1",
                     executable="1"), str(tmp_path / "out"), lambda _: None)
    assert (tmp_path / "out/bin/x").read_bytes() == data
    assert os.access(tmp_path / "out/bin/x", os.X_OK)
    (cache / f"sha256-{sha}").write_bytes(b"tampered")
    assert rf._cache_get(sha, lambda _: None) is None


# --- real registry clients -----------------------------------------------------------------------


@needs_apt
def test_fetch_apt_binary_member_is_the_pinned_static_busybox(tmp_path, monkeypatch):
    monkeypatch.delenv("PURE_SEED_CACHE", raising=False)
    lines = []
    out = tmp_path / "busybox"
    rf.fetch_apt(drv(package="busybox-static", version=BUSYBOX_VERSION, member="bin/busybox",
                     keepPath="1", executable="1", sha256=BUSYBOX_SHA), str(out), lines.append)
    exe = out / "bin" / "busybox"
    assert rf.sha256_file(exe) == BUSYBOX_SHA
    assert os.access(exe, os.X_OK)
    assert any("apt-get" in line and "download" in line for line in lines)
    # It is static: no program interpreter (PT_INTERP) in its ELF program headers.
    data = exe.read_bytes()
    assert data[:4] == b"\x7fELF"
    phoff, phentsize, phnum = (int.from_bytes(data[0x20:0x28], "little"),
                               int.from_bytes(data[0x36:0x38], "little"),
                               int.from_bytes(data[0x38:0x3A], "little"))
    types_ = [int.from_bytes(data[phoff + i * phentsize: phoff + i * phentsize + 4], "little")
              for i in range(phnum)]
    assert 3 not in types_


@needs_apt
def test_fetch_apt_refuses_an_artifact_with_another_hash(tmp_path, monkeypatch):
    monkeypatch.delenv("PURE_SEED_CACHE", raising=False)
    out = tmp_path / "busybox"
    with pytest.raises(HashMismatch, match=f"expected {'0' * 64}, got {BUSYBOX_SHA}"):
        rf.fetch_apt(drv(package="busybox-static", version=BUSYBOX_VERSION, member="bin/busybox",
                         sha256="0" * 64), str(out), lambda _: None)
    assert not out.exists()


@needs_apt
def test_fetch_apt_source_gets_the_upstream_tarball_without_touching_etc(tmp_path, monkeypatch):
    monkeypatch.delenv("PURE_SEED_CACHE", raising=False)
    monkeypatch.setenv("PURE_APT_DIR", str(tmp_path / "apt"))
    etc_before = sorted(p.name for p in Path("/etc/apt/sources.list.d").iterdir())
    out = tmp_path / "hello.tar.gz"
    rf.fetch_apt(drv(package="hello", version="2.10-3", kind="source", file="hello_2.10.orig.tar.gz",
                     sha256=HELLO_SHA), str(out), lambda _: None)
    assert rf.sha256_file(out) == HELLO_SHA
    assert sorted(p.name for p in Path("/etc/apt/sources.list.d").iterdir()) == etc_before
    assert "deb-src" in next((tmp_path / "apt" / "sources").iterdir()).read_text()


def test_fetch_pip_downloads_and_unpacks_a_wheel(tmp_path, monkeypatch):
    monkeypatch.delenv("PURE_SEED_CACHE", raising=False)
    flat = tmp_path / "six.whl"
    rf.fetch_pip(drv(package="six", version="1.16.0"), str(flat), lambda _: None)
    sha = rf.sha256_file(flat)
    with zipfile.ZipFile(flat) as z:
        assert "six.py" in z.namelist()
    tree = tmp_path / "six"
    rf.fetch_pip(drv(package="six", version="1.16.0", sha256=sha, unpack="1"), str(tree), lambda _: None)
    assert "def add_metaclass" in (tree / "six.py").read_text()
    with pytest.raises(HashMismatch):
        rf.fetch_pip(drv(package="six", version="1.16.0", sha256="1" * 64), str(tmp_path / "bad"),
                     lambda _: None)
    with pytest.raises(BuildError, match="expected file 'nope.whl'"):
        rf.fetch_pip(drv(package="six", version="1.16.0", file="nope.whl"), str(tmp_path / "x"),
                     lambda _: None)


# --- through the store -------------------------------------------------------------------------


@needs_apt
def test_pure_build_refuses_a_seed_with_the_wrong_hash_and_accepts_the_pinned_one(tmp_path, store_root):
    expr = tmp_path / "seed.py"
    expr.write_text(
        "from purestore.expr import derivation\n"
        "def bb(h):\n"
        "    return derivation(name='busybox-1.35.0', system='x86_64-linux', builder='builtin:fetch-apt',\n"
        f"        package='busybox-static', version={BUSYBOX_VERSION!r}, kind='binary',\n"
        "        member='bin/busybox', keepPath=True, executable=True,\n"
        "        outputHash=h, outputHashAlgo='sha256', outputHashMode='recursive')\n"
        "bad = bb('0' * 64)\n"
        "import pkgs.seeds\n"
        "good = pkgs.seeds.busybox\n"
    )
    p = run_pure("build", "--no-link", "-A", "bad", expr, root=store_root, check=False)
    assert p.returncode != 0
    assert "hash mismatch" in p.stderr.lower(), p.stderr
    p = run_pure("build", "--no-link", "-A", "good", expr, root=store_root)
    out = p.stdout.strip().splitlines()[-1]
    assert out.endswith("-busybox-1.35.0")
    exe = Path(str(store_root) + out) / "bin" / "busybox"
    assert rf.sha256_file(exe) == BUSYBOX_SHA
