"""store/fsnar.py: dumping, hashing, copying, restoring and canonicalising real file trees."""

import errno
import io
import os
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import DATA, needs_nix
from purestore.errors import NarError, StoreError
from purestore.formats import nar as N
from purestore.formats.hash import Hash
from purestore.store import fsnar, fstree

GOLDEN = DATA / "nar"
HASHES = {line.split("\t")[0]: line.split("\t")[1:] for line in (GOLDEN / "hashes.tsv").read_text().splitlines()}
NIX_ENV = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command"}


@pytest.fixture(scope="module")
def golden_trees(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden") / "t"
    subprocess.run(["bash", str(GOLDEN / "make-golden.sh"), "trees", str(d)], check=True)
    return d


def ref_nar(path: str) -> bytes:
    """An independent, simple NAR serialiser (NarWriter + lstat), to check the fast one against."""
    out = io.BytesIO()
    w = N.NarWriter(out)

    def node(p: bytes):
        st_ = os.lstat(p)
        if stat.S_ISLNK(st_.st_mode):
            w.symlink(os.readlink(p))
        elif stat.S_ISREG(st_.st_mode):
            with open(p, "rb") as f:
                w.regular_bytes(f.read(), bool(st_.st_mode & 0o100))
        else:
            w.directory()
            for name in sorted(os.listdir(p)):
                w.entry(name)
                node(p + b"/" + name)
            w.end()

    node(os.fsencode(path))
    w.close()
    return out.getvalue()


def dump(path) -> bytes:
    out = io.BytesIO()
    fsnar.dump_path(str(path), out)
    return out.getvalue()


def walk_all(root: Path):
    yield root
    if stat.S_ISDIR(os.lstat(root).st_mode):
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                yield Path(dirpath) / n


# -- byte-identical to Nix --------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(HASHES))
def test_dump_is_byte_identical_to_nix_golden(golden_trees, name):
    assert dump(golden_trees / name) == (GOLDEN / f"{name}.nar").read_bytes()


@pytest.mark.parametrize("name", sorted(HASHES))
def test_hash_path_matches_nix_for_every_algorithm(golden_trees, name):
    size, sri, nix32, sha1_16, sha512_64, md5_32 = HASHES[name]
    p = str(golden_trees / name)
    h, n = fsnar.hash_path(p)
    assert (h.sri, h.nix32, n) == (sri, nix32, int(size))
    assert fsnar.hash_path(p, "sha1")[0].base16 == sha1_16
    assert fsnar.hash_path(p, "sha512")[0].base64 == sha512_64
    assert fsnar.hash_path(p, "md5")[0].nix32 == md5_32


def test_hash_file_matches_nix(golden_trees):
    for line in (GOLDEN / "files.tsv").read_text().splitlines():
        f, sri, nix32, sha1 = line.split("\t")
        assert fsnar.hash_file(str(golden_trees / f)).sri == sri
        assert fsnar.hash_file(str(golden_trees / f), "sha1").base16 == sha1


def test_hash_file_refuses_directories(tmp_path):
    with pytest.raises(StoreError, match="directory"):
        fsnar.hash_file(str(tmp_path))


def make_big_tree(root: Path, seed: int = 7) -> Path:
    """Files around the batching limits (256 KiB, 1 MiB, 2 MiB buffers), many small files."""
    import random
    rng = random.Random(seed)
    root.mkdir()
    for size in (0, 1, (1 << 18) - 1, 1 << 18, (1 << 18) + 1, (1 << 20) + 3, (2 << 20) + 5, 5 << 20):
        (root / f"f{size}").write_bytes(rng.randbytes(size))
    (root / "exe").write_bytes(rng.randbytes(3 << 20))
    (root / "exe").chmod(0o755)
    sub = root / "many"
    sub.mkdir()
    for i in range(600):
        (sub / f"s{i}").write_bytes(rng.randbytes(rng.randrange(4000)))
    (root / "link").symlink_to("many/s1")
    return root


def test_big_and_many_files_match_the_reference_serialiser(tmp_path):
    root = make_big_tree(tmp_path / "big")
    data = dump(root)
    assert data == ref_nar(str(root))
    h, n = fsnar.hash_path(str(root))
    assert n == len(data) and h == Hash.of_bytes(data)


@needs_nix
def test_live_against_nix(tmp_path, golden_trees):
    root = make_big_tree(tmp_path / "big", seed=11)
    for p in (root, golden_trees / "tree", root / "f1", root / "link"):
        nar = subprocess.run(["nix-store", "--dump", str(p)], check=True, capture_output=True).stdout
        assert dump(p) == nar
        sri = subprocess.run(["nix", "hash", "path", str(p)], check=True, capture_output=True,
                             text=True, env=NIX_ENV).stdout.strip()
        assert fsnar.hash_path(str(p))[0].sri == sri


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.recursive(
    st.binary(max_size=50),
    lambda kids: st.dictionaries(st.text(alphabet="abcXYZ_.é-", min_size=1, max_size=6)
                                 .filter(lambda n: n not in (".", "..")), kids, max_size=4),
    max_leaves=12), st.data())
def test_dump_restore_round_trip(tmp_path, tree, data):
    """dump -> restore -> dump gives the same NAR, for random trees of files and directories."""
    import uuid
    base = tmp_path / uuid.uuid4().hex
    base.mkdir()
    src = base / "src"

    def make(p: Path, t):
        if isinstance(t, bytes):
            p.write_bytes(t)
            if data.draw(st.booleans()):
                p.chmod(0o755)
        else:
            p.mkdir(parents=True)
            for k, v in t.items():
                make(p / k, v)

    make(src, tree)
    nar = dump(src)
    fstree.restore_nar(io.BytesIO(nar), str(base / "dst"))
    assert dump(base / "dst") == nar


# -- restore ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(HASHES))
def test_restore_golden_then_dump_is_identical(tmp_path, name):
    nar = (GOLDEN / f"{name}.nar").read_bytes()
    dest = tmp_path / "out"
    fstree.restore_nar(io.BytesIO(nar), str(dest))
    assert dump(dest) == nar
    for p in walk_all(dest):
        st_ = os.lstat(p)
        if stat.S_ISREG(st_.st_mode):
            assert stat.S_IMODE(st_.st_mode) in (0o644, 0o755)


def test_restore_refuses_an_existing_dest(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(StoreError, match="already exists"):
        fstree.restore_nar(io.BytesIO(N.nar_of_bytes(b"x")), str(tmp_path / "x"))
    (tmp_path / "l").symlink_to("nowhere")
    with pytest.raises(StoreError, match="already exists"):
        fstree.restore_nar(io.BytesIO(N.nar_of_bytes(b"x")), str(tmp_path / "l"))
    assert not (tmp_path / "nowhere").exists()


def _s(b: bytes) -> bytes:
    import struct
    return struct.pack("<Q", len(b)) + b + bytes((-len(b)) & 7)


def _file(data=b"pwned"):
    return _s(b"(") + _s(b"type") + _s(b"regular") + _s(b"contents") + _s(data) + _s(b")")


def _sym(t):
    return _s(b"(") + _s(b"type") + _s(b"symlink") + _s(b"target") + _s(t) + _s(b")")


def _entry(name, node):
    return _s(b"entry") + _s(b"(") + _s(b"name") + _s(name) + _s(b"node") + node + _s(b")")


def _dir(*entries):
    return _s(b"(") + _s(b"type") + _s(b"directory") + b"".join(entries) + _s(b")")


def _nar(node):
    return _s(b"nix-archive-1") + node


def test_restore_never_writes_through_a_symlink_it_created(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    attacks = [
        # a symlink to the outside, then a directory of the same name with a file in it
        _nar(_dir(_entry(b"a", _sym(str(outside).encode())), _entry(b"a", _dir(_entry(b"f", _file()))))),
        # a symlink to an outside file, then a regular file of the same name
        _nar(_dir(_entry(b"a", _sym(str(outside / "f").encode())), _entry(b"a", _file()))),
        # the same, unsorted
        _nar(_dir(_entry(b"b", _sym(str(outside).encode())), _entry(b"a", _file()),
                  _entry(b"b", _dir(_entry(b"f", _file()))))),
        # names that climb
        _nar(_dir(_entry(b"..", _dir(_entry(b"outside", _dir(_entry(b"f", _file()))))))),
        _nar(_dir(_entry(b"../outside/f", _file()))),
        _nar(_dir(_entry(b"x/../../outside/f", _file()))),
        _nar(_dir(_entry(b".", _file()))),
    ]
    for i, attack in enumerate(attacks):
        dest = tmp_path / f"dest{i}"
        with pytest.raises(NarError) as ei:
            fstree.restore_nar(io.BytesIO(attack), str(dest))
        assert ei.value.offset is not None
        assert list(outside.iterdir()) == [], f"attack {i} wrote outside"
        assert not dest.exists() and not dest.is_symlink(), "partial tree left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside"]


def test_restore_removes_the_partial_tree_on_truncation(tmp_path):
    nar = (GOLDEN / "tree.nar").read_bytes()
    with pytest.raises(NarError, match="truncated"):
        fstree.restore_nar(io.BytesIO(nar[: len(nar) // 2]), str(tmp_path / "d"))
    assert list(tmp_path.iterdir()) == []


def test_restore_into_a_missing_parent_is_a_store_error(tmp_path):
    with pytest.raises(StoreError):
        fstree.restore_nar(io.BytesIO(N.nar_of_bytes(b"x")), str(tmp_path / "no" / "dest"))


# -- copy_and_hash and canonical metadata -----------------------------------------------------

def assert_canonical(root: Path):
    for p in walk_all(root):
        st_ = os.lstat(p)
        assert st_.st_mtime == 1, p
        if stat.S_ISDIR(st_.st_mode):
            assert stat.S_IMODE(st_.st_mode) == 0o555, p
        elif stat.S_ISREG(st_.st_mode):
            assert stat.S_IMODE(st_.st_mode) in (0o444, 0o555), p


def make_writable(root: Path):
    for p in walk_all(root):
        if stat.S_ISDIR(os.lstat(p).st_mode):
            p.chmod(0o755)


def test_copy_and_hash(golden_trees, tmp_path):
    src = golden_trees / "tree"
    dst = tmp_path / "copy"
    marker = "abcdfghijklmnpqrsvwxyz0123456789"
    h, n, found = fsnar.copy_and_hash(str(src), str(dst), scan=[marker, "0" * 32])
    size, sri, *_ = HASHES["tree"]
    assert (h.sri, n, found) == (sri, int(size), set())
    assert dump(dst) == dump(src)
    assert_canonical(dst)
    make_writable(dst)


def test_copy_and_hash_scans_contents_names_and_targets(tmp_path):
    a, b, c, d = ("a" * 31 + x for x in "0123")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"\0\1 binary /pure/store/" + a.encode() + b"-dep\n" + os.urandom(3 << 20))
    (src / f"name-{b}").write_text("x")
    (src / "l").symlink_to(f"/pure/store/{c}-x/bin")
    dst = tmp_path / "dst"
    h, n, found = fsnar.copy_and_hash(str(src), str(dst), scan=[a, b, c, d])
    assert found == {a, b, c}
    assert (h, n) == fsnar.hash_path(str(src))
    assert fsnar.scan_path(str(src), [a, b, c, d]) == {a, b, c}
    assert fsnar.nar_hash_and_scan(str(dst), [a, d]) == (h, n, {a})
    assert_canonical(dst)
    with pytest.raises(StoreError, match="already exists"):
        fsnar.copy_and_hash(str(src), str(dst))
    make_writable(dst)


def test_copy_of_single_file_and_symlink(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"#!/bin/sh\n")
    f.chmod(0o4755)  # setuid is dropped
    h, n, _ = fsnar.copy_and_hash(str(f), str(tmp_path / "g"))
    assert stat.S_IMODE(os.lstat(tmp_path / "g").st_mode) == 0o555
    assert h == Hash.of_bytes(N.nar_of_bytes(b"#!/bin/sh\n", executable=True))
    (tmp_path / "l").symlink_to("f")
    fsnar.copy_and_hash(str(tmp_path / "l"), str(tmp_path / "m"))
    assert os.readlink(tmp_path / "m") == "f" and os.lstat(tmp_path / "m").st_mtime == 1


def test_canonicalise_path(tmp_path):
    root = tmp_path / "out"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_text("x")
    (root / "bin" / "tool").chmod(0o6711)          # setuid+setgid, owner x
    (root / "data").write_text("y")
    (root / "data").chmod(0o600)
    (root / "gx").write_text("z")
    (root / "gx").chmod(0o654)                     # group x only: not executable
    (root / "link").symlink_to("data")
    (root / "private").mkdir(mode=0o700)
    (root / "private" / "f").write_text("p")
    os.setxattr(root / "data", "user.junk", b"1") if hasattr(os, "setxattr") else None
    fstree.canonicalise_path(str(root))
    assert_canonical(root)
    assert stat.S_IMODE(os.lstat(root / "bin" / "tool").st_mode) == 0o555
    assert stat.S_IMODE(os.lstat(root / "data").st_mode) == 0o444
    assert stat.S_IMODE(os.lstat(root / "gx").st_mode) == 0o444
    assert os.listxattr(root / "data") == []
    fstree.canonicalise_path(str(root))  # idempotent
    assert_canonical(root)
    make_writable(root)


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o775, 0o777])
def test_canonicalise_rejects_writable_outputs_when_asked(tmp_path, mode):
    root = tmp_path / "out"
    root.mkdir()
    (root / "ok").write_text("x")
    bad = root / "bad"
    if mode & 0o100:
        bad.mkdir()
    else:
        bad.write_text("x")
    bad.chmod(mode)
    with pytest.raises(StoreError, match="bad.*writable"):
        fstree.canonicalise_path(str(root), reject_writable=True)
    make_writable(root)


def test_special_files_are_refused(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    os.mkfifo(root / "fifo")
    with pytest.raises(StoreError, match="FIFO"):
        fsnar.hash_path(str(root))
    with pytest.raises(StoreError, match="FIFO"):
        fsnar.copy_and_hash(str(root), str(tmp_path / "c"))
    with pytest.raises(StoreError, match="FIFO"):
        fstree.canonicalise_path(str(root / "fifo"))
    os.unlink(root / "fifo")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(root / "sock"))
        with pytest.raises(StoreError, match="socket"):
            fsnar.dump_path(str(root), io.BytesIO())
        with pytest.raises(StoreError, match="socket"):
            fsnar.hash_path(str(root / "sock"))
    finally:
        s.close()
    with pytest.raises(StoreError, match="No such file"):
        fsnar.hash_path(str(tmp_path / "missing"))


def test_too_deep_trees_are_refused(tmp_path):
    p = tmp_path / "deep"
    p.mkdir()
    q = p
    for _ in range(N.MAX_DEPTH + 1):
        q = q / "d"
        q.mkdir()
    with pytest.raises(StoreError, match="nested"):
        fsnar.hash_path(str(p))


def test_sink_errors_propagate_and_leave_no_thread(tmp_path):
    root = make_big_tree(tmp_path / "big")

    class Full:
        def __init__(self):
            self.n = 0

        def write(self, data):
            self.n += len(data)
            if self.n > (3 << 20):
                raise OSError(28, "No space left on device")

    before = threading.active_count()
    with pytest.raises(OSError, match="No space"):
        fsnar.dump_path(str(root), Full())
    assert threading.active_count() == before


def test_dump_sink_gets_immutable_bytes(tmp_path):
    """The sink may keep what it is given (the pooled buffers are never handed out)."""
    root = make_big_tree(tmp_path / "big")
    kept = []

    class Keep:
        def write(self, data):
            kept.append(data)

    fsnar.dump_path(str(root), Keep())
    assert all(isinstance(k, bytes) for k in kept)
    assert b"".join(kept) == ref_nar(str(root))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_restoring_corrupted_nars_fails_cleanly(tmp_path, data):
    """A corrupted NAR either restores to a tree that dumps back to it, or raises NarError and
    leaves nothing behind; nothing is ever created outside the destination."""
    import uuid
    good = (GOLDEN / "links-only.nar").read_bytes() if data.draw(st.booleans()) else \
        (GOLDEN / "exec.nar").read_bytes()
    pos = data.draw(st.integers(0, len(good) - 1))
    bad = good[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + good[pos + data.draw(st.integers(0, 8)):]
    base = tmp_path / uuid.uuid4().hex
    base.mkdir()
    dest = base / "dest"
    try:
        fstree.restore_nar(io.BytesIO(bad), str(dest))
    except NarError:
        assert not os.path.lexists(dest)
    else:
        assert dump(dest) == bad
    assert [p.name for p in base.iterdir()] in ([], ["dest"])


def test_restore_modes_do_not_depend_on_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        fstree.restore_nar(io.BytesIO((GOLDEN / "tree.nar").read_bytes()), str(tmp_path / "t"))
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(os.lstat(p).st_mode) for p in walk_all(tmp_path / "t") if not os.path.islink(p)}
    assert modes == {0o755, 0o644}


def test_worst_case_framing_fits_the_batch_buffers(tmp_path):
    """250 directories deep, ending in the largest batched file and a long symlink, after enough
    small files to bring the batch buffer right up to its flush threshold."""
    import random
    rng = random.Random(3)
    root = tmp_path / "w"
    root.mkdir()
    for i in range(70):
        (root / f"a{i:03d}").write_bytes(rng.randbytes(7000 + i))
    deep = root
    for _ in range(250):
        deep = deep / ("n" * 14)
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(rng.randbytes(fsnar._SMALL))
    (deep / "l").symlink_to("t" * 4000)
    data = dump(root)
    assert data == ref_nar(str(root))
    assert fsnar.hash_path(str(root)) == (Hash.of_bytes(data), len(data))


# -- restore with canonical metadata (substitution) --------------------------------------------

def _metadata(root: Path) -> dict:
    return {str(p.relative_to(root.parent)) if p != root else ".":
            (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_mtime_ns)
            for p in walk_all(root) for s in [os.lstat(p)]}


@pytest.mark.parametrize("name", sorted(HASHES))
def test_canonical_restore_equals_restore_then_canonicalise(tmp_path, name):
    """Setting the metadata while restoring gives exactly what the separate pass gives."""
    nar = (GOLDEN / f"{name}.nar").read_bytes()
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    a.parent.mkdir()
    b.parent.mkdir()
    fstree.restore_nar(io.BytesIO(nar), str(a), canonical=True)
    fstree.restore_nar(io.BytesIO(nar), str(b))
    fstree.canonicalise_path(str(b))
    assert dump(a) == nar
    assert_canonical(a)
    assert _metadata(a) == _metadata(b)
    make_writable(a)
    make_writable(b)


def test_canonical_restore_removes_read_only_partial_trees(tmp_path):
    """Directories finished (made read-only) before the NAR turns out truncated are removed too."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_bytes(b"x" * 100)
    (src / "z").write_bytes(b"y" * 5000)
    nar = dump(src)
    cut = nar.index(b"y" * 100)  # in the contents of z, after a/ is complete
    with pytest.raises(NarError, match="truncated"):
        fstree.restore_nar(io.BytesIO(nar[:cut]), str(tmp_path / "d"), canonical=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _default_acl_bytes(uid: int) -> bytes:
    """A POSIX default ACL in the kernel's xattr format: user::rwx user:UID:r-x group::r-x
    mask::r-x other::r-x (a named user makes it more than the mode bits, so it is kept)."""
    import struct
    entries = [(0x01, 7, 0xFFFFFFFF), (0x02, 5, uid), (0x04, 5, 0xFFFFFFFF), (0x10, 5, 0xFFFFFFFF),
               (0x20, 5, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_canonical_restore_strips_inherited_acls(tmp_path):
    """A default ACL on the store directory would give every new file an ACL xattr: the
    restore notices and strips them, as the canonicalising pass does."""
    parent = tmp_path / "store"
    parent.mkdir()
    try:
        os.setxattr(parent, "system.posix_acl_default", _default_acl_bytes(4242))
    except OSError as e:
        pytest.skip(f"no POSIX ACLs on this file system: {e}")
    probe = parent / "probe"
    probe.write_text("x")
    if not os.listxattr(probe):
        pytest.skip("the file system did not apply the default ACL")
    probe.unlink()
    nar = (GOLDEN / "tree.nar").read_bytes()
    fstree.restore_nar(io.BytesIO(nar), str(parent / "out"), canonical=True)
    assert dump(parent / "out") == nar
    assert_canonical(parent / "out")
    for p in walk_all(parent / "out"):
        if not p.is_symlink():
            assert os.listxattr(p) == [], p
    make_writable(parent / "out")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o277, 0o002])
def test_canonical_restore_modes_do_not_depend_on_the_umask(tmp_path, umask):
    nar = (GOLDEN / "tree.nar").read_bytes()
    old = os.umask(umask)
    try:
        fstree.restore_nar(io.BytesIO(nar), str(tmp_path / "t"), canonical=True)
    finally:
        os.umask(old)
    assert dump(tmp_path / "t") == nar
    assert_canonical(tmp_path / "t")
    make_writable(tmp_path / "t")


# -- direct writes (substitution into a flushing store) ----------------------------------------

_DIRECT_SIZES = [0, 1, 4095, fstree.DIRECT_MIN - 1, fstree.DIRECT_MIN, fstree.DIRECT_MIN + 1,
                 (1 << 20) - 1, 1 << 20, (1 << 20) + 4097, (3 << 20) + 7]


def _direct_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    for i, size in enumerate(_DIRECT_SIZES):
        f = root / ("sub" if i % 2 else ".") / f"f{i:02d}"
        f.write_bytes(os.urandom(size))
        if i % 3 == 0:
            f.chmod(0o755)
    (root / "link").symlink_to("sub/f01")


@pytest.fixture
def direct_ok(tmp_path):
    """Skip where tmp_path's file system refuses O_DIRECT (the restore then writes as usual,
    which the fallback tests below cover)."""
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    finally:
        (tmp_path / "probe").unlink(missing_ok=True)


class _OddReads(io.BytesIO):
    """Hands out at most 77,777 bytes per read: chunks that straddle buffer and block edges."""

    def read(self, n=-1):
        return super().read(77_777 if n is None or n < 0 else min(n, 77_777))


def _opens_with_direct(monkeypatch) -> list[tuple[bytes, bool]]:
    """Record (name, O_DIRECT?) for every file the restore opens for writing."""
    seen, real_open = [], os.open

    def spy(path, flags, *args, **kw):
        if flags & os.O_CREAT:
            seen.append((os.fsencode(path), bool(flags & os.O_DIRECT)))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", spy)
    return seen


@pytest.mark.parametrize("canonical", [False, True])
def test_direct_restore_writes_big_files_directly_and_gives_the_same_tree(tmp_path, direct_ok, monkeypatch, canonical):
    _direct_tree(tmp_path / "src")
    nar = dump(tmp_path / "src")
    direct, plain = tmp_path / "a" / "out", tmp_path / "b" / "out"
    direct.parent.mkdir()
    plain.parent.mkdir()
    seen = _opens_with_direct(monkeypatch)
    fstree.restore_nar(_OddReads(nar), str(direct), canonical=canonical, direct=True)
    monkeypatch.undo()
    fstree.restore_nar(io.BytesIO(nar), str(plain), canonical=canonical)
    assert dump(direct) == nar
    if canonical:
        assert _metadata(direct) == _metadata(plain)
    else:  # (mtimes are the restore's)
        assert {k: v[:2] for k, v in _metadata(direct).items()} == {k: v[:2] for k, v in _metadata(plain).items()}
    sizes = {f"f{i:02d}".encode(): s for i, s in enumerate(_DIRECT_SIZES)}
    assert sorted(seen) == sorted((name, sizes[name] >= fstree.DIRECT_MIN) for name in sizes)
    if canonical:
        make_writable(direct)
        make_writable(plain)


def test_direct_restore_falls_back_when_open_refuses_o_direct(tmp_path, monkeypatch):
    """As older kernels do on tmpfs: the file is created, then the open fails with EINVAL."""
    _direct_tree(tmp_path / "src")
    nar = dump(tmp_path / "src")
    real_open, tries = os.open, []

    def refusing(path, flags, *args, **kw):
        if flags & os.O_DIRECT:
            tries.append(path)
            os.close(real_open(path, flags & ~os.O_DIRECT, *args, **kw))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", refusing)
    fstree.restore_nar(io.BytesIO(nar), str(tmp_path / "d"), canonical=True, direct=True)
    monkeypatch.undo()
    assert dump(tmp_path / "d") == nar
    assert len(tries) == 1, "after one refusal the restore writes through the page cache"
    make_writable(tmp_path / "d")


def test_direct_restore_falls_back_when_a_direct_write_is_refused(tmp_path, direct_ok, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the writes (alignment): written on
    through the page cache, from where the refused write stopped."""
    import fcntl
    _direct_tree(tmp_path / "src")
    nar = dump(tmp_path / "src")
    real_write, refused = os.write, []

    def refusing(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            if refused:  # the first direct write succeeds, the next is refused
                refused.append(fd)
                raise OSError(errno.EINVAL, "Invalid argument")
            refused.append(None)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing)
    fstree.restore_nar(_OddReads(nar), str(tmp_path / "d"), direct=True)
    monkeypatch.undo()
    assert dump(tmp_path / "d") == nar
    assert refused[0] is None and len(refused) == 2, "one refusal turns direct writes off for the rest"


def test_direct_restore_of_a_truncated_nar_leaves_nothing(tmp_path):
    _direct_tree(tmp_path / "src")
    nar = dump(tmp_path / "src")
    with pytest.raises(NarError, match="truncated"):
        fstree.restore_nar(io.BytesIO(nar[: len(nar) // 2]), str(tmp_path / "d"), canonical=True, direct=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_failing_direct_write_is_named_and_leaves_nothing(tmp_path, direct_ok, monkeypatch):
    """A disk that fills up during a direct write: the error names the file, the partial tree
    is removed and no descriptor is left open."""
    import fcntl
    _direct_tree(tmp_path / "src")
    nar = dump(tmp_path / "src")
    real_write = os.write

    def full(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StoreError, match=r"cannot write 'f\d\d': No space left on device"):
        fstree.restore_nar(io.BytesIO(nar), str(tmp_path / "d"), canonical=True, direct=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert len(os.listdir("/proc/self/fd")) == fds


def test_remove_tree_removes_a_tree_deeper_than_recursion_and_path_max(tmp_path):
    """A failed build's output nested 2000 directories deep (paths longer than PATH_MAX, deeper
    than Python's recursion limit), read-only at every level, is removed: a recursive remover
    crashed with RecursionError and left it in .tmp, where every later command tripped on it."""
    root = tmp_path / "deep"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(2000):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=child), "w") as f:
                f.write("x")
            os.symlink("f", "l", dir_fd=child)
            os.chmod(fd, 0o555)
            os.close(fd)
            fd = child
        os.chmod(fd, 0o555)
    finally:
        os.close(fd)
    os.chmod(root, 0o555)
    try:
        fstree.remove_tree(str(root))
        assert not root.exists()
    finally:
        if root.exists():  # pytest's own (recursive) clean-up of tmp_path would fail on it
            subprocess.run(["chmod", "-R", "u+w", root], check=False)
            subprocess.run(["rm", "-rf", root], check=False)
