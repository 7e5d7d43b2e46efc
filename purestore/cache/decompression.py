"""Reading compressed NARs: every compression Nix writes (zstd, xz, bzip2, gzip, br, lz4, lzip,
none), with the output of each step bounded.

A NAR file comes from a cache that may be hostile: its narinfo's NarSize is signed, its FileSize
and FileHash are not, and a few KiB of zstd (or a MiB of gzip) can stand for gigabytes.  So a
decompressor here never gives more than the caller asks for at once, whatever one chunk of
input holds: the caller counts what came against NarSize after each step and stops a bomb
before it is in memory (a chunk of a zstd file could otherwise expand to 32 GiB in one call).

:func:`open_reader` ``(method, source)`` returns a reader whose ``read(n)`` gives at most ``n``
bytes of the NAR (``b""`` at its end), pulling compressed chunks from ``source.read()`` as it
needs them (``b""`` there: the file ended), and whose ``complete`` says whether the
compressed stream ended where its format says it ends (None where the format reader cannot
tell: zstd, whose missing end shows as a NAR shorter than its NarSize).  Errors are
:class:`CacheError`; an exception of ``source.read`` goes through as it is.  Streams end to
end (gzip, xz, bzip2 and lzip members, lz4 frames) are read as one, as Nix reads them; bytes
after the last that begin none are corrupt data (Nix 2.8 ignores them in gzip, bzip2 and lzip).

zstd is read with zstandard's stream reader (twice as fast as its decompressobj here, which
also has no bound); xz and bzip2 with the standard library, gzip with zlib, br with brotli,
lz4 with the system liblz4 and lzip with liblzma's lzip decoder (5.4 and later), both through
ctypes.
"""

from __future__ import annotations

import bz2
import ctypes
import lzma
import threading
import zlib

import zstandard

from ..errors import CacheError
from .compression import _LZMA_ERRORS, _LZMA_OK, _LZMA_RUN, _LZMA_STREAM_END, _LzmaStream, _load_liblzma

_LZMA_FORMAT_ERROR, _LZMA_BUF_ERROR = 7, 10
READABLE = ("zstd", "xz", "bzip2", "gzip", "br", "lz4", "lzip", "none")


def open_reader(method: str, source):
    if method == "zstd":
        return _ZstdReader(source)
    if method == "xz":
        return _Pull(_Std(lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), "xz"), source)
    if method == "bzip2":
        return _Pull(_Std(bz2.BZ2Decompressor, "bzip2"), source)
    if method == "gzip":
        return _Pull(_Gzip(), source)
    if method == "br":
        return _Pull(_Brotli(), source)
    if method == "lz4":
        return _Pull(_Lz4(), source)
    if method == "lzip":
        return _Pull(_Lzip(), source)
    if method == "none":
        return _Pull(_Plain(), source)
    raise CacheError(f"cannot read compression {method!r}, expected one of {', '.join(READABLE)}")


_spare = threading.local()  # .zstd: a list holding this thread's idle ZstdDecompressor, if any


class _ZstdReader:
    """zstd through a decompression context reused by the NARs read one after another in a
    thread (making one costs ~10 us, more than decompressing a small NAR).  A reader takes its
    thread's idle context (or makes one, when another reader of this thread holds it) and gives
    it back when its stream has ended; a reader stopped by an error or left half read keeps it
    (``stream_reader`` resets a context it is given anyway)."""

    complete = None  # (the stream reader does not say; NarSize does)

    def __init__(self, source):
        spare = getattr(_spare, "zstd", None)
        if spare is None:
            spare = _spare.zstd = []
        self._spare = spare  # (this thread's: the end may be read in another, see nar_jobs._Ahead)
        self._d = spare.pop() if spare else zstandard.ZstdDecompressor()
        self._r = self._d.stream_reader(source, read_size=1 << 20, read_across_frames=True)

    def read(self, n: int) -> bytes:
        if self._d is None:  # ended (and the context given back)
            return b""
        try:
            out = self._r.read(n)
        except zstandard.ZstdError as e:
            raise CacheError(f"corrupt zstd data: {e}") from e
        if not out:
            d, self._d, self._r = self._d, None, None
            if not self._spare:
                self._spare.append(d)
        return out


class _Pull:
    """``read(n)`` over a decompressor with a bound (``decompress(data, n)``, ``needs_input``,
    ``eof``; ``members``, where streams may follow one another: how many it has begun): input is
    pulled only when the decompressor has given all it had."""

    def __init__(self, dec, source):
        self._dec = dec
        self._source = source
        self._ended = False

    @property
    def complete(self) -> bool:
        return self._dec.eof

    def read(self, n: int) -> bytes:
        idle = 0  # steps in a row that neither gave output nor began a member
        while True:
            if self._dec.needs_input:
                if self._ended:
                    return b""
                data = self._source.read()
                if not data:
                    self._ended = True
                    return b""
                out = self._dec.decompress(data, n)
            else:
                begun = getattr(self._dec, "members", 0)
                out = self._dec.decompress(b"", n)
                # a step that began the next member used input up (an empty member gives nothing)
                idle = 0 if out or getattr(self._dec, "members", 0) != begun else idle + 1
                if idle > 2:
                    raise CacheError("corrupt compressed data: the decompressor is stuck")
            if out:
                return out


class _Std:
    """lzma's and bz2's decompressors, which have the bound (``max_length``) already.  Streams
    may follow one another (members), as Nix reads them: ``eof`` says the last one begun is
    complete; bytes after it that begin no stream are corrupt data."""

    def __init__(self, new, name: str):
        self._new = new
        self._d = new()
        self._name = name
        self.members = 1  # begun so far

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def needs_input(self) -> bool:
        return (not self._d.unused_data) if self._d.eof else self._d.needs_input

    def decompress(self, data: bytes, n: int) -> bytes:
        if self._d.eof:  # the next stream, if anything follows
            data = self._d.unused_data + data
            if not data:
                return b""
            self._d = self._new()
            self.members += 1
        try:
            return self._d.decompress(data, n)
        except (lzma.LZMAError, OSError, EOFError, ValueError) as e:
            raise CacheError(f"corrupt {self._name} data: {e}") from e


class _Gzip:
    """gzip, as libarchive writes it; members may follow one another, as Nix reads them."""

    def __init__(self):
        self._d = zlib.decompressobj(31)
        self._full = False  # the last step filled its bound: zlib may hold more
        self.members = 1  # begun so far

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def needs_input(self) -> bool:
        if self._d.eof:
            return not self._d.unused_data
        return not self._d.unconsumed_tail and not self._full

    def decompress(self, data: bytes, n: int) -> bytes:
        if self._d.eof:  # the next member, if anything follows
            data = self._d.unused_data + data
            if not data:
                return b""
            self._d = zlib.decompressobj(31)
            self.members += 1
        elif self._d.unconsumed_tail:
            data = self._d.unconsumed_tail + data
        try:
            out = self._d.decompress(data, n)
        except zlib.error as e:
            raise CacheError(f"corrupt gzip data: {e}") from e
        self._full = len(out) >= n
        return out


class _Brotli:
    """brotli's ``output_buffer_limit`` is a hint (it gave 2 MiB for 1), and
    ``can_accept_more_data`` says nothing of output still to come: a step's output beyond the
    bound is kept for the next, and input is asked for only once a step gave nothing."""

    def __init__(self):
        import brotli
        self._brotli = brotli
        self._d = brotli.Decompressor()
        self._rest = b""
        self._drained = True  # the last step gave nothing: it needs input (or it has ended)

    @property
    def eof(self) -> bool:
        return self._d.is_finished() and not self._rest

    @property
    def needs_input(self) -> bool:
        return not self._rest and (self._drained or self._d.is_finished())

    def decompress(self, data: bytes, n: int) -> bytes:
        if self._rest:
            out, self._rest = self._rest[:n], self._rest[n:]
            return out
        if self._d.is_finished():
            return b""
        try:
            out = self._d.process(data, output_buffer_limit=n)
        except self._brotli.error as e:
            raise CacheError(f"corrupt br data: {e or 'invalid stream'}") from e
        self._drained = not out
        if len(out) > n:
            out, self._rest = out[:n], out[n:]
        return out


class _Plain:
    eof = True

    def __init__(self):
        self._rest = b""

    @property
    def needs_input(self) -> bool:
        return not self._rest

    def decompress(self, data: bytes, n: int) -> bytes:
        data = self._rest + data if self._rest else data
        self._rest = data[n:]
        return data[:n] if len(data) > n else data


class _CtypesStream:
    """What the ctypes decompressors share: the input not taken yet, and whether the last step
    filled its bound (the library may hold more output)."""

    ends = True  # the stream ends with ``eof`` (lz4: another frame may follow)

    def __init__(self):
        self._in = b""
        self._pos = 0
        self._full = False
        self.eof = False

    @property
    def needs_input(self) -> bool:
        return (self.eof and self.ends) or (self._pos >= len(self._in) and not self._full)

    def decompress(self, data: bytes, n: int) -> bytes:
        if self.eof and self.ends:
            return b""
        if data:
            self._in = bytes(data) if self._pos >= len(self._in) else self._in[self._pos:] + bytes(data)
            self._pos = 0
        out = ctypes.create_string_buffer(n)
        got = self._step(out, n)
        self._full = got >= n
        return out.raw[:got] if got < n else out.raw


_liblz4 = None


def _load_liblz4():
    global _liblz4
    if _liblz4 is None:
        try:
            lib = ctypes.CDLL("liblz4.so.1")
            lib.LZ4F_createDecompressionContext.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
            lib.LZ4F_createDecompressionContext.restype = ctypes.c_size_t
            lib.LZ4F_freeDecompressionContext.argtypes = [ctypes.c_void_p]
            lib.LZ4F_freeDecompressionContext.restype = ctypes.c_size_t
            lib.LZ4F_decompress.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p]
            lib.LZ4F_decompress.restype = ctypes.c_size_t
            lib.LZ4F_isError.argtypes = [ctypes.c_size_t]
            lib.LZ4F_isError.restype = ctypes.c_uint
            lib.LZ4F_getErrorName.argtypes = [ctypes.c_size_t]
            lib.LZ4F_getErrorName.restype = ctypes.c_char_p
        except (OSError, AttributeError) as e:
            raise CacheError(f"reading lz4 NARs needs the lz4 library (liblz4.so.1): {e}") from None
        _liblz4 = lib
    return _liblz4


class _Lz4(_CtypesStream):
    """lz4 frames (libarchive's lz4 filter, Nix's ``compression=lz4``), through the system
    liblz4.  Frames may follow one another, as Nix reads them: ``eof`` says the last frame
    begun is complete."""

    ends = False

    def __init__(self):
        super().__init__()
        self._lib = _load_liblz4()
        self._ctx = ctypes.c_void_p()
        r = self._lib.LZ4F_createDecompressionContext(ctypes.byref(self._ctx), 100)  # LZ4F_VERSION
        if self._lib.LZ4F_isError(r):
            self._ctx = None
            raise CacheError(f"lz4: {self._lib.LZ4F_getErrorName(r).decode()}")

    def _step(self, out, n: int) -> int:
        got = 0
        base = ctypes.cast(ctypes.c_char_p(self._in), ctypes.c_void_p).value or 0
        while got < n:
            dst_n, src_n = ctypes.c_size_t(n - got), ctypes.c_size_t(len(self._in) - self._pos)
            r = self._lib.LZ4F_decompress(self._ctx, ctypes.addressof(out) + got, ctypes.byref(dst_n),
                                          base + self._pos if src_n.value else None, ctypes.byref(src_n), None)
            if self._lib.LZ4F_isError(r):
                raise CacheError(f"corrupt lz4 data: {self._lib.LZ4F_getErrorName(r).decode()}")
            if not dst_n.value and not src_n.value:  # nothing more without input
                break
            self._pos += src_n.value
            got += dst_n.value
            self.eof = r == 0  # the frame is complete (another may follow)
        return got

    def __del__(self):
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx:
            self._lib.LZ4F_freeDecompressionContext(ctx)


class _Lzip(_CtypesStream):
    """lzip (libarchive's lzip filter, Nix's ``compression=lzip``), through liblzma's lzip
    decoder (liblzma 5.4 and later; Python's lzma module does not have it).  Members may follow
    one another, as Nix reads them: ``eof`` says the last member begun is complete; bytes after
    it that begin no member are corrupt data, as for gzip, xz and bzip2.

    The decoder reads one member and is started again for the next (as ``_Std`` does), rather
    than given ``LZMA_CONCATENATED``: with that flag liblzma tells a member's end only at
    ``LZMA_FINISH`` (the pull loop has no such call), and it ends quietly at bytes that begin no
    member, swallowing up to three that look like the magic."""

    ends = False

    def __init__(self):
        super().__init__()
        lib = _load_liblzma()
        try:
            f = lib.lzma_lzip_decoder
        except AttributeError:
            raise CacheError("reading lzip NARs needs liblzma 5.4 or later") from None
        f.argtypes = [ctypes.POINTER(_LzmaStream), ctypes.c_uint64, ctypes.c_uint32]
        f.restype = ctypes.c_int
        self._lib = lib
        self._strm = _LzmaStream()
        self._members = 0  # members complete
        self._begin()
        self._live = True

    def _begin(self):
        """(Re)start the decoder for a member (liblzma reuses the stream's memory)."""
        r = self._lib.lzma_lzip_decoder(ctypes.byref(self._strm), ctypes.c_uint64(-1).value, 0)
        if r != _LZMA_OK:
            raise CacheError(f"lzip: {_LZMA_ERRORS.get(r, f'liblzma error {r}')}")
        self.eof = False

    def _step(self, out, n: int) -> int:
        strm = self._strm
        base = ctypes.cast(ctypes.c_char_p(self._in), ctypes.c_void_p).value or 0
        got = 0
        while got < n:
            if self.eof:  # the next member, if anything follows
                if self._pos >= len(self._in):
                    break
                self._begin()
            strm.next_in = base + self._pos if self._pos < len(self._in) else None
            strm.avail_in = len(self._in) - self._pos
            strm.next_out, strm.avail_out = ctypes.addressof(out) + got, n - got
            r = self._lib.lzma_code(ctypes.byref(strm), _LZMA_RUN)
            self._pos = len(self._in) - strm.avail_in
            got = n - strm.avail_out
            strm.next_in, strm.avail_in = None, 0
            if r == _LZMA_STREAM_END:  # (a member takes 36 bytes at least: the loop ends)
                self.eof = True
                self._members += 1
            elif r == _LZMA_FORMAT_ERROR:
                raise CacheError(f"corrupt lzip data: the bytes after member {self._members} begin no lzip member"
                                 if self._members else "corrupt lzip data: the file does not begin with an lzip member")
            elif r not in (_LZMA_OK, _LZMA_BUF_ERROR):  # (no progress possible: it wants input)
                raise CacheError(f"corrupt lzip data: {_LZMA_ERRORS.get(r, f'liblzma error {r}')}")
            else:  # all input taken or the bound reached
                break
        return got

    def __del__(self):
        if getattr(self, "_live", False):
            self._live = False
            self._lib.lzma_end(ctypes.byref(self._strm))
