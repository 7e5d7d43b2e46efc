"""The restoring half of a substitution (cache/fetch.py): the reading thread that runs ahead of
the restore, and its errors.  End-to-end substitutions and attacks are in test_substitute*.py."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time

import pytest
import zstandard

from purestore.cache.nar_jobs import restore_stream as _restore
from purestore.errors import CacheError, StoreError
from purestore.formats.hash import Hash
from purestore.formats.narinfo import NarInfo
from purestore.formats.store_path import StorePath
from purestore.store import fsnar


def _tree(root):
    (root / "d").mkdir(parents=True)
    for i in range(40):
        (root / "d" / f"f{i:02d}").write_bytes(os.urandom(50_000))
    (root / "x").write_bytes(b"#!/bin/sh\n")
    (root / "x").chmod(0o755)
    (root / "l").symlink_to("d/f00")


def _nar(root) -> bytes:
    out = io.BytesIO()
    fsnar.dump_path(str(root), out)
    return out.getvalue()


def _narinfo(nar: bytes, comp: bytes) -> NarInfo:
    return NarInfo(store_path=StorePath.parse("/nix/store/" + "a" * 32 + "-t", "/nix/store"),
                   url="nar/x.nar.zst", compression="zstd",
                   file_hash=Hash("sha256", hashlib.sha256(comp).digest()), file_size=len(comp),
                   nar_hash=Hash("sha256", hashlib.sha256(nar).digest()), nar_size=len(nar))


def _chunks(data: bytes, size: int = 7000):
    it = iter([data[i:i + size] for i in range(0, len(data), size)] + [b""])
    return lambda: next(it, b"")


def _threads_settle(before: int) -> None:
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before, "a reading thread was left behind"


def test_restore_gives_the_tree_with_canonical_metadata(tmp_path):
    _tree(tmp_path / "src")
    nar = _nar(tmp_path / "src")
    comp = zstandard.ZstdCompressor().compress(nar)
    before = threading.active_count()
    _restore(_chunks(comp), _narinfo(nar, comp), "test", str(tmp_path / "out"), None)
    assert _nar(tmp_path / "out") == nar
    st = os.lstat(tmp_path / "out" / "d" / "f01")
    assert (st.st_mode & 0o777, st.st_mtime) == (0o444, 1)
    assert os.lstat(tmp_path / "out").st_mode & 0o777 == 0o555
    _threads_settle(before)
    for p in (tmp_path / "out", tmp_path / "out" / "d"):
        p.chmod(0o755)


def test_a_read_error_in_the_reading_thread_reaches_the_restore(tmp_path):
    _tree(tmp_path / "src")
    nar = _nar(tmp_path / "src")
    comp = zstandard.ZstdCompressor().compress(nar)
    pieces = [comp[i:i + 5000] for i in range(0, len(comp), 5000)]
    n = [0]

    def next_chunk():
        n[0] += 1
        if n[0] == len(pieces) // 2:
            raise CacheError("connection reset by the cache")
        return pieces[n[0] - 1]

    before = threading.active_count()
    with pytest.raises(CacheError, match="connection reset"):
        _restore(next_chunk, _narinfo(nar, comp), "test", str(tmp_path / "out"), None)
    assert not os.path.lexists(tmp_path / "out")
    _threads_settle(before)


def test_an_early_nar_error_stops_the_reading_thread(tmp_path):
    """A NAR that is bad at its start, with megabytes after it: the error names the hash
    mismatch (the bytes were altered), the partial tree is gone, no thread waits forever."""
    _tree(tmp_path / "src")
    nar = bytearray(_nar(tmp_path / "src"))
    good = bytes(nar)
    nar[40:48] = b"garbage!"
    comp = zstandard.ZstdCompressor().compress(bytes(nar))
    ni = _narinfo(good, zstandard.ZstdCompressor().compress(good))
    before = threading.active_count()
    with pytest.raises(CacheError, match="not a valid NAR"):
        _restore(_chunks(comp, 1000), ni, "test", str(tmp_path / "out"), None)
    assert not os.path.lexists(tmp_path / "out")
    _threads_settle(before)


def test_a_consumer_that_stops_does_not_leave_the_reader_blocked(tmp_path):
    """The restore fails on the file system (the destination's parent vanishes) while the
    reading thread still has chunks to hand over: closing it must not hang."""
    _tree(tmp_path / "src")
    nar = _nar(tmp_path / "src")
    comp = zstandard.ZstdCompressor().compress(nar)
    before = threading.active_count()
    with pytest.raises(StoreError, match="cannot restore a NAR"):
        _restore(_chunks(comp, 500), _narinfo(nar, comp), "test", str(tmp_path / "gone" / "out"), None)
    _threads_settle(before)


def test_restore_file_refuses_a_missing_nar_and_removes_a_tree_that_does_not_hash(tmp_path):
    """A NAR whose bytes restore fine but do not match the narinfo (a flipped byte inside a
    file's contents): the complete tree is removed, the error names the cache file."""
    from purestore.cache.nar_jobs import restore_file
    _tree(tmp_path / "src")
    nar = _nar(tmp_path / "src")
    comp = bytearray(zstandard.ZstdCompressor(level=1).compress(nar))
    ni = _narinfo(nar, bytes(comp))
    with pytest.raises(CacheError, match="the-cache/nope is missing from the cache"):
        restore_file(str(tmp_path / "nope"), ni, "the-cache/nope", str(tmp_path / "out"))
    # random file contents are stored raw: a flipped byte there still decompresses and parses
    comp[len(comp) // 2] ^= 0xFF
    (tmp_path / "x.nar.zst").write_bytes(bytes(comp))
    before = threading.active_count()
    with pytest.raises(CacheError, match="the-cache/x"):
        restore_file(str(tmp_path / "x.nar.zst"), ni, "the-cache/x", str(tmp_path / "out"))
    assert not os.path.lexists(tmp_path / "out")
    _threads_settle(before)
