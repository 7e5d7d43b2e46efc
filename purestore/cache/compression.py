"""Streaming compression of NARs for caches: ``zstd`` (default), ``xz``, ``none``; reading also ``bzip2``.

zstd output depends on the library version, and Nix writes through libarchive with the system's
libzstd.  So compression uses the system ``libzstd`` through ctypes when there is one (the same
library Nix uses, hence the same bytes, FileHash and FileSize as ``nix copy`` for any NAR), and
the ``zstandard`` module otherwise (identical for small NARs; decompression always uses it).
Both stream at the given level without checksum or content size, as libarchive does.

``parallel`` (the cache URL's ``parallel-compression=true``) compresses one NAR on all cores:
zstd with libzstd's worker threads, xz with liblzma's multi-threaded encoder (through ctypes,
with the options libarchive gives it: the preset's LZMA2 filter, CRC64, default block size).
Either output is the same whatever the number of cores (the input is cut into jobs or blocks
by size, not by thread), but differs from the single-threaded output.  xz matches Nix's
``parallel-compression`` byte for byte; Nix 2.8's libarchive (3.6) ignores the setting for
zstd and compresses single-threaded.

``compressor(method, level, parallel)`` returns an object with ``compress(data) -> bytes`` and
``flush() -> bytes``; :func:`compress_to` and :func:`flush_to` hand the output to a callback
instead (for the system libzstd as views of its output buffer, saving a copy of every byte);
Reading compressed NARs is :mod:`.decompression`'s.  zstandard, libzstd, lzma and bz2 release
the GIL while they work, so callers run them in worker threads in parallel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import lzma
import os

import zstandard

from ..errors import CacheError
from ..formats.narinfo import COMPRESSIONS

WRITABLE = ("zstd", "xz", "none")
DEFAULT_LEVEL = {"zstd": 3, "xz": 6, "none": 0}
ZSTD_MIN_LEVEL = -131072  # ZSTD_minCLevel() of libzstd 1.5


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
    def __init__(self, level: int, workers: int = 0):
        self._c = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=False,
                                           threads=workers).compressobj()

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
        lib.ZSTD_CCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.ZSTD_CCtx_setParameter.restype = ctypes.c_size_t
        lib.ZSTD_CStreamOutSize.restype = ctypes.c_size_t
        lib.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
        lib.ZSTD_compressBound.restype = ctypes.c_size_t
    except (OSError, AttributeError):
        return None
    return lib


_LIBZSTD = _load_libzstd()
_ZSTD_C_NBWORKERS = 400  # ZSTD_cParameter ZSTD_c_nbWorkers


def cores() -> int:
    """Worker threads for parallel compression: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# Input handed to one ZSTD_compressStream call at most: with an output buffer of its compress
# bound, each call normally drains in one go into a single output piece.
_IN_CHUNK = 1 << 20


class _SysZstd:
    """Streaming zstd compression with the system libzstd (what Nix's libarchive uses).

    The bytes do not depend on how the input is split or how much output room each call gets:
    zstd buffers input into whole blocks whatever the call pattern.
    """

    def __init__(self, level: int, workers: int = 0):
        lib = self._lib = _LIBZSTD
        self._cs = lib.ZSTD_createCStream()
        if not self._cs:
            raise CacheError("cannot create a zstd compression stream (out of memory)")
        self._check(lib.ZSTD_initCStream(self._cs, level))
        if workers:
            r = lib.ZSTD_CCtx_setParameter(self._cs, _ZSTD_C_NBWORKERS, workers)
            if lib.ZSTD_isError(r):
                self._free()
                raise CacheError("parallel zstd compression is not available: the system libzstd "
                                 f"was built without threads ({lib.ZSTD_getErrorName(r).decode()})")
        # the output buffer: ZSTD_CStreamOutSize (a block's bound, ~128 KiB) at first, grown to
        # the bound of a whole input chunk when a call brings more (see _room).  A buffer of
        # the bigger size for every compressor (zeroed: 1 MiB a path) took a third of the time
        # of a small NAR's compression.
        self._osz = 0
        self._room(lib.ZSTD_CStreamOutSize())

    def _room(self, size: int) -> None:
        """An output buffer of at least ``size`` bytes (what is in the old one is not kept)."""
        if size <= self._osz:
            return
        self._osz = size
        self._obuf = ctypes.create_string_buffer(size)
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
        if n > self._osz:
            self._room(self._lib.ZSTD_compressBound(min(n, _IN_CHUNK)))
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


# -- multi-threaded xz (liblzma's lzma_stream_encoder_mt, which Python's lzma module lacks) -----

class _LzmaStream(ctypes.Structure):
    _fields_ = [("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_size_t), ("total_in", ctypes.c_uint64),
                ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_size_t), ("total_out", ctypes.c_uint64),
                ("allocator", ctypes.c_void_p), ("internal", ctypes.c_void_p),
                ("reserved_ptr", ctypes.c_void_p * 4), ("reserved_int1", ctypes.c_uint64),
                ("reserved_int2", ctypes.c_uint64), ("reserved_int3", ctypes.c_size_t),
                ("reserved_int4", ctypes.c_size_t), ("reserved_enum", ctypes.c_int * 2)]


class _LzmaMT(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("threads", ctypes.c_uint32), ("block_size", ctypes.c_uint64),
                ("timeout", ctypes.c_uint32), ("preset", ctypes.c_uint32), ("filters", ctypes.c_void_p),
                ("check", ctypes.c_int), ("reserved_enum", ctypes.c_int * 3),
                ("reserved_int", ctypes.c_uint32 * 4), ("reserved_int64", ctypes.c_uint64 * 4),
                ("reserved_ptr", ctypes.c_void_p * 4)]


_LZMA_OK, _LZMA_STREAM_END = 0, 1
_LZMA_RUN, _LZMA_FINISH = 0, 3
_LZMA_CHECK_CRC64 = 4
_LZMA_ERRORS = {5: "out of memory", 6: "memory limit reached", 8: "unsupported options",
                9: "corrupt data", 11: "internal error"}
_liblzma = None


def _load_liblzma():
    global _liblzma
    if _liblzma is None:
        try:
            lib = ctypes.CDLL("liblzma.so.5")  # the library Python's lzma module is linked with
            lib.lzma_stream_encoder_mt.argtypes = [ctypes.POINTER(_LzmaStream), ctypes.POINTER(_LzmaMT)]
            lib.lzma_stream_encoder_mt.restype = ctypes.c_int
            lib.lzma_code.argtypes = [ctypes.POINTER(_LzmaStream), ctypes.c_int]
            lib.lzma_code.restype = ctypes.c_int
            lib.lzma_end.argtypes = [ctypes.POINTER(_LzmaStream)]
            lib.lzma_end.restype = None
        except (OSError, AttributeError) as e:
            raise CacheError(f"parallel xz compression needs liblzma 5.2 or later: {e}") from None
        _liblzma = lib
    return _liblzma


class _XzMT:
    """xz on ``threads`` threads, as libarchive asks liblzma for it (what Nix's
    ``parallel-compression`` writes): the level's preset, CRC64, the default block size (three
    times the dictionary), a timeout of 300 ms."""

    _OUT = 1 << 20

    def __init__(self, level: int, threads: int):
        self._live = False
        self._lib = _load_liblzma()
        self._strm = _LzmaStream()
        mt = _LzmaMT(threads=threads, timeout=300, preset=level, check=_LZMA_CHECK_CRC64)
        self._check(self._lib.lzma_stream_encoder_mt(ctypes.byref(self._strm), ctypes.byref(mt)))
        self._live = True
        self._obuf = ctypes.create_string_buffer(self._OUT)

    def _check(self, r: int) -> int:
        if r not in (_LZMA_OK, _LZMA_STREAM_END):
            raise CacheError(f"xz compression failed: {_LZMA_ERRORS.get(r, f'liblzma error {r}')}")
        return r

    def _code(self, data, action: int) -> bytes:
        if not self._live:
            raise CacheError("xz compression stream used after its end")
        keep = bytes(data) if not isinstance(data, bytes) else data
        strm, out = self._strm, []
        strm.next_in = ctypes.cast(ctypes.c_char_p(keep), ctypes.c_void_p).value if keep else None
        strm.avail_in = len(keep)
        oaddr = ctypes.addressof(self._obuf)
        while True:
            strm.next_out, strm.avail_out = oaddr, self._OUT
            r = self._check(self._lib.lzma_code(ctypes.byref(strm), action))
            n = self._OUT - strm.avail_out
            if n:
                out.append(ctypes.string_at(oaddr, n))
            if action == _LZMA_FINISH:
                if r == _LZMA_STREAM_END:
                    break
            elif strm.avail_in == 0 and strm.avail_out:
                break
        strm.next_in, strm.avail_in = None, 0
        return b"".join(out)

    def compress(self, data) -> bytes:
        return self._code(data, _LZMA_RUN) if len(data) else b""

    def flush(self) -> bytes:
        try:
            return self._code(b"", _LZMA_FINISH)
        finally:
            self._free()

    def _free(self) -> None:
        if self._live:
            self._lib.lzma_end(ctypes.byref(self._strm))
            self._live = False

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


def check_level(method: str, level: int) -> None:
    """Raise :class:`CacheError` when ``level`` is no level of the compression ``method`` (any
    level goes with ``none``, which does not use it).  As libarchive takes them from Nix: -1 is
    the default (Nix's value for it); for zstd also its negative (fast) levels, 0 (zstd's
    default, 3), and 20..22 (much slower, more memory)."""
    if method == "zstd" and not ZSTD_MIN_LEVEL <= level <= 22:
        raise CacheError(f"zstd compression level must be {ZSTD_MIN_LEVEL}..22 (-1 or 0: the default, 3), got {level}")
    if method == "xz" and not (0 <= level <= 9 or level == -1):
        raise CacheError(f"xz compression level must be 0..9 (-1: the default, 6), got {level}")


def compressor(method: str, level: int | None = None, parallel: bool = False):
    """A streaming compressor; ``parallel``: on all cores (see the module's docstring)."""
    if method not in WRITABLE:
        raise CacheError(f"cannot write compression {method!r}, expected one of {', '.join(WRITABLE)}")
    if level is not None:
        check_level(method, level)
    if level is None or level == -1 or (method == "zstd" and level == 0):
        level = DEFAULT_LEVEL[method]
    if method == "zstd":
        workers = cores() if parallel else 0
        return _SysZstd(level, workers) if _LIBZSTD is not None else _Zstd(level, workers)
    if method == "xz":
        if parallel:
            return _XzMT(level, cores())
        return lzma.LZMACompressor(lzma.FORMAT_XZ, preset=level)
    return _Identity()
