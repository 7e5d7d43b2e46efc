"""Deterministic sample inputs for the store golden files (used by make_golden.py and the tests).

``make_case(name, dir) -> path`` creates input ``name`` under ``dir`` and returns the path to add.
"""

from __future__ import annotations

import os
import random

# case name -> (mode, how) ; mode "recursive" is `nix-store --add`, "flat" `--add-fixed sha256`
CASES = {
    "tree": "recursive",          # nested dirs, executables, symlinks, empty file and dir, big file
    "hello.txt": "recursive",     # a single regular file
    "run.sh": "recursive",        # a single executable file
    "link": "recursive",          # a single (dangling) symlink
    "empty-dir": "recursive",     # an empty directory
    "h.txt": "flat",              # FORMATS.md vector: "hello\n"
    "blob.bin": "flat",           # 3 MiB of pseudo-random bytes
    "tool": "flat",               # an executable file added flat
}


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def make_case(name: str, base: str) -> str:
    os.makedirs(base, exist_ok=True)
    p = os.path.join(base, name)
    rnd = random.Random(name)
    if name == "tree":
        os.makedirs(os.path.join(p, "bin"))
        os.makedirs(os.path.join(p, "share", "doc", "deep", "er"))
        os.makedirs(os.path.join(p, "empty"))
        _write(os.path.join(p, "bin", "tool"), b"#!/bin/sh\necho tool\n", 0o755)
        _write(os.path.join(p, "bin", "group-exec-only"), b"x", 0o654)  # not executable in NAR
        _write(os.path.join(p, "share", "doc", "README"), b"read me\n" * 100)
        _write(os.path.join(p, "share", "doc", "deep", "er", "leaf"), b"")
        _write(os.path.join(p, "big"), rnd.randbytes(3 * 1024 * 1024 + 5))
        for n in ("B", "a", "a-b", "a.b", "a_b", "Z9"):  # byte order, not locale order
            _write(os.path.join(p, n), n.encode() * 3)
        os.symlink("bin/tool", os.path.join(p, "tool-link"))
        os.symlink("/nonexistent/target", os.path.join(p, "dangling"))
        os.symlink("share", os.path.join(p, "dir-link"))
    elif name == "hello.txt":
        _write(p, b"hello, world\n")
    elif name == "run.sh":
        _write(p, b"#!/bin/sh\nexit 0\n", 0o755)
    elif name == "link":
        os.symlink("../somewhere/else", p)
    elif name == "empty-dir":
        os.makedirs(p)
    elif name == "h.txt":
        _write(p, b"hello\n")
    elif name == "blob.bin":
        _write(p, rnd.randbytes(3 * 1024 * 1024))
    elif name == "tool":
        _write(p, b"#!/bin/sh\necho flat tool\n", 0o755)
    else:
        raise KeyError(name)
    return p
