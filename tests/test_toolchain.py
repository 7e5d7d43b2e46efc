"""The package set built from the seeds: GNU hello and a C library with a program, in the sandbox,
with nothing from the host; reproducible in an independent store; `pure build --check` clean.

These builds take minutes (zig builds musl in every C derivation), so the module is slow and builds
as little as it can: one store for everything (module fixture), one independent store for hello.
Downloads are shared through PURE_SEED_CACHE (hash-checked).  PURE_TEST_HELLO_STORE names a store
root where hello may already be built (shared with test_sbom_hello.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_pure
from purestore.build.sandbox import sandbox_available

EXPR = REPO / "expressions"
REASON = sandbox_available()
if REASON is None and (shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None):
    REASON = "no apt-get/dpkg-deb (the seeds are fetched with the registry clients)"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

SEED_CACHE = os.environ.get("PURE_SEED_CACHE") or os.path.expanduser("~/.cache/purestore/seed-cache")
ENV = {"PURE_SEED_CACHE": SEED_CACHE}
HOST_DIRS = (b"/usr/", b"/lib/x86_64", b"/lib64/", b"/etc/", b"/home/", b"/root/", b"/var/tmp")


def build(root, *args, env=None, check=True):
    p = run_pure("build", "-j", "2", *args, root=root, env={**ENV, **(env or {})}, check=False,
                 timeout=3000)
    if check and p.returncode != 0:
        pytest.fail(f"pure build {' '.join(map(str, args))} failed:\n{p.stderr[-4000:]}")
    return p


def path_info(root, path) -> dict:
    p = run_pure("store", "path-info", "--json", path, root=root)
    return json.loads(p.stdout)[0]


def real(root, path) -> Path:
    return Path(str(root) + path)


def elf_program_header_types(data: bytes) -> list[int]:
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF file"
    phoff = int.from_bytes(data[0x20:0x28], "little")
    size, num = int.from_bytes(data[0x36:0x38], "little"), int.from_bytes(data[0x38:0x3A], "little")
    return [int.from_bytes(data[phoff + i * size: phoff + i * size + 4], "little") for i in range(num)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One rooted store with everything in expressions/all.py built; returns (root, {name: path})."""
    root = os.environ.get("PURE_TEST_HELLO_STORE") or str(tmp_path_factory.mktemp("pkgs-store"))
    p = build(root, "--no-link", EXPR / "all.py")
    outs = {line.split("-", 1)[1]: line for line in p.stdout.split() if line.startswith("/")}
    assert "hello-2.10" in outs, p.stdout
    return root, outs


def test_hello_prints_hello_world(store):
    root, outs = store
    hello = real(root, outs["hello-2.10"]) / "bin" / "hello"
    p = subprocess.run([hello], capture_output=True, text=True, env={}, timeout=30)
    assert p.returncode == 0 and p.stdout == "Hello, world!\n"
    p = subprocess.run([hello, "--version"], capture_output=True, text=True, env={}, timeout=30)
    assert p.stdout.splitlines()[0] == "hello (GNU Hello) 2.10"
    p = subprocess.run([hello, "-g", "purestore"], capture_output=True, text=True, timeout=30)
    assert p.stdout == "purestore\n"


def test_hello_saw_no_host_files(store):
    """References are store paths only (here: none but itself), it is static (no ELF interpreter,
    so no host libc), and no host directory name is written into it."""
    root, outs = store
    info = path_info(root, outs["hello-2.10"])
    assert all(r.startswith("/pure/store/") for r in info["references"])
    assert set(info["references"]) <= {outs["hello-2.10"]}
    data = (real(root, outs["hello-2.10"]) / "bin" / "hello").read_bytes()
    assert 3 not in elf_program_header_types(data)  # PT_INTERP
    for d in HOST_DIRS:
        assert d not in data, f"hello mentions host directory {d!r}"


def test_a_c_library_and_a_program_that_links_it(store):
    root, outs = store
    lib = real(root, outs["libgreet-1.0"])
    assert (lib / "lib" / "libgreet.a").read_bytes().startswith(b"!<arch>\n")
    assert "greet_format" in (lib / "include" / "greet.h").read_text()
    greet = real(root, outs["greet-1.0"]) / "bin" / "greet"
    p = subprocess.run([greet, "purestore", "Bonjour"], capture_output=True, text=True, timeout=30)
    assert p.stdout == "Bonjour, purestore!\n"
    # Linked statically: the program does not need the library at run time.
    assert outs["libgreet-1.0"] not in path_info(root, outs["greet-1.0"])["references"]


def test_toolchain_outputs_refer_only_to_the_seeds_and_each_other(store):
    root, outs = store
    closure = run_pure("store", "requisites", outs["devshell"], root=root).stdout.split()
    names = sorted(p.split("-", 1)[1] for p in closure)
    assert names == sorted(["devshell", "bmake-20200710", "zig-cc-0.17.0", "untar-1.0",
                            "bootstrap-tools-busybox-1.35.0", "zig-0.17.0"])
    bindir = real(root, outs["devshell"]) / "bin"
    for tool in ("cc", "c++", "ld", "ar", "ranlib", "make", "bmake", "sh", "sed", "untar"):
        assert (bindir / tool).is_symlink(), tool
    assert os.readlink(bindir / "make").startswith(outs["bmake-20200710"])
    assert os.readlink(bindir / "ar").startswith(outs["zig-cc-0.17.0"])


def test_build_check_rebuilds_bit_for_bit(store):
    """`pure build --check`: the derivations are rebuilt and must give the same NAR hashes (exit
    status 104 otherwise).  The suite checks a cheap subset (shell tools, compiler wrappers, the
    C library, the devshell); docs/packages.md records --check of the whole set."""
    root, _ = store
    p = build(root, "--no-link", "--check", "-A", "quick_check", EXPR / "all.py", check=False)
    assert p.returncode == 0, p.stderr[-4000:]


def test_hello_is_reproduced_in_an_independent_store(store, tmp_path):
    """Another rooted store, another time, hostname (UTS namespace), TMPDIR, working directory,
    locale, time zone and user (uid 4242 in a user namespace, when we are root): the same hello
    output path and NAR hash."""
    root, outs = store
    other, tmp = tmp_path / "other-store", tmp_path / "other-tmp"
    other.mkdir()
    tmp.mkdir()
    env = {"PATH": os.environ["PATH"], "PURE_STORE": str(other), "PURE_CONFIG": "/dev/null",
           "PYTHONPATH": str(REPO), "TMPDIR": str(tmp), "HOME": str(tmp), "USER": "someone-else",
           "LOGNAME": "someone-else", "LANG": "C.UTF-8", "TZ": "Pacific/Kiritimati",
           "PURE_APT_DIR": str(tmp / "apt"), **ENV}
    prefix = []
    if os.geteuid() == 0 and shutil.which("unshare"):
        prefix = ["unshare", "--uts", "sh", "-c", 'hostname repro-host-2 && exec "$@"', "sh",
                  "unshare", "--user", "--map-user=4242", "--map-group=4242"]
    script = "import os, socket, sys; print(os.getuid(), socket.gethostname(), file=sys.stderr); " \
             "from purestore.cli.main import main; sys.exit(main())"
    p = subprocess.run(
        [*prefix, sys.executable, "-c", script, "build", "--no-link", str(EXPR / "hello.py")],
        capture_output=True, text=True, timeout=3000, cwd=tmp, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    if prefix:
        assert p.stderr.startswith("4242 repro-host-2\n")
    path = p.stdout.split()[-1]
    assert path == outs["hello-2.10"]
    assert path_info(other, path)["narHash"] == path_info(root, path)["narHash"]
