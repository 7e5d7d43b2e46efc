"""Reproducibility checks: compare two builds of one output and say which files differ.

:func:`diff_trees` walks two trees (the registered output and the rebuilt one) and reports, for
each differing file, whether it was added, removed or changed, the sizes, the first differing byte
offset, and type or mode changes.  :func:`diffoscope` adds diffoscope's text output when it is
installed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

MAX_DIFFERENCES = 200


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISREG(st.st_mode):
        return "executable" if st.st_mode & 0o100 else "regular"
    return "special"


def _walk(root: str) -> dict[str, os.stat_result]:
    out = {"": os.lstat(root)}
    if not stat.S_ISDIR(out[""].st_mode):
        return out
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                st = e.stat(follow_symlinks=False)
                out[r] = st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(r)
    return out


def _first_difference(a: str, b: str) -> int | None:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            x, y = fa.read(65536), fb.read(65536)
            if x != y:
                n = min(len(x), len(y))
                for i in range(n):
                    if x[i] != y[i]:
                        return offset + i
                return offset + n
            if not x:
                return None
            offset += len(x)


def diff_trees(old: str, new: str) -> list[dict]:
    """The differences between trees ``old`` and ``new`` (file paths relative to the roots, "" is
    the root itself), at most :data:`MAX_DIFFERENCES`, sorted by path."""
    a, b = _walk(old), _walk(new)
    diffs: list[dict] = []
    for rel in sorted(a.keys() | b.keys()):
        if len(diffs) >= MAX_DIFFERENCES:
            break
        sa, sb = a.get(rel), b.get(rel)
        if sa is None:
            diffs.append({"file": rel, "change": "added", "type": _kind(sb), "new_size": sb.st_size})
            continue
        if sb is None:
            diffs.append({"file": rel, "change": "removed", "type": _kind(sa), "old_size": sa.st_size})
            continue
        ka, kb = _kind(sa), _kind(sb)
        pa, pb = os.path.join(old, rel) if rel else old, os.path.join(new, rel) if rel else new
        if ka != kb:
            diffs.append({"file": rel, "change": "type", "old_type": ka, "new_type": kb})
        elif ka == "symlink":
            ta, tb = os.readlink(pa), os.readlink(pb)
            if ta != tb:
                diffs.append({"file": rel, "change": "changed", "type": ka, "old_target": ta, "new_target": tb})
        elif ka in ("regular", "executable"):
            off = None if sa.st_size == sb.st_size and _same(pa, pb) else _first_difference(pa, pb)
            if off is not None:
                diffs.append({"file": rel, "change": "changed", "type": ka, "old_size": sa.st_size,
                              "new_size": sb.st_size, "first_difference": off})
    return diffs


def _same(a: str, b: str) -> bool:
    return _first_difference(a, b) is None


def describe(d: dict) -> str:
    """One line for a difference from :func:`diff_trees`."""
    f = d["file"] or "(the output itself)"
    if d["change"] == "added":
        return f"added   {f} ({d['type']}, {d['new_size']} bytes)"
    if d["change"] == "removed":
        return f"removed {f} ({d['type']}, {d['old_size']} bytes)"
    if d["change"] == "type":
        return f"changed {f}: was a {d['old_type']}, now a {d['new_type']}"
    if "old_target" in d:
        return f"changed {f}: symlink target {d['old_target']!r} -> {d['new_target']!r}"
    return (f"changed {f}: {d['old_size']} -> {d['new_size']} bytes, "
            f"first difference at byte {d['first_difference']}")


def diffoscope(old: str, new: str, timeout: float = 120) -> str | None:
    """diffoscope's text report of ``old`` vs ``new``, or None if diffoscope is not installed."""
    exe = shutil.which("diffoscope")
    if not exe:
        return None
    try:
        p = subprocess.run([exe, "--text", "-", old, new], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(diffoscope failed: {e})"
    return p.stdout or p.stderr
