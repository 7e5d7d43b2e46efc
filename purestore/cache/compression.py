"""Streaming compression of NARs for caches: ``zstd`` (default), ``xz``, ``none``; reading also ``bzip2``.

zstd output depends on the library version, and Nix writes through libarchive with the system's
libzstd.  So compression uses the system ``libzstd`` through ctypes when there is one (the same
library Nix uses, hence the same bytes, FileHash and FileSize as ``nix copy`` for any NAR), and
the ``zstandard`` module otherwise (identical for small NARs; decompression always uses it).
Both stream at the given level without checksum or content size, as libarchive does.
``compressor(method, level)`` returns an object with ``compress(data) -> bytes`` and
``flush() -> bytes``; :func:`compress_to` and :func:`flush_to` hand the output to a callback
instead (for the system libzstd as views of its output buffer, saving a copy of every byte);
``decompressor(method)`` one with ``decompress(data) -> bytes`` and ``eof``.  zstandard,
libzstd, lzma and bz2 release the GIL while they work, so callers run them in worker threads
in parallel.
"""

from __future__ import annotations

import bz2
import ctypes
import ctypes.util
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


class _Buf(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


def _load_libzstd():
    # The soname first: the library the dynamic linker gives Nix too, without find_library's
    # ldconfig run (milliseconds of start-up).
    try:
        lib = ctypes.CDLL("libzstd.so.1")
    except OSError:
        name = ctypes.util.find_library("zstd")
        if not name:
            return None
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            return None
    try:  # CDLL releases the GIL during calls
        lib.ZSTD_createCStream.restype = ctypes.c_void_p
        lib.ZSTD_initCStream.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ZSTD_initCStream.restype = ctypes.c_size_t
        lib.ZSTD_compressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buf), ctypes.POINTER(_Buf)]
        lib.ZSTD_compressStream.restype = ctypes.c_size_t
        lib.ZSTD_endStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buf)]
        lib.ZSTD_endStream.restype = ctypes.c_size_t
        lib.ZSTD_freeCStream.argtypes = [ctypes.c_void_p]
        lib.ZSTD_freeCStream.restype = ctypes.c_size_t
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        lib.ZSTD_CStreamOutSize.restype = ctypes.c_size_t
        lib.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
        lib.ZSTD_compressBound.restype = ctypes.c_size_t
    except (OSError, AttributeError):
        return None
    return lib


_LIBZSTD = _load_libzstd()


# Input handed to one ZSTD_compressStream call at most: with an output buffer of its compress
# bound, each call normally drains in one go into a single output piece.
_IN_CHUNK = 1 << 20


class _SysZstd:
    """Streaming zstd compression with the system libzstd (what Nix's libarchive uses).

    The bytes do not depend on how the input is split or how much output room each call gets:
    zstd buffers input into whole blocks whatever the call pattern.
    """

    def __init__(self, level: int):
        lib = self._lib = _LIBZSTD
        self._cs = lib.ZSTD_createCStream()
        if not self._cs:
            raise CacheError("cannot create a zstd compression stream (out of memory)")
        self._check(lib.ZSTD_initCStream(self._cs, level))
        self._osz = max(lib.ZSTD_CStreamOutSize(), lib.ZSTD_compressBound(_IN_CHUNK))
        self._obuf = ctypes.create_string_buffer(self._osz)
        self._oaddr = ctypes.addressof(self._obuf)
        self._oview = memoryview(self._obuf).cast("B")

    def _check(self, r: int) -> int:
        if self._lib.ZSTD_isError(r):
            raise CacheError(f"zstd compression failed: {self._lib.ZSTD_getErrorName(r).decode()}")
        return r

    def compress_to(self, data, emit) -> None:
        """Compress ``data``, calling ``emit`` with views of the output buffer (each valid only
        during the call)."""
        n = len(data)
        if not n:
            return
        if not self._cs:
            raise CacheError("zstd compression stream used after its end")
        keep = data
        if isinstance(data, bytes):
            addr = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        else:
            mv = memoryview(data)
            if mv.readonly or not mv.c_contiguous:
                keep = bytes(mv)
                addr = ctypes.cast(ctypes.c_char_p(keep), ctypes.c_void_p).value
            else:
                keep = ctypes.c_char.from_buffer(mv)  # pins the buffer; no array type per size
                addr = ctypes.addressof(keep)
        try:
            compress, cs, check = self._lib.ZSTD_compressStream, self._cs, self._check
            oaddr, osz, oview = self._oaddr, self._osz, self._oview
            ib = _Buf(addr, 0, 0)
            ob = _Buf(oaddr, osz, 0)
            pib, pob = ctypes.byref(ib), ctypes.byref(ob)
            start = 0
            while start < n:
                ib.size = min(n, start + _IN_CHUNK)
                while ib.pos < ib.size:
                    ob.pos = 0
                    check(compress(cs, pob, pib))
                    if ob.pos:
                        with oview[: ob.pos] as out:
                            emit(out)
                start = ib.size
        finally:
            del keep

    def flush_to(self, emit) -> None:
        """End the frame, calling ``emit`` with views of the output buffer; frees the stream."""
        if not self._cs:
            raise CacheError("zstd compression stream used after its end")
        ob = _Buf(self._oaddr, self._osz, 0)
        while True:
            ob.pos = 0
            left = self._check(self._lib.ZSTD_endStream(self._cs, ctypes.byref(ob)))
            if ob.pos:
                with self._oview[: ob.pos] as out:
                    emit(out)
            if left == 0:
                break
        self._free()

    def compress(self, data) -> bytes:
        out: list[bytes] = []
        self.compress_to(data, lambda v: out.append(bytes(v)))
        return b"".join(out)

    def flush(self) -> bytes:
        out: list[bytes] = []
        self.flush_to(lambda v: out.append(bytes(v)))
        return b"".join(out)

    def _free(self) -> None:
        if self._cs:
            self._lib.ZSTD_freeCStream(self._cs)
            self._cs = None

    def __del__(self):
        self._free()


def compress_to(comp, data, emit) -> None:
    """Feed ``data`` to a :func:`compressor`, handing any output to ``emit`` (bytes or a view
    valid only during the call; never empty)."""
    f = getattr(comp, "compress_to", None)
    if f is not None:
        f(data, emit)
        return
    out = comp.compress(data)
    if out:
        emit(out)


def flush_to(comp, emit) -> None:
    """End a :func:`compressor`'s stream, handing the rest of the output to ``emit``."""
    f = getattr(comp, "flush_to", None)
    if f is not None:
        f(emit)
        return
    out = comp.flush()
    if out:
        emit(out)


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
        return _SysZstd(level) if _LIBZSTD is not None else _Zstd(level)
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
