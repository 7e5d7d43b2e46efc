"""LocalStore as a library: adding, registering, queries, parse_path, verify, delete, leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from purestore.errors import InvalidStorePath, PathInUse, PathNotValid, PurestoreError, StoreError
from purestore.formats.hash import Hash
from purestore.formats.path_info import PathInfo
from purestore.formats.store_path import StorePath, make_text_path
from purestore.store.local import LocalStore, TMP_DIR
from purestore.store.settings import load_settings
from conftest import REPO


@pytest.fixture
def store(settings):
    with LocalStore.open(settings) as s:
        yield s


@pytest.fixture
def nix_store(store_root):
    s = load_settings(env={"PURE_CONFIG": "/dev/null"}, root=str(store_root), store_dir="/nix/store")
    with LocalStore.open(s) as st:
        yield st


def make_tree(d):
    os.makedirs(d / "bin")
    (d / "bin" / "x").write_text("#!/bin/sh\n")
    os.chmod(d / "bin" / "x", 0o755)
    (d / "data").write_bytes(b"data" * 1000)
    os.symlink("bin/x", d / "link")
    return d


def canonical(path: str) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(path):
        for n in [dirpath] + [os.path.join(dirpath, f) for f in dirnames + filenames]:
            st = os.lstat(n)
            if st.st_mtime != 1:
                bad.append(f"{n}: mtime {st.st_mtime}")
            if not os.path.islink(n) and st.st_mode & 0o7777 not in (0o444, 0o555):
                bad.append(f"{n}: mode {oct(st.st_mode)}")
    return bad


def test_open_creates_the_documented_layout(store, settings):
    for sub in ("db/db.sqlite", "locks", "temproots", "gcroots/auto", "profiles", "log"):
        assert os.path.exists(os.path.join(settings.state_dir, sub)), sub
    assert os.path.isdir(settings.real_store_dir)
    assert store.real_store_dir.startswith(str(settings.root))
    assert store.store_dir == "/pure/store"


def test_database_refuses_a_different_store_dir(store_root, settings):
    LocalStore.open(settings).close()
    db = os.path.join(settings.state_dir, "db", "db.sqlite")
    from purestore.store.db import StoreDB
    with pytest.raises(StoreError, match="belongs to store dir '/pure/store'"):
        StoreDB(db, "/other/store")


def test_a_store_opened_with_another_store_dir_refuses_before_making_that_dir(store_root, settings):
    """`--store ROOT --store-dir /pure/other` on ROOT's /pure/store store (whose state dir it
    shares) was refused only after ROOT/pure/other had been made, and left there."""
    LocalStore.open(settings).close()
    other = settings.evolve(store_dir="/pure/other")
    with pytest.raises(StoreError, match="belongs to store dir '/pure/store', not '/pure/other'"):
        LocalStore.open(other)
    assert not os.path.lexists(other.real_store_dir)


def test_add_path_copies_with_canonical_metadata_and_registers(store, tmp_path):
    src = make_tree(tmp_path / "src")
    sp = store.add_path(str(src))
    assert sp.name == "src"
    real = store.real_path(sp)
    assert canonical(real) == []
    assert os.access(os.path.join(real, "bin", "x"), os.X_OK)
    assert os.readlink(os.path.join(real, "link")) == "bin/x"
    info = store.query_path_info(sp)
    assert info.ca == f"fixed:r:sha256:{info.nar_hash.nix32}"
    assert info.references == frozenset() and info.registration_time > 0
    from purestore.store import fsnar
    assert fsnar.hash_path(real) == (info.nar_hash, info.nar_size)
    assert os.listdir(os.path.join(store.real_store_dir, TMP_DIR)) == []
    # adding again is a no-op giving the same path; dry run agrees without copying
    assert store.add_path(str(src)) == sp
    assert store.add_path(str(src), dry_run=True) == sp
    assert store.add_path(str(src), name="other", dry_run=True) != sp
    assert not store.is_valid(store.add_path(str(src), name="other", dry_run=True))


def test_query_valid_paths_gives_the_valid_ones_of_many_asked_at_once(store, tmp_path):
    valid = []
    for i in range(3):
        (tmp_path / f"f{i}").write_text(f"file {i}\n")
        valid.append(store.add_path(str(tmp_path / f"f{i}")))
    missing = [store.add_path(str(tmp_path / "f0"), name=f"other{i}", dry_run=True) for i in range(1200)]
    assert store.query_valid_paths(missing + valid + valid) == set(valid)  # (more than one query's worth)
    assert store.query_valid_paths([]) == set()


def test_add_flat_gives_the_formats_vector(nix_store, tmp_path):
    f = tmp_path / "h.txt"
    f.write_bytes(b"hello\n")
    sp = nix_store.add_path(str(f), flat=True)
    assert nix_store.print_path(sp) == "/nix/store/pihdd9cadryc4gkk8zsdbvpvilql139b-h.txt"
    info = nix_store.query_path_info(sp)
    assert info.nar_hash.nix32 == "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw" and info.nar_size == 120
    assert info.ca == "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"


def test_add_flat_follows_a_symlink_to_the_file(nix_store, tmp_path):
    (tmp_path / "h.txt").write_bytes(b"hello\n")
    os.symlink("h.txt", tmp_path / "link.txt")
    sp = nix_store.add_path(str(tmp_path / "link.txt"), flat=True)
    # named after the link, like Nix; its contents are the target's.  (Nix 2.8 has no golden
    # answer here: `nix-store --add-fixed sha256 link.txt` hashes nothing and then fails.)
    assert nix_store.print_path(sp) == "/nix/store/qc0gkfad5bs8haqprxm1qqimzcd6qpgg-link.txt"
    assert open(nix_store.real_path(sp), "rb").read() == b"hello\n"
    assert not os.path.islink(nix_store.real_path(sp))
    assert nix_store.verify(check_contents=True).ok


def test_add_flat_refuses_a_directory(store, tmp_path):
    with pytest.raises(StoreError, match="expected a regular file, got a directory"):
        store.add_path(str(tmp_path), flat=True)


def test_add_errors_name_the_problem(store, tmp_path):
    with pytest.raises(StoreError, match="no such file or directory"):
        store.add_path(str(tmp_path / "missing"))
    (tmp_path / "bad name").write_text("x")
    with pytest.raises(InvalidStorePath, match="contains ' '") as e:
        store.add_path(str(tmp_path / "bad name"))
    assert "--name" in e.value.hint
    assert store.add_path(str(tmp_path / "bad name"), name="good").name == "good"


def test_add_text_gives_the_formats_vector_and_is_idempotent(nix_store):
    sp = nix_store.add_text("plain.txt", b"plain\n")
    assert nix_store.print_path(sp) == "/nix/store/ay7hdmlhc2d9pn7k2mwjh6cq4csccv3x-plain.txt"
    assert open(nix_store.real_path(sp), "rb").read() == b"plain\n"
    assert canonical(nix_store.real_path(sp)) == []
    info = nix_store.query_path_info(sp)
    assert info.ca == f"text:sha256:{Hash.of_bytes(b'plain' + bytes([10])).nix32}"
    assert nix_store.add_text("plain.txt", b"plain\n") == sp


def test_add_texts_registers_a_graph_in_one_call(store):
    leaf = ("leaf.drv", b"leaf", ())
    leaf_sp = make_text_path("leaf.drv", b"leaf", (), store.store_dir)
    items = [leaf] + [(f"n{i}.drv", f"node {i}".encode(), (leaf_sp,)) for i in range(300)]
    paths = store.add_texts(items)
    assert paths[0] == leaf_sp and len(set(paths)) == 301
    assert store.query_referrers(leaf_sp) == set(paths[1:])
    assert store.query_closure([paths[5]]) == {paths[5], leaf_sp}
    assert store.add_texts(items) == paths


def test_add_texts_refuses_a_missing_reference_and_registers_nothing(store):
    ghost = StorePath("0" * 32, "ghost")
    with pytest.raises(StoreError, match="reference '/pure/store/0{32}-ghost' is not valid"):
        store.add_texts([("a", b"a", ()), ("b", b"b", (ghost,))])
    assert store.valid_paths() == []


def _register_file(store, name, refs=(), self_ref=False, deriver=None):
    """Register a hand-made path (what a builder does): temp name, rename, register."""
    sp = StorePath(Hash.of_bytes(name.encode()).nix32[:32], name)
    tmp = store.temp_name(sp)
    with open(tmp, "wb") as f:
        f.write(name.encode())
    with store.lock_path(sp):
        store.install_path(tmp, sp)
        references = set(refs) | ({sp} if self_ref else set())
        store.register([PathInfo(sp, Hash.of_bytes(name.encode()), len(name), references, deriver)])
    return sp


def test_closure_topo_sort_referrers_and_self_references(store):
    a = _register_file(store, "a")
    b = _register_file(store, "b", [a], self_ref=True)
    c = _register_file(store, "c", [a, b])
    d = _register_file(store, "d")
    assert store.query_references(b) == {a, b}
    assert store.query_referrers(a) == {b, c}
    assert store.query_closure([c]) == {a, b, c}
    assert store.query_closure([c, d]) == {a, b, c, d}
    order = store.topo_sort([c, b, a, d])
    assert order.index(a) < order.index(b) < order.index(c)
    assert store.closure_size([c]) == 3
    with pytest.raises(PathNotValid, match="0{32}-nope"):
        store.query_closure([StorePath("0" * 32, "nope")])


def test_register_is_one_transaction(store):
    a = StorePath("1" * 32, "a")
    open(store.real_path(a), "w").close()
    open(store.real_path(StorePath("3" * 32, "c")), "w").close()
    missing = StorePath("2" * 32, "b")
    with pytest.raises(StoreError, match="its reference"):
        store.register([PathInfo(a, Hash.of_bytes(b""), 1),
                        PathInfo(StorePath("3" * 32, "c"), Hash.of_bytes(b""), 1, {missing})])
    assert not store.is_valid(a)  # the first one was rolled back too


def test_register_refuses_missing_files(store):
    with pytest.raises(StoreError, match="nothing at"):
        store.register([PathInfo(StorePath("1" * 32, "a"), Hash.of_bytes(b""), 1)])


def test_derivation_outputs_deriver_and_signatures(store):
    drv = store.add_text("x.drv", b"Derive()")
    out = _register_file(store, "x", deriver=drv)
    store.register_derivation_outputs(drv, {"out": out})
    assert store.query_derivation_outputs(drv) == {"out": out}
    assert store.query_derivers_of(out) == [drv]
    assert store.query_deriver(out) == drv
    store.add_signatures(out, ["k1:AAAA"])
    store.add_signatures(out, ["k2:BBBB", "k1:AAAA"])
    assert store.query_path_info(out).sigs == {"k1:AAAA", "k2:BBBB"}
    with pytest.raises(PathNotValid):
        store.add_signatures(StorePath("1" * 32, "nope"), ["k:x"])


def test_parse_path_accepts_every_documented_form(store, tmp_path):
    sp = store.add_text("t.txt", b"t")
    logical = store.print_path(sp)
    assert store.parse_path(logical) == sp
    assert store.parse_path(store.real_path(sp)) == sp
    assert store.parse_path(logical + "/bin/sh") == sp
    assert store.parse_path(sp.base_name) == sp
    link = tmp_path / "result"
    os.symlink(logical, link)  # rooted store: the link names the logical path
    assert store.parse_path(str(link)) == sp
    link2 = tmp_path / "result2"
    os.symlink("result", link2)
    assert store.parse_path(str(link2)) == sp
    assert store.parse_path(logical, valid=True) == sp


def test_parse_path_errors(store, tmp_path):
    with pytest.raises(InvalidStorePath, match="not in the store dir '/pure/store'"):
        store.parse_path(str(tmp_path))
    with pytest.raises(InvalidStorePath, match="is not a store path"):
        store.parse_path("/pure/store/short")
    with pytest.raises(InvalidStorePath, match="neither a store path"):
        store.parse_path("nonsense")
    with pytest.raises(PathNotValid, match="is not valid"):
        store.parse_path("/pure/store/" + "1" * 32 + "-x", valid=True)


def test_verify_finds_missing_and_modified_paths(store, tmp_path):
    (tmp_path / "f").write_text("content")
    a = store.add_path(str(tmp_path / "f"), name="a")
    b = store.add_path(str(tmp_path / "f"), name="b")
    assert store.verify(check_contents=True).ok
    os.chmod(store.real_path(a), 0o644)
    with open(store.real_path(a), "a") as f:
        f.write("tampered")
    os.unlink(store.real_path(b))
    quick = store.verify()
    assert [p.kind for p in quick.problems] == ["missing"]
    full = store.verify(check_contents=True)
    assert sorted(p.kind for p in full.problems) == ["hash", "missing"]
    assert full.checked == 2
    assert any(store.print_path(a) in p.message for p in full.problems)


def test_verify_does_not_report_paths_deleted_while_it_runs(store, tmp_path, monkeypatch):
    """A path that a collection (or `pure store delete`) removes while verify runs is no problem:
    it was invalidated before its files went.  (Verify listed the valid paths once and reported
    every path deleted after that as "missing", or "unreadable" when it went while being hashed:
    a `pure store verify --check-contents` next to a `pure gc` reported hundreds of problems
    and exited 1.)  A path that is still valid and missing is still reported."""
    from purestore.store import fsnar
    names = ["a", "b", "c", "d"]
    sps = {}
    for n in names:
        (tmp_path / n).write_text(n * 1000)
        sps[n] = store.add_path(str(tmp_path / n), name=n)
    real_hash_path = fsnar.hash_path
    calls = []

    def hash_path_while_deleting(path, *a, **kw):
        calls.append(path)
        if len(calls) == 1:  # a collection runs while `a` is hashed: it takes `a` and `c`
            store.delete([sps["a"], sps["c"]])
        return real_hash_path(path, *a, **kw)
    monkeypatch.setattr(fsnar, "hash_path", hash_path_while_deleting)
    os.chmod(store.real_path(sps["d"]), 0o644)
    os.unlink(store.real_path(sps["d"]))  # really missing
    report = store.verify(check_contents=True)
    assert [(p.kind, p.path) for p in report.problems] == [("missing", store.print_path(sps["d"]))]
    assert calls, "check_contents hashes the paths"


def test_delete_refuses_referenced_paths_and_deletes_sets(store):
    a = _register_file(store, "a")
    b = _register_file(store, "b", [a])
    with pytest.raises(PathInUse, match=f"referenced by '{store.print_path(b)}'"):
        store.delete([a])
    assert store.is_valid(a) and os.path.exists(store.real_path(a))
    assert store.delete([a, b]) == [b, a]
    assert not store.is_valid(a) and not os.path.lexists(store.real_path(a))
    with pytest.raises(PathNotValid):
        store.delete([a])


def test_delete_removes_read_only_trees(store, tmp_path):
    sp = store.add_path(str(make_tree(tmp_path / "src")))
    store.delete([sp])
    assert not os.path.lexists(store.real_path(sp))
    assert store.verify().ok


def test_a_complete_but_unregistered_copy_is_replaced_on_add(store, tmp_path):
    """A crash after the rename but before the registration leaves an invalid path on disk."""
    f = tmp_path / "f"
    f.write_text("right")
    sp = store.add_path(str(f), dry_run=True)
    os.makedirs(store.real_path(sp) + "/junk")
    os.chmod(store.real_path(sp), 0o555)
    assert store.add_path(str(f)) == sp
    assert open(store.real_path(sp)).read() == "right"
    assert store.verify(check_contents=True).ok


def _child(code: str, root) -> subprocess.Popen:
    prog = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from purestore.store.settings import load_settings
        from purestore.store.local import LocalStore
        store = LocalStore.open(load_settings(env={{"PURE_CONFIG": "/dev/null"}}, root={str(root)!r}))
    """) + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", prog], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(settings, store_root):
    dead = _child("""
        t = store.temp_name()
        os.makedirs(t + "/sub"); os.chmod(t + "/sub", 0o555); os.chmod(t, 0o555)
        print(t, flush=True)
        os._exit(0)   # no cleanup, like a crash
    """, store_root)
    dead_tmp = dead.stdout.readline().strip()
    dead.wait()
    assert os.path.exists(dead_tmp)
    assert os.path.exists(os.path.join(settings.state_dir, "temproots", str(dead.pid)))
    with LocalStore.open(settings):
        assert not os.path.exists(dead_tmp)
        assert not os.path.exists(os.path.join(settings.state_dir, "temproots", str(dead.pid)))
    live = _child("""
        t = store.temp_name()
        open(t, "w").close()
        print(t, flush=True)
        sys.stdin.readline()
    """, store_root)
    live_tmp = live.stdout.readline().strip()
    try:
        with LocalStore.open(settings):
            assert os.path.exists(live_tmp)
    finally:
        live.stdin.close()
        live.wait()
    with LocalStore.open(settings):  # once it is gone, its leftover goes too
        assert not os.path.exists(live_tmp)


def test_temp_roots_are_recorded_for_added_paths(store):
    from purestore.store.roots import read_temp_roots
    sp = store.add_text("r.txt", b"r")
    assert sp in read_temp_roots(store.state_dir, store.store_dir)


def test_path_lock_excludes_other_processes(store, store_root):
    sp = StorePath("1" * 32, "locked")
    child = _child(f"""
        from purestore.formats.store_path import StorePath
        with store.lock_path(StorePath("1" * 32, "locked")):
            print("locked", flush=True)
            sys.stdin.readline()
        print("released", flush=True)
        sys.stdin.readline()
    """, store_root)
    try:
        assert child.stdout.readline() == "locked\n"
        assert store.locks.acquire(sp.base_name, blocking=False) is False
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "released\n"
        assert store.locks.acquire(sp.base_name, blocking=False) is True
        store.locks.release(sp.base_name)
    finally:
        child.stdin.close()
        child.wait()


def test_path_lock_excludes_other_threads_and_is_reentrant(store):
    sp = StorePath("1" * 32, "t")
    got = []
    with store.lock_path(sp):
        with store.lock_path(sp):  # reentrant in one thread
            pass
        t = threading.Thread(target=lambda: got.append(store.locks.acquire(sp.base_name, blocking=False)))
        t.start()
        t.join()
        assert got == [False]
    t = threading.Thread(target=lambda: got.append(store.locks.acquire(sp.base_name, blocking=False)))
    t.start()
    t.join()
    assert got == [False, True]
    assert os.listdir(store.locks.directory) == [sp.base_name + ".lock"]  # held by that thread


def test_lock_paths_and_concurrent_threads_adding_the_same_tree(store, tmp_path):
    src = make_tree(tmp_path / "src")
    results, errors = [], []

    def add():
        try:
            results.append(store.add_path(str(src)))
        except PurestoreError as e:  # pragma: no cover - would fail the test below
            errors.append(e)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    assert store.valid_paths() == results[:1]
    assert os.listdir(os.path.join(store.real_store_dir, TMP_DIR)) == []
    assert os.listdir(store.locks.directory) == []


def test_db_transactions_nest_and_roll_back_as_a_whole(store):
    from purestore.store.db import StoreDB
    store.db.ensure_schema("CREATE TABLE IF NOT EXISTS Extra (k TEXT PRIMARY KEY, v TEXT);")
    store.db.ensure_schema("CREATE TABLE IF NOT EXISTS Extra (k TEXT PRIMARY KEY, v TEXT);")  # idempotent
    with pytest.raises(RuntimeError):
        with store.db.transaction() as c:
            c.execute("INSERT INTO Extra VALUES ('a', '1')")
            with store.db.transaction() as c2:
                c2.execute("INSERT INTO Extra VALUES ('b', '2')")
            raise RuntimeError("boom")
    assert store.db.query("SELECT * FROM Extra") == []
    with store.db.transaction() as c:
        c.execute("INSERT INTO Extra VALUES ('a', '1')")
        with pytest.raises(StoreError, match="inside a transaction"):
            store.db.ensure_schema("CREATE TABLE IF NOT EXISTS Other (x);")
    # another connection (another process would be the same) sees the committed row
    other = StoreDB(store.db.path, store.store_dir)
    assert other.query("SELECT * FROM Extra") == [("a", "1")]
    other.close()


def test_many_processes_opening_a_fresh_database_at_once_all_succeed(tmp_path):
    """Racing to create the database and switch it to WAL gives "database is locked" without
    SQLite's busy handler; opening must wait instead of failing (a CI run once lost a build so)."""
    script = textwrap.dedent("""
        import sys, time
        from purestore.store.db import StoreDB
        while time.time() < float(sys.argv[2]):  # start together
            pass
        db = StoreDB(sys.argv[1], "/pure/store")
        db.query("SELECT count(*) FROM ValidPaths")
        db.close()
    """)
    for round_ in range(5):
        path = str(tmp_path / f"r{round_}" / "db.sqlite")
        start = str(time.time() + 1.0)
        procs = [subprocess.Popen([sys.executable, "-c", script, path, start], cwd=REPO,
                                  stderr=subprocess.PIPE, text=True) for _ in range(12)]
        errors = [p.communicate(timeout=120)[1] for p in procs if p.wait(timeout=120) != 0]
        assert errors == []


def test_readers_are_not_blocked_by_a_writer(store, settings):
    """WAL: closure queries and path info work while another connection holds a write transaction."""
    sp = store.add_text("r.txt", b"r")
    with LocalStore.open(settings) as other:
        with other.db.transaction() as c:
            c.execute("UPDATE ValidPaths SET narSize = narSize WHERE path = ?", (sp.base_name,))
            assert store.query_closure([sp]) == {sp}
            assert store.query_path_info(sp).nar_size > 0
            assert store.is_valid(sp)


def test_a_failed_add_leaves_nothing_behind(store, tmp_path):
    src = make_tree(tmp_path / "src")
    os.mkfifo(src / "zz-fifo")
    with pytest.raises(StoreError, match="zz-fifo"):
        store.add_path(str(src))
    assert store.valid_paths() == []
    assert os.listdir(os.path.join(store.real_store_dir, TMP_DIR)) == []
    assert sorted(os.listdir(store.real_store_dir)) == [TMP_DIR]


def test_concurrent_cleaners_of_one_leftover_do_not_trip_over_each_other(settings, store_root):
    dead = _child("""
        t = store.temp_name()
        for i in range(200):
            os.makedirs(f"{t}/d{i}/e")
        print(t, flush=True)
        os._exit(0)
    """, store_root)
    leftover = dead.stdout.readline().strip()
    dead.wait()
    cleaners = [_child("print('ok', flush=True)", store_root) for _ in range(3)]
    assert [c.communicate()[0] for c in cleaners] == ["ok\n"] * 3
    assert [c.returncode for c in cleaners] == [0, 0, 0]
    assert not os.path.exists(leftover)


def test_a_statement_that_fills_the_database_is_a_store_error_not_a_failed_rollback(tmp_path):
    """SQLite rolls a transaction back by itself on SQLITE_FULL; the transaction's own ROLLBACK
    then fails ("no transaction is active") and must not replace the real error."""
    from purestore.errors import StoreError
    from purestore.store.db import StoreDB

    db = StoreDB(str(tmp_path / "db.sqlite"), "/pure/store")
    pages = db.conn.execute("PRAGMA page_count").fetchone()[0]
    db.conn.execute(f"PRAGMA max_page_count = {pages}")  # no room for one more page
    with pytest.raises(StoreError, match=r"cannot write to the store database .*full"):
        with db.transaction() as c:
            c.execute("CREATE TABLE Filler (x BLOB)")
            c.execute("INSERT INTO Filler VALUES (?)", (b"x" * 100_000,))
    assert not db.conn.in_transaction
    db.conn.execute(f"PRAGMA max_page_count = {pages + 1000}")
    with db.transaction() as c:  # still usable
        c.execute("CREATE TABLE Other (x)")
    db.close()
