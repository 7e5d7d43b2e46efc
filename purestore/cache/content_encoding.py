"""The HTTP ``Content-Encoding`` of a cache's small files, as Nix reads and writes it.

Nix's S3 binary caches can store narinfos, ``.ls`` listings and build logs compressed
(``narinfo-compression``, ``ls-compression``, ``log-compression``; cache.nixos.org's listings
and logs are brotli), with the method as the object's ``Content-Encoding``, and every Nix
client decodes what a cache sends that way.  So:

- :func:`decode` undoes the ``Content-Encoding`` of a file a cache sent (``br``, ``gzip``,
  ``deflate``, ``xz``, ``bzip2``, ``zstd``; ``identity`` and none leave it), never producing
  more than :data:`MAX_DECODED` bytes (a small compressed file must not fill the memory);
- :func:`encode` compresses a file to upload with such an encoding (S3 caches, as in Nix).

NAR files are not concerned: their compression is part of the file (``.nar.xz``) and checked
by FileHash, and a cache that adds a ``Content-Encoding`` to them is refused by the backends.
"""

from __future__ import annotations

import bz2
import lzma
import zlib

import zstandard

from ..errors import CacheError

WRITABLE = ("br", "gzip", "xz", "bzip2", "zstd")
MAX_DECODED = 512 << 20  # bytes a decoded file may have
_IDENTITY = ("", "identity", "none")


def is_identity(encoding: str | None) -> bool:
    return (encoding or "").strip().lower() in _IDENTITY


def decode(encoding: str | None, data: bytes, where: str, limit: int = MAX_DECODED) -> bytes:
    """``data`` as sent with ``Content-Encoding: encoding``, decoded; raises :class:`CacheError`
    naming ``where`` for an encoding not known, corrupt or truncated data, or more than
    ``limit`` bytes."""
    enc = (encoding or "").strip().lower()
    if enc in _IDENTITY:
        return data
    try:
        if enc == "br":
            out, done = _brotli(data, limit)
        elif enc in ("gzip", "x-gzip", "deflate"):
            d = zlib.decompressobj(47)  # zlib or gzip framing, whichever it is
            out = d.decompress(data, limit + 1)
            done = d.eof
        elif enc in ("xz", "bzip2"):
            d = lzma.LZMADecompressor() if enc == "xz" else bz2.BZ2Decompressor()
            out = d.decompress(data, limit + 1)
            done = d.eof
        elif enc == "zstd":
            out, done = _zstd(data, limit)
        else:
            raise CacheError(f"{where} is sent with Content-Encoding {encoding!r}, which pure cannot decode",
                             hint="expected br, gzip, deflate, xz, bzip2 or zstd (what Nix reads)")
    except (zlib.error, lzma.LZMAError, OSError, EOFError, zstandard.ZstdError, _BrotliError) as e:
        raise CacheError(f"{where} is sent with Content-Encoding {encoding!r} but is not valid {enc} "
                         f"data: {e}") from None
    if len(out) > limit:
        raise CacheError(f"{where} decodes ({enc}) to more than {limit} bytes: refused")
    if not done:
        raise CacheError(f"{where} is sent with Content-Encoding {encoding!r} but is truncated")
    return out


def encode(method: str, data: bytes) -> bytes:
    """``data`` compressed with ``method`` (one of :data:`WRITABLE`), to send with
    ``Content-Encoding: method``."""
    if method == "br":
        import brotli
        return brotli.compress(data)
    if method == "gzip":
        import gzip  # only to write (decoding is zlib's): not at every start of a cache command
        return gzip.compress(data, mtime=0)
    if method == "xz":
        return lzma.compress(data, lzma.FORMAT_XZ)
    if method == "bzip2":
        return bz2.compress(data)
    if method == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    raise CacheError(f"cannot encode with {method!r}, expected one of {', '.join(WRITABLE)}")


class _BrotliError(Exception):
    pass


def _brotli(data: bytes, limit: int) -> tuple[bytes, bool]:
    import brotli
    d = brotli.Decompressor()
    try:
        parts = [d.process(data, output_buffer_limit=limit + 1)]
        n = len(parts[0])
        while n <= limit and not d.can_accept_more_data():
            more = d.process(b"", output_buffer_limit=limit + 1 - n)
            if not more:
                break
            parts.append(more)
            n += len(more)
    except brotli.error as e:
        raise _BrotliError(str(e) or "corrupt data") from None
    return b"".join(parts), d.is_finished()


def _zstd(data: bytes, limit: int) -> tuple[bytes, bool]:
    # no output bound in zstandard's decompressobj: small pieces of input keep each step's
    # output small (a zstd block of 128 KiB takes at least a few bytes)
    d = zstandard.ZstdDecompressor().decompressobj()
    parts: list[bytes] = []
    n = 0
    view = memoryview(data)
    for i in range(0, len(data), 1024):
        out = d.decompress(view[i:i + 1024])
        parts.append(out)
        n += len(out)
        if n > limit or d.eof:
            break
    return b"".join(parts), d.eof
