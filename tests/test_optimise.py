"""pure store optimise: equal files hard-linked through <store dir>/.links, hashes unchanged,
damaged links not spread, unused links removed by the collector."""

from __future__ import annotations

import json
import os
import stat

import pytest

from conftest import pure_env, run_pure
from purestore.store.fsnar import hash_path
from purestore.store.local import LocalStore
from purestore.store.settings import load_settings


@pytest.fixture
def store(store_root):
    s = LocalStore.open(load_settings(env={"PURE_CONFIG": "/dev/null"}, root=str(store_root)))
    yield s
    s.close()


def _tree(tmp_path, name: str, files: dict[str, tuple[bytes, bool]]):
    d = tmp_path / "src" / name
    for rel, (data, exe) in files.items():
        f = d / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        f.chmod(0o755 if exe else 0o644)
    return d


def _paths(store, tmp_path):
    big = b"shared library bytes\n" * 5000
    a = store.add_path(str(_tree(tmp_path, "a", {"lib/libx.so": (big, False), "bin/tool": (b"#!x\n" * 100, True),
                                                 "own": (b"only in a\n", False)})), "a")
    b = store.add_path(str(_tree(tmp_path, "b", {"share/libx.so": (big, False), "tool": (b"#!x\n" * 100, True),
                                                 "tool-noexec": (b"#!x\n" * 100, False)})), "b")
    return a, b, big


def _ino(path) -> int:
    return os.lstat(path).st_ino


def test_equal_files_become_one_inode_and_nothing_else_changes(store, store_root, tmp_path):
    a, b, big = _paths(store, tmp_path)
    ra, rb = store.real_path(a), store.real_path(b)
    before = {p: store.query_path_info(p).nar_hash for p in (a, b)}
    dir_times = {d: os.lstat(d).st_mtime_ns for d in (f"{ra}/lib", f"{rb}/share", rb)}
    p = run_pure("store", "optimise", "--json", root=store_root)
    assert p.stdout.count("\n") == 1 and p.stdout.endswith("}\n"), p.stdout  # one JSON line
    r = json.loads(p.stdout)
    assert r["linked"] == 2 and r["bytesSaved"] == len(big) + 400 and r["paths"] == 2
    assert _ino(f"{ra}/lib/libx.so") == _ino(f"{rb}/share/libx.so")
    assert _ino(f"{ra}/bin/tool") == _ino(f"{rb}/tool")
    assert _ino(f"{rb}/tool-noexec") != _ino(f"{rb}/tool")  # the executable bit is part of the name
    name = hash_path(f"{ra}/lib/libx.so")[0].nix32
    assert _ino(f"{store.real_store_dir}/.links/{name}") == _ino(f"{ra}/lib/libx.so")
    for path, h in before.items():  # the NAR hashes, modes and directory times are as they were
        assert hash_path(store.real_path(path))[0] == h
    assert stat.S_IMODE(os.lstat(f"{rb}/tool").st_mode) == 0o555
    assert stat.S_IMODE(os.lstat(rb).st_mode) == 0o555
    assert {d: os.lstat(d).st_mtime_ns for d in dir_times} == dir_times
    assert run_pure("store", "verify", "--check-contents", root=store_root).returncode == 0
    assert not [n for n in os.listdir(store.real_store_dir) if n.startswith(".tmp-link-")]
    # a second run links nothing more
    again = json.loads(run_pure("store", "optimise", "--json", root=store_root).stdout)
    assert again["linked"] == 0 and again["entriesAdded"] == 0
    # text output
    p = run_pure("store", "optimise", root=store_root)
    assert "0 files hard-linked, 0 bytes (0.00 MiB) saved; 6 files in 2 paths looked at" in p.stderr


def test_a_damaged_link_is_replaced_not_spread(store, store_root, tmp_path):
    """An entry of .links whose contents no longer match its name (a disk error, a hand edit) is
    not linked into other paths: the file being optimised takes its place."""
    a, b, big = _paths(store, tmp_path)
    ra, rb = store.real_path(a), store.real_path(b)
    run_pure("store", "optimise", store.print_path(a), root=store_root)  # only a: entries made
    name = hash_path(f"{ra}/lib/libx.so")[0].nix32
    link = f"{store.real_store_dir}/.links/{name}"
    # damage the entry alone: make it a separate inode with other bytes
    os.unlink(link)
    with open(link, "wb") as f:
        f.write(b"garbage")
    r = json.loads(run_pure("store", "optimise", "--json", store.print_path(b), root=store_root).stdout)
    assert r["entriesRepaired"] == 1
    assert open(f"{rb}/share/libx.so", "rb").read() == big
    assert open(link, "rb").read() == big and _ino(link) == _ino(f"{rb}/share/libx.so")
    assert run_pure("store", "verify", "--check-contents", root=store_root).returncode == 0


def test_gc_removes_links_no_path_uses(store, store_root, tmp_path):
    a, b, big = _paths(store, tmp_path)
    run_pure("store", "optimise", root=store_root)
    links = f"{store.real_store_dir}/.links"
    n_links = len(os.listdir(links))
    assert n_links == 4  # libx.so, tool, own, tool-noexec (every non-empty file gets an entry)
    store.close()  # (its temporary roots keep the paths it added)
    p = run_pure("gc", root=store_root)  # no roots: both paths go, and then every entry
    assert "2 store paths deleted" in p.stderr and f"{n_links} unused links of 'pure store optimise' removed" in p.stderr
    assert os.listdir(links) == []
    p = run_pure("gc", "--json", root=store_root)
    assert json.loads(p.stdout)["linksRemoved"] == 0


def _dead_pid() -> int:
    import subprocess
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_gc_removes_the_temporary_link_of_a_killed_optimise_and_then_its_entry(store, store_root, tmp_path):
    """`pure store optimise` killed between making <store dir>/.tmp-link-<pid>-<n> (a second
    name of a .links entry) and renaming it over a file left that temporary in the store dir
    (seen under a stress run sending SIGKILL at random moments): `pure gc` removed neither it nor
    its .links entry, which it kept at two links, so the bytes stayed used until the next
    optimise.  The collector removes the temporaries of runs that are gone, then the entry."""
    a, b, big = _paths(store, tmp_path)
    run_pure("store", "optimise", root=store_root)
    links = f"{store.real_store_dir}/.links"
    entry = hash_path(f"{store.real_path(a)}/own")[0].nix32
    leftover = f"{store.real_store_dir}/.tmp-link-{_dead_pid()}-7"
    os.link(f"{links}/{entry}", leftover)  # what the killed run had made
    store.close()  # (its temporary roots keep the paths it added)
    p = run_pure("gc", "--json", root=store_root)
    assert json.loads(p.stdout)["linksRemoved"] == 4
    assert not os.path.lexists(leftover) and os.listdir(links) == []


def test_gc_leaves_the_temporary_link_of_a_running_optimise(store, store_root, tmp_path):
    a, b, big = _paths(store, tmp_path)
    run_pure("store", "optimise", root=store_root)
    entry = hash_path(f"{store.real_path(a)}/own")[0].nix32
    running = f"{store.real_store_dir}/.tmp-link-{os.getpid()}-1"  # this test's process runs
    os.link(f"{store.real_store_dir}/.links/{entry}", running)
    store.close()
    run_pure("gc", root=store_root)
    assert os.path.exists(running)
    os.unlink(running)


def test_gc_counts_only_the_bytes_it_really_frees(store, store_root, tmp_path):
    """After optimise, deleting a path whose files are still linked into a live path frees
    nothing for them: `bytesFreed` counts a file when its last link goes (its .links entry's,
    when that goes unused), not the deleted paths' NAR sizes."""
    a, b, big = _paths(store, tmp_path)
    run_pure("store", "optimise", root=store_root)
    store.close()  # (its temporary roots keep the paths it added)
    root = f"{store.state_dir}/gcroots/b"
    os.symlink(store.print_path(b), root)
    r = json.loads(run_pure("gc", "--json", root=store_root).stdout)
    # a's libx.so and tool live on in b; only "own" (10 bytes) goes, with its .links entry
    assert r["deleted"] == [store.print_path(a)] and r["linksRemoved"] == 1
    assert r["bytesFreed"] == len(b"only in a\n")
    os.unlink(root)
    p = run_pure("gc", root=store_root)  # now b's three files go, through their .links entries
    freed = len(big) + 400 + 400
    assert f"1 store paths deleted, {freed} bytes freed" in p.stderr
    assert os.listdir(f"{store.real_store_dir}/.links") == []


def test_max_freed_and_dry_run_count_what_deleting_frees_not_nar_sizes(store, store_root, tmp_path):
    """After optimise, a dead path whose files a live path shares frees almost nothing: by NAR
    sizes `--max-freed 1` stopped after it (freeing 10 bytes, or 0) and a dry run promised its
    whole NAR size.  Both now count as bytesFreed does."""
    a, b, big = _paths(store, tmp_path)                 # a shares libx.so and tool with b
    c = store.add_text("c", b"c's own bytes\n")           # registered after a: deleted after it
    run_pure("store", "optimise", root=store_root)
    store.close()
    os.symlink(store.print_path(b), f"{store.state_dir}/gcroots/b")
    dry = json.loads(run_pure("gc", "--dry-run", "--json", root=store_root).stdout)
    assert dry["wouldDelete"] == [store.print_path(a), store.print_path(c)]
    assert dry["wouldFree"] == len(b"only in a\n") + len(b"c's own bytes\n")
    p = json.loads(run_pure("gc", "--max-freed", "11", "--json", root=store_root).stdout)
    assert p["deleted"] == [store.print_path(a), store.print_path(c)] and p["bytesFreed"] == dry["wouldFree"]


def test_store_delete_removes_the_links_only_the_deleted_path_used(store, store_root, tmp_path):
    """`pure store delete` left the .links entries of the deleted path's files behind, so the
    space of a file no other path shares was not freed until the next `pure gc`."""
    a, b, big = _paths(store, tmp_path)
    run_pure("store", "optimise", root=store_root)
    store.close()  # (its temporary roots keep the paths it added)
    links = f"{store.real_store_dir}/.links"
    own = hash_path(f"{store.real_path(a)}/own")[0].nix32
    assert own in os.listdir(links) and len(os.listdir(links)) == 4
    run_pure("store", "delete", store.print_path(a), root=store_root)
    left = os.listdir(links)
    assert own not in left and len(left) == 3  # the shared files' entries stay (b uses them)
    assert run_pure("store", "verify", "--check-contents", root=store_root).returncode == 0


def test_a_file_in_place_of_links_does_not_break_gc_or_delete(store, store_root, tmp_path):
    """A file named .links (damage) made `pure gc` and `pure store delete` end in a
    NotADirectoryError traceback after they had deleted their paths."""
    a, b, _big = _paths(store, tmp_path)
    store.close()
    with open(f"{store.real_store_dir}/.links", "w"):
        pass
    p = run_pure("store", "delete", store.print_path(a), root=store_root, check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    p = run_pure("gc", root=store_root, check=False)
    assert p.returncode == 0 and "1 store paths deleted" in p.stderr, p.stderr
    p = run_pure("store", "optimise", root=store_root, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: cannot create") and ".links" in p.stderr


def test_optimise_errors_name_the_path(store, store_root, tmp_path):
    p = run_pure("store", "optimise", "/pure/store/00000000000000000000000000000000-nope", root=store_root,
                 check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "nope" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_path_the_collector_removes_meanwhile_is_skipped(store, tmp_path, monkeypatch):
    """No lock is held: a path that `pure gc` moves aside (to delete it) while its files are
    being hashed is skipped, not an error ("cannot link ...: No such file or directory")."""
    from purestore.store import optimise as opt
    a, b, big = _paths(store, tmp_path)
    single = store.add_path(str(_tree(tmp_path, "c", {"f": (big, False)}) / "f"), "single")
    gone = {}

    def hash_then_collect(path):
        r = real_hash(path)
        for p in (b, single):
            rp = store.real_path(p)
            if (path == rp or path.startswith(rp + "/")) and os.path.lexists(rp):
                os.rename(rp, f"{store.real_store_dir}/.gc-trash-{p.name}")  # as the collector does
                gone[p] = True
        return r
    real_hash = opt.hash_path
    monkeypatch.setattr(opt, "hash_path", hash_then_collect)
    r = opt.optimise_store(store, [b])
    assert gone == {b: True} and r.linked == 0 and r.entries_added == 0 and r.skipped >= 1
    r = opt.optimise_store(store, [single])
    assert gone[single] and r.linked == 0 and r.entries_added == 0 and r.skipped == 1
    r = opt.optimise_store(store, [a])  # (the rest is as before)
    assert r.entries_added == 3 and r.skipped == 0


def test_a_path_the_collector_removes_before_its_file_is_read_is_skipped(store, tmp_path, monkeypatch):
    """A path that `pure gc` moved aside after the walk had listed a file and before that file
    was read ended the run with "error: cannot read '.../f': No such file or directory" (seen
    under a stress run: optimise and gc at once).  It is skipped, as a path collected later is."""
    from purestore.store import optimise as opt
    a, b, big = _paths(store, tmp_path)
    gone = {}

    def collect_then_hash(path):
        rp = store.real_path(b)
        if path.startswith(rp + "/") and os.path.lexists(rp):
            os.rename(rp, f"{store.real_store_dir}/.gc-trash-{b.name}")  # as the collector does
            gone[b] = True
        return real_hash(path)
    real_hash = opt.hash_path
    monkeypatch.setattr(opt, "hash_path", collect_then_hash)
    r = opt.optimise_store(store, [b])
    assert gone == {b: True} and r.linked == 0 and r.entries_added == 0 and r.skipped >= 1
    r = opt.optimise_store(store, [a])  # (the rest is as before)
    assert r.entries_added == 3 and r.skipped == 0


def test_a_leftover_temporary_of_a_killed_run_whose_pid_is_now_ours_is_removed(store, tmp_path):
    """A run killed mid-link leaves <store dir>/.tmp-link-<pid>-<n>; when a later run gets the
    same pid (pids are reused), the leftover is not "of a process that is gone", and its first
    link failed: "cannot link ...: File exists". A run holds the .links lock, so a temporary
    carrying its own pid when it starts is a leftover too."""
    from purestore.store import optimise as opt
    a, b, big = _paths(store, tmp_path)
    for n in (1, 2):
        with open(f"{store.real_store_dir}/.tmp-link-{os.getpid()}-{n}", "wb") as f:
            f.write(b"left by a killed run")
    r = opt.optimise_store(store)
    assert r.linked == 2 and r.skipped == 0
    assert [n for n in os.listdir(store.real_store_dir) if n.startswith(".tmp-link-")] == []


def test_a_link_the_collector_removes_meanwhile_is_made_again(store, tmp_path, monkeypatch):
    """As documented: an entry of .links that `pure gc` removes while a file is being linked to
    it is made again from that file.  (The file was skipped: "left as they were", counted as
    skipped, and its path was not deduplicated.)"""
    from purestore.store import optimise as opt
    a, b, big = _paths(store, tmp_path)
    assert opt.optimise_store(store, [a]).entries_added == 3
    links = f"{store.real_store_dir}/.links/"

    def hash_then_collect(path):
        r = real_hash(path)
        if path.startswith(links):  # the entry, rehashed before use: then collected
            os.unlink(path)
        return r
    real_hash = opt.hash_path
    monkeypatch.setattr(opt, "hash_path", hash_then_collect)
    r = opt.optimise_store(store, [b])
    assert r.skipped == 0 and r.entries_added == 3, r
    rb = store.real_path(b)
    for rel in ("share/libx.so", "tool"):
        assert os.stat(f"{links}{real_hash(f'{rb}/{rel}')[0].nix32}").st_ino == _ino(f"{rb}/{rel}")


def test_a_second_run_waits_for_the_first(store, store_root, tmp_path):
    """Two runs at once would undo each other's chmod and utime of a directory (seen as a user:
    store directories left with a new mtime or writable, "cannot replace ...: Permission
    denied"): a run waits while another holds the flock on .links."""
    import fcntl
    import subprocess
    import sys
    a, b, big = _paths(store, tmp_path)
    links = f"{store.real_store_dir}/.links"
    os.makedirs(links, exist_ok=True)
    fd = os.open(links, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a run in progress holds it
    try:
        p = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "store", "optimise", "--json"],
                             env=pure_env(store_root), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        # once it says it waits (a run that did not wait would end without the line: no hang)
        said = ""
        while "waiting for another" not in said and (line := p.stderr.readline()):
            said += line
        assert "waiting for another 'pure store optimise' to finish" in said, said
        assert p.poll() is None and os.listdir(links) == []
        assert _ino(f"{store.real_path(a)}/lib/libx.so") != _ino(f"{store.real_path(b)}/share/libx.so")
    finally:
        os.close(fd)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert json.loads(out)["linked"] == 2
