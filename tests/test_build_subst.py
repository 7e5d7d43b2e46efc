"""pure build substitutes from a signed binary cache before building, and records it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import pure_env
from test_build import build, expr, needs_sandbox, open_store  # noqa: F401 - fixtures

pytestmark = needs_sandbox


def test_outputs_in_a_trusted_cache_are_fetched_not_built(pure, expr, tmp_path, store_root):
    try:
        import purestore.cache.substituter  # noqa: F401
    except ImportError:
        pytest.skip("the caches layer is not installed")
    f = expr('default = sh("fetchme", "$B mkdir $out; echo from-cache > $out/f")\n')
    out = build(pure, tmp_path, f, "--no-link").stdout.strip()
    cache, pub, other = pushed(pure, tmp_path, out)
    p = pure("--substituters", cache, "--trusted-public-keys", pub, "build", f, "--no-link",
             root=other, cwd=tmp_path)
    assert p.stdout.strip() == out
    assert "will be built" not in p.stderr and "will be fetched" in p.stderr
    assert (other / out.lstrip("/") / "f").read_text() == "from-cache\n"
    st = open_store(other)
    try:
        from purestore.store import events
        assert events.query_builds(st) == []
        assert [s["path"] for s in events.query_substitutions(st)] == [out]
        # its deriver is recorded with it: `pure report` counts a build avoided by it
        assert [s["drv"] for s in events.query_substitutions(st)] == [st.print_path(st.query_deriver(st.parse_path(out)))]
    finally:
        st.close()


def test_a_build_substitutes_from_another_store_served_as_it_is(pure, expr, tmp_path, store_root):
    """Machine A builds and serves its store (`pure store serve`, signing); machine B's build of
    the same expression fetches the output from it instead of building, and finds its log."""
    from test_cache_support import start_store_server, stop_server
    f = expr('default = sh("served", "$B mkdir $out; echo built-on-a > $out/f; echo a-log-line")\n')
    out = build(pure, tmp_path, f, "--no-link").stdout.strip()
    pure("key", "generate", "--name", "build-a-1", "--secret-out", tmp_path / "k.sec",
         "--public-out", tmp_path / "k.pub")
    proc, url = start_store_server(store_root, None, "--secret-key-file", tmp_path / "k.sec")
    try:
        other = tmp_path / "machine-b"
        other.mkdir()
        pub = (tmp_path / "k.pub").read_text().strip()
        p = pure("--substituters", url, "--trusted-public-keys", pub, "build", f, "--no-link",
                 root=other, cwd=tmp_path)
        assert p.stdout.strip() == out
        assert "will be built" not in p.stderr and "will be fetched" in p.stderr
        assert (other / out.lstrip("/") / "f").read_text() == "built-on-a\n"
        p = pure("--substituters", url, "log", out, root=other)
        assert "a-log-line" in p.stdout
    finally:
        stop_server(proc)


def _children(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                kids.append(int(name))
    return kids


def _has_open(pid: int, path: Path) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            pass
    return False


def _half_fed_cache(pure, expr, tmp_path):
    """An expression, built and pushed to a file:// cache whose NAR is then a FIFO fed half
    way until ``release`` is set: (expression, output path, cache URL, key, NAR, release)."""
    f = expr('default = sh("forked", "$B mkdir $out; $B seq 1 400000 > $out/numbers")\n')
    out = build(pure, tmp_path, f, "--no-link").stdout.strip()
    pure("key", "generate", "--name", "test-cache-1", "--secret-out", tmp_path / "k.sec",
         "--public-out", tmp_path / "k.pub")
    cache = tmp_path / "cache"
    pure("copy", "--to", f"file://{cache}?compression=none", "--secret-key-file", tmp_path / "k.sec", out)
    hash_part = out.rsplit("/", 1)[1].split("-", 1)[0]
    text = (cache / f"{hash_part}.narinfo").read_text()
    nar = cache / next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
    data = nar.read_bytes()
    assert len(data) > 2 << 20
    nar.unlink()
    os.mkfifo(nar)
    release = threading.Event()

    def feed():
        with open(nar, "wb", buffering=0) as w:  # blocks until pure opens it
            w.write(data[: len(data) // 2])
            release.wait(60)
            try:
                w.write(data[len(data) // 2:])
            except BrokenPipeError:  # the reader was stopped
                pass

    threading.Thread(target=feed, daemon=True).start()
    return f, out, f"file://{cache}", (tmp_path / "k.pub").read_text().strip(), nar, release


@contextlib.contextmanager
def _started_build(f, cache: str, pub: str, root: Path, cwd: Path, release: threading.Event, **kw):
    """`pure build f` substituting from ``cache`` into ``root``, running; at the end the NAR's
    feeder is released and the build killed if it still runs."""
    p = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "--substituters", cache,
                          "--trusted-public-keys", pub, "build", str(f), "--no-link"],
                         env=pure_env(root), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, **kw)
    try:
        yield p
    finally:
        release.set()
        if p.poll() is None:
            p.kill()
            p.wait()


def _reader_of(p: subprocess.Popen, nar: Path) -> int | None:
    """The child of ``p`` that has ``nar`` open, waiting up to a minute for one."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        reader = next((k for k in _children(p.pid) if _has_open(k, nar)), None)
        if reader is not None:
            return reader
        time.sleep(0.05)
    return None


needs_two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the forked restorer needs two cores")


@needs_two_cores
def test_pure_build_restores_from_a_file_cache_in_the_forked_copy(pure, expr, tmp_path):
    """`pure build` substitutes as `pure copy --from` does: a NAR from a file:// cache is restored
    by the forked copy of the command (seen reading it, while the NAR, a FIFO, is half fed)."""
    f, out, cache, pub, nar, release = _half_fed_cache(pure, expr, tmp_path)
    other = tmp_path / "other-root"
    other.mkdir()
    with _started_build(f, cache, pub, other, tmp_path, release) as p:
        assert _reader_of(p, nar) is not None, "a child of pure build should be reading the NAR"
        assert not _has_open(p.pid, nar)  # the command itself does not read it
        release.set()
        stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert stdout.strip() == out and "will be fetched" in stderr
    assert (other / out.lstrip("/") / "numbers").read_bytes() == b"".join(b"%d\n" % i for i in range(1, 400001))
    pure("store", "verify", "--check-contents", root=other)


@needs_two_cores
def test_ctrl_c_while_pure_build_restores_in_the_forked_copy_leaves_nothing_behind(pure, expr, tmp_path):
    f, out, cache, pub, nar, release = _half_fed_cache(pure, expr, tmp_path)
    other = tmp_path / "other-root"
    other.mkdir()
    with _started_build(f, cache, pub, other, tmp_path, release, start_new_session=True,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as p:
        reader = _reader_of(p, nar)
        assert reader is not None, "a child of pure build should be reading the NAR"
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C
        _stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "error: interrupted" in stderr and "Traceback" not in stderr, stderr
    assert not os.path.exists(f"/proc/{reader}")  # the forked copy is gone (and was reaped)
    assert not (other / out.lstrip("/")).exists()
    assert os.listdir(other / "pure/store/.tmp") == []
    pure("store", "verify", "--check-contents", root=other)


def test_only_the_outputs_a_build_uses_are_fetched_or_needed(pure, expr, tmp_path, store_root):
    """An input derivation is wanted for the outputs its referrers name: a cache holding only
    base's "out" (not its "doc") serves a build that uses base's "out" (base is not rebuilt,
    "doc" is not fetched), and so does the store once "out" is valid, offline."""
    f = expr('base = sh("base", "$B mkdir $out $doc; echo b > $out/x; echo manual > $doc/d", outputs=["out", "doc"])\n'
             'app = sh("app", f"$B mkdir $out; $B cat {base}/x > $out/w; echo {base} > $out/ref")\n'
             'default = app\n')
    outs = pure("build", f, "-A", "base", "--no-link", cwd=tmp_path).stdout.split()
    base_out, base_doc = (next(o for o in outs if o.endswith(suffix)) for suffix in ("-base", "-base-doc"))
    cache, pub, other = pushed(pure, tmp_path, base_out)  # not base_doc
    p = pure("--substituters", cache, "--trusted-public-keys", pub, "build", f, "--no-link", "--json",
             root=other, cwd=tmp_path)
    evs = [json.loads(line) for line in p.stdout.splitlines()]
    plan = next(e for e in evs if e["type"] == "plan")
    fetch_plan = next(e for e in evs if e["type"] == "fetch-plan")
    assert fetch_plan["willFetch"] == [base_out]
    assert [e["path"] for e in evs if e["type"] == "fetched"] == [base_out] == plan["willSubstitute"]
    assert [d.rsplit("-", 1)[1] for d in plan["willBuild"]] == ["app.drv"], plan
    st = open_store(other)
    try:
        assert st.is_valid(st.parse_path(base_out)) and not st.is_valid(st.parse_path(base_doc))
    finally:
        st.close()
    # offline, with base's "out" valid and its "doc" missing: only app is built again
    (tmp_path / "e.py").write_text((tmp_path / "e.py").read_text().replace('echo {base} > $out/ref', 'echo {base} >> $out/ref'))
    p = pure("--offline", "build", f, "--no-link", "--json", root=other, cwd=tmp_path)
    plan = next(json.loads(line) for line in p.stdout.splitlines() if json.loads(line)["type"] == "plan")
    assert [d.rsplit("-", 1)[1] for d in plan["willBuild"]] == ["app.drv"], plan


def test_dry_run_honours_require_provenance_as_the_real_run_does(pure, expr, tmp_path, store_root):
    """A cache whose paths have no provenance statement: with --require-provenance, --dry-run
    says they will be built, as the real run then builds them."""
    f = expr('default = sh("noprov", "$B mkdir $out; echo x > $out/f")\n')
    out = build(pure, tmp_path, f, "--no-link").stdout.strip()
    cache, pub, other = pushed(pure, tmp_path, out)
    common = ("--substituters", cache, "--trusted-public-keys", pub, "build", f, "--no-link")
    dry = json.loads(pure(*common, "--dry-run", "--json", root=other, cwd=tmp_path).stdout)
    assert [w["path"] for w in dry["willFetch"]] == [out] and dry["willBuild"] == []
    dry = json.loads(pure(*common, "--dry-run", "--json", "--require-provenance", root=other, cwd=tmp_path).stdout)
    assert dry["willFetch"] == [] and len(dry["willBuild"]) == 1, dry
    real = pure(*common, "--require-provenance", root=other, cwd=tmp_path)
    assert "will be fetched" not in real.stderr and "will be built" in real.stderr


def pushed(pure, tmp_path, *paths):
    """A key pair, ``paths`` pushed to a file:// cache signed with it, and a second, empty
    store root: returns (cache URL, public key, that root)."""
    pure("key", "generate", "--name", "test-cache-1", "--secret-out", tmp_path / "k.sec",
         "--public-out", tmp_path / "k.pub")
    cache = f"file://{tmp_path / 'cache'}"
    pure("copy", "--to", cache, "--secret-key-file", tmp_path / "k.sec", *paths)
    other = tmp_path / "other-root"
    other.mkdir()
    return cache, (tmp_path / "k.pub").read_text().strip(), other


async def test_a_substituter_that_stops_answering_costs_one_stall_timeout(pure, expr, tmp_path):
    """The first substituter answers its nix-cache-info, then nothing at all (a hung server): the
    build waits one stalled-download-timeout, says so once naming the cache and the setting, and
    fetches the output from the next cache, without asking the silent one again (before: the
    lookup was retried through every download attempt, a timeout each)."""
    import trio
    from test_cache_retry import FlakyCache
    f = expr('default = sh("hung-mirror", "$B mkdir $out; echo from-cache > $out/f")\n')
    out = build(pure, tmp_path, f, "--no-link").stdout.strip()
    cache, pub, other = pushed(pure, tmp_path, out)
    cfg = tmp_path / "pure.conf"
    cfg.write_text("stalled-download-timeout = 1\ndownload-attempts = 5\n")
    server = FlakyCache(tmp_path / "cache", {".narinfo": ["silent"] * 100})
    async with trio.open_nursery() as n:
        await n.start(server.run)
        with trio.fail_after(120):
            r = await trio.run_process(
                [sys.executable, "-m", "purestore.cli.main", "--substituters", f"{server.url} {cache}",
                 "--trusted-public-keys", pub, "build", str(f), "--no-link"],
                env=pure_env(other, extra={"PURE_CONFIG": str(cfg)}), cwd=tmp_path,
                capture_stdout=True, capture_stderr=True, check=False)
        n.cancel_scope.cancel()
    stderr = r.stderr.decode()
    assert r.returncode == 0 and r.stdout.decode().strip() == out, stderr
    assert "will be fetched" in stderr and "will be built" not in stderr, stderr
    assert (other / out.lstrip("/") / "f").read_text() == "from-cache\n"
    assert "retrying" not in stderr, stderr
    said = [line for line in stderr.splitlines() if "did not answer" in line]
    assert said == [f"warning: binary cache {server.url!r} did not answer '{out[len('/pure/store/'):][:32]}"
                    ".narinfo' within 1 s (stalled-download-timeout): not asking it for anything more in "
                    "this run"], stderr
    assert [name for _m, name, _r, _s in server.asked if name.endswith(".narinfo")] == \
        [f"{out[len('/pure/store/'):][:32]}.narinfo"], server.asked
