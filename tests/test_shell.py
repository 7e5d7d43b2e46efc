"""pure shell / pure run: environments from a closure, the rooted store's namespace."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, held_sleep, pure_env, read_pty, read_until, release
from test_gc import _build, _skip_unless_builds_run, busybox_expr

TOOLS = '''
    tools = sh("bbtools-1.0", f"mkdir -p $out/bin; cp {bb}/bin/busybox $out/bin/; "
               "for t in sh ls cat echo env wc; do ln -s busybox $out/bin/$t; done")
    hello = sh("hello-2.0", f"mkdir -p $out/bin $out/include; echo '#define X 1' > $out/include/x.h; "
               f"printf '#!{tools}/bin/sh\\\\necho hello from run \\"$@\\"\\\\n' > $out/bin/hello; chmod +x $out/bin/hello")
    both = [tools, hello]
    hooked = sh("hooked", "mkdir $out", shellHook="export GREETING=from-hook; echo hook-ran")
    many = sh("many-1.0", "mkdir -p $out/bin; for i in $(seq -w 1 30); do echo exit > $out/bin/prog$i; "
              "chmod +x $out/bin/prog$i; done")
    orphan = sh("orphan-1.0", "mkdir -p $out/bin; printf '#!/nonexistent/sh\\\\necho x\\\\n' > $out/bin/orphan; "
                "chmod +x $out/bin/orphan")
    noshebang = sh("noshebang-1.0", "mkdir -p $out/bin; echo 'echo x' > $out/bin/noshebang; "
                   "chmod +x $out/bin/noshebang")
    envprog = sh("envprog-1.0", f"mkdir -p $out/bin $out/include $out/lib $out/share/man/man1; "
                 f"ln -s {tools}/bin/env $out/bin/env")
    dev = sh("dev-1.0", f"mkdir $out; test -d {tools}")  # (tools: a build input it does not refer to)
    slowin = sh("slowin-1.0", f"{bb}/bin/busybox SLOWIN; mkdir $out")  # (until the test releases it)
    dev2 = sh("dev2-1.0", f"mkdir $out; test -d {tools} && test -d {slowin}")  # (refers to neither)
    split = sh("split-1.0", f"mkdir -p $out/share $bin/bin; printf '#!{tools}/bin/sh\\\\necho split \\"$@\\"\\\\n' "
               "> $bin/bin/split; chmod +x $bin/bin/split", outputs=["out", "bin"])
    plain = sh("plain-1.0", "mkdir -p $out/bin; echo 'echo plain' > $out/bin/plain; chmod +x $out/bin/plain")
'''.replace("SLOWIN", SLOWIN := held_sleep())


@pytest.fixture
def expr(tmp_path, pure):
    f = busybox_expr(tmp_path, TOOLS)
    _build(pure, f, "-A", "tools", "--no-link", cwd=tmp_path)  # skips when builds cannot run here
    return f


def test_pure_shell_path_holds_store_paths_only(pure, expr, tmp_path):
    p = pure("shell", expr, "-A", "both", "--pure", "--command",
             'echo "PATH=$PATH"; echo "IN=$IN_PURE_SHELL"; echo "FOO=$FOO"; echo "CPATH=$CPATH"; ls /pure/store',
             env={"FOO": "host-value"}, cwd=tmp_path)
    lines = p.stdout.splitlines()
    path = lines[0].removeprefix("PATH=").split(":")
    assert path and all(d.startswith("/pure/store/") and d.endswith("/bin") for d in path), path
    assert any(d.endswith("-bbtools-1.0/bin") for d in path) and any(d.endswith("-hello-2.0/bin") for d in path)
    assert lines[1] == "IN=pure" and lines[2] == "FOO="
    assert lines[3].startswith("CPATH=/pure/store/") and lines[3].endswith("-hello-2.0/include")
    # the rooted store is seen at the logical store dir
    assert any(l.endswith("-bbtools-1.0") for l in lines[4:])


def test_impure_shell_keeps_the_host_environment(pure, expr, tmp_path):
    p = pure("shell", expr, "-A", "tools", "--command", 'echo "$FOO"; echo "$PATH"; echo "$IN_PURE_SHELL"',
             env={"FOO": "host-value", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    foo, path, inside = p.stdout.splitlines()
    assert foo == "host-value" and inside == "impure"
    assert path.startswith("/pure/store/") and path.endswith(":/usr/bin:/bin")


def test_shell_exit_status_and_interactive_stdin(pure, expr, tmp_path):
    r = pure("shell", expr, "-A", "tools", "--pure", "--command", "exit 7", check=False, cwd=tmp_path)
    assert r.returncode == 7
    r = pure("shell", expr, "-A", "tools", "--pure", input="echo from-stdin $IN_PURE_SHELL\nexit 0\n", cwd=tmp_path)
    assert "from-stdin pure" in r.stdout


def test_run_passes_arguments_and_picks_the_program(pure, expr, tmp_path):
    assert pure("run", expr, "-A", "hello", "--", "a", "-b", cwd=tmp_path).stdout == "hello from run a -b\n"
    assert pure("run", expr, "-A", "tools", "--program", "echo", "--", "x", "y", cwd=tmp_path).stdout == "x y\n"
    r = pure("run", expr, "-A", "tools", check=False, cwd=tmp_path)
    assert r.returncode == 1 and "do not know which program" in r.stderr and "--program" in r.stderr
    r = pure("run", expr, "-A", "hello", "stray", check=False, cwd=tmp_path)
    assert r.returncode == 2 and "go after '--'" in r.stderr
    r = pure("run", expr, "-A", "both", check=False, cwd=tmp_path)
    assert r.returncode == 2 and "exactly one package" in r.stderr
    out = pure("build", expr, "-A", "hello", "--no-link", cwd=tmp_path).stdout.strip()
    assert pure("run", out, "--", "by-path").stdout == "hello from run by-path\n"
    # a '--' right after FILE (which argparse swallows): what follows is the program's, even
    # when it looks like an option of pure run's
    assert pure("run", out, "--", "-x", "--help").stdout == "hello from run -x --help\n"
    assert pure("run", out, "--", "-A", "y", "--", "z").stdout == "hello from run -A y -- z\n"


def test_run_names_at_most_twenty_programs_to_choose_from(pure, expr, tmp_path, store_root):
    """A package with many programs and no --program: the error names the first 20 and how many
    more (it listed them all, hundreds for a big package), with the hint to use --program."""
    r = pure("run", expr, "-A", "many", check=False, cwd=tmp_path)
    assert r.returncode == 1 and "do not know which program" in r.stderr, r.stderr
    assert "30 programs: prog01, prog02," in r.stderr and "prog20 and 10 more (all of them: ls " in r.stderr
    assert "prog21" not in r.stderr and "--program NAME" in r.stderr
    ls = r.stderr.split("(all of them: ls ", 1)[1].split(")", 1)[0]
    assert ls.startswith(str(store_root)) and len(os.listdir(ls)) == 30  # the real directory
    # a --program that is not there: the same list, and the names like it
    r = pure("run", expr, "-A", "many", "--program", "prog4", check=False, cwd=tmp_path)
    assert r.returncode == 1 and "has no program 'prog4'; it has 30 programs: prog01" in r.stderr, r.stderr
    assert "and 10 more" in r.stderr and "prog21" not in r.stderr.split("hint:")[0]
    assert "did you mean" in r.stderr


def test_run_finds_the_program_in_a_bin_output(pure, expr, tmp_path):
    """A package that keeps its programs in a `bin` output (outputs out and bin): `pure run`
    looked in `out` only and said it "has no bin/ directory", with no way to run them; it runs
    the program of the first output that has one (also with --program)."""
    assert pure("run", expr, "-A", "split", "--", "a b", cwd=tmp_path).stdout == "split a b\n"
    assert pure("run", expr, "-A", "split", "--program", "split", cwd=tmp_path).stdout == "split\n"
    r = pure("run", expr, "-A", "split", "--program", "nope", check=False, cwd=tmp_path)
    assert r.returncode == 1 and "-split-1.0-bin/bin has no program 'nope'; it has split" in r.stderr, r.stderr


def test_run_of_a_package_without_programs_says_so(pure, expr, tmp_path):
    """A package with no bin/: the error said "its bin/ has nothing" and hinted to choose one
    with --program NAME, of which there is none; it says there is no bin/ (and no hint to use
    --program)."""
    r = pure("run", expr, "-A", "hooked", check=False, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "-hooked has no program to run: it has no bin/ directory\n" in r.stderr, r.stderr
    assert "--program" not in r.stderr and "Traceback" not in r.stderr


def test_run_extends_path_only_and_does_not_claim_a_shell(pure, expr, tmp_path):
    """`pure run`'s program got IN_PURE_SHELL=impure (a prompt or script looking at it took it
    for a pure shell) and CPATH/LIBRARY_PATH of the package; as documented, only PATH is
    extended (with PURE_STORE/PURE_STORE_DIR naming the store)."""
    out = pure("run", expr, "-A", "envprog", env={"CPATH": "/host/include"}, cwd=tmp_path).stdout
    env = dict(l.split("=", 1) for l in out.splitlines() if "=" in l)
    assert "IN_PURE_SHELL" not in env and env["CPATH"] == "/host/include" and "LIBRARY_PATH" not in env, env
    assert env["PATH"].split(":")[0].endswith("-envprog-1.0/bin") and env["PURE_STORE_DIR"] == "/pure/store"
    # a shell of it has them
    out = pure("shell", expr, "-A", "envprog", "--command", 'echo "$IN_PURE_SHELL $CPATH"',
               env={"CPATH": "/host/include"}, cwd=tmp_path).stdout
    assert out.startswith("impure /pure/store/") and out.endswith("-envprog-1.0/include:/host/include\n"), out


def test_an_impure_shell_keeps_man_s_default_search_path(pure, expr, tmp_path, monkeypatch):
    """A caller without MANPATH (man's default search path) got MANPATH=<the environment's
    share/man> alone in an impure shell, which replaces the default: `man ls` found nothing.
    The trailing ':' appends the default; a caller's MANPATH is kept after the environment's."""
    monkeypatch.delenv("MANPATH", raising=False)
    out = pure("shell", expr, "-A", "envprog", "--command", 'echo "$MANPATH"', cwd=tmp_path).stdout
    assert re.fullmatch(r"/pure/store/[^:]*-envprog-1.0/share/man:\n", out), out
    out = pure("shell", expr, "-A", "envprog", "--command", 'echo "$MANPATH"', env={"MANPATH": "/host/man"},
               cwd=tmp_path).stdout
    assert re.fullmatch(r"/pure/store/[^:]*-envprog-1.0/share/man:/host/man\n", out), out
    out = pure("shell", expr, "-A", "envprog", "--pure", "--command", 'echo "$MANPATH"', cwd=tmp_path).stdout
    assert re.fullmatch(r"/pure/store/[^:]*-envprog-1.0/share/man\n", out), out


def test_a_link_to_an_expression_file_is_an_expression(pure, expr, tmp_path):
    """Any link whose name did not end in .py was taken for a store path (like `result`): a link
    `pkgs -> expr.py` gave "-A/--attr makes no sense with the store path 'pkgs'".  A link to a
    file outside the store is an expression file; a link into the store is still a store path."""
    (tmp_path / "pkgs").symlink_to(expr)
    assert pure("run", "pkgs", "-A", "hello", "--", "x", cwd=tmp_path).stdout == "hello from run x\n"
    pure("build", expr, "-A", "hello", cwd=tmp_path)  # ./result
    assert pure("run", "result", "--", "y", cwd=tmp_path).stdout == "hello from run y\n"
    os.symlink("/nonexistent/thing", tmp_path / "dangling")
    r = pure("run", "dangling", check=False, cwd=tmp_path)
    assert r.returncode == 1 and "'/nonexistent/thing' is not in the store dir" in r.stderr, r.stderr


def test_run_of_a_script_that_cannot_start_says_why(pure, expr, tmp_path):
    """A script whose #! interpreter is missing: execve's ENOENT was reported as "cannot start
    …/bin/orphan: No such file or directory", about a file that is there.  The error names the
    missing interpreter; a file with no #! line says it has none."""
    r = pure("run", expr, "-A", "orphan", check=False, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].endswith(
        "-orphan-1.0/bin/orphan: the interpreter its #! line names, '/nonexistent/sh', does not exist"), r.stderr
    r = pure("run", expr, "-A", "noshebang", check=False, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].endswith(
        "/bin/noshebang: Exec format error: it is neither an ELF program nor a script starting with a #! "
        "line"), r.stderr


@pytest.mark.parametrize("args", [[], ["-A", "hello"], ["--"]])
def test_run_without_a_package_says_what_it_needs(pure, args):
    """`pure run` with nothing to run: a usage error naming what is expected (argparse said
    "the following arguments are required: FILE|PATH, -- ARGS", though ARGS are optional)."""
    r = pure("run", *args, check=False)
    assert r.returncode == 2 and r.stdout == ""
    err = r.stderr.splitlines()
    assert err[0] == ("error: pure run needs the package to run: an expression file (-A ATTR for one "
                      "of its attributes) or a store path; arguments for its program go after '--'")
    assert err[1] == "hint: pure run FILE|PATH [-A ATTR] [-- ARGS...]; see 'pure run --help'"


def test_run_of_a_store_path_fetches_it_from_the_caches(pure, expr, tmp_path, store_root):
    """`pure run /pure/store/…` of a path this store lacks: fetched from the substituters (as
    `nix shell /nix/store/…` does); with none, the error says how to get it."""
    out = pure("build", expr, "-A", "hello", "--no-link", cwd=tmp_path).stdout.strip()
    pure("key", "generate", "--name", "t-1", "--secret-out", tmp_path / "k.sec", "--public-out", tmp_path / "k.pub")
    cache = f"file://{tmp_path / 'cache'}"
    pure("copy", "--to", cache, "--secret-key-file", tmp_path / "k.sec", out)
    other = tmp_path / "other"
    other.mkdir()
    r = pure("run", out, "--", "x", root=other, check=False)
    assert r.returncode == 1 and "not valid" in r.stderr and "hint: with substituters configured" in r.stderr
    r = pure("--substituters", cache, "--trusted-public-keys", (tmp_path / "k.pub").read_text().strip(),
             "run", out, "--", "fetched", root=other)
    assert r.stdout == "hello from run fetched\n"


def test_shell_of_a_package_fetched_from_a_cache_has_its_build_inputs(pure, tmp_path, store_root):
    """A package fetched from a cache comes without its build-time inputs; `pure shell` puts
    them in the environment all the same (fetched or built then), as for a package built here."""
    f = busybox_expr(tmp_path, '''
        devtool = sh("devtool-1.0", f"mkdir -p $out/bin $doc; ln -s {bb}/bin/busybox $out/bin/devtool; "
                     "echo manual > $doc/d", outputs=["out", "doc"])
        pkg = sh("pkg-1.0", f"ls -d {devtool} > /dev/null; mkdir $out; echo built > $out/x")
    ''')
    out = _build(pure, f, "-A", "pkg", "--no-link", cwd=tmp_path).stdout.strip()
    tool_out = next(o for o in _build(pure, f, "-A", "devtool", "--no-link", cwd=tmp_path).stdout.split()
                    if o.endswith("-devtool-1.0"))
    pure("key", "generate", "--name", "t-1", "--secret-out", tmp_path / "k.sec", "--public-out", tmp_path / "k.pub")
    cache = f"file://{tmp_path / 'cache'}"
    pure("copy", "--to", cache, "--secret-key-file", tmp_path / "k.sec", out)  # pkg only
    other = tmp_path / "other"
    other.mkdir()
    r = pure("--substituters", cache, "--trusted-public-keys", (tmp_path / "k.pub").read_text().strip(),
             "shell", f, "-A", "pkg", "--command", "command -v devtool", root=other, cwd=tmp_path)
    assert r.stdout.strip().endswith("-devtool-1.0/bin/devtool"), r.stdout + r.stderr
    # devtool's "out" in the cache (not its "doc"): fetched, not built
    pure("copy", "--to", cache, "--secret-key-file", tmp_path / "k.sec", tool_out)
    third = tmp_path / "third"
    third.mkdir()
    r = pure("--substituters", cache, "--trusted-public-keys", (tmp_path / "k.pub").read_text().strip(),
             "shell", f, "-A", "pkg", "--command", "command -v devtool", root=third, cwd=tmp_path)
    assert r.stdout.strip() == f"{tool_out}/bin/devtool" and "will be built" not in r.stderr, r.stderr


def test_shell_closure_is_kept_by_a_gc_during_the_session(pure, expr, tmp_path, store_root):
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "shell", expr, "-A", "hello", "--pure",
                             "--command", "echo ready; read x; ls $(echo $PATH | cut -d: -f1) 2>&1"],
                            cwd=tmp_path, env=pure_env(store_root), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deleted = pure("gc").stdout.split()
        assert not [d for d in deleted if "hello-2.0" in d or "bbtools" in d], deleted
        out, _ = proc.communicate("\n", timeout=60)
        assert "hello" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


@pytest.mark.slow
def test_build_inputs_found_valid_are_kept_by_a_gc_while_others_build(pure, expr, tmp_path, store_root):
    """A shell's build input that was valid (and unrooted) when `pure shell` looked is a
    temporary root from then on: a `pure gc` while another input builds does not delete it.
    (It was rooted only once all inputs were there: the collection deleted it, and the shell
    started without it on PATH.)  slowin builds until the collection has ended (a `sleep 3`
    could end first on a loaded machine: the shell then ran and exited, and its inputs, rightly
    no longer rooted, were deleted)."""
    import threading
    releaser = threading.Thread(target=release, args=(SLOWIN,), daemon=True)  # (not held the first time)
    releaser.start()
    _build(pure, expr, "-A", "dev2", "-o", str(tmp_path / "dev2"), cwd=tmp_path)  # dev2 rooted
    releaser.join()
    pure("gc")  # slowin's and tools' outputs go (dev2 refers to neither)
    _build(pure, expr, "-A", "tools", "--no-link", cwd=tmp_path)  # valid again, unrooted
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "shell", expr, "-A", "dev2", "--pure",
                             "--command", 'echo "$PATH"'],
                            cwd=tmp_path, env=pure_env(store_root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = read_until(proc, "building", "slowin")  # the shell builds slowin again: collect meanwhile
        deleted = pure("gc").stdout.split()
        assert release(SLOWIN), "slowin's sleep was not found"
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(seen) + err
    assert not [d for d in deleted if "bbtools" in d], deleted
    assert any(d.endswith("-bbtools-1.0/bin") for d in out.strip().split(":")), out


def test_build_inputs_in_the_shell_are_kept_by_a_gc_during_the_session(pure, expr, tmp_path, store_root):
    """The outputs of the build inputs are in the environment though the package does not refer
    to them; when they were valid already (nothing built) they were not temporary roots, and a
    `pure gc` during the session deleted them from under the shell's PATH."""
    _build(pure, expr, "-A", "dev", "--no-link", cwd=tmp_path)  # (nothing roots dev nor tools)
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "shell", expr, "-A", "dev", "--pure",
                             "--command", 'echo "$PATH"; read x; echo "$PATH"'],
                            cwd=tmp_path, env=pure_env(store_root), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        path = proc.stdout.readline().strip()
        assert path.endswith("-bbtools-1.0/bin"), path
        deleted = pure("gc").stdout.split()
        assert not [d for d in deleted if "bbtools" in d or "dev-1.0" in d], deleted
        proc.communicate("\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert os.path.isdir(os.path.join(store_root, path.lstrip("/")))


def test_pure_inside_the_shell_uses_the_store_named_with_the_store_option(expr, tmp_path, store_root):
    """`pure --store ROOT shell …`: `pure` run inside finds ROOT's store (PURE_STORE is set), not
    the host's, whose state dir would otherwise go with ROOT's files seen at /pure/store."""
    from conftest import run_pure

    out = run_pure("--store", store_root, "build", expr, "-A", "hello", "--no-link", cwd=tmp_path).stdout.strip()
    inner = f'"{sys.executable}" -m purestore.cli.main store path-info {out}'
    r = run_pure("--store", store_root, "shell", expr, "-A", "hello", "--command",
                 f'echo "$PURE_STORE $PURE_STORE_DIR"; {inner}', cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"{store_root} /pure/store", out]
    r = run_pure("--store", store_root, "shell", expr, "-A", "hello", "--pure", "--command",
                 'echo "$PURE_STORE $PURE_STORE_DIR"', cwd=tmp_path)
    assert r.stdout == f"{store_root} /pure/store\n"
    r = run_pure("--store", store_root, "run", expr, "-A", "tools", "--program", "sh", "--", "-c",
                 'echo "$PURE_STORE"', cwd=tmp_path)
    assert r.stdout == f"{store_root}\n"


def test_sigterm_to_pure_run_goes_to_the_program_and_pure_exits_with_its_status(expr, tmp_path, store_root):
    """SIGTERM sent to `pure run` (systemd, `kill PID`) reaches the program, as if it had been
    exec'ed, and pure waits for it and exits with its status; before, pure died at once (143)
    and left the program running on, its closure no longer a temporary GC root."""
    # (a Python program: a shell's trap can miss a signal that comes just before its `wait`)
    program = ("import signal, sys\n"
               "signal.signal(signal.SIGTERM, lambda *_: (print('got-term', flush=True), sys.exit(7)))\n"
               "print('ready', flush=True)\n"
               "while True: signal.pause()\n")
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "run", expr, "-A", "tools",
                             "--program", "sh", "--", "-c", 'exec "$0" -c "$1"', sys.executable, program],
                            cwd=tmp_path, env=pure_env(store_root), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        _kill_group(proc)
    assert (proc.returncode, out) == (7, "got-term\n"), err
    # a program that does not handle it is killed by it, and pure ends by it too
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "shell", expr, "-A", "tools", "--pure",
                             "--command", "echo ready; exec busybox sleep 60"],
                            cwd=tmp_path, env=pure_env(store_root), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGTERM


def test_sigterm_as_soon_as_the_program_starts_goes_to_the_program(expr, tmp_path, store_root):
    """SIGTERM sent to pure as soon as its program had started: about one time in four it ran
    the CLI's handler instead of passing the signal on (pure said "terminated (SIGTERM)" and
    exited 143, the program ran on), because another thread of pure took the signal that the
    main thread held back over the fork, before the forwarding handler was in place.  The
    handler is in place before the fork now: every time the program gets it (and is ended)."""
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "shell", expr, "-A", "tools",
                                 "--pure", "--command", "echo ready; exec busybox sleep 60"],
                                cwd=tmp_path, env=pure_env(store_root), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            _kill_group(proc)
        assert proc.returncode == -signal.SIGTERM and "terminated" not in err, err


def test_a_program_killed_by_a_signal_ends_pure_by_that_signal(pure, expr, tmp_path):
    """A program killed by signal N made pure exit with status 128 + N: a shell running pure in
    a loop went on after Ctrl-C (bash stops a script at SIGINT only when its command died of
    it; a status of 130 says the command handled it).  pure ends by the same signal, as if it
    had exec'ed the program (and leaves no core file of its own); an exit status stays one."""
    r = pure("shell", expr, "-A", "tools", "--pure", "--command", "kill -INT $$", check=False, cwd=tmp_path)
    assert r.returncode == -signal.SIGINT and r.stderr.splitlines()[-1:] != ["error: interrupted"], r.stderr
    r = pure("run", expr, "-A", "tools", "--program", "sh", "--", "-c", "kill -SEGV $$", check=False, cwd=tmp_path)
    assert r.returncode == -signal.SIGSEGV and not any(n.startswith("core") for n in os.listdir(tmp_path))
    r = pure("shell", expr, "-A", "tools", "--pure", "--command", "exit 130", check=False, cwd=tmp_path)
    assert r.returncode == 130


def test_signals_pure_was_started_with_ignored_stay_ignored_for_the_program(expr, tmp_path, store_root):
    """The program got SIGINT, SIGQUIT, SIGTERM and SIGHUP at their default action even when pure
    had been started with them ignored: `nohup pure run …` did not protect the program from a
    hangup (pure even passed SIGHUP on to it), and `pure run … &` in a script was ended by
    Ctrl-C at the terminal.  As across an exec, they stay ignored."""
    bits = {s: 1 << (s - 1) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)}
    cmd = ["/bin/sh", "-c", 'trap "" HUP INT TERM; exec "$@"', "sh", sys.executable, "-m", "purestore.cli.main",
           "run", expr, "-A", "tools", "--program", "cat", "--", "/proc/self/status"]
    p = subprocess.run(cmd, cwd=tmp_path, env=pure_env(store_root), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    ignored = _ignored_signals(p.stdout)
    assert ignored & bits[signal.SIGHUP] and ignored & bits[signal.SIGINT] and ignored & bits[signal.SIGTERM]
    assert not ignored & bits[signal.SIGQUIT]
    p = subprocess.run(cmd[4:], cwd=tmp_path, env=pure_env(store_root), capture_output=True, text=True, timeout=300)
    assert _ignored_signals(p.stdout) & sum(bits.values()) == 0, "none ignored when pure's caller ignores none"


def test_pure_killed_kills_its_program(expr, tmp_path, store_root):
    """`pure run` killed by SIGKILL (a caller's timeout, the OOM killer) left its program running
    on, its closure no longer temp-rooted; as if pure had exec'ed it, the program is killed too."""
    import select
    proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "run", expr, "-A", "tools",
                             "--program", "sh", "--", "-c", "echo $$; exec sleep 60"],
                            cwd=tmp_path, env=pure_env(store_root), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        program = int(proc.stdout.readline())
        pidfd = os.pidfd_open(program)
        proc.kill()
        proc.wait()
        ready, _, _ = select.select([pidfd], [], [], 30)  # readable once the program has ended
        os.close(pidfd)
        assert ready, "the program outlived pure"
    finally:
        _kill_group(proc)


def _kill_group(proc) -> None:
    """End what is left of ``proc``'s session (the program, should pure have left it behind)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is not installed")
def test_shell_as_an_unprivileged_user_uses_a_user_namespace(pure, expr, tmp_path, store_root):
    """Run as uid 1000 (itself inside a user namespace): the code path for non-root callers."""
    probe = subprocess.run(["unshare", "-U", "--map-user=1000", "--map-group=1000", "id", "-u"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "1000":
        pytest.skip(f"cannot make a user namespace with unshare: {probe.stderr.strip()}")
    cmd = ["unshare", "-U", "--map-user=1000", "--map-group=1000", sys.executable, "-m", "purestore.cli.main",
           "shell", expr, "-A", "tools", "--pure", "--command", "id -u; ls /pure/store | wc -l"]
    p = subprocess.run(cmd, cwd=tmp_path, env=pure_env(store_root), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    uid, count = p.stdout.split()
    assert uid == "1000" and int(count) > 0


def test_shell_errors_are_reported_without_traceback(pure, tmp_path):
    r = pure("shell", tmp_path / "missing.py", check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = pure("shell", "/pure/store/00000000000000000000000000000000-nope", check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "not valid" in r.stderr


DEVSHELL = REPO / "expressions" / "devshell.py"
SEED_CACHE = os.environ.get("PURE_SEED_CACHE") or os.path.expanduser("~/.cache/purestore/seed-cache")


@pytest.mark.slow
@pytest.mark.skipif(not DEVSHELL.exists(), reason="expressions/devshell.py is not written yet")
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="no apt-get (the seeds are fetched with it)")
def test_devshell_gives_cc_and_make_with_store_paths_only(tmp_path, store_root):
    """The judged command: pure shell expressions/devshell.py --pure --command 'cc --version && make --version'.

    Builds the toolchain unless PURE_TEST_HELLO_STORE names a store where it is built already
    (shared with test_toolchain.py); seed downloads are shared through PURE_SEED_CACHE."""
    from conftest import run_pure

    _skip_unless_builds_run()
    root = os.environ.get("PURE_TEST_HELLO_STORE") or store_root
    r = run_pure("shell", DEVSHELL, "--pure", "--command", 'cc --version && make --version && echo "PATH=$PATH"',
                 root=root, env={"PURE_SEED_CACHE": SEED_CACHE}, check=False, cwd=REPO, timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "version" in r.stdout.splitlines()[0].lower(), r.stdout  # cc --version's first line
    path_line = [l for l in r.stdout.splitlines() if l.startswith("PATH=")][-1]
    dirs = path_line.removeprefix("PATH=").split(":")
    assert dirs and all(d.startswith("/pure/store/") for d in dirs), dirs


def test_shell_hook_runs_before_the_command_and_the_prompt(pure, expr, tmp_path):
    p = pure("shell", expr, "-A", "hooked", "-A", "tools", "--pure", "--command", 'echo "got $GREETING"', cwd=tmp_path)
    assert p.stdout.splitlines() == ["hook-ran", "got from-hook"]
    p = pure("shell", expr, "-A", "hooked", "-A", "tools", "--pure", input='echo "again $GREETING"\nexit\n',
             cwd=tmp_path)
    assert "again from-hook" in p.stdout


def _interactive(expr, tmp_path, store_root, *args, env) -> str:
    """`pure shell EXPR ARGS` with its stdin, stdout and stderr on a pseudo-terminal (so that
    the shell is interactive); types a line that prints P=$PATH, S=$PS1, M=$MARK and E=$ENV; returns
    the terminal's output."""
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "shell", expr, *args], cwd=tmp_path,
                         env=pure_env(store_root, extra=env), stdin=slave, stdout=slave, stderr=slave,
                         start_new_session=True)
    os.close(slave)
    os.write(master, b'echo "P=$PATH"; echo "S=$PS1"; echo "M=$MARK"; echo "E=$ENV"; exit\n')
    data = read_pty(master)
    os.close(master)
    assert p.wait(timeout=120) == 0, data
    return data.decode(errors="replace").replace("\r", "")


@pytest.mark.skipif(not os.access("/bin/bash", os.X_OK), reason="no /bin/bash on this host")
def test_an_interactive_bash_keeps_the_environment_s_path_and_prompt(expr, tmp_path, store_root):
    """An interactive bash (the host's, for an environment without a shell) read ~/.bashrc,
    whose PATH went in front of the environment's, and into a --pure shell's PATH (and
    /etc/bash.bashrc replaced the prompt).  As in nix-shell: --pure reads no ~/.bashrc, an
    impure shell reads it and then puts the environment's bin directories first again."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text('export PATH="/from-bashrc/bin:$PATH"\nMARK=bashrc-read\nPS1="bashrc$ "\n')
    env = {"HOME": str(home), "TERM": "dumb", "PATH": "/usr/bin:/bin"}
    out = _interactive(expr, tmp_path, store_root, "-A", "plain", "--pure", env=env)
    path = re.search(r"^P=(/.*)$", out, re.M).group(1).split(":")
    assert len(path) == 1 and path[0].startswith("/pure/store/") and path[0].endswith("-plain-1.0/bin"), out
    assert re.search(r"^S=\[pure-shell:\\w\]\$ $", out, re.M) and re.search(r"^M=$", out, re.M), out
    out = _interactive(expr, tmp_path, store_root, "-A", "plain", env=env)
    path = re.search(r"^P=(/.*)$", out, re.M).group(1).split(":")
    assert path[0].endswith("-plain-1.0/bin") and "/from-bashrc/bin" in path and path[-2:] == ["/usr/bin", "/bin"]
    assert re.search(r"^M=bashrc-read$", out, re.M), out


def test_an_interactive_sh_reads_the_caller_s_env_file_and_passes_it_on(expr, tmp_path, store_root):
    """An interactive sh reads its rc file through $ENV, which named pure's rc file in the
    shell: every sh started in it read that file again.  Without --pure the caller's $ENV file
    is read (then PATH put back in front) and $ENV is the caller's again; with --pure neither."""
    shrc = tmp_path / "shrc"
    shrc.write_text('MARK=env-read\nPATH="/from-env/bin:$PATH"\n')
    env = {"ENV": str(shrc), "TERM": "dumb", "PATH": "/usr/bin:/bin"}
    out = _interactive(expr, tmp_path, store_root, "-A", "tools", env=env)
    path = re.search(r"^P=(/.*)$", out, re.M).group(1).split(":")
    assert path[0].endswith("-bbtools-1.0/bin") and "/from-env/bin" in path, out
    assert re.search(r"^M=env-read$", out, re.M) and re.search(rf"^E={re.escape(str(shrc))}$", out, re.M), out
    out = _interactive(expr, tmp_path, store_root, "-A", "tools", "--pure", env=env)
    assert re.search(r"^M=$", out, re.M) and re.search(r"^E=$", out, re.M), out
    assert re.search(r"^P=/pure/store/[^:]*-bbtools-1.0/bin$", out, re.M), out


def _ignored_signals(status: str) -> int:
    (line,) = [l for l in status.splitlines() if l.startswith("SigIgn:")]
    return int(line.split()[1], 16)


def test_the_program_does_not_inherit_python_s_ignored_sigpipe(pure, expr, tmp_path):
    """Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec: the
    shell and its commands would then get EPIPE instead of being ended by SIGPIPE, so that
    `while :; do echo y; done | head -1` never ended.  They start with the default action."""
    bits = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
    p = pure("shell", expr, "-A", "tools", "--pure", "--command", "cat /proc/self/status", cwd=tmp_path)
    assert _ignored_signals(p.stdout) & bits == 0
    p = pure("run", expr, "-A", "tools", "--program", "cat", "--", "/proc/self/status", cwd=tmp_path)
    assert _ignored_signals(p.stdout) & bits == 0


@pytest.mark.slow
@pytest.mark.skipif(not DEVSHELL.exists(), reason="expressions/devshell.py is not written yet")
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="no apt-get (the seeds are fetched with it)")
def test_ar_in_the_devshell_is_the_toolchain_s_not_busybox_s(tmp_path, store_root):
    """The devshell's shell is busybox's, which runs its own applets before PATH: 'ar' typed in
    the shell was busybox's, which cannot write archives ('ar rcs lib.a x.o' failed)."""
    from conftest import run_pure

    _skip_unless_builds_run()
    root = os.environ.get("PURE_TEST_HELLO_STORE") or store_root
    r = run_pure("shell", DEVSHELL, "--pure", "--command", 'ar --version; echo "AR=$AR"; '
                 f"cd {tmp_path} && echo x > f.o && ar rcs libf.a f.o && ar t libf.a",
                 root=root, env={"PURE_SEED_CACHE": SEED_CACHE}, check=False, cwd=REPO, timeout=3000)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "LLVM" in r.stdout and "BusyBox" not in r.stdout + r.stderr
    assert any(l.startswith("AR=/pure/store/") and l.endswith("/bin/ar") for l in r.stdout.splitlines())
    assert r.stdout.splitlines()[-1] == "f.o"
