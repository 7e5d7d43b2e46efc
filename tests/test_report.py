"""`pure report`: the hermeticity figures, checked against a known sequence of recorded events.

The events are recorded through the builder's own recording API (store/events.py) into the real
SQLite database; `pure report` then runs as a separate process and reads them back.
"""

import json

import pytest

from purestore.formats.store_path import StorePath
from purestore.store import events
from purestore.store.local import LocalStore

A = "/pure/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a.drv"
B = "/pure/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b.drv"
F = "/pure/store/ffffffffffffffffffffffffffffffff-src.tar.gz.drv"
N = "/pure/store/nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn-net.drv"
X = "/pure/store/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-c.drv"
C_OUT = "/pure/store/cccccccccccccccccccccccccccccccc-c"
Y = "/pure/store/yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy-h.drv"
H = "/pure/store/hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh-h"


def build(store, drv, status, *, fod=False, network=False, kind="build", round=1):
    eid = events.record_build_start(store, drv, drv.rsplit("-", 1)[-1], fixed_output=fod, network=network,
                                    kind=kind, round=round, start=1000.0)
    events.record_build_finish(store, eid, status, finish=1005.0)


@pytest.fixture
def recorded(settings):
    with LocalStore.open(settings, durable=False) as store:
        build(store, A, "built")
        build(store, F, "built", fod=True, network=True)
        build(store, B, "failed")
        build(store, A, "built", kind="check", round=2)            # a --check re-run: not a build
        events.record_check(store, A, kind="check", rounds=2, reproducible=True)
        events.record_check(store, B, kind="rounds", rounds=3, reproducible=False,
                            differences=[{"output": "out", "file": "bin/b", "change": "contents"}])
        events.record_check(store, B, kind="rounds", rounds=2, reproducible=True)
        # the cache hit rate counts derivations: two outputs of X (one fetched twice) are one,
        # a .drv file and a source (no deriver) none; H, recorded without its deriver (as before
        # the column), counts by the derivation the store knows for it
        events.record_substitution(store, C_OUT, "file:///c", 100, drv=X)
        events.record_substitution(store, C_OUT + "-dev", "file:///c", 50, drv=X)
        events.record_substitution(store, C_OUT, "file:///c", 100, drv=X)
        events.record_substitution(store, X, "file:///c", 1)
        events.record_substitution(store, "/pure/store/gggggggggggggggggggggggggggggggg-g", "file:///c", 10)
        events.record_substitution(store, H, "file:///c", 5)
        store.register_derivation_outputs(StorePath.from_base_name(Y.rsplit("/", 1)[1]),
                                          {"out": StorePath.from_base_name(H.rsplit("/", 1)[1])})
        events.record_sandbox_refusal(store, B, "output is world-writable")


def test_report_json_figures_match_the_recorded_sequence(pure, recorded):
    r = json.loads(pure("report", "--json").stdout)
    assert r["builds"] == {"total": 3, "byStatus": {"built": 2, "failed": 1}, "fixedOutput": 1}
    n = r["builtWithoutNetwork"]
    assert (n["withoutNetwork"], n["finished"]) == (2, 3)
    assert n["share"] == pytest.approx(2 / 3)
    assert n["nonFixedOutputWithNetwork"] == []
    assert r["fixedOutputPinned"]["share"] == 1.0
    assert r["fixedOutputPinned"]["derivations"] == [F]
    rp = r["reproducibility"]
    assert (rp["reproducible"], rp["runs"]) == (2, 3) and rp["rate"] == pytest.approx(2 / 3)
    assert [f["drv"] for f in rp["failing"]] == [B]
    assert rp["failing"][0]["differences"][0]["file"] == "bin/b"
    c = r["cache"]
    assert (c["substituted"], c["built"], c["substitutedPaths"], c["substitutedBytes"]) == (2, 2, 5, 166)
    assert c["hitRate"] == pytest.approx(2 / 4)
    assert r["sandboxRefusals"]["count"] == 1
    assert r["sandboxRefusals"]["refusals"][0]["what"] == "output is world-writable"


def test_report_text_is_readable(pure, recorded):
    out = pure("report").stdout
    assert "built without network:           66.7% (2 of 3)" in out
    assert "reproducible (--check/--rounds): 66.7% (2 of 3 runs)" in out
    assert f"! not reproducible: {B}" in out
    assert "cache hit rate:                  50.0% (2 of 4 derivations substituted, 2 built)" in out
    assert "sandbox refusals:                1" in out


def test_a_networked_build_that_is_not_fixed_output_is_flagged(pure, settings):
    with LocalStore.open(settings, durable=False) as store:
        build(store, N, "built", network=True)
    r = json.loads(pure("report", "--json").stdout)
    assert r["builtWithoutNetwork"]["nonFixedOutputWithNetwork"] == [N]
    assert r["fixedOutputPinned"]["share"] == 0.0
    assert "! had network but is not fixed-output" in pure("report").stdout


def test_empty_store_reports_n_a_not_100_percent(pure):
    r = json.loads(pure("report", "--json").stdout)
    assert r["builds"]["total"] == 0
    assert r["builtWithoutNetwork"]["share"] is None and r["cache"]["hitRate"] is None
    assert "n/a" in pure("report").stdout


def test_report_json_keys_are_camel_case_as_every_json_of_pure(pure, recorded):
    """README: every --json has camelCase keys; report --json had 'by_status', 'hit_rate'..."""
    def keys(o):
        if isinstance(o, dict):
            for k, v in o.items():
                yield k
                yield from keys(v)
        elif isinstance(o, list):
            for v in o:
                yield from keys(v)
    r = json.loads(pure("report", "--json").stdout)
    assert [k for k in keys(r) if "_" in k] == []
    assert r["builds"]["byStatus"] == {"built": 2, "failed": 1}


def test_since_takes_seconds_or_a_duration_with_a_unit(pure, recorded):
    """--since 1d: the builds recorded at 1000.0 (1970) are left out, the checks and
    substitutions of now are in; a window reaching back before 1970 takes everything."""
    r = json.loads(pure("report", "--json", "--since", "1d").stdout)
    assert r["builds"]["total"] == 0 and r["cache"]["substituted"] == 2
    r2 = json.loads(pure("report", "--json", "--since", "86400").stdout)   # the same in seconds
    assert (r2["builds"]["total"], r2["cache"]["substituted"]) == (0, 2)
    assert r2["since"] == pytest.approx(r["since"], abs=60)
    r = json.loads(pure("report", "--json", "--since", "3000w").stdout)
    assert r["builds"]["total"] == 3 and r["since"] == 0.0
    assert pure("report", "--since", "1.5h").stdout.startswith("since ")


@pytest.mark.parametrize("value", ["-5", "-0.5", "nan", "inf", "1e30", "5x", "", "d"])
def test_since_refuses_a_negative_or_garbage_duration(pure, value):
    """`--since -5` was taken (a window in the future: an empty report), `nan`/`inf`/`1e30`
    ended in a traceback: each is an error naming the option and what it expects."""
    p = pure("report", "--since", value, check=False)
    assert p.returncode == 2 and p.stdout == ""
    first = p.stderr.splitlines()[0]
    assert first.startswith("error: argument --since: expected a duration: seconds (a number >= 0)")
    assert first.endswith(f"not {value!r}")


def test_a_recording_process_is_told_from_a_later_one_with_its_pid():
    """What tells an abandoned build from a running one: the recorded process's identity (boot,
    start time, pid namespace), not its pid alone, which a later process may be given."""
    import subprocess
    p = subprocess.Popen(["sleep", "60"])
    try:
        ident = events.process_identity(p.pid)
        assert ident is not None and events.process_running(p.pid, ident) is True
        boot, ticks, ns = ident.split(" ")
        assert events.process_running(p.pid, f"{boot} {int(ticks) + 1} {ns}") is False  # a reused pid
        assert events.process_running(p.pid, f"{'0' * len(boot)} {ticks} {ns}") is False  # another boot
        assert events.process_running(p.pid, f"{boot} {ticks} pid:[1]") is None  # another namespace
        p.kill()
        import os
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # a zombie until reaped: it has ended
        assert events.process_running(p.pid, ident) is False
    finally:
        p.kill()
        p.wait()
    assert events.process_running(p.pid, ident) is False


def test_a_database_from_before_the_deriver_column_gets_it_and_its_rows_still_count(pure, settings):
    """SubstitutionEvents made without the drv column: the column is added on first use, and a
    row recorded before counts by the deriver the store knows of its path."""
    import sqlite3
    with LocalStore.open(settings, durable=False):
        pass
    db = sqlite3.connect(f"{settings.state_dir}/db/db.sqlite")
    db.executescript("DROP TABLE IF EXISTS SubstitutionEvents; CREATE TABLE SubstitutionEvents (id INTEGER "
                     "PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, cache TEXT NOT NULL, time REAL NOT NULL, "
                     "nar_size INTEGER);")
    db.execute("INSERT INTO SubstitutionEvents(path, cache, time, nar_size) VALUES (?, 'file:///c', 1.0, 5)", (H,))
    db.commit()
    db.close()
    with LocalStore.open(settings, durable=False) as store:
        store.register_derivation_outputs(StorePath.from_base_name(Y.rsplit("/", 1)[1]),
                                          {"out": StorePath.from_base_name(H.rsplit("/", 1)[1])})
        events.record_substitution(store, C_OUT, "file:///c", 100, drv=X)
    c = json.loads(pure("report", "--json").stdout)["cache"]
    assert (c["substituted"], c["substitutedPaths"], c["hitRate"]) == (2, 2, 1.0)
