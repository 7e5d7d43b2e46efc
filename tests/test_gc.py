"""Garbage collection: roots keep their closures, dead paths go, concurrent users stay safe."""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import blocked_on_lock, held_sleep, pure_env, read_until, release, sandbox_build_reason
from purestore.formats.hash import fold20, nix32_encode
from purestore.formats.path_info import PathInfo
from purestore.formats.store_path import StorePath
from purestore.store import fsnar
from purestore.store.local import LocalStore


def _open(settings):
    return LocalStore.open(settings, durable=False)


def add_output(st, name: str, content: bytes, *, deriver=None, refs=()) -> StorePath:
    """Register a file as if a builder had produced it (with a deriver)."""
    sp = StorePath(nix32_encode(os.urandom(20)), name)
    real = st.real_path(sp)
    with open(real, "wb") as f:
        f.write(content)
    os.chmod(real, 0o444)
    h, size = fsnar.hash_path(real)
    st.register([PathInfo(sp, h, size, references=frozenset(refs), deriver=deriver)])
    return sp


def valid(pure) -> set[str]:
    return set(pure("store", "ls").stdout.split())


@pytest.fixture
def graph(settings):
    """a <- b (rooted by gcroots/b), c <- d (dead), e (dead, a directory tree)."""
    with _open(settings) as st:
        p = {}
        p["a"] = st.add_text("a", b"a")
        p["b"] = st.add_text("b", b"b " + st.print_path(p["a"]).encode(), [p["a"]])
        p["c"] = st.add_text("c", b"c")
        p["d"] = st.add_text("d", b"d", [p["c"]])
        tree = os.path.join(os.path.dirname(settings.state_dir), "tree-src")
        os.makedirs(tree + "/sub/deeper")
        with open(tree + "/sub/deeper/f", "w") as f:
            f.write("x")
        p["e"] = st.add_path(tree, "e")
        os.symlink(st.print_path(p["b"]), os.path.join(st.state_dir, "gcroots", "b"))
        return {k: st.print_path(v) for k, v in p.items()}


def test_roots_and_their_closure_survive_dead_paths_go(pure, graph, settings):
    p = pure("gc")
    deleted = p.stdout.split()
    assert sorted(deleted) == sorted([graph["c"], graph["d"], graph["e"]])
    assert deleted.index(graph["d"]) < deleted.index(graph["c"]), "referrers are deleted first"
    assert "3 store paths deleted" in p.stderr
    assert valid(pure) == {graph["a"], graph["b"]}
    left = sorted(n for n in os.listdir(settings.real_store_dir) if not n.startswith("."))
    assert left == sorted(os.path.basename(graph[k]) for k in "ab")
    assert os.listdir(os.path.join(settings.real_store_dir, ".tmp")) == []
    pure("store", "verify", "--check-contents")
    # a second run finds nothing
    assert pure("gc").stdout == ""


def test_dry_run_and_print_options_delete_nothing(pure, graph):
    before = valid(pure)
    dry = pure("gc", "--dry-run")
    assert sorted(dry.stdout.split()) == sorted([graph["c"], graph["d"], graph["e"]])
    assert sorted(pure("gc", "--print-dead").stdout.split()) == sorted(dry.stdout.split())
    assert sorted(pure("gc", "--print-live").stdout.split()) == sorted([graph["a"], graph["b"]])
    roots = pure("gc", "--print-roots").stdout.splitlines()
    assert len(roots) == 1 and roots[0].endswith(f"gcroots/b -> {graph['b']}")
    j = json.loads(pure("gc", "--print-roots", "--json").stdout)
    assert j[0]["kind"] == "direct" and j[0]["path"] == graph["b"]
    # --json says what the text says: what would go, and how many bytes (it had no such field)
    free = int(dry.stderr.split("freeing ")[1].split()[0])
    j = json.loads(pure("gc", "--dry-run", "--json").stdout)
    assert j["dryRun"] and sorted(j["wouldDelete"]) == sorted(dry.stdout.split()) and j["deleted"] == []
    assert j["wouldFree"] == free > 0 and j["bytesFreed"] == 0
    assert valid(pure) == before


def test_deleted_result_link_stops_rooting(pure, graph, settings, tmp_path):
    result = tmp_path / "result"
    result.symlink_to(graph["d"])
    auto = os.path.join(settings.state_dir, "gcroots", "auto", "abc")
    os.symlink(str(result), auto)
    roots = pure("gc", "--print-roots").stdout
    assert f"{result} -> {graph['d']}" in roots
    pure("gc")
    assert graph["d"] in valid(pure) and graph["c"] in valid(pure)
    result.unlink()
    p = pure("gc")
    assert graph["d"] in p.stdout.split() and graph["c"] in p.stdout.split()
    assert "removed stale GC root" in p.stderr
    assert not os.path.lexists(auto), "the stale indirect root is pruned"


def busybox_expr(tmp_path, body: str) -> str:
    """Write an expression file with ``bb`` (a source path holding a static busybox in bin/)
    and ``sh(name, script)`` (a derivation running busybox sh -c script) in scope."""
    bb = tmp_path / "bbsrc" / "busybox"
    if not bb.exists():
        (bb / "bin").mkdir(parents=True)
        shutil.copy("/bin/busybox", bb / "bin" / "busybox")
    f = tmp_path / "expr.py"
    f.write_text(textwrap.dedent('''
        from purestore.expr import derivation, source
        bb = source("bbsrc/busybox")
        def sh(name, script, **kw):
            return derivation(name=name, system="x86_64-linux", builder=f"{bb}/bin/busybox",
                              args=["sh", "-c", script], PATH=f"{bb}/bin", **kw)
    ''') + textwrap.dedent(body))
    return str(f)


def _skip_unless_builds_run() -> None:
    """Skipped where sandboxed builds cannot run (the reason said); a build failing where they
    can is a failure (it was a skip whenever its error mentioned a sandbox or a namespace)."""
    reason = sandbox_build_reason()
    if reason is not None:
        pytest.skip(f"pure build cannot build here: {reason}")


def _build(pure, *args, **kw):
    _skip_unless_builds_run()
    r = pure("build", *args, check=False, **kw)
    assert r.returncode == 0, r.stderr
    return r


def test_result_link_made_by_pure_build_roots_its_output(pure, tmp_path):
    expr = busybox_expr(tmp_path, '''
        default = sh("gc-built", "echo hi > $out")
    ''')
    out = _build(pure, expr, cwd=tmp_path).stdout.split()[-1]
    pure("gc")
    assert out in valid(pure)
    (tmp_path / "result").unlink()
    assert out in pure("gc").stdout.split()


def test_a_result_link_in_a_directory_whose_name_is_not_utf8_roots_its_output(pure, tmp_path):
    """`pure build` in a directory whose name is not UTF-8 made ./result, then ended in a
    UnicodeEncodeError traceback naming its GC root: the output was left unrooted, and the next
    `pure gc` deleted it under the link.  The root is named from the link's bytes now."""
    expr = busybox_expr(tmp_path, '''
        default = sh("odd-dir", "echo hi > $out")
    ''')
    odd = os.path.join(os.fsencode(tmp_path), b"dir-\xff")
    os.mkdir(odd)
    r = _build(pure, expr, cwd=odd)
    assert "Traceback" not in r.stderr
    out = r.stdout.split()[-1]
    link = os.path.join(odd, b"result")
    assert os.readlink(link).endswith(os.fsencode(out))
    roots = pure("gc", "--print-roots", "--json").stdout
    assert {"link": os.fsdecode(link), "path": out, "kind": "indirect"} in json.loads(roots)
    assert out not in pure("gc").stdout.split() and out in valid(pure)
    os.unlink(link)
    assert out in pure("gc").stdout.split()


def test_a_result_link_whose_gc_root_cannot_be_made_is_not_left_unrooted(pure, tmp_path, store_root):
    """When the GC root of ./result cannot be made (here a directory is in its place; for
    another user's store, it is in a directory this user may not write), `pure build` made
    ./result and then failed saying it could not create it: an unrooted link was left, whose
    output the next collection deleted.  The link is taken away again, and the error names the
    root."""
    expr = busybox_expr(tmp_path, '''
        default = sh("unrooted", "echo hi > $out")
    ''')
    out = _build(pure, expr, "--no-link", cwd=tmp_path).stdout.split()[-1]
    link = os.fsencode(tmp_path / "result")
    root = store_root / "pure/var/pure/gcroots/auto" / nix32_encode(fold20(hashlib.sha256(link).digest()))
    (root / "in-the-way").mkdir(parents=True)  # where the root goes: a directory, not replaced
    r = pure("build", expr, cwd=tmp_path, check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: cannot make the GC root "), r.stderr
    assert "Traceback" not in r.stderr and "(no link made)" in r.stderr
    assert [n for n in os.listdir(tmp_path) if n.startswith("result")] == []  # nor a temporary
    assert out in valid(pure)


def test_a_result_link_temporary_left_by_a_killed_run_with_this_pid_is_replaced(tmp_path):
    """`pure build` makes ./result through ./result.tmp-<its pid>; one killed between the two
    steps leaves that temporary, and a later run that got the same pid failed with "cannot
    create the result link ...: File exists".  The leftover is replaced."""
    from purestore.cli.build_cmd import _replace_symlink
    link = str(tmp_path / "result")
    os.symlink("/pure/store/old", f"{link}.tmp-{os.getpid()}")  # as a killed run left it
    _replace_symlink("/pure/store/new", link)
    assert os.readlink(link) == "/pure/store/new" and os.listdir(tmp_path) == ["result"]


@pytest.mark.slow
def test_gc_during_a_build_keeps_what_the_build_uses(pure, tmp_path, store_root):
    """A collection while `pure build` runs deletes neither its .drv nor its inputs; the build
    (whose output refers to an input) then registers fine.  The builder runs until the
    collection has ended (a `sleep 3` could end first on a loaded machine: the .drv, no longer
    a root of the finished build, was then rightly deleted and the test failed)."""
    _skip_unless_builds_run()
    held = held_sleep()
    expr = busybox_expr(tmp_path, f'''
        default = sh("slow", f"{{bb}}/bin/busybox {held}; echo {{bb}} > $out")
    ''')
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "build", expr], cwd=tmp_path,
                            env=pure_env(store_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = read_until(proc, "building")  # (pure build started building)
        p = pure("gc", "--json")
        assert release(held), "the builder's sleep was not found"
        deleted = json.loads(p.stdout)["deleted"]
        assert not [d for d in deleted if d.endswith(".drv") or d.endswith("-busybox")], deleted
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, "".join(seen) + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    built = out.split()[-1]
    assert built in valid(pure)
    assert any(r.endswith("-busybox") for r in pure("store", "references", built).stdout.split())


@pytest.mark.slow
def test_gc_during_a_build_keeps_inputs_that_were_valid_before_it(pure, tmp_path, store_root):
    """An input that was valid (and unrooted) when `pure build` planned is a temporary root of
    the build from then on: a collection while another input builds does not delete it, and the
    build that uses it then succeeds.  (The build used to root its inputs only when it started
    the derivation that uses them: a `pure gc` in between deleted them, and the build failed
    with "path '…-gc-dep' is not valid".)  gc-slow runs until the collection has ended (a
    `sleep 3` could end first on a loaded machine, and the whole build with it: dep, rightly no
    longer rooted, was deleted)."""
    held = held_sleep()
    expr = busybox_expr(tmp_path, f'''
        dep = sh("gc-dep", "echo dep > $out")
        slow = sh("gc-slow", f"{{bb}}/bin/busybox {held}; echo slow > $out")
        default = sh("gc-top", f"cat {{dep}} {{slow}} > $out")
    ''')
    dep = _build(pure, expr, "-A", "dep", "--no-link", cwd=tmp_path).stdout.split()[-1]
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "build", expr], cwd=tmp_path,
                            env=pure_env(store_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = read_until(proc, "building", "gc-slow")  # (pure build started building)
        deleted = json.loads(pure("gc", "--json").stdout)["deleted"]
        assert release(held), "gc-slow's sleep was not found"
        assert dep not in deleted
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, "".join(seen) + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.split()[-1] in valid(pure) and dep in valid(pure)


def test_a_no_op_build_roots_its_outputs_before_checking_them(pure, tmp_path, settings):
    """`valid_outputs` (a build whose outputs are all valid: no scheduler) temp-roots them before
    it reads their validity: when a collection deletes them meanwhile, it says they are not
    all valid, and the build builds them again.  (It used to check first and root afterwards:
    a collection in between deleted the path that the build then printed, and linked as
    `result`, as valid.)"""
    import threading
    from purestore.build.plan import valid_outputs
    from purestore.store import gc, roots
    expr = busybox_expr(tmp_path, '''
        default = sh("gc-noop", "echo hi > $out")
    ''')
    out = _build(pure, expr, "--no-link", cwd=tmp_path).stdout.split()[-1]
    with _open(settings) as st:
        sp = StorePath.parse(out, st.store_dir)
        drv = st.query_deriver(sp)
        got = []
        lock = roots.gc_lock(settings.state_dir)  # a collection has begun
        t = threading.Thread(target=lambda: got.append(valid_outputs(st, [drv])))
        try:
            t.start()
            t.join(2)
            assert t.is_alive(), "valid_outputs waits for gc.lock to add its temporary roots"
            # what the collection does while it holds the lock
            g = gc._Graph(st)
            assert gc._invalidate(st, g, [g.id_of[sp.base_name]]) == [g.id_of[sp.base_name]]
            os.unlink(st.real_path(sp))
        finally:
            lock.close()
            t.join()
        assert got == [None], "it said the deleted output was valid"
        assert valid_outputs(st, [drv]) is None


def test_a_root_naming_the_store_through_dotdot_or_a_symlinked_directory_keeps_its_path(pure, graph, settings,
                                                                                        store_root, tmp_path):
    """A root spelled '<root>/pure/var/../store/X', or through a symlink to the store's root
    (the store opened by another name), was taken for a link outside the store: it rooted
    nothing and its path was deleted."""
    real_sd = f"{store_root}/pure/store"
    os.symlink(store_root, tmp_path / "other-name")
    gcroots = os.path.join(settings.state_dir, "gcroots")
    c, e = (os.path.basename(graph[k]) for k in "ce")
    os.symlink(f"{store_root}/pure/var/../store/{c}", f"{gcroots}/dotdot")
    os.symlink(f"{tmp_path}/other-name/pure/store/{e}/sub", f"{gcroots}/vialink")
    roots = pure("gc", "--print-roots").stdout
    assert f"gcroots/dotdot -> {graph['c']}" in roots and f"gcroots/vialink -> {graph['e']}" in roots
    assert pure("gc").stdout.split() == [graph["d"]]
    assert {graph["c"], graph["e"]} <= valid(pure) and os.path.isdir(f"{real_sd}/{e}/sub")


def test_profiles_root_their_paths(pure, graph, settings):
    prof = os.path.join(settings.state_dir, "profiles")
    os.symlink(graph["d"], os.path.join(prof, "p-1-link"))
    os.symlink("p-1-link", os.path.join(prof, "p"))
    pure("gc")
    assert {graph["c"], graph["d"]} <= valid(pure)
    assert any(l.endswith(f"p-1-link -> {graph['d']}") for l in pure("gc", "--print-roots").stdout.splitlines())


def test_keep_derivations_and_keep_outputs(pure, settings, tmp_path):
    with _open(settings) as st:
        drv = st.add_text("thing.drv", b"Derive(...)")
        out = add_output(st, "thing", b"built", deriver=drv)
        drv2 = st.add_text("other.drv", b"Derive(other)")
        out2 = add_output(st, "other", b"built2", deriver=drv2)
        st.register_derivation_outputs(drv2, {"out": out2})
        os.symlink(st.print_path(out), os.path.join(st.state_dir, "gcroots", "out"))
        os.symlink(st.print_path(drv2), os.path.join(st.state_dir, "gcroots", "drv2"))
        drv, out, drv2, out2 = map(st.print_path, (drv, out, drv2, out2))
    live = set(pure("gc", "--print-live").stdout.split())
    assert live == {drv, out, drv2}, "keep-derivations is on and keep-outputs off by default"
    cfg = tmp_path / "pure.conf"
    cfg.write_text("keep-outputs = true\n")
    assert set(pure("gc", "--print-live", env={"PURE_CONFIG": str(cfg)}).stdout.split()) == {drv, out, drv2, out2}
    cfg.write_text("keep-derivations = false\n")
    pure("gc", env={"PURE_CONFIG": str(cfg)})
    assert valid(pure) == {out, drv2}


def test_max_freed_deletes_referrers_first_and_stops(pure, settings):
    with _open(settings) as st:
        chain = [st.add_text("c0", b"x" * 1000)]
        for i in range(1, 6):
            chain.append(st.add_text(f"c{i}", b"y" * 1000 + st.print_path(chain[-1]).encode(), [chain[-1]]))
        names = [st.print_path(c) for c in chain]
    p = pure("gc", "--max-freed", "2K")
    deleted = p.stdout.split()
    assert deleted == [names[5], names[4], names[3]] or deleted == [names[5], names[4]]
    assert valid(pure) == set(names) - set(deleted)
    pure("store", "verify")
    dry = pure("gc", "--dry-run", "--max-freed", "1")
    left = len(names) - len(deleted)
    assert dry.stdout.split() == [names[left - 1]] and f"would delete 1 of {left} dead store paths" in dry.stderr
    assert pure("gc", "--max-freed", "nonsense", check=False).stderr.startswith("error: --max-freed")


def test_max_freed_sizes_are_parsed_exactly_and_strictly(pure):
    """A size beyond a float (400 digits) ended in an OverflowError traceback; one beyond 2**53
    was rounded; non-ASCII digits ('١٢') were taken as 12."""
    from purestore.cli.env_cmd import parse_size
    from purestore.errors import UsageError
    assert parse_size("9007199254740993") == 2 ** 53 + 1
    assert parse_size("1.5K") == 1536 and parse_size(" 2GiB ") == 2 << 30 and parse_size("0") == 0
    assert parse_size("9" * 400) == 10 ** 400 - 1
    for bad in ("\u0661\u0662", "1e3", "-1", "inf", ""):
        with pytest.raises(UsageError, match="--max-freed: expected a size"):
            parse_size(bad)
    p = pure("gc", "--dry-run", "--max-freed", "9" * 400, check=False)
    assert p.returncode == 0 and "would delete 0 of 0 dead store paths" in p.stderr, p.stderr


def test_temp_roots_of_a_live_process_are_kept(pure, graph, store_root):
    """A running process that temp-rooted a path keeps it (and its closure); once it exits, not."""
    code = textwrap.dedent(f"""
        import sys
        from purestore.store.settings import load_settings
        from purestore.store.local import LocalStore
        st = LocalStore.open(load_settings(env={{"PURE_CONFIG": "/dev/null"}}, root={str(store_root)!r}))
        st.add_temp_root(st.parse_path({graph['d']!r}))
        print("rooted", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=pure_env(store_root))
    try:
        assert proc.stdout.readline().strip() == "rooted"
        deleted = pure("gc").stdout.split()
        assert graph["d"] not in deleted and graph["c"] not in deleted and graph["e"] in deleted
        assert f"{{temp:{proc.pid}}} -> {graph['d']}" in pure("gc", "--print-roots").stdout
        r = pure("store", "delete", graph["d"], check=False)
        assert r.returncode != 0 and f"temporary root of process {proc.pid}" in r.stderr
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert sorted(pure("gc").stdout.split()) == sorted([graph["c"], graph["d"]])


def test_a_temp_root_can_be_dropped_again(pure, graph, settings):
    """What a long-running server does per download: add, and remove when done.  Each add needs
    its own remove; other roots of the process stay; the collector sees the file as rewritten."""
    with _open(settings) as st:
        c, d = st.parse_path(graph["c"]), st.parse_path(graph["d"])
        st.add_temp_root(d)
        st.add_temp_roots([d, c])
        f = os.path.join(settings.state_dir, "temproots", str(os.getpid()))
        st.remove_temp_root(d)
        assert sorted(open(f).read().split()) == sorted([graph["d"], graph["c"]])
        assert graph["d"] not in pure("gc", "--print-dead").stdout.split()
        st.remove_temp_root(d)
        st.remove_temp_root(d)  # (one too many: nothing to drop)
        assert open(f).read().split() == [graph["c"]]
        dead = pure("gc", "--print-dead").stdout.split()
        assert graph["d"] in dead and graph["c"] not in dead
        st.remove_temp_root(c)
        assert open(f).read() == ""
    assert sorted(pure("gc").stdout.split()) == sorted([graph["c"], graph["d"], graph["e"]])


def test_store_delete_uses_the_same_liveness_rules(pure, graph):
    r = pure("store", "delete", graph["b"], check=False)
    assert r.returncode != 0 and "gcroots/b" in r.stderr and r.stderr.startswith("error: ")
    # each refusal says what to do about it
    assert r.stderr.endswith("\nhint: remove the root first (`pure gc --print-roots` lists the roots)\n")
    r = pure("store", "delete", graph["a"], check=False)
    assert r.returncode != 0 and "referenced by" in r.stderr
    assert r.stderr.endswith("\nhint: delete the paths that refer to it in the same call "
                             "(`pure store referrers` lists them)\n")
    pure("store", "delete", graph["d"])
    assert graph["d"] not in valid(pure)


def test_store_delete_holds_gc_lock_like_a_collection(pure, graph, settings, store_root):
    """`pure store delete` takes gc.lock exclusively while it reads the roots and deletes, as
    a collection does: a temporary root being added (under gc.lock shared) when it starts is
    seen, and the path is refused.  (It read the roots without the lock: a process could root a
    path and find it valid just after, and lose it to the delete.)"""
    from purestore.store import roots
    with _open(settings) as st:
        lock = roots.gc_lock(settings.state_dir, shared=True)  # this process is adding a root
        proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "store", "delete", graph["e"]],
                                env=pure_env(store_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            # the delete waits for gc.lock (seen waiting: 3 s without an exit did not say it had
            # got there, on a loaded machine)
            assert blocked_on_lock(proc, roots.gc_lock_path(settings.state_dir)), proc.communicate()
            st.add_temp_root(st.parse_path(graph["e"]))
        finally:
            lock.close()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert err.startswith("error: ") and f"a temporary root of process {os.getpid()}" in err, err
        assert graph["e"] in valid(pure)
    pure("store", "delete", graph["e"])  # (the root is gone with the store that added it)
    assert graph["e"] not in valid(pure)


def test_store_delete_rechecks_referrers_in_its_transaction(pure, graph, settings):
    """A referrer registered after `delete` checked the liveness of its paths (a writer that
    did not temp-root what it refers to) makes it refuse as it refuses any referenced path,
    deleting nothing.  (The database's foreign key kept the reference from dangling, but the
    delete failed with "cannot write to the store database …: FOREIGN KEY constraint failed".)"""
    from purestore.store import local
    with _open(settings) as st:
        c, d = st.parse_path(graph["c"]), st.parse_path(graph["d"])
        real_is_live = st.is_live

        def is_live_then_register(sp, deleting=()):
            reason = real_is_live(sp, deleting=deleting)
            if sp == c and not hasattr(st, "_registered"):  # just after the check of c
                st._registered = add_output(st, "late-referrer", b"late", refs=[c])
            return reason
        st.is_live = is_live_then_register
        with pytest.raises(local.PathInUse, match="referenced by"):
            st.delete([c, d])
        assert st.is_valid(c) and st.is_valid(d)
        assert os.path.exists(st.real_path(c)) and os.path.exists(st.real_path(d))
    r = pure("store", "verify")
    assert r.returncode == 0, r.stdout + r.stderr


def test_gc_lock_makes_temp_root_registration_wait(pure, settings, store_root):
    """While a collection holds gc.lock, adding a temporary root blocks until it is released."""
    from purestore.store import roots

    with _open(settings) as st:
        sp = st.print_path(st.add_text("x", b"x"))
    code = textwrap.dedent(f"""
        from purestore.store.settings import load_settings
        from purestore.store.local import LocalStore
        st = LocalStore.open(load_settings(env={{"PURE_CONFIG": "/dev/null"}}, root={str(store_root)!r}))
        print("opened", flush=True)
        st.add_temp_root(st.parse_path({sp!r}))
        print("rooted", flush=True)
        input()
    """)
    lock = roots.gc_lock(settings.state_dir)  # what a collection holds
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=pure_env(store_root))
    try:
        assert proc.stdout.readline().strip() == "opened"
        # stuck waiting for the lock (seen in /proc/locks: 1 s without a line did not say so)
        assert blocked_on_lock(proc, roots.gc_lock_path(settings.state_dir)), "it must wait for the lock"
        ready, _, _ = select.select([proc.stdout], [], [], 0)
        assert not ready and proc.poll() is None
        lock.close()
        assert proc.stdout.readline().strip() == "rooted"
        assert sp not in pure("gc").stdout.split()
    finally:
        lock.close()
        proc.kill()
        proc.wait()


ADDER = textwrap.dedent("""
    import sys
    from purestore.store.settings import load_settings
    from purestore.store.local import LocalStore
    st = LocalStore.open(load_settings(env={"PURE_CONFIG": "/dev/null"}, root=sys.argv[1]), durable=False)
    prev = None
    for i in range(int(sys.argv[2])):
        # what a build does: inputs are temp-rooted, the output is added (temp-rooted by the store)
        sp = st.add_text(f"n{i}", (f"node {i} " + (st.print_path(prev) if prev else "")).encode(),
                         [prev] if prev else [])
        assert st.is_valid(sp), sp
        prev = sp
        print(st.print_path(sp), flush=True)
    input()
""")


@pytest.mark.slow
def test_gc_while_a_process_adds_paths_loses_nothing(pure, store_root, settings):
    """Collections running concurrently with a writer never delete what it has added."""
    with _open(settings) as st:  # some garbage for the collectors to chew on
        st.add_texts([(f"junk{i}", f"junk {i}".encode(), ()) for i in range(300)])
    n = 150
    proc = subprocess.Popen([sys.executable, "-c", ADDER, str(store_root), str(n)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=pure_env(store_root))
    collectors = [subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "gc", "-q"],
                                   env=pure_env(store_root), stderr=subprocess.PIPE, text=True)
                  for _ in range(3)]
    try:
        added = [proc.stdout.readline().strip() for _ in range(n)]
        for c in collectors:
            _, err = c.communicate(timeout=120)
            assert c.returncode == 0, err
        assert all(added), "the writer failed"
        assert pure("gc").returncode == 0
        assert set(added) <= valid(pure), "a collection deleted a path a live process had added"
        pure("store", "verify", "--check-contents")
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert set(added) & valid(pure) == set(added)
    pure("gc", "-q")
    assert valid(pure) == set()


def test_invalid_leftovers_are_removed_unless_temp_rooted(pure, settings):
    junk = os.path.join(settings.real_store_dir, "0" * 32 + "-junk")
    os.makedirs(junk + "/d")
    os.chmod(junk + "/d", 0o555)
    os.chmod(junk, 0o555)
    p = pure("gc")
    assert "1 invalid leftovers removed" in p.stderr
    assert not os.path.lexists(junk)


def test_a_leftover_with_a_stale_lock_file_is_removed_and_a_locked_one_kept(pure, settings, store_root):
    """A writer killed outright after renaming its path into place and before registering it
    leaves the path and its lock file (lock files go only on release).  Nobody holds that lock,
    so the next collection removes the leftover (and the stale lock file); it used to skip every
    leftover with a lock file, for ever.  A leftover whose lock a live process holds (being
    written) is kept."""
    locks = os.path.join(settings.state_dir, "locks")
    os.makedirs(locks, exist_ok=True)
    stale = "1" * 32 + "-killed-writer"
    held = "2" * 32 + "-being-written"
    for n in (stale, held):
        os.makedirs(os.path.join(settings.real_store_dir, n, "d"))
        open(os.path.join(locks, n + ".lock"), "w").close()
    code = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({os.path.join(locks, held + ".lock")!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        result = json.loads(pure("gc", "--json").stdout)
    finally:
        proc.kill()
        proc.wait()
    assert result["invalidRemoved"] == [stale]
    assert not os.path.lexists(os.path.join(settings.real_store_dir, stale))
    assert not os.path.lexists(os.path.join(locks, stale + ".lock"))
    assert os.path.isdir(os.path.join(settings.real_store_dir, held, "d"))
    assert json.loads(pure("gc", "--json").stdout)["invalidRemoved"] == [held], "its writer is gone now"


def test_a_leftover_registered_while_the_collection_looks_is_kept(pure, settings, monkeypatch):
    """The collector checks a leftover's validity under its path lock, just before moving it:
    a writer that took the lock, installed and registered the path after the store dir was read
    keeps it (else the path would be valid with its files in the trash)."""
    from purestore.store import gc
    with _open(settings) as st:
        sp = StorePath(nix32_encode(os.urandom(20)), "late")
        real = st.real_path(sp)
        with open(real, "wb") as f:
            f.write(b"late")
        os.chmod(real, 0o444)
        real_scan = gc._invalid_leftovers

        def scan_then_register(store, valid_names, temp_names):
            found = real_scan(store, valid_names, temp_names)
            assert sp.base_name in found
            with st.lock_path(sp):  # a writer, between the scan and the move
                h, size = fsnar.hash_path(real)
                st.register([PathInfo(sp, h, size)])
            return found
        monkeypatch.setattr(gc, "_invalid_leftovers", scan_then_register)
        result = gc.collect_garbage(st)
        assert sp.base_name not in result.invalid_removed
        assert os.path.exists(real)


def test_only_stale_links_under_auto_are_pruned(pure, graph, settings, tmp_path):
    mine = os.path.join(settings.state_dir, "gcroots", "mine")
    os.symlink(str(tmp_path / "gone"), mine)
    p = pure("gc")
    assert os.path.islink(mine), "a stale link the user made outside gcroots/auto is left alone"
    assert "removed stale GC root" not in p.stderr


def _dead_trees(st, n: int, files: int) -> None:
    """Register ``n`` directory paths of ``files`` files each (dead: nothing roots them)."""
    infos = []
    for i in range(n):
        sp = StorePath(nix32_encode(os.urandom(20)), f"tree{i}")
        real = st.real_path(sp)
        os.mkdir(real)
        for j in range(files):
            with open(f"{real}/f{j}", "wb") as f:
                f.write(b"%d" % j)
            os.chmod(f"{real}/f{j}", 0o444)
        os.chmod(real, 0o555)
        h, size = fsnar.hash_path(real)
        infos.append(PathInfo(sp, h, size))
    st.register(infos)


def _inotify(directory: str, mask: int) -> int:
    """An inotify descriptor that becomes readable at an event of ``mask`` in ``directory``."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        pytest.skip(f"inotify: {os.strerror(ctypes.get_errno())}")
    if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
        os.close(fd)
        raise AssertionError(f"cannot watch {directory!r}: {os.strerror(ctypes.get_errno())}")
    return fd


def _wait_readable(fd: int, what: str) -> None:
    try:
        assert select.select([fd], [], [], 120)[0], f"no {what} in two minutes"
    finally:
        os.close(fd)


IN_MOVED_FROM, IN_CREATE, IN_DELETE = 0x40, 0x100, 0x200


def _stop(proc: subprocess.Popen) -> bool:
    """SIGSTOP ``proc`` and wait until all its threads are stopped: True, or False when it had
    exited already (left for ``proc.wait()`` to reap)."""
    import signal
    os.kill(proc.pid, signal.SIGSTOP)
    info = os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
    return info.si_code == os.CLD_STOPPED


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGTERM, SIGINT ignored"])
@pytest.mark.parametrize("phase", ["moving", "removing"])
def test_a_collection_stopped_by_sigterm_or_ctrl_c_removes_its_trash(pure, settings, store_root, sig, phase):
    """SIGTERM while a collection moves dead trees into its trash, or removes them there, stops
    it as Ctrl-C does: exit 143 (130) with an `error:` line, and its trash removed before it
    exits (it was left to the next command to open the store).  The store verifies; dead paths
    it had not moved yet are invalid leftovers that the next collection removes.  With SIGINT
    ignored (a background job of a script) too: gc was then killed outright.

    The collection is stopped (SIGSTOP) once inotify saw it enter the phase, and the signal is
    sent only if, stopped, it is still in that phase (dead trees not moved yet; the trash not
    removed yet); then it continues.  A collection that got past the phase before the test could
    stop it (a loaded machine: the whole collection takes ~0.3 s) is let finish, and the test
    starts again with new dead trees."""
    import signal
    sigint = "ignored" if "ignored" in sig else "default"
    code, word = (130, "interrupted") if sig == "SIGINT" else (143, "terminated (SIGTERM)")

    with _open(settings) as st:
        kept = st.add_text("kept", b"kept")
        os.symlink(st.print_path(kept), os.path.join(st.state_dir, "gcroots", "kept"))
        kept_path = st.print_path(kept)
        kept = os.path.basename(kept_path)
    tmp = os.path.join(settings.real_store_dir, ".tmp")
    for attempt in range(10):
        with _open(settings) as st:
            _dead_trees(st, 600, 10)
        dead = set(os.listdir(settings.real_store_dir)) - {".tmp", kept}
        watch = _inotify(settings.real_store_dir, IN_MOVED_FROM) if phase == "moving" else _inotify(tmp, IN_CREATE)
        proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "gc", "-q"], env=pure_env(store_root),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
                                if sigint == "ignored" else None)
        trash = f"{tmp}/{proc.pid}-gc-trash"
        try:
            if phase == "moving":
                _wait_readable(watch, "dead path moved to the trash")
                in_phase = _stop(proc) and bool(dead & set(os.listdir(settings.real_store_dir)))
            else:
                _wait_readable(watch, "trash directory made")
                try:
                    removed = _inotify(trash, IN_DELETE)
                except AssertionError:  # (the trash is gone already)
                    in_phase = False
                else:
                    _wait_readable(removed, "tree removed from the trash")
                    in_phase = _stop(proc) and os.path.isdir(trash)
            if in_phase:
                proc.send_signal(signal.SIGINT if sig == "SIGINT" else signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
            proc.wait()
        if in_phase:
            break
        # too late: the collection ran to its end, and removed every dead tree
        assert proc.returncode == 0 and err.startswith("600 store paths deleted"), (proc.returncode, err)
        assert set(os.listdir(settings.real_store_dir)) == {".tmp", kept}
    else:
        pytest.fail(f"{attempt + 1} collections got past the {phase} phase before the test could stop them")
    assert proc.returncode == code and err == f"error: {word}\n", (proc.returncode, err)
    assert os.listdir(tmp) == [], "the trash (or another temporary) was left behind"
    pure("store", "verify", "--check-contents")
    assert valid(pure) == {kept_path}
    left = set(os.listdir(settings.real_store_dir)) - {".tmp", kept}
    assert len(left) < 600 and (phase == "moving" or not left)
    assert pure("gc").stderr.endswith(f", {len(left)} invalid leftovers removed\n" if left else " freed (0.00 MiB)\n")
    assert set(os.listdir(settings.real_store_dir)) == {".tmp", kept}


def test_a_collection_that_fails_half_way_removes_its_trash(pure, settings):
    """A dead path that cannot be moved aside (here: immutable) fails the collection with an
    error naming it; what was moved to the trash before is removed all the same (it was left
    for the next command to open the store), and the store verifies."""
    with _open(settings) as st:
        _dead_trees(st, 300, 2)
        stuck = sorted(n for n in os.listdir(settings.real_store_dir) if n != ".tmp")[150]
    real = os.path.join(settings.real_store_dir, stuck)
    if subprocess.run(["chattr", "+i", real], capture_output=True).returncode != 0:
        pytest.skip("this file system cannot make a directory immutable")
    try:
        r = pure("gc", check=False)
    finally:
        subprocess.run(["chattr", "-i", real], check=True)
    assert r.returncode == 1 and f"cannot move dead path {real!r}" in r.stderr, r.stderr
    tmp = os.path.join(settings.real_store_dir, ".tmp")
    assert os.listdir(tmp) == [], "the trash was left behind"
    pure("store", "verify", "--check-contents")
    assert valid(pure) == set()
    pure("gc")
    assert os.listdir(settings.real_store_dir) == [".tmp"]


def test_gc_removes_temporary_log_files_of_dead_writers(store_root):
    """A build SIGKILLed while it ran leaves its log's temporary file (<log>.tmp-<pid>-<n>):
    `pure gc` removes those of pids that are not running, and keeps a running writer's."""
    from conftest import run_pure
    run_pure("store", "ls", root=store_root)  # (creates the store)
    d = store_root / "pure" / "var" / "pure" / "log" / "ab"
    d.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = d / f"cdefghijklmnopqrstuvwxyz012345-x.drv.zst.tmp-{dead.pid}-140000"
    live = d / f"cdefghijklmnopqrstuvwxyz012345-y.drv.zst.tmp-{os.getpid()}-140001"
    done = d / "cdefghijklmnopqrstuvwxyz012345-z.drv.zst"
    for f in (stale, live, done):
        f.write_bytes(b"x")
    p = run_pure("gc", root=store_root)
    assert "1 temporary build log files of killed builds removed" in p.stderr
    assert not stale.exists() and live.exists() and done.exists()
    assert json.loads(run_pure("gc", "--json", root=store_root).stdout)["logTempsRemoved"] == 0


def test_gc_keeps_the_logs_of_derivations_whose_name_looks_like_a_temporary(store_root):
    """A finished log of a derivation named `backup.tmp-<n>-1` (a valid name) was taken for a
    temporary of a writer with pid <n>, and `pure gc` deleted it when no such process ran; only
    the temporaries a build log is written to (<log>.zst.tmp-<pid>-<n>) are candidates now."""
    from conftest import run_pure
    run_pure("store", "ls", root=store_root)  # (creates the store)
    d = store_root / "pure" / "var" / "pure" / "log" / "ab"
    d.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    logs = [d / f"cdefghijklmnopqrstuvwxyz012345-backup.tmp-{dead.pid}-1.drv.zst",
            d / f"cdefghijklmnopqrstuvwxyz012345-backup.tmp-{dead.pid}-1.drv.check-1.zst"]
    for f in logs:
        f.write_bytes(b"x")
    assert json.loads(run_pure("gc", "--json", root=store_root).stdout)["logTempsRemoved"] == 0
    assert all(f.exists() for f in logs)
