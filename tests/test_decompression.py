"""Reading compressed NARs with the output of each step bounded: every compression Nix writes
gives back its bytes whatever the chunking, and a bomb (a small file standing for gigabytes)
never gives more than a step's worth at once, so a reader checking NarSize stops it early."""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
import resource

import pytest
import zstandard

from conftest import DATA
from purestore.cache.decompression import READABLE, open_reader
from purestore.errors import CacheError

GOLDEN = DATA / "cache" / "nix-compressions"


class Chunks:
    """A source giving ``data`` in pieces of the sizes given, round and round."""

    def __init__(self, data: bytes, sizes=(1, 100, 5000, 1 << 20)):
        self.data, self.sizes, self.pos, self.i = data, sizes, 0, 0

    def read(self, _n: int = -1) -> bytes:
        k = self.sizes[self.i % len(self.sizes)]
        self.i += 1
        out = self.data[self.pos:self.pos + k]
        self.pos += len(out)
        return out


def read_all(method, data, step=1 << 16, sizes=(1, 100, 5000, 1 << 20)):
    r = open_reader(method, Chunks(data, sizes))
    out = []
    while chunk := r.read(step):
        assert len(chunk) <= step
        out.append(chunk)
    return b"".join(out), r.complete


def _compress(method: str, data: bytes) -> bytes:
    if method == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if method == "xz":
        return lzma.compress(data)
    if method == "bzip2":
        return bz2.compress(data)
    if method == "gzip":
        return gzip.compress(data)
    if method == "br":
        import brotli
        return brotli.compress(data)
    return data


SAMPLE = random.Random(5).randbytes(300_000) + bytes(2_000_000) + b"".join(b"line %d\n" % i for i in range(50_000))


@pytest.mark.parametrize("method", ["zstd", "xz", "bzip2", "gzip", "br", "none"])
def test_each_method_round_trips_in_bounded_steps(method):
    got, complete = read_all(method, _compress(method, SAMPLE))
    assert got == SAMPLE and complete in (True, None)


@pytest.mark.parametrize("method", ["lz4", "lzip", "gzip", "br", "bzip2"])
def test_nix_s_golden_nars_read_in_small_steps(method):
    (nar,) = (GOLDEN / method / "nar").iterdir()
    whole, _ = read_all(method, nar.read_bytes(), step=1 << 20)
    small, complete = read_all(method, nar.read_bytes(), step=7, sizes=(3, 1))
    assert small == whole and len(whole) == 880 and complete is True


@pytest.mark.parametrize("method", ["xz", "bzip2", "gzip", "br", "lz4", "lzip"])
def test_a_truncated_stream_is_not_complete(method):
    data = (GOLDEN / method / "nar").iterdir().__next__().read_bytes() if method in ("lz4", "lzip") \
        else _compress(method, SAMPLE)
    got, complete = read_all(method, data[:len(data) // 2])
    assert complete is False


@pytest.mark.parametrize("method", ["zstd", "gzip", "xz", "br"])
def test_a_bomb_gives_one_step_at_a_time(method):
    """1 GiB of zeros in a small file: the first step is the step's size, and reading only a few
    steps keeps the memory small (one unbounded call gave the whole GiB, and a chunk of a zstd
    file can stand for 32 GiB)."""
    size = 1 << 30
    if method == "zstd":
        co = zstandard.ZstdCompressor(level=1).compressobj()
        data = b"".join(co.compress(bytes(64 << 20)) for _ in range(size >> 26)) + co.flush()
    elif method == "gzip":
        import zlib
        co = zlib.compressobj(1, zlib.DEFLATED, 31)
        data = b"".join(co.compress(bytes(64 << 20)) for _ in range(size >> 26)) + co.flush()
    elif method == "xz":
        co = lzma.LZMACompressor(preset=0)
        data = b"".join(co.compress(bytes(64 << 20)) for _ in range(size >> 26)) + co.flush()
    else:
        import brotli
        c = brotli.Compressor(quality=0)
        data = b"".join(c.process(bytes(64 << 20)) for _ in range(size >> 26)) + c.finish()
    assert len(data) < 8 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = open_reader(method, Chunks(data, sizes=(len(data),)))  # the whole file in one chunk
    for _ in range(3):
        assert 0 < len(r.read(1 << 20)) <= 1 << 20
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    assert grew < 200 << 10, f"memory grew by {grew} KiB"


def test_corrupt_data_is_a_cache_error():
    for method in ("zstd", "xz", "bzip2", "gzip", "br", "lz4", "lzip"):
        with pytest.raises(CacheError, match=f"corrupt {method}|corrupt "):
            read_all(method, b"\x00this is no compressed stream at all" * 100)


def test_an_unknown_method_is_named():
    with pytest.raises(CacheError, match="cannot read compression 'lz5', expected one of " + ", ".join(READABLE)):
        open_reader("lz5", Chunks(b""))


def _lz4_frame(data: bytes) -> bytes:
    import ctypes
    lib = ctypes.CDLL("liblz4.so.1")
    lib.LZ4F_compressFrameBound.restype = ctypes.c_size_t
    lib.LZ4F_compressFrameBound.argtypes = [ctypes.c_size_t, ctypes.c_void_p]
    lib.LZ4F_compressFrame.restype = ctypes.c_size_t
    lib.LZ4F_compressFrame.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                       ctypes.c_void_p]
    bound = lib.LZ4F_compressFrameBound(len(data), None)
    buf = ctypes.create_string_buffer(bound)
    n = lib.LZ4F_compressFrame(buf, bound, data, len(data), None)
    return buf.raw[:n]


@pytest.mark.parametrize("cuts", [[], [400], [1 << 20, 2 << 20], [2 << 20, 4 << 20]])
def test_lz4_frames_one_after_another_are_read_as_nix_reads_them(cuts):
    """Nix reads an lz4 NAR of several frames; a step that ends exactly at a frame's end or at
    the step's bound must not take the stream for ended or for truncated."""
    bounds = [0, *cuts, len(SAMPLE)]
    data = b"".join(_lz4_frame(SAMPLE[a:b]) for a, b in zip(bounds, bounds[1:]))
    for sizes in ((1 << 20,), (len(data),), (1, 100, 5000)):
        got, complete = read_all("lz4", data, step=1 << 21, sizes=sizes)
        assert got == SAMPLE and complete is True
    got, complete = read_all("lz4", data[:-5])
    assert complete is False


@pytest.mark.parametrize("method", ["gzip", "xz", "bzip2"])
def test_streams_one_after_another_are_read_as_nix_reads_them(method):
    """A NAR compressed as several members (gzip, xz, bzip2 streams end to end): Nix reads it
    whole; pure stopped after the first."""
    cuts = [0, 400, 1 << 20, 1 << 20, 2 << 20, len(SAMPLE)]  # (one empty member too)
    data = b"".join(_compress(method, SAMPLE[a:b]) for a, b in zip(cuts, cuts[1:]))
    for sizes in ((1 << 20,), (len(data),), (1, 100, 5000)):
        got, complete = read_all(method, data, step=1 << 21, sizes=sizes)
        assert got == SAMPLE and complete is True
    got, complete = read_all(method, data[:-5])
    assert complete is False
    with pytest.raises(CacheError, match="corrupt"):
        read_all(method, data + b"this is no stream")


@pytest.mark.parametrize("method", ["gzip", "xz", "bzip2"])
def test_many_empty_members_in_one_chunk_are_read(method):
    """Empty members give no output but use input up: three of them in a row within one chunk
    were taken for a decompressor that is stuck."""
    data = b"".join(_compress(method, b"") for _ in range(5)) + _compress(method, SAMPLE[:1000])
    data += b"".join(_compress(method, b"") for _ in range(4))
    got, complete = read_all(method, data, sizes=(len(data),))
    assert got == SAMPLE[:1000] and complete is True


def _lzip_member(data: bytes) -> bytes:
    """One lzip member, written by libarchive's lzip filter (the writer Nix's
    ``compression=lzip`` uses; liblzma has an lzip decoder only)."""
    import ctypes
    try:
        lib = ctypes.CDLL("libarchive.so.13")
    except OSError as e:
        pytest.skip(f"writing lzip here needs libarchive (libarchive.so.13): {e}")
    lib.archive_write_new.restype = ctypes.c_void_p
    lib.archive_entry_new.restype = ctypes.c_void_p
    for f in ("archive_write_add_filter_lzip", "archive_write_set_format_raw", "archive_write_close",
              "archive_write_free"):
        getattr(lib, f).argtypes = [ctypes.c_void_p]
    lib.archive_write_open_memory.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                              ctypes.POINTER(ctypes.c_size_t)]
    lib.archive_entry_set_filetype.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.archive_entry_free.argtypes = [ctypes.c_void_p]
    lib.archive_write_header.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.archive_write_data.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.archive_write_data.restype = ctypes.c_ssize_t
    lib.archive_error_string.argtypes = [ctypes.c_void_p]
    lib.archive_error_string.restype = ctypes.c_char_p
    buf = ctypes.create_string_buffer(len(data) + len(data) // 2 + 4096)
    used = ctypes.c_size_t()
    a, e = lib.archive_write_new(), lib.archive_entry_new()
    try:
        lib.archive_entry_set_filetype(e, 0o100000)  # a regular file: the raw format's one entry
        ok = (lib.archive_write_add_filter_lzip(a) == 0 and lib.archive_write_set_format_raw(a) == 0
              and lib.archive_write_open_memory(a, buf, len(buf), ctypes.byref(used)) == 0
              and lib.archive_write_header(a, e) == 0
              and (not data or lib.archive_write_data(a, data, len(data)) == len(data))
              and lib.archive_write_close(a) == 0)
        assert ok, lib.archive_error_string(a)
    finally:
        lib.archive_entry_free(e)
        lib.archive_write_free(a)
    return buf.raw[:used.value]


def test_lzip_members_one_after_another_are_read_as_nix_reads_them():
    """An lzip NAR of two members (made with the lzip tool, read whole by Nix 2.8:
    tests/data/cache/README.md): pure read the first member only, and took it for the whole."""
    (one,) = (GOLDEN / "lzip" / "nar").iterdir()
    (two,) = (DATA / "cache" / "lzip-members" / "nar").iterdir()
    whole, _ = read_all("lzip", one.read_bytes())
    data = two.read_bytes()
    for step, sizes in ((1 << 20, (1 << 20,)), (7, (3, 1)), (400, (144, 1)), (1, (145, 157))):
        got, complete = read_all("lzip", data, step=step, sizes=sizes)
        assert got == whole and len(got) == 880 and complete is True
    for cut in (1, 5, 157):  # into the second member: its trailer, its data, its header
        got, complete = read_all("lzip", data[:-cut])
        assert complete is False and whole.startswith(got)
    got, complete = read_all("lzip", data + b"LZI")  # (the start of a third member's magic)
    assert complete is False


@pytest.mark.parametrize("tail", [b"this is no stream", b"LZIPjunk", b"LZIjunk", b"\0" * 20])
def test_bytes_after_the_last_lzip_member_are_corrupt_data(tail):
    """As for gzip, xz and bzip2 here (Nix 2.8, through libarchive, ignores them; liblzma's
    LZMA_CONCATENATED would too, and swallow up to three bytes equal to the magic)."""
    (two,) = (DATA / "cache" / "lzip-members" / "nar").iterdir()
    with pytest.raises(CacheError, match="corrupt lzip data"):
        read_all("lzip", two.read_bytes() + tail)


def test_lzip_members_of_a_bigger_nar_are_read_in_bounded_steps():
    """Members ending at a step's bound, within a chunk, and an empty member between two."""
    cuts = [0, 400, 1 << 20, 1 << 20, 2 << 20, len(SAMPLE)]
    data = b"".join(_lzip_member(SAMPLE[a:b]) for a, b in zip(cuts, cuts[1:]))
    for sizes in ((1 << 20,), (len(data),), (1, 100, 5000)):
        for step in (1 << 20, 1 << 21):
            got, complete = read_all("lzip", data, step=step, sizes=sizes)
            assert got == SAMPLE and complete is True
    got, complete = read_all("lzip", data[:-5])
    assert complete is False
    with pytest.raises(CacheError, match="corrupt lzip data: the bytes after member 5 begin no lzip member"):
        read_all("lzip", data + b"this is no stream")


def test_zstd_readers_of_one_thread_interleaved_or_after_an_error_each_read_their_own_stream():
    """The zstd reader reuses its thread's decompression context from one NAR to the next: two
    readers at once in one thread, and a reader after one stopped by corrupt data or left half
    read, still each give their own stream's bytes."""
    a, b = random.Random(1).randbytes(300_000), random.Random(2).randbytes(300_000)
    za, zb = zstandard.compress(a), zstandard.compress(b)
    with pytest.raises(CacheError):
        read_all("zstd", za[:4] + b"\xff" * 64)
    half = open_reader("zstd", Chunks(za))
    assert half.read(1000) == a[:1000]
    ra, rb = open_reader("zstd", Chunks(za)), open_reader("zstd", Chunks(zb))
    got_a, got_b = [], []
    while True:
        x, y = ra.read(4096), rb.read(4096)
        got_a.append(x)
        got_b.append(y)
        if not x and not y:
            break
    assert b"".join(got_a) == a and b"".join(got_b) == b
    assert ra.read(10) == b"" and read_all("zstd", zb)[0] == b
