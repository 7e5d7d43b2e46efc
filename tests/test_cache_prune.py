"""pure cache prune: old paths leave a file:// cache, closures stay whole (the pruned cache
verifies clean and still substitutes what it kept), --keep and re-pushing keep paths, a dry
run touches nothing, and a prune waits for a push into the same directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, blocked_on_lock, pure_env, run_pure
from test_cache_support import PUB, SEC, make_path, open_store, start_server, stop_server

OLD = time.time() - 40 * 86400


def setup_cache(tmp_path):
    """lib ← app (app refers to lib), other (alone), twin (same contents as other, another name:
    the same NAR file), all pushed with listings, logs and provenance-less; returns names."""
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    root = tmp_path / "src"
    with open_store(root) as store:
        lib = make_path(store, "lib-1.0", {"": b"library\n" * 50})
        app = make_path(store, "app-2.0", {"bin/app": b"#!/bin/sh\nexec " + store.print_path(lib).encode() + b"\n"},
                        refs=[lib])
        other = make_path(store, "other-1.0", {"x": b"other\n"})
        twin = make_path(store, "twin-1.0", {"x": b"other\n"})
        names = {n: store.print_path(p) for n, p in (("lib", lib), ("app", app), ("other", other), ("twin", twin))}
    cache = tmp_path / "cache"
    run_pure("copy", "--to", f"file://{cache}?write-nar-listing=true", "--secret-key-file", key,
             *names.values(), root=root)
    return root, cache, names


def narinfo(cache, path: str):
    return cache / (os.path.basename(path)[:32] + ".narinfo")


def age(files, when=OLD):
    for f in files:
        os.utime(f, (when, when))


@contextlib.contextmanager
def immutable(path):
    """``path`` made immutable (``chattr +i``: not even root removes it) while the block runs;
    the test is skipped where the file system cannot."""
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode != 0:
        pytest.skip("chattr +i does not work here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


def prune(cache, *args, check=True):
    return run_pure("cache", "prune", cache, *args, check=check)


def test_old_paths_go_and_closures_stay(tmp_path):
    root, cache, n = setup_cache(tmp_path)
    age([*cache.glob("*.narinfo"), *cache.glob("nar/*")])
    age([narinfo(cache, n["app"]), narinfo(cache, n["twin"])], time.time())  # pushed recently
    before = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    dry = prune(cache, "--older-than", "30d", "--dry-run", "--json")
    plan = json.loads(dry.stdout)
    assert plan["dryRun"] and plan["removed"] == [n["other"]]
    assert plan["keptPaths"] == sorted((n["lib"], n["app"], n["twin"]), key=lambda p: p.rsplit("/", 1)[1])
    assert plan["kept"] == 3
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) == before
    r = prune(cache, "--older-than", "30d")
    assert r.stdout == f"removing '{n['other']}'\n"
    assert "removed 1 path (2 files" in r.stderr and "3 paths kept" in r.stderr
    # lib is old but app refers to it; other's NAR is twin's too, so only its narinfo and listing go
    assert not narinfo(cache, n["other"]).exists() and narinfo(cache, n["lib"]).exists()
    assert not (cache / (os.path.basename(n["other"])[:32] + ".ls")).exists()
    assert len(list(cache.glob("nar/*"))) == 3
    v = run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{cache}")
    assert v.stdout == "" and "checked 3 paths" in v.stderr  # exit status 0: nothing bad
    fresh = tmp_path / "fresh"
    run_pure("copy", "--from", f"file://{cache}", "--trusted-public-keys", PUB, n["app"], n["twin"], root=fresh)
    # once twin is old too, the shared NAR goes with it
    age([narinfo(cache, n["twin"])])
    r = prune(cache, "--older-than", "30d", "--json")
    out = json.loads(r.stdout)
    assert out["removed"] == [n["twin"]] and any(f.startswith("nar/") for f in out["files"])
    assert len(list(cache.glob("nar/*"))) == 2


def test_keep_and_pushing_again_keep_old_paths(tmp_path):
    root, cache, n = setup_cache(tmp_path)
    age([*cache.glob("*.narinfo"), *cache.glob("nar/*")])
    # pushing other again (the cache has it: nothing uploaded) marks it as recent
    run_pure("copy", "--to", f"file://{cache}", n["other"], root=root)
    assert narinfo(cache, n["other"]).stat().st_mtime > time.time() - 600
    # so does copying it from another cache (a mirror that finds it there already)
    assert narinfo(cache, n["twin"]).stat().st_mtime < time.time() - 86400
    src = tmp_path / "src-cache"
    run_pure("copy", "--to", f"file://{src}", n["twin"], root=root)
    run_pure("copy", "--from", f"file://{src}", "--to", f"file://{cache}", "--no-check-sigs", n["twin"])
    assert narinfo(cache, n["twin"]).stat().st_mtime > time.time() - 600
    link = tmp_path / "result"  # a result symlink (through a second link, with a slash) names its path
    link.symlink_to(n["app"])
    (tmp_path / "again").symlink_to(link)
    out = json.loads(prune(cache, "--older-than", "30d", "--keep", f"{tmp_path}/again/", "--json").stdout)
    assert out["removed"] == []
    age([narinfo(cache, n["twin"])])
    out = json.loads(prune(cache, "--older-than", "30d", "--keep", n["app"], "--json").stdout)
    assert sorted(out["removed"]) == [n["twin"]]
    assert narinfo(cache, n["other"]).exists() and narinfo(cache, n["lib"]).exists()
    # only --keep: everything outside those closures goes, however recent
    out = json.loads(prune(cache, "--keep", os.path.basename(n["lib"]), "--json").stdout)
    assert sorted(out["removed"]) == sorted([n["app"], n["other"]])
    assert [p.name for p in cache.glob("*.narinfo")] == [narinfo(cache, n["lib"]).name]


def test_a_reference_missing_before_the_prune_is_reported_as_data(tmp_path):
    """A kept path whose reference the cache already lacked: a warning naming both, and in
    --json a list of {path, reference} objects (not sentences)."""
    root, cache, n = setup_cache(tmp_path)
    narinfo(cache, n["lib"]).unlink()  # lost before the prune, by someone else
    r = prune(cache, "--keep", n["app"], "--dry-run")
    assert (f"warning: {n['app']} refers to {n['lib']}, which the cache lacks "
            "(it was missing before this prune)") in r.stderr
    out = json.loads(prune(cache, "--keep", n["app"], "--dry-run", "--json").stdout)
    assert out["missingReferences"] == [{"path": n["app"], "reference": n["lib"]}]
    assert sorted(out["removed"]) == sorted([n["other"], n["twin"]])


def test_temporary_files_of_killed_runs_go_once_an_hour_old(tmp_path):
    """What a push, copy or upload killed by SIGKILL left (``.tmp-…``) goes with the next prune
    (which holds the directory's lock); a recent one stays, as do other hidden files."""
    root, cache, n = setup_cache(tmp_path)
    old = [cache / "nar" / ".tmp-push-0123456789abcdef.nar", cache / ".tmp-k1x2y3", cache / "log" / ".tmp-upload-a"]
    (cache / "log").mkdir(exist_ok=True)
    for f in old:
        f.write_bytes(b"partial" * 100)
    age(old, time.time() - 2 * 3600)
    fresh = cache / "nar" / ".tmp-push-fedcba9876543210.nar"
    fresh.write_bytes(b"being written")
    other = cache / "nar" / ".keep-me"
    other.write_bytes(b"not ours")
    age([other], OLD)
    out = json.loads(prune(cache, "--older-than", "30d", "--json").stdout)
    assert out["removed"] == []
    assert sorted(out["files"]) == sorted(f.relative_to(cache).as_posix() for f in old)
    assert out["freedBytes"] == 3 * 700
    assert not any(f.exists() for f in old) and fresh.exists() and other.exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a read-only bind mount")
def test_a_read_only_cache_is_refused_before_anything_is_said_removed(tmp_path):
    root, cache, n = setup_cache(tmp_path)
    age([*cache.glob("*.narinfo"), *cache.glob("nar/*")])
    before = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))
    pure = f"{shlex.quote(sys.executable)} -m purestore.cli.main"
    script = (f"mount --bind {cache} {cache} && mount -o remount,ro,bind {cache} && "
              f"{pure} cache prune {cache} --older-than 30d > {tmp_path}/out 2> {tmp_path}/err; echo $? > {tmp_path}/rc")
    subprocess.run(["unshare", "-m", "sh", "-c", script], env=pure_env(root), check=True, timeout=60)
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", err
    assert f"error: cannot prune '{cache}': Read-only file system" in err and "Traceback" not in err, err
    assert (tmp_path / "out").read_text() == ""  # no "removing ..." for what stays
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) == before


def test_a_narinfo_that_cannot_be_removed_keeps_its_path_and_every_other_file(tmp_path):
    """One narinfo refuses removal (immutable): that path is kept and not reported removed, and
    no NAR, listing or log goes in this run (the narinfo left may need them)."""
    root, cache, n = setup_cache(tmp_path)
    age([*cache.glob("*.narinfo"), *cache.glob("nar/*")])
    stuck = narinfo(cache, n["other"])
    nars = sorted(cache.glob("nar/*"))
    with immutable(stuck):
        r = prune(cache, "--keep", n["app"], check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: cannot remove '{stuck.name}' from '{cache}': Operation not permitted" in r.stderr
    assert "the other files of the removed paths were kept" in r.stderr
    assert r.stdout == f"removing '{n['twin']}'\n"  # other stays: not said removed
    assert stuck.exists() and not narinfo(cache, n["twin"]).exists()
    assert sorted(cache.glob("nar/*")) == nars
    v = run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{cache}")
    assert v.stdout == ""


def test_a_narinfo_that_cannot_be_removed_keeps_its_closure(tmp_path):
    """The narinfo of a referrer refuses removal: its references' narinfos stay too (the cache
    never holds a narinfo whose references are gone), and are reported kept."""
    root, cache, n = setup_cache(tmp_path)
    age([*cache.glob("*.narinfo"), *cache.glob("nar/*")])
    stuck = narinfo(cache, n["app"])
    with immutable(stuck):
        r = prune(cache, "--older-than", "1d", "--json", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert sorted(out["keptPaths"]) == sorted([n["app"], n["lib"]]) and n["lib"] not in out["removed"]
    assert narinfo(cache, n["lib"]).exists() and not narinfo(cache, n["other"]).exists()
    v = run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{cache}")
    assert v.stdout == "", v.stdout


def test_narinfos_go_referrers_first(tmp_path):
    """Removed in an order where each narinfo goes before those of its references: a prune
    stopped half way, or a reader meanwhile, never meets a narinfo whose references are gone."""
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    root = tmp_path / "src"
    with open_store(root) as store:
        chain = [make_path(store, "p0", {"": b"p0\n"})]
        for i in range(1, 12):  # p_i refers to p_{i-1} and, every third, to p0
            refs = [chain[-1]] + ([chain[0]] if i % 3 == 0 else [])
            chain.append(make_path(store, f"p{i}", {"": f"p{i}\n".encode()}, refs=refs))
        top = store.print_path(chain[-1])
        refs_of = {p.hash_part: [r.hash_part for r in store.query_path_info(p).references if r != p] for p in chain}
    cache = tmp_path / "cache"
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", key, top, root=root)
    age(cache.glob("*.narinfo"))
    out = json.loads(prune(cache, "--older-than", "1d", "--dry-run", "--json").stdout)
    order = [f[: -len(".narinfo")] for f in out["files"] if f.endswith(".narinfo")]
    assert sorted(order) == sorted(refs_of)
    for h, refs in refs_of.items():
        for r in refs:
            assert order.index(h) < order.index(r), (h, r)


def test_bad_input_is_refused_and_changes_nothing(tmp_path):
    _root, cache, n = setup_cache(tmp_path)
    (cache / "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz.narinfo").write_text("garbage\n")
    before = sorted(p.name for p in cache.rglob("*"))
    gone = "/pure/store/" + "0" * 32 + "-gone"
    elsewhere = n["other"].replace("/pure/store/", "/nix/store/")
    for args, msg in ((["--older-than", "soon"], "cannot read the age 'soon'"),
                      ([], "say what to keep"),
                      (["--keep", gone], f"--keep {gone!r}: the cache has no such path"),
                      (["--keep", elsewhere], f"--keep {elsewhere!r} is not in the cache's store dir '/pure/store'")):
        r = prune(cache, *args, check=False)
        assert r.returncode != 0 and f"error: {msg}" in r.stderr, r.stderr
    assert sorted(p.name for p in cache.rglob("*")) == before
    r = prune(tmp_path / "nowhere", "--older-than", "1d", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr  # a failure, not bad usage
    (tmp_path / "afile").write_text("")
    r = prune(tmp_path / "afile", "--older-than", "1d", check=False)
    assert r.returncode == 1 and "is not a directory" in r.stderr, r.stderr
    r = run_pure("cache", "prune", "http://127.0.0.1:1/", "--older-than", "1d", check=False)
    assert r.returncode != 0 and "only a local cache directory" in r.stderr
    # an unreadable narinfo is kept and reported, and so is the NAR its URL line names; the
    # rest is pruned
    other_nar = next(ln[5:] for ln in narinfo(cache, n["other"]).read_text().splitlines() if ln.startswith("URL: "))
    (cache / "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz.narinfo").write_text(f"garbage\nURL: {other_nar}\n")
    age([*cache.glob("*.narinfo"), *cache.glob("nar/*")])
    r = prune(cache, "--older-than", "30d")
    assert "warning: kept a narinfo that cannot be read: zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz.narinfo" in r.stderr
    assert [p.name for p in cache.glob("*.narinfo")] == ["zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz.narinfo"]
    assert [f"nar/{p.name}" for p in cache.glob("nar/*")] == [other_nar]


def test_an_age_without_unit_or_nothing_to_keep_is_a_usage_error(tmp_path):
    """Status 2, whatever the directory holds (it is not read)."""
    for args, msg in ((["--older-than", "30"], "cannot read the age '30': expected a number with a unit"),
                      ([], "say what to keep")):
        for where in (tmp_path, tmp_path / "nowhere"):
            r = prune(where, *args, check=False)
            assert r.returncode == 2 and r.stderr.startswith(f"error: {msg}"), r.stderr


def test_a_nix_cache_info_that_cannot_be_read_is_named(tmp_path):
    (tmp_path / "c" / "nix-cache-info").mkdir(parents=True)
    r = prune(tmp_path / "c", "--older-than", "1d", check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"error: cannot read '{tmp_path / 'c' / 'nix-cache-info'}': Is a directory")


def test_a_prune_waits_for_a_push_into_the_directory(tmp_path):
    _root, cache, n = setup_cache(tmp_path)
    age([*cache.glob("*.narinfo")])
    fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # as a running `pure copy --to` holds it
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "cache", "prune", str(cache),
                             "--older-than", "30d"], env=pure_env(None), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        line = proc.stderr.readline()
        assert "waiting for the push into" in line, line
        time.sleep(0.3)
        assert proc.poll() is None and len(list(cache.glob("*.narinfo"))) == 4  # nothing removed yet
    finally:
        os.close(fd)
    out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    assert proc.returncode == 0, err
    assert not list(cache.glob("*.narinfo"))


def test_serving_or_fetching_a_path_keeps_it(tmp_path):
    _root, cache, n = setup_cache(tmp_path)
    age([*cache.glob("*.narinfo"), *cache.glob("nar/*")])
    proc, url = start_server(cache)
    try:  # fetched through `pure cache serve`
        run_pure("copy", "--from", url, "--trusted-public-keys", PUB, n["other"], root=tmp_path / "f1")
    finally:
        stop_server(proc)
    # fetched straight from the directory
    run_pure("copy", "--from", f"file://{cache}", "--trusted-public-keys", PUB, n["twin"], root=tmp_path / "f2")
    # only read (path-info, ls, verify): not a use
    run_pure("cache", "path-info", f"file://{cache}", n["app"])
    out = json.loads(prune(cache, "--older-than", "30d", "--json").stdout)
    assert sorted(out["removed"]) == sorted([n["app"], n["lib"]])


def test_a_nar_goes_only_once_it_is_old_too(tmp_path):
    """A push that finds a NAR present marks it used instead of uploading it; a prune must not
    remove it under that push's narinfo, so an unused NAR waits until it is old as well."""
    _root, cache, n = setup_cache(tmp_path)
    age([*cache.glob("*.narinfo")])  # the NAR files stay recent
    out = json.loads(prune(cache, "--older-than", "30d", "--json").stdout)
    assert len(out["removed"]) == 4 and not [f for f in out["files"] if f.startswith("nar/")]
    assert len(list(cache.glob("nar/*"))) == 3
    age([*cache.glob("nar/*")])
    out = json.loads(prune(cache, "--older-than", "30d", "--json").stdout)
    assert out["removed"] == [] and len([f for f in out["files"] if f.startswith("nar/")]) == 3
    assert not list(cache.glob("nar/*"))


def test_an_upload_through_cache_serve_waits_for_a_prune(tmp_path):
    """`pure cache serve` renames each upload into place under the directory's shared lock: while
    a prune holds it (exclusively, from its plan to its last removal), the file does not appear,
    so a prune never removes a NAR that an upload put back after it planned."""
    import httpx
    import threading

    _root, cache, _n = setup_cache(tmp_path)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    proc, url = start_server(cache, token_file=token)
    fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running prune holds it
        answer = {}

        def upload():
            answer["status"] = httpx.put(url + "nar/new.nar", content=b"nar bytes",
                                         headers={"Authorization": "Bearer s3cret"}, timeout=30).status_code
        t = threading.Thread(target=upload)
        t.start()
        # the server waits for the lock (seen in /proc/locks: after a 1 s sleep, the request
        # may not have reached it yet on a loaded machine, and nothing was shown)
        assert blocked_on_lock(proc, cache), "the upload did not wait for the directory's lock"
        assert t.is_alive() and not (cache / "nar" / "new.nar").exists()
        fcntl.flock(fd, fcntl.LOCK_UN)
        t.join(30)
        assert answer["status"] == 201 and (cache / "nar" / "new.nar").read_bytes() == b"nar bytes"
    finally:
        os.close(fd)
        stop_server(proc)


def test_old_logs_no_narinfo_names_go_with_an_age(tmp_path):
    """A log whose path never got a narinfo (a push that failed after uploading it) goes once
    older than the age, as an unused NAR file does; a recent one stays, and so does every log
    in a prune without an age (--keep only); the log of a kept path stays however old."""
    from purestore.formats.store_path import StorePath
    from test_cache_support import keep_build_log

    root, cache = tmp_path / "src", tmp_path / "cache"
    drv = StorePath("1" * 32, "thing.drv")
    with open_store(root) as store:
        out = store.print_path(make_path(store, "thing", {"": b"built\n"}, deriver=drv))
        keep_build_log(store, drv, b"the build's log\n")
    run_pure("copy", "--to", f"file://{cache}", out, root=root)
    own = cache / "log" / drv.base_name
    orphan = cache / "log" / ("z" * 32 + "-orphan.drv")
    orphan.write_text("a log\n")
    recent = cache / "log" / ("y" * 32 + "-recent.drv")
    recent.write_text("a log\n")
    age([*cache.glob("nar/*"), own, orphan])
    res = json.loads(prune(cache, "--keep", out, "--json").stdout)
    assert res["files"] == [] and orphan.exists()
    res = json.loads(prune(cache, "--older-than", "30d", "--json").stdout)  # the narinfo is recent
    assert res["removed"] == [] and res["files"] == ["log/" + orphan.name], res
    assert not orphan.exists() and recent.exists() and own.exists()


def test_a_bucket_prune_deletes_referrers_in_earlier_batches_and_spares_a_closure():
    """S3 deletes a batch in no order: a referrer's narinfo goes in an earlier batch than its
    references'; one S3 refuses to delete keeps its references' narinfos (not sent at all)."""
    import trio

    from purestore.cache.prune import PrunePlan
    from purestore.cache.prune_bucket import apply_prune_bucket
    from purestore.formats.store_path import StorePath

    def sp(c, name):
        return StorePath(c * 32, name)
    top, mid, leaf, alone = sp("a", "top"), sp("b", "mid"), sp("c", "leaf"), sp("d", "alone")
    plan = PrunePlan("/pure/store", removed=[top, mid, leaf, alone],
                     files=[f"{p.hash_part}.narinfo" for p in (top, alone, mid, leaf)] + ["nar/x.nar"],
                     gone_refs={top.hash_part: [mid.hash_part], mid.hash_part: [leaf.hash_part],
                                leaf.hash_part: [], alone.hash_part: []})

    class Bucket:
        url = "s3://b"

        def __init__(self, refuse):
            self.batches, self.refuse = [], refuse

        async def delete_files(self, names):
            self.batches.append(list(names))
            return [f"cannot remove {n!r} from 's3://b': S3 AccessDenied: no" for n in names if n in self.refuse]

        async def abort_upload(self, name, uid):
            return None

    b = Bucket(set())
    errors = []
    trio.run(apply_prune_bucket, b, plan, errors.append)
    order = [n for batch in b.batches for n in batch]
    assert order.index(f"{top.hash_part}.narinfo") < order.index(f"{mid.hash_part}.narinfo") < \
        order.index(f"{leaf.hash_part}.narinfo")
    assert all(len({f"{x.hash_part}.narinfo" for x in (top, mid)} & set(batch)) < 2 for batch in b.batches)
    assert errors == []

    plan.removed, plan.kept = [top, mid, leaf, alone], []
    b = Bucket({f"{mid.hash_part}.narinfo"})
    trio.run(apply_prune_bucket, b, plan, errors.append)
    sent = {n for batch in b.batches for n in batch}
    assert f"{leaf.hash_part}.narinfo" not in sent and "nar/x.nar" not in sent
    assert plan.removed == [top, alone] and plan.kept == [mid, leaf]
