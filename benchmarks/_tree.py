"""Deterministic realistic file tree for benchmarks (shared by several benchmarks).

``make_tree(path, files=20000, total_mb=350)`` builds, once, a tree that looks like an unpacked
package set: nested directories, many small files (source, headers, scripts), some large ones
(libraries, archives), about 5% executables and 2% symlinks (some dangling).  The same arguments
always give the same bytes.  When ``path`` already holds a finished tree made with the same
arguments (a stamp file next to it says so) nothing is done, so benchmarks can call it every run.

What the files hold (``content``):

- ``"random"``: random bytes.  Nothing compresses; enough where only the amount of data and the
  number of files matter (hashing, adding to the store).
- ``"mixed"``: bytes that compress like software does. Text files (``.c``, ``.h``, ``.py``,
  ``.txt``, ``.1``, ``.json``) are token soup drawn from a skewed vocabulary of identifiers,
  keywords and punctuation; libraries and programs (``.so``, ``.a``, no extension) mix
  "instructions" from a skewed vocabulary of short byte strings with runs of random bytes and of
  zeros; ``.tar`` files are random (an archive is already compressed). zstd -3 makes the whole
  2.3 times smaller (text 3.0-3.2, binaries 1.9, archives 1.0) at about the speed it has on real
  files: on this machine's /usr/lib, /usr/bin, /usr/share and /usr/include it gives 2.1-4.3.
  Each file is slices, at random offsets, of a 32 MiB pool of its kind, so that generating 350
  MB takes seconds.

``default_tree(content)`` returns the cached default tree of that content under /var/tmp.
"""

from __future__ import annotations

import os
import random
import shutil
import sys

VERSION = 1
DEFAULT_DIR = "/var/tmp/purestore-bench"
CONTENTS = ("random", "mixed")

_TEXT_EXTS = (".c", ".h", ".py", ".txt", ".1", ".json")
_BINARY_EXTS = (".so", ".a", "")
_POOL_SIZE = 32 << 20


def _stamp(files: int, total_mb: int, seed: int, content: str) -> str:
    extra = "" if content == "random" else f" content={content}"  # random: the stamp of v1 trees
    return f"purestore bench tree v{VERSION} files={files} total_mb={total_mb} seed={seed}{extra}\n"


def _skewed(rng: random.Random, n: int) -> list[float]:
    """Cumulative Zipf-like weights for a vocabulary of ``n`` (a few items are most of the draws)."""
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(n)]
    rng.shuffle(weights)
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    return cum


def _text_pool(rng: random.Random) -> bytes:
    words = ["static", "const", "int", "char", "void", "return", "if", "else", "for", "while",
             "struct", "unsigned", "size_t", "NULL", "self", "def", "import", "the", "of", "and",
             "#include", "#define", "uint32_t", "error", "data", "len", "buf", "ptr"]
    letters = "abcdefghijklmnopqrstuvwxyz_"
    words += ["".join(rng.choices(letters, k=rng.randint(2, 12))) for _ in range(3000)]
    words += [str(rng.randrange(100000)) for _ in range(300)]
    punct = [" ", " ", " ", "\n", "\n    ", "(", ")", ");\n", " = ", ", ", "->", ".", "{\n", "}\n",
             ";\n", "\t", " == ", "[", "]", ": ", "\"", "/* ", " */\n", "0x"]
    vocab = [w.encode() for w in words] + [p.encode() for p in punct] * 20
    cum = _skewed(rng, len(vocab))
    out, size = [], 0
    while size < _POOL_SIZE:
        chunk = b"".join(rng.choices(vocab, cum_weights=cum, k=65536))
        out.append(chunk)
        size += len(chunk)
    return b"".join(out)[:_POOL_SIZE]


def _binary_pool(rng: random.Random) -> bytes:
    ops = [rng.randbytes(rng.randint(1, 7)) for _ in range(4000)]
    cum = _skewed(rng, len(ops))
    out, size = [], 0
    while size < _POOL_SIZE:
        r = rng.random()
        if r < 0.65:
            piece = b"".join(rng.choices(ops, cum_weights=cum, k=rng.randint(50, 2000)))
        elif r < 0.93:
            piece = rng.randbytes(rng.randint(16, 1500))
        else:
            piece = bytes(rng.randint(16, 4096))
        out.append(piece)
        size += len(piece)
    return b"".join(out)[:_POOL_SIZE]


def _mixed_bytes(rng: random.Random, pools: dict, ext: str, size: int) -> bytes:
    """``size`` bytes for a file with extension ``ext``: slices of its kind's pool."""
    kind = "text" if ext in _TEXT_EXTS else "binary" if ext in _BINARY_EXTS else "random"
    if kind == "random":
        return rng.randbytes(size)
    pool = pools[kind]
    parts, left = [], size
    while left:
        n = min(left, rng.randint(4096, 65536))
        at = rng.randrange(_POOL_SIZE - n)
        parts.append(pool[at:at + n])
        left -= n
    return b"".join(parts)


def make_tree(path: str, files: int = 20000, total_mb: int = 350, seed: int = 1,
              content: str = "random") -> str:
    """Create the tree at ``path`` unless already there; return ``path``."""
    if content not in CONTENTS:
        raise ValueError(f"content must be one of {CONTENTS}, not {content!r}")
    stamp_file = path + ".stamp"
    want = _stamp(files, total_mb, seed, content)
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
    if content == "mixed":  # contents come from a generator of their own
        crng = random.Random(seed + 1)
        pools = {"text": _text_pool(crng), "binary": _binary_pool(crng)}
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
            if content == "mixed":
                f.write(_mixed_bytes(crng, pools, os.path.splitext(name)[1], size))
            else:
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


def default_tree(content: str = "random") -> str:
    os.makedirs(DEFAULT_DIR, exist_ok=True)
    name = "tree-20000-350" + ("" if content == "random" else f"-{content}")
    return make_tree(os.path.join(DEFAULT_DIR, name), 20000, 350, content=content)


if __name__ == "__main__":
    p = default_tree() if len(sys.argv) < 2 else make_tree(sys.argv[1])
    print(p)
