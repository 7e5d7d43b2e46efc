"""Streaming compression of NARs for caches: ``zstd`` (default), ``xz``, ``none``; reading also ``bzip2``.

``zstd`` at level 3 without checksum or content size is byte-identical to what Nix 2.8 writes
(libarchive's zstd filter), so FileHash and FileSize match Nix's for the same NAR.
``compressor(method, level)`` returns an object with ``compress(data) -> bytes`` and
``flush() -> bytes``; ``decompressor(method)`` one with ``decompress(data) -> bytes`` and
``eof``.  zstandard, lzma and bz2 release the GIL while they work, so callers run them in
worker threads in parallel.
"""

from __future__ import annotations

import bz2
import lzma

import zstandard

from ..errors import CacheError
from ..formats.narinfo import COMPRESSIONS

WRITABLE = ("zstd", "xz", "none")
DEFAULT_LEVEL = {"zstd": 3, "xz": 6, "none": 0}


def extension(method: str) -> str:
    try:
        return COMPRESSIONS[method]
    except KeyError:
        raise CacheError(f"unknown compression {method!r}, expected one of {', '.join(WRITABLE)}") from None


class _Identity:
    eof = True  # no framing: completeness is checked by size and hash

    def compress(self, data: bytes) -> bytes:
        return data

    decompress = compress

    def flush(self) -> bytes:
        return b""


class _Zstd:
    def __init__(self, level: int):
        self._c = zstandard.ZstdCompressor(level=level, write_checksum=False,
                                           write_content_size=False).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


class _ZstdD:
    def __init__(self):
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self.eof = False

    def decompress(self, data: bytes) -> bytes:
        try:
            out = self._d.decompress(data)
        except zstandard.ZstdError as e:
            raise CacheError(f"corrupt zstd data: {e}") from e
        self.eof = self._d.eof
        return out


class _Lzma:
    def __init__(self, d):
        self._d = d

    @property
    def eof(self) -> bool:
        return self._d.eof

    def decompress(self, data: bytes) -> bytes:
        try:
            return self._d.decompress(data)
        except (lzma.LZMAError, OSError, EOFError) as e:
            raise CacheError(f"corrupt compressed data: {e}") from e


def compressor(method: str, level: int | None = None):
    if method not in WRITABLE:
        raise CacheError(f"cannot write compression {method!r}, expected one of {', '.join(WRITABLE)}")
    if level is None:
        level = DEFAULT_LEVEL[method]
    if method == "zstd":
        if not 1 <= level <= 19:
            raise CacheError(f"zstd compression level must be 1..19, got {level}")
        return _Zstd(level)
    if method == "xz":
        if not 0 <= level <= 9:
            raise CacheError(f"xz compression level must be 0..9, got {level}")
        return lzma.LZMACompressor(lzma.FORMAT_XZ, preset=level)
    return _Identity()


def decompressor(method: str):
    if method == "zstd":
        return _ZstdD()
    if method == "xz":
        return _Lzma(lzma.LZMADecompressor(lzma.FORMAT_XZ))
    if method == "bzip2":
        return _Lzma(bz2.BZ2Decompressor())
    if method == "none":
        return _Identity()
    raise CacheError(f"cannot read compression {method!r}, expected zstd, xz, bzip2 or none")
