"""The post-build hook: run after each real build (not for valid or fetched paths) with DRV_PATH
and OUT_PATHS, its output shown, its failure failing the command with the outputs kept; the use
it is for, pushing what was built to a binary cache, end to end."""

from __future__ import annotations

import json
import os
import stat
import sys

from test_build import expr, needs_sandbox  # noqa: F401 - expr is a fixture
from test_cache_support import PUB, SEC

pytestmark = needs_sandbox

TWO = '''
dep = sh("dep", "$B mkdir $out; echo dep > $out/x")
default = sh("top", f"$B mkdir $out $dev; $B cat {dep}/x > $out/y; echo d > $dev/z", outputs=["out", "dev"])
'''


def hook(tmp_path, body: str, name: str = "hook.sh"):
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def test_hook_runs_after_each_build_with_its_paths(pure, expr, tmp_path, store_root):
    seen = tmp_path / "seen"
    h = hook(tmp_path, f'echo "$DRV_PATH|$OUT_PATHS|$PURE_STORE|$PURE_STORE_DIR" >> {seen}\n'
                       'echo "hello from the hook"\necho "to stderr" >&2\n')
    f = expr(TWO)
    p = pure("--post-build-hook", h, "build", f, "--no-link", cwd=tmp_path)
    top_dev, top_out = p.stdout.split()
    runs = [line.split("|") for line in seen.read_text().splitlines()]
    assert len(runs) == 2
    by_name = {r[0].rsplit("-", 1)[1]: r for r in runs}
    assert by_name["dep.drv"][1].endswith("-dep") and " " not in by_name["dep.drv"][1]
    # outputs in the order of their names (dev, out), as Nix gives them
    assert by_name["top.drv"][1] == f"{top_dev} {top_out}"
    assert all(r[2] == str(store_root) and r[3] == "/pure/store" for r in runs)
    assert f"running post-build-hook '{h}' for '{by_name['top.drv'][0]}'..." in p.stderr
    assert "top (post)> hello from the hook" in p.stderr and "dep (post)> to stderr" in p.stderr
    # nothing built, no hook
    pure("--post-build-hook", h, "build", f, "--no-link", cwd=tmp_path)
    assert len(seen.read_text().splitlines()) == 2


def test_hook_pushes_what_was_built_and_another_store_fetches_it(pure, expr, tmp_path):
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    cache = tmp_path / "cache"
    h = hook(tmp_path, f'exec pure copy --to "file://{cache}?secret-key={key}" $OUT_PATHS\n')
    f = expr(TWO)
    env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # the hook runs `pure`
    p = pure("--post-build-hook", h, "build", f, "--no-link", cwd=tmp_path, env=env)
    outs = p.stdout.split()
    assert "top (post)> copied 2 paths" in p.stderr
    # a fresh store (another machine) gets them from the cache instead of building
    other = tmp_path / "other"
    other.mkdir()
    q = pure("--substituters", f"file://{cache}", "--trusted-public-keys", PUB, "--post-build-hook", h,
             "build", f, "--no-link", "--json", root=other, cwd=tmp_path, env=env)
    events = [json.loads(line) for line in q.stdout.splitlines()]
    types = [e["type"] for e in events]
    assert "start" not in types and "hook" not in types  # fetched, not built: no hook
    (result,) = [e for e in events if e["type"] == "result"]
    assert sorted(result["results"][0]["outputs"].values()) == sorted(outs)


def test_a_failing_hook_fails_the_build_and_keeps_the_outputs(pure, expr, tmp_path):
    h = hook(tmp_path, 'echo "uploading $OUT_PATHS"\necho "cache is down" >&2\nexit 3\n')
    f = expr('default = sh("one", "$B mkdir $out; echo 1 > $out/x")\n')
    p = pure("--post-build-hook", h, "build", f, "--no-link", cwd=tmp_path, check=False)
    assert p.returncode == 1
    assert f"error: post-build hook '{h}' exited with status 3 after building /pure/store/" in p.stderr
    assert "its outputs are built and valid; its last lines:\n  uploading /pure/store/" in p.stderr
    assert "  cache is down" in p.stderr
    # the output is valid: the next build does not build, and has no hook to run
    q = pure("--post-build-hook", h, "build", f, "--no-link", cwd=tmp_path)
    assert "building" not in q.stderr and "post-build-hook" not in q.stderr
    pure("store", "verify", "--check-contents")


def test_a_hook_that_cannot_run_stops_before_any_build(pure, expr, tmp_path):
    f = expr('default = sh("one", "$B mkdir $out; echo 1 > $out/x")\n')
    missing = tmp_path / "nope.sh"
    p = pure("--post-build-hook", missing, "build", f, "--no-link", cwd=tmp_path, check=False)
    assert p.returncode == 1 and f"error: post-build hook '{missing}' does not exist" in p.stderr
    assert "building" not in p.stderr
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/sh\n")
    p = pure("--post-build-hook", plain, "build", f, "--no-link", cwd=tmp_path, check=False)
    assert p.returncode == 1 and f"error: post-build hook '{plain}' is not executable" in p.stderr
    # from the config file too; '' on the command line turns it off
    conf = tmp_path / "pure.conf"
    conf.write_text(f"post-build-hook = {missing}\n")
    p = pure("build", f, "--no-link", cwd=tmp_path, check=False, env={"PURE_CONFIG": str(conf)})
    assert "does not exist" in p.stderr
    p = pure("--post-build-hook", "", "build", f, "--no-link", cwd=tmp_path, env={"PURE_CONFIG": str(conf)})
    assert p.stdout.strip().endswith("-one")


def test_a_hook_named_without_a_slash_is_found_on_path(pure, expr, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    seen = tmp_path / "seen"
    hook(bindir, f'echo "$OUT_PATHS" > {seen}\n', name="push-outputs")
    f = expr('default = sh("one", "$B mkdir $out; echo 1 > $out/x")\n')
    p = pure("--post-build-hook", "push-outputs", "build", f, "--no-link", cwd=tmp_path,
             env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert seen.read_text().strip() == p.stdout.strip()
    f2 = expr('default = sh("two", "$B mkdir $out; echo 2 > $out/x")\n', name="e2.py")  # not built yet
    p = pure("--post-build-hook", "no-such-hook-anywhere", "build", f2, "--no-link", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "error: post-build hook 'no-such-hook-anywhere' is not on PATH" in p.stderr


def test_a_hook_named_without_a_slash_is_not_taken_from_the_working_directory(pure, expr, tmp_path):
    """A bare name not on PATH is refused before anything is built, even when a file of that
    name is in the working directory (the check took that file, then the hook, looked up on
    PATH, could not be run once the build was done: "cannot be run: No such file or directory");
    the hint says how to name that file."""
    hook(tmp_path, "echo ran\n", name="local-hook")
    f = expr('default = sh("three", "$B mkdir $out")\n')
    p = pure("--post-build-hook", "local-hook", "build", f, "--no-link", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "will be built" not in p.stderr
    assert p.stderr == ("error: post-build hook 'local-hook' is not on PATH\n"
                        "hint: give './local-hook' to run the one in the working directory\n")
    p = pure("--post-build-hook", "./local-hook", "build", f, "--no-link", cwd=tmp_path)
    assert "three (post)> ran" in p.stderr


def test_an_interrupted_build_stops_the_hook_and_what_it_started(expr, tmp_path, store_root):
    """Ctrl-C while a hook runs: the hook and the processes it started (a script's children,
    as `pure copy --to` run without exec) are stopped with it; they kept running, re-parented to
    init, after pure had exited."""
    import signal
    import subprocess
    import time

    from conftest import pure_env
    pids = tmp_path / "pids"
    h = hook(tmp_path, f'sleep 300 &\necho $! >> {pids}\necho $$ >> {pids}\necho started\nsleep 300\n')
    f = expr('default = sh("one", "$B mkdir $out")\n')
    p = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "--post-build-hook", str(h), "build", str(f),
                          "--no-link"], env=pure_env(store_root), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and len(pids.read_text().split()) == 2):
            assert time.monotonic() < deadline and p.poll() is None, "the hook did not start"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "error: interrupted" in err, err
    left = []
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 5
        while True:
            try:  # gone, or a zombie (PID 1 of a container may not reap what it inherits)
                if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except (FileNotFoundError, ProcessLookupError):
                break
            if time.monotonic() > deadline:
                left.append(pid)
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    assert left == [], f"processes of the hook still running: {left}"


def test_hook_output_lines_are_split_and_long_ones_cut():
    """Output split into lines in any chunking; a line longer than MAX_LINE is shown cut and the
    rest of it skipped."""
    from purestore.build.hook import CUT, MAX_LINE, _Lines
    data = b"one\r\ntwo\n" + b"x" * (3 * MAX_LINE) + b"\nthree\nfour"
    want = ["one", "two", "x" * MAX_LINE + CUT, "three", "four"]
    for size in (1, 7, MAX_LINE - 1, len(data)):
        lines = _Lines()
        got = [line for i in range(0, len(data), size) for line in lines.feed(data[i:i + size])] + lines.end()
        assert got == want, size


def test_a_hook_printing_a_huge_line_is_shown_cut_and_read_in_linear_time(settings, tmp_path):
    """A hook that printed a binary file (no newline for 64 MiB): its whole unfinished line was
    kept and split again for every 64 KiB read, quadratic (40 MB took 12 s, 200 MB minutes) and
    all of it in memory, then shown as one line."""
    import time

    import attrs
    import trio

    from purestore.build.hook import CUT, MAX_LINE, run_hook
    h = hook(tmp_path, "head -c 67108864 /dev/zero | tr '\\0' x\necho\necho end\n")
    lines = []
    start = time.monotonic()
    trio.run(run_hook, attrs.evolve(settings, post_build_hook=str(h)), "/pure/store/x.drv", [], lines.append)
    assert lines == ["x" * MAX_LINE + CUT, "end"]
    assert time.monotonic() - start < 30
