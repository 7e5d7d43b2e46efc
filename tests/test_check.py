"""Reproducibility checks: --check and --rounds rebuild and compare, naming the differing files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from purestore.build.check import describe, diff_trees
from test_build import build, expr, needs_sandbox, open_store  # noqa: F401 - fixtures

NONDET = '''\
det = sh("det", "$B mkdir $out; echo stable > $out/same; $B mkdir $out/sub; echo x > $out/sub/f")
rand = sh("rand", "$B mkdir $out; echo stable > $out/same; $B head -c 16 /dev/urandom > $out/noise")
clock = sh("clock", "$B mkdir $out; echo stable > $out/same; $B date > $out/stamp; $B cat /proc/uptime >> $out/stamp")
'''


@needs_sandbox
def test_check_passes_on_a_deterministic_derivation(pure, expr, tmp_path, store_root):
    f = expr(NONDET)
    build(pure, tmp_path, f, "-A", "det")
    p = build(pure, tmp_path, f, "-A", "det", "--check")
    assert p.returncode == 0 and "checking" in p.stderr
    st = open_store(store_root)
    try:
        from purestore.store import events
        c = events.query_checks(st)
        assert len(c) == 1 and c[0]["reproducible"] and c[0]["kind"] == "check" and c[0]["differences"] == []
    finally:
        st.close()


@needs_sandbox
def test_check_detects_random_bytes_and_names_the_file(pure, expr, tmp_path, store_root):
    f = expr(NONDET)
    out = build(pure, tmp_path, f, "-A", "rand").stdout.strip()
    p = build(pure, tmp_path, f, "-A", "rand", "--check", check=False)
    assert p.returncode == 104, p.stderr
    assert "changed noise: 16 -> 16 bytes, first difference at byte" in p.stderr
    assert "same" not in p.stderr.replace("stable", "")  # the stable file is not reported
    kept = f"{store_root}{out}.check"
    assert Path(kept, "noise").stat().st_size == 16 and kept in p.stderr
    st = open_store(store_root)
    try:
        from purestore.store import events
        c = events.query_checks(st)[0]
        assert not c["reproducible"] and [d["file"] for d in c["differences"]] == ["noise"]
        # the registered output is untouched
        assert st.verify(check_contents=True).ok
    finally:
        st.close()


@needs_sandbox
def test_a_check_keeps_its_result_under_a_lock_another_checker_waits_for(pure, expr, tmp_path, store_root):
    """Two `--check`s of one derivation at once each removed <output>.check and renamed their
    result there: one removed the other's while it was being renamed or diffed (a
    FileNotFoundError or 'Directory not empty' traceback, seen in 5 of 24 concurrent checks).
    Keeping the result takes the path lock named by <output>.check; a check that finds it held
    says so and waits."""
    import subprocess
    import sys

    from conftest import pure_env
    from purestore.store.lock import PathLocks
    f = expr(NONDET)
    out = build(pure, tmp_path, f, "-A", "rand").stdout.strip()
    kept = f"{store_root}{out}.check"
    locks = PathLocks(str(store_root / "pure" / "var" / "pure" / "locks"))
    locks.acquire(os.path.basename(kept))  # as another check keeping its result holds it
    try:
        p = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "build", str(f), "-A", "rand",
                              "--check", "--no-link"], cwd=tmp_path, env=pure_env(store_root),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        for line in p.stderr:  # (until it says it waits; without the lock it ends without a word)
            seen.append(line)
            if "waiting for another process to finish checking" in line:
                break
        assert f"waiting for another process to finish checking '{out}'" in "".join(seen), "".join(seen)
        assert not os.path.exists(kept)  # nothing kept while the other holds the lock
    finally:
        locks.release(os.path.basename(kept))
    rest = p.communicate(timeout=120)[1]
    assert p.returncode == 104 and "Traceback" not in rest, rest
    assert Path(kept, "noise").stat().st_size == 16


@needs_sandbox
def test_rounds_detects_a_timestamp(pure, expr, tmp_path, store_root):
    f = expr(NONDET)
    p = build(pure, tmp_path, f, "-A", "clock", "--rounds", "2", check=False)
    assert p.returncode == 104 and "changed stamp" in p.stderr
    p = build(pure, tmp_path, f, "-A", "det", "--rounds", "3")
    assert p.returncode == 0
    # each build says which round it is
    for r in (1, 2, 3):
        assert f"building (round {r} of 3) '/pure/store/" in p.stderr
    st = open_store(store_root)
    try:
        from purestore.store import events
        kinds = [(c["kind"], c["reproducible"]) for c in events.query_checks(st)]
        assert ("rounds", False) in kinds and ("rounds", True) in kinds
        rounds = sorted(b["round"] for b in events.query_builds(st) if b["name"] == "det")
        assert rounds == [1, 2, 3]
    finally:
        st.close()


@needs_sandbox
def test_rounds_on_valid_outputs_says_nothing_was_built(pure, expr, tmp_path, store_root):
    """--rounds N repeats only the builds that happen (as in Nix): outputs valid already are not
    built, and stderr says so and how to rebuild them (it said nothing); --json: the plan's `valid`."""
    f = expr(NONDET)
    build(pure, tmp_path, f, "-A", "det")
    p = build(pure, tmp_path, f, "-A", "det", "--rounds", "2")
    assert "nothing built: the outputs are valid already" in p.stderr
    assert "--check --rounds 2 rebuilds valid outputs" in p.stderr
    p = build(pure, tmp_path, f, "-A", "det", "--rounds", "2", "--json")
    [plan] = [e for e in map(json.loads, p.stdout.splitlines()) if e["type"] == "plan"]
    assert plan["willBuild"] == [] and len(plan["valid"]) == 1 and plan["valid"][0].endswith("-det.drv")
    # one derivation built, another valid: the valid one is named
    g = expr(NONDET + 'both = [det, sh("fresh", "$B mkdir $out")]\n', name="g.py")
    p = build(pure, tmp_path, g, "-A", "both", "--rounds", "2")
    assert "1 requested derivation not built (/pure/store/" in p.stderr and "-det.drv)" in p.stderr
    st = open_store(store_root)
    try:
        from purestore.store import events
        builds = sorted((b["name"], b["kind"], b["round"]) for b in events.query_builds(st))
        assert builds == [("det", "build", 1), ("fresh", "build", 1), ("fresh", "round", 2)]
    finally:
        st.close()


@needs_sandbox
def test_check_of_outputs_not_valid_says_they_are_built_not_checked(pure, expr, tmp_path, store_root):
    """--check of a derivation whose outputs are not valid builds it once, with nothing to compare
    with: stderr says so (it said nothing, and exited 0 as if a check had passed)."""
    f = expr(NONDET)
    p = build(pure, tmp_path, f, "-A", "det", "--check")
    assert p.returncode == 0
    assert "not checking 1 requested derivation (/pure/store/" in p.stderr
    assert "-det.drv): its outputs are not valid, so there is nothing to compare with" in p.stderr
    p = build(pure, tmp_path, f, "-A", "det", "--check")  # valid now: checked, and nothing said
    assert "checking '/pure/store/" in p.stderr and "not checking" not in p.stderr


@needs_sandbox
def test_check_with_rounds_makes_n_builds_in_all(pure, expr, tmp_path, store_root):
    """--check --rounds 3: the valid outputs and two rebuilds, each compared (it rebuilt once).
    The valid outputs are round 1, so the rebuilds are rounds 2 and 3 in the text, in the --json
    `start` events and in the database alike (the events and the database said 1 and 2)."""
    f = expr(NONDET)
    build(pure, tmp_path, f, "-A", "det")
    p = build(pure, tmp_path, f, "-A", "det", "--check", "--rounds", "3")
    assert "checking (round 2 of 3) '" in p.stderr and "checking (round 3 of 3) '" in p.stderr
    assert "round 1 of 3" not in p.stderr
    p = build(pure, tmp_path, f, "-A", "det", "--check", "--rounds", "3", "--json")
    starts = [e for e in map(json.loads, p.stdout.splitlines()) if e["type"] == "start"]
    assert [(e["kind"], e["round"], e["rounds"]) for e in starts] == [("check", 2, 3), ("check", 3, 3)]
    p = build(pure, tmp_path, f, "-A", "det", "--check")
    assert "checking '/pure/store/" in p.stderr and "round" not in p.stderr
    st = open_store(store_root)
    try:
        from purestore.store import events
        rounds = sorted((b["kind"], b["round"]) for b in events.query_builds(st) if b["name"] == "det")
        assert rounds == [("build", 1), ("check", 2), ("check", 2), ("check", 2), ("check", 3), ("check", 3)]
        checks = events.query_checks(st)
        assert sorted((c["kind"], c["rounds"], c["reproducible"]) for c in checks) == \
            [("check", 2, True)] + [("check", 3, True)] * 4
    finally:
        st.close()


def test_diff_trees_reports_added_removed_changed_and_type_changes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "same").write_text("x")
    (a / "gone").write_text("old")
    (b / "new").write_text("fresh")
    (a / "f").write_bytes(b"abcdef")
    (b / "f").write_bytes(b"abcXefg")
    (a / "t").write_text("file")
    (b / "t").mkdir()
    os.symlink("one", a / "l")
    os.symlink("two", b / "l")
    d = {x["file"]: x for x in diff_trees(str(a), str(b))}
    assert set(d) == {"gone", "new", "f", "t", "l"}
    assert d["gone"]["change"] == "removed" and d["new"]["change"] == "added"
    assert d["f"]["first_difference"] == 3 and d["f"]["old_size"] == 6 and d["f"]["new_size"] == 7
    assert d["t"] == {"file": "t", "change": "type", "old_type": "regular", "new_type": "directory"}
    assert "symlink target 'one' -> 'two'" in describe(d["l"])
    assert diff_trees(str(a), str(a)) == []


@needs_sandbox
def test_check_json_event_names_the_differences_in_camel_case(pure, expr, tmp_path):
    """The `check` event of `build --json` said 'first_difference', 'old_size', 'new_size'."""
    f = expr(NONDET)
    build(pure, tmp_path, f, "-A", "rand")
    p = build(pure, tmp_path, f, "-A", "rand", "--check", "--json", check=False)
    assert p.returncode == 104, p.stderr
    [ev] = [e for e in map(json.loads, p.stdout.splitlines()) if e["type"] == "check"]
    [d] = ev["differences"]
    assert (d["file"], d["oldSize"], d["newSize"]) == ("noise", 16, 16) and "firstDifference" in d
    assert not [k for k in d if "_" in k]


@needs_sandbox
def test_several_differing_rounds_keep_the_first_and_say_so(pure, expr, tmp_path, store_root):
    """--check --rounds 3, both rebuilds differing: each said "the new result is kept at
    X.check", but the second replaced the first, whose message (and hash) no longer held. The
    first is kept; the second says it is not, and its event's `kept` is null."""
    f = expr(NONDET)
    out = build(pure, tmp_path, f, "-A", "rand").stdout.strip()
    p = build(pure, tmp_path, f, "-A", "rand", "--check", "--rounds", "3", "--json", check=False)
    assert p.returncode == 104, p.stderr
    kept = f"{store_root}{out}.check"
    msgs = [line for line in p.stderr.splitlines() if " differs (check): " in line]
    assert len(msgs) == 2
    # one error that counts them, each difference an item (not an error: line and a loose one)
    assert "error: 2 outputs differ:\n- output 'out' of " in p.stderr, p.stderr
    assert sum(line.startswith("- output 'out' of ") for line in p.stderr.splitlines()) == 2
    assert msgs[0].endswith(f"now; the new result is kept at {kept}")
    assert msgs[1].endswith(f"now; the new result is not kept: the first result that differed is kept at {kept}")
    first_hash = msgs[0].split(" before, ")[1].split(" now;")[0]
    got = pure("hash", "path", kept).stdout.strip()  # what is kept is the first that differed
    checks = [json.loads(line) for line in p.stdout.splitlines() if '"check"' in line]
    checks = [c for c in checks if c["type"] == "check"]
    assert [c["differences"][0]["kept"] for c in checks] == [kept, None]
    assert got == first_hash


@needs_sandbox
def test_a_rebuild_keeps_its_log_apart_from_the_builds(pure, expr, tmp_path, store_root):
    """The log of the build whose outputs are valid stays what `pure log` shows: a --check or
    --rounds rebuild writes its own (….drv.check-2.zst, ….drv.round-2.zst: round 2 both); it replaced it."""
    f = expr('noisy = sh("noisy", "$B head -c 8 /dev/urandom | $B od -An -tx1; $B mkdir $out")\n')
    out = build(pure, tmp_path, f, "-A", "noisy").stdout.strip()
    first = pure("log", out).stdout
    assert first.strip()
    p = build(pure, tmp_path, f, "-A", "noisy", "--check")
    assert p.returncode == 0
    assert pure("log", out).stdout == first
    drv = pure("store", "path-info", "--json", out).stdout
    base = os.path.basename(json.loads(drv)[0]["deriver"])
    logs = store_root / "pure" / "var" / "pure" / "log" / base[:2]
    assert sorted(n[len(base) - 2:] for n in os.listdir(logs) if n.startswith(base[2:])) == \
        [".check-2.zst", ".zst"]
    g = expr('again = sh("again", "$B head -c 8 /dev/urandom | $B od -An -tx1; $B mkdir $out")\n', name="g.py")
    out = build(pure, tmp_path, g, "-A", "again", "--rounds", "2").stdout.strip()
    base = os.path.basename(json.loads(pure("store", "path-info", "--json", out).stdout)[0]["deriver"])
    names = os.listdir(store_root / "pure" / "var" / "pure" / "log" / base[:2])
    assert sorted(n[len(base) - 2:] for n in names if n.startswith(base[2:])) == [".round-2.zst", ".zst"]
