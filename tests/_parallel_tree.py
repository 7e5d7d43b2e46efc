"""The source tree of tests/data/cache/parallel (see its README): generated, not committed."""

from __future__ import annotations

import os
import random
from pathlib import Path

BUILD_ID = "ab" + "0123456789abcdef" * 2 + "012345"  # 2 + 38 hex digits


def make_parallel_tree(dest: Path) -> Path:
    """A path of ~3 MB of compressible text (several xz blocks at level 0) with separate debug
    files where Nix's index-debug-info looks, and some it must skip."""
    r = random.Random(11)
    words = [bytes(r.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(r.randrange(2, 9))) for _ in range(500)]
    dest.mkdir()
    (dest / "bin").mkdir()
    (dest / "bin" / "text").write_bytes(b"\n".join(b" ".join(r.choice(words) for _ in range(10))
                                                 for _ in range(60_000)))
    ids = dest / "lib" / "debug" / ".build-id"
    (ids / BUILD_ID[:2]).mkdir(parents=True)
    (ids / BUILD_ID[:2] / f"{BUILD_ID[2:]}.debug").write_bytes(b"\x7fELF debug info\n")
    (ids / BUILD_ID[:2] / "notes.txt").write_text("not a debug file\n")        # wrong name
    (ids / BUILD_ID[:2] / ("f" * 38 + ".debug")).symlink_to(f"{BUILD_ID[2:]}.debug")  # a symlink
    (ids / "cd").symlink_to(BUILD_ID[:2])                                       # a symlinked dir
    (ids / "XY").mkdir()                                                        # not hex
    (ids / "XY" / ("0" * 38 + ".debug")).write_text("skipped\n")
    os.utime(dest, (0, 0))
    return dest
