"""Deterministic realistic file tree for benchmarks (shared by several benchmarks).

``make_tree(path, files=20000, total_mb=350)`` builds, once, a tree that looks like an unpacked
package set: nested directories, many small files (source, headers, scripts), some large ones
(libraries, archives), about 5% executables and 2% symlinks (some dangling).  The same arguments
always give the same bytes.  When ``path`` already holds a finished tree made with the same
arguments (a stamp file next to it says so) nothing is done, so benchmarks can call it every run.

``default_tree()`` returns the cached default tree under /var/tmp.
"""

from __future__ import annotations

import os
import random
import shutil
import sys

VERSION = 1
DEFAULT_DIR = "/var/tmp/purestore-bench"


def _stamp(files: int, total_mb: int, seed: int) -> str:
    return f"purestore bench tree v{VERSION} files={files} total_mb={total_mb} seed={seed}\n"


def make_tree(path: str, files: int = 20000, total_mb: int = 350, seed: int = 1) -> str:
    """Create the tree at ``path`` unless already there; return ``path``."""
    stamp_file = path + ".stamp"
    want = _stamp(files, total_mb, seed)
    try:
        with open(stamp_file) as f:
            if f.read() == want and os.path.isdir(path):
                return path
    except FileNotFoundError:
        pass
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    rng = random.Random(seed)
    total = total_mb << 20

    # Directory skeleton: a few top-level "packages", each with nested dirs.
    dirs = [""]
    for pkg in range(max(1, files // 400)):
        base = f"pkg{pkg:03d}-{rng.choice(['lib', 'tools', 'data', 'doc', 'src'])}"
        dirs.append(base)
        for sub in ("bin", "lib", "include", "share/doc", "share/man/man1", "src/core", "src/util/deep"):
            if rng.random() < 0.8:
                dirs.append(f"{base}/{sub}")
    dirs = sorted(set(dirs) | {d.rsplit("/", 1)[0] for d in dirs if "/" in d})

    n_links = files // 50
    n_regular = files - n_links
    n_large = max(1, n_regular // 200)
    small_sizes = [min(int(rng.lognormvariate(7.5, 1.6)), 256 << 10) for _ in range(n_regular - n_large)]
    rest = max(total - sum(small_sizes), n_large)
    weights = [rng.random() + 0.05 for _ in range(n_large)]
    wsum = sum(weights)
    large_sizes = [int(rest * w / wsum) for w in weights]
    sizes = small_sizes + large_sizes
    rng.shuffle(sizes)

    names_used: set[str] = set()
    made: list[str] = []
    os.makedirs(tmp)
    for d in dirs:
        if d:
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
    exts = [".c", ".h", ".py", ".so", ".txt", ".1", ".json", "", ".a", ".tar"]
    for i, size in enumerate(sizes):
        d = rng.choice(dirs)
        while True:
            name = f"f{rng.randrange(1 << 30):x}{rng.choice(exts)}"
            rel = os.path.join(d, name)
            if rel not in names_used:
                break
        names_used.add(rel)
        full = os.path.join(tmp, rel)
        with open(full, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 20)
                f.write(rng.randbytes(n))
                left -= n
        if rng.random() < 0.05 or "/bin" in d:
            os.chmod(full, 0o755)
        else:
            os.chmod(full, 0o644)
        made.append(rel)
    for i in range(n_links):
        d = rng.choice(dirs)
        name = f"link{i}"
        target = rng.choice(made) if rng.random() < 0.9 else f"missing/{i}"
        os.symlink(os.path.relpath(target, d or ".") if not target.startswith("missing") else target,
                   os.path.join(tmp, d, name))
    os.rename(tmp, path)
    with open(stamp_file, "w") as f:
        f.write(want)
    return path


def default_tree() -> str:
    os.makedirs(DEFAULT_DIR, exist_ok=True)
    return make_tree(os.path.join(DEFAULT_DIR, "tree-20000-350"), 20000, 350)


if __name__ == "__main__":
    p = default_tree() if len(sys.argv) < 2 else make_tree(sys.argv[1])
    print(p)
