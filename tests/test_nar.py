"""formats/nar.py: the writer, the strict streaming reader, golden NARs from Nix, malicious NARs."""

import gzip
import hashlib
import io
import lzma
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import DATA
from purestore.errors import NarError
from purestore.formats import nar as N
from purestore.formats.hash import Hash

GOLDEN = DATA / "nar"
GOLDEN_NAMES = ["hello", "exec", "empty-file", "empty-dir", "dangling-symlink", "symlink-to-file",
                "tree", "links-only", "exec8"]


def s(b: bytes) -> bytes:
    """Raw ``str(b)``, without any of the writer's checks."""
    return struct.pack("<Q", len(b)) + b + bytes((-len(b)) & 7)


def raw_file(data=b"x", executable=False) -> bytes:
    return (s(b"(") + s(b"type") + s(b"regular") + (s(b"executable") + s(b"") if executable else b"")
            + s(b"contents") + s(data) + s(b")"))


def raw_entry(name: bytes, node: bytes) -> bytes:
    return s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + node + s(b")")


def raw_dir(*entries: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"directory") + b"".join(entries) + s(b")")


def raw_symlink(target: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(target) + s(b")")


def nar(node: bytes) -> bytes:
    return s(b"nix-archive-1") + node


def parse_all(data: bytes):
    return N.read_nar_bytes(data)


def rewrite(data: bytes) -> bytes:
    out = io.BytesIO()
    N.write_events(out, N.parse_nar(io.BytesIO(data)))
    return out.getvalue()


# -- trees as values, for round trips ---------------------------------------------------------

names = st.binary(min_size=1, max_size=12).filter(lambda n: n not in (b".", b"..") and b"/" not in n and b"\0" not in n)
targets = st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t)
files = st.tuples(st.just("regular"), st.booleans(), st.binary(max_size=70))
symlinks = st.tuples(st.just("symlink"), targets)
trees = st.recursive(
    files | symlinks,
    lambda kids: st.dictionaries(names, kids, max_size=5).map(lambda d: ("directory", d)),
    max_leaves=20,
)


def write_tree(w: N.NarWriter, tree) -> None:
    if tree[0] == "regular":
        w.regular_bytes(tree[2], tree[1])
    elif tree[0] == "symlink":
        w.symlink(tree[1])
    else:
        w.directory()
        for name in sorted(tree[1]):
            w.entry(name)
            write_tree(w, tree[1][name])
        w.end()


def nar_of_tree(tree) -> bytes:
    out = io.BytesIO()
    w = N.NarWriter(out)
    write_tree(w, tree)
    w.close()
    return out.getvalue()


def events_of_tree(tree, path=()):
    if tree[0] == "regular":
        yield ("regular", path, tree[1], tree[2])
    elif tree[0] == "symlink":
        yield ("symlink", path, tree[1])
    else:
        yield ("directory", path)
        for name in sorted(tree[1]):
            yield from events_of_tree(tree[1][name], path + (name,))


# -- vectors and golden files -----------------------------------------------------------------

def test_formats_md_vector():
    data = N.nar_of_bytes(b"hello\n")
    assert data.hex() == (
        "0d000000000000006e69782d617263686976652d3100000001000000000000002800000000000000"
        "040000000000000074797065000000000700000000000000726567756c6172000800000000000000"
        "636f6e74656e7473060000000000000068656c6c6f0a000001000000000000002900000000000000")
    assert Hash.of_bytes(data).nix32 == "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_nars_parse_and_rewrite_byte_identical(name):
    """Every NAR Nix made parses, and writing its events back gives the same bytes."""
    data = (GOLDEN / f"{name}.nar").read_bytes()
    assert rewrite(data) == data


def test_golden_tree_events():
    evs = parse_all((GOLDEN / "tree.nar").read_bytes())
    by_path = {e[1]: e for e in evs}
    assert by_path[()] == ("directory", ())
    assert by_path[(b"not-exec",)][2] is False          # 0654: group x only
    assert by_path[(b"owner-exec",)][2] is True
    assert by_path[(b"dangling",)] == ("symlink", (b"dangling",), b"missing/../nowhere")
    assert by_path[(b"size-9",)][3] == b"x" * 9
    top = [e[1][0] for e in evs if len(e[1]) == 1]
    assert top == sorted(top)                            # sorted by raw bytes
    assert "é".encode() in top and b"B" in top and top.index(b"B") < top.index(b"a")
    assert max(len(e[1]) for e in evs) == 42            # tree/deep/d1../d40/bottom


def test_regular_event_offset_points_at_the_contents():
    data = (GOLDEN / "tree.nar").read_bytes()
    for ev in N.parse_nar(io.BytesIO(data)):
        if isinstance(ev, N.NarRegular):
            contents = b"".join(ev.chunks)
            assert data[ev.offset: ev.offset + ev.size] == contents


def test_unconsumed_chunks_are_skipped_and_stale_chunks_refuse():
    data = (GOLDEN / "tree.nar").read_bytes()
    evs = list(N.parse_nar(io.BytesIO(data)))   # never reads any contents
    assert len(evs) == len(parse_all(data))
    reg = next(e for e in evs if isinstance(e, N.NarRegular) and e.size)
    with pytest.raises(RuntimeError, match="read after the reader moved on"):
        next(iter(reg.chunks))


def test_contents_stream_in_bounded_chunks():
    big = bytes(range(256)) * 20000   # 5 MB
    chunks = []
    for ev in N.parse_nar(io.BytesIO(N.nar_of_bytes(big, executable=True))):
        assert ev.executable and ev.size == len(big)
        chunks = list(ev.chunks)
    assert b"".join(chunks) == big and max(map(len, chunks)) <= 1 << 20


class Trickle(io.RawIOBase):
    """A source that returns at most 3 bytes per read (like a slow pipe)."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def readable(self):
        return True

    def read(self, n=-1):
        k = min(3, n if n >= 0 else 3)
        out = self.data[self.pos: self.pos + k]
        self.pos += len(out)
        return out


def test_short_reads_from_the_source_are_fine():
    data = (GOLDEN / "links-only.nar").read_bytes() + b""
    evs = []
    for ev in N.parse_nar(Trickle(data)):
        evs.append(ev.path)
    assert evs == [e[1] for e in parse_all(data)]


# -- round trips ------------------------------------------------------------------------------

@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_writer_reader_round_trip(tree):
    data = nar_of_tree(tree)
    assert parse_all(data) == list(events_of_tree(tree))
    assert rewrite(data) == data


@given(st.binary(max_size=100), st.booleans())
def test_nar_of_bytes_agrees_with_the_writer(data, x):
    assert N.nar_of_bytes(data, x) == nar_of_tree(("regular", x, data))
    assert len(N.nar_of_bytes(data, x)) % 8 == 0


# -- the writer refuses to produce bad NARs ---------------------------------------------------

def test_writer_checks_order_names_and_sizes():
    w = N.NarWriter(io.BytesIO())
    w.directory()
    w.entry(b"b")
    w.regular_bytes(b"")
    with pytest.raises(NarError, match="sorted"):
        w.entry(b"a")
    with pytest.raises(NarError, match="sorted"):
        w.entry(b"b")
    for bad in (b"", b".", b"..", b"a/b", b"a\0", b"x" * 256):
        with pytest.raises(NarError):
            w.entry(bad)
    w.entry(b"c")
    w.regular(3)
    with pytest.raises(NarError, match="exceed"):
        w.contents(b"abcd")
    w.contents(b"ab")
    with pytest.raises(NarError, match="short"):
        w.end()
    with pytest.raises(NarError):
        N.NarWriter(io.BytesIO()).close()
    with pytest.raises(NarError):
        N.NarWriter(io.BytesIO()).symlink(b"")


# -- malicious and corrupt NARs ---------------------------------------------------------------

MAGIC = s(b"nix-archive-1")
FILE = raw_file()
BAD = {
    "wrong magic": s(b"nix-archive-2") + FILE,
    "not a nar": b"\x00" * 64,
    "empty": b"",
    "magic only": MAGIC,
    "unsorted": nar(raw_dir(raw_entry(b"b", FILE), raw_entry(b"a", FILE))),
    "duplicate": nar(raw_dir(raw_entry(b"a", FILE), raw_entry(b"a", FILE))),
    "dot": nar(raw_dir(raw_entry(b".", FILE))),
    "dotdot": nar(raw_dir(raw_entry(b"..", FILE))),
    "empty name": nar(raw_dir(raw_entry(b"", FILE))),
    "slash": nar(raw_dir(raw_entry(b"a/b", FILE))),
    "nul": nar(raw_dir(raw_entry(b"a\0b", FILE))),
    "long name": nar(raw_dir(raw_entry(b"n" * 256, FILE))),
    "bad padding": nar(raw_file(b"abc")).replace(b"abc\0\0\0\0\0", b"abc\0\0\0\0\1"),
    "bad token padding": MAGIC + struct.pack("<Q", 1) + b"(\0\0\0\0\0\0\1",
    "unknown token": nar(s(b"(") + s(b"type") + s(b"regular") + s(b"mode") + s(b"0644")),
    "unknown type": nar(s(b"(") + s(b"type") + s(b"fifo") + s(b")")),
    "executable flag not empty": nar(s(b"(") + s(b"type") + s(b"regular") + s(b"executable")
                                     + s(b"yes") + s(b"contents") + s(b"") + s(b")")),
    "truncated": nar(raw_file(b"hello"))[:-12],
    "truncated contents": nar(raw_file(b"hello world, twenty four"))[:60],
    "trailing bytes": nar(FILE) + b"\0" * 8,
    "two roots": nar(FILE) + FILE,
    "huge name length": nar(s(b"(") + s(b"type") + s(b"directory") + s(b"entry") + s(b"(")
                            + s(b"name") + struct.pack("<Q", 1 << 62)),
    "huge token length": MAGIC + struct.pack("<Q", (1 << 64) - 1),
    "huge contents": nar(s(b"(") + s(b"type") + s(b"regular") + s(b"contents")
                         + struct.pack("<Q", (1 << 64) - 8) + b"x" * 64),
    "huge target": nar(s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + struct.pack("<Q", 4097) + b"x" * 4104),
    "empty target": nar(raw_symlink(b"")),
    "nul in target": nar(raw_symlink(b"a\0b")),
    "entry under a symlink": nar(s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(b"x")
                                 + raw_entry(b"a", FILE) + s(b")")),
    "symlink then same name as dir": nar(raw_dir(raw_entry(b"a", raw_symlink(b"/tmp")),
                                                 raw_entry(b"a", raw_dir(raw_entry(b"f", FILE))))),
    "contents twice": nar(s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + s(b"a")
                          + s(b"contents") + s(b"b") + s(b")")),
    "executable after contents": nar(s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + s(b"a")
                                     + s(b"executable") + s(b"") + s(b")")),
    "missing close": nar(s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + s(b"a")),
    "entry without node": nar(s(b"(") + s(b"type") + s(b"directory") + s(b"entry") + s(b"(")
                              + s(b"name") + s(b"a") + s(b")") + s(b")")),
    "deep nesting": nar(s(b"(") + s(b"type") + s(b"directory")
                        + (s(b"entry") + s(b"(") + s(b"name") + s(b"d") + s(b"node") + s(b"(")
                           + s(b"type") + s(b"directory")) * 300),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malicious_nars_raise_narerror_with_offset(case):
    data = BAD[case]
    with pytest.raises(NarError) as ei:
        parse_all(data)
    e = ei.value
    assert e.offset is not None and 0 <= e.offset <= len(data)
    assert f"at NAR offset {e.offset}" in str(e)
    assert isinstance(e, ValueError)


def test_error_offsets_are_exact():
    data = BAD["unsorted"]
    with pytest.raises(NarError) as ei:
        parse_all(data)
    # the offending name "a" is the second entry name; its length field is where it fails
    assert data[ei.value.offset: ei.value.offset + 16] == s(b"a")
    with pytest.raises(NarError) as ei:
        parse_all(BAD["trailing bytes"])
    assert ei.value.offset == len(nar(FILE))


def test_nesting_at_the_limit_is_fine():
    depth = N.MAX_DEPTH  # directories at depths 0..255
    node = raw_file()
    for _ in range(depth):
        node = raw_dir(raw_entry(b"d", node))
    assert len(parse_all(nar(node))) == depth + 1
    with pytest.raises(NarError, match="nesting"):
        parse_all(nar(raw_dir(raw_entry(b"d", node))))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.data())
def test_random_corruption_only_ever_raises_narerror(tree, data):
    good = nar_of_tree(tree)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite8"]))
    pos = data.draw(st.integers(0, len(good) - 1))
    if kind == "flip":
        bad = good[:pos] + bytes([good[pos] ^ data.draw(st.integers(1, 255))]) + good[pos + 1:]
    elif kind == "truncate":
        bad = good[:pos]
    elif kind == "insert":
        bad = good[:pos] + data.draw(st.binary(min_size=1, max_size=16)) + good[pos:]
    elif kind == "delete":
        bad = good[:pos] + good[pos + data.draw(st.integers(1, 16)):]
    else:
        bad = good[:pos] + data.draw(st.binary(min_size=8, max_size=8)) + good[pos + 8:]
    try:
        evs = parse_all(bad)
    except NarError as e:
        assert e.offset is not None
    else:
        # a corruption that still parses must still be a canonical NAR
        assert rewrite(bad) == bad
        assert evs


@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_narerror(junk):
    for data in (junk, MAGIC + junk, nar(s(b"(") + s(b"type")) + junk):
        with pytest.raises(NarError):
            parse_all(data)


def test_hash_of_golden_nar_matches_nix():
    for line in (GOLDEN / "hashes.tsv").read_text().splitlines():
        name, size, sri, *_ = line.split("\t")
        data = (GOLDEN / f"{name}.nar").read_bytes()
        assert len(data) == int(size)
        assert Hash("sha256", hashlib.sha256(data).digest()).sri == sri


@pytest.mark.parametrize("data, said", [
    (b"# a README, not a NAR\n" * 3, "not a NAR: it does not start with 'nix-archive-1' (at NAR offset 0)"),
    (gzip.compress(MAGIC + FILE), "(it is gzip-compressed: decompress it first)"),
    (lzma.compress(MAGIC + FILE), "(it is xz-compressed: decompress it first)"),
    (b"\x28\xb5\x2f\xfd" + b"\0" * 40, "(it is zstd-compressed: decompress it first)"),
])
def test_a_file_that_is_no_nar_is_said_to_be_none(data, said):
    """A text file or a compressed NAR (as binary caches keep them) given to `pure nar ls` or
    `nar restore` was 'expected a NAR token, got a string of 8391162072992325667 bytes'."""
    with pytest.raises(NarError) as ei:
        parse_all(data)
    assert said in str(ei.value) and ei.value.offset == 0
