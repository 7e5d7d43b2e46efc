"""pure build / pure store realise / pure log: real builds with a static busybox in the sandbox."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import BUSYBOX, run_pure, sandbox_build_reason
from purestore.formats.derivation import Derivation, DerivationOutput, fill_output_paths, render_aterm
from purestore.formats.derivation import drv_references, parse_aterm

REASON = sandbox_build_reason()
needs_sandbox = pytest.mark.skipif(REASON is not None, reason=REASON or "")
pytestmark = needs_sandbox


class Drvs:
    """Writes derivations straight into a store (no expression layer needed)."""

    def __init__(self, store):
        self.store = store
        self.sd = store.store_dir
        d = Path(store.real_store_dir).parent / "bbsrc" / "busybox"
        if not d.exists():
            (d / "bin").mkdir(parents=True)
            shutil.copy(BUSYBOX, d / "bin" / "busybox")
        self.busybox = store.print_path(store.add_path(str(d), "busybox"))
        self.sh = f"{self.busybox}/bin/busybox"

    def _lookup(self, p):
        with open(self.store.real_path(self.store.parse_path(p)), "rb") as f:
            return parse_aterm(f.read())

    def add(self, name: str, script: str, *, deps=(), srcs=(), outputs=("out",), fixed: tuple | None = None,
            builder: str | None = None, args=None, env=None) -> str:
        """A derivation running `busybox sh -c SCRIPT` (with $B = busybox); returns its .drv path."""
        dep_outs = {}
        for d in deps:
            p, _, o = d.partition("!")
            dep_outs.setdefault(p, set()).add(o or "out")
        if fixed:
            algo, h = fixed
            outs = {"out": DerivationOutput("", algo, h)}
        else:
            outs = {o: DerivationOutput("") for o in outputs}
        e = {"name": name, "system": "x86_64-linux", "builder": builder or self.sh, "B": self.sh, **(env or {})}
        for o in outs:
            e[o] = ""
        if len(outputs) > 1:
            e["outputs"] = " ".join(outputs)
        drv = Derivation(outputs=outs, input_drvs={k: frozenset(v) for k, v in dep_outs.items()},
                         input_srcs=frozenset([self.busybox, *srcs]), system="x86_64-linux",
                         builder=builder or self.sh, args=tuple(args if args is not None else ("sh", "-c", script)),
                         env=e)
        drv = fill_output_paths(drv, self._lookup, self.sd)
        aterm = render_aterm(drv)
        sp = self.store.add_text(drv.name + ".drv", aterm, drv_references(drv, self.sd))
        return self.store.print_path(sp)

    def out(self, drv_path: str, o: str = "out") -> str:
        return self._lookup(drv_path).outputs[o].path


@pytest.fixture
def drvs(settings):
    from purestore.store.local import LocalStore
    store = LocalStore.open(settings)
    yield Drvs(store)
    store.close()


# -- helpers for expression-file tests ---------------------------------------------------------

HEADER = '''\
from purestore.expr import derivation, source, fetchurl
bb = source("bb")
B = f"{bb}/bin/busybox"
def sh(name, script, **kw):
    return derivation(name=name, system="x86_64-linux", builder=B, args=["sh", "-c", script], B=B, **kw)
'''


@pytest.fixture
def expr(tmp_path):
    """expr(BODY) writes an expression file (HEADER + BODY) next to a busybox source dir."""
    bbdir = tmp_path / "bb" / "bin"
    bbdir.mkdir(parents=True)
    shutil.copy(BUSYBOX, bbdir / "busybox")

    def write(body: str, name: str = "e.py") -> Path:
        f = tmp_path / name
        f.write_text(HEADER + body)
        return f
    return write


def build(pure, tmp_path, f, *args, check=True, **kw):
    return pure("build", f, *args, cwd=tmp_path, check=check, **kw)


def open_store(store_root, store_dir=None):
    from purestore.store.local import LocalStore
    from purestore.store.settings import load_settings
    s = load_settings(env={"PURE_CONFIG": "/dev/null"}, root=str(store_root), store_dir=store_dir)
    return LocalStore.open(s)


# -- building and linking ----------------------------------------------------------------------


def test_build_links_result_registers_root_and_prints_paths(pure, expr, tmp_path, store_root):
    f = expr('default = sh("hello", "$B mkdir $out; echo hello > $out/greeting")\n')
    p = build(pure, tmp_path, f)
    out = p.stdout.strip()
    assert out.startswith("/pure/store/") and out.endswith("-hello")
    link = tmp_path / "result"
    assert (link / "greeting").read_text() == "hello\n"
    assert os.readlink(link) == f"{store_root}{out}"  # rooted store: the link points at the real path
    roots = list((store_root / "pure/var/pure/gcroots/auto").iterdir())
    assert [os.readlink(r) for r in roots] == [str(link)]
    info = json.loads(pure("store", "path-info", "--json", out).stdout)[0]
    assert info["deriver"].endswith("-hello.drv") and info["references"] == []
    # a second build does nothing and prints the same path
    p2 = build(pure, tmp_path, f)
    assert p2.stdout.strip() == out and "will be built" not in p2.stderr


def test_bad_build_options_are_usage_errors_also_when_every_output_is_valid(pure, expr, tmp_path):
    """A negative --cores or --max-jobs, or --rounds 0, is refused whatever the store holds: a
    no-op build (every output valid, answered without the scheduler) refuses them too, as
    `pure store realise` does (it took them without a word)."""
    f = expr('default = sh("noop", "$B echo hi > $out")\n')
    out = build(pure, tmp_path, f, "--no-link").stdout.strip()
    for bad, said in ((["--cores", "-1"], "--cores must be 0"), (["-j", "-1"], "--max-jobs must be 0"),
                      (["--rounds", "0"], "--rounds must be at least 1")):
        p = build(pure, tmp_path, f, "--no-link", *bad, check=False)
        assert p.returncode == 2 and said in p.stderr and p.stdout == "", (bad, p.stderr)
        drv = pure("instantiate", f).stdout.strip()
        p = pure("store", "realise", drv, *bad, check=False)
        assert p.returncode == 2 and said in p.stderr and p.stdout == "", (bad, p.stderr)
    assert build(pure, tmp_path, f, "--no-link", "--cores", "0").stdout.strip() == out


def test_an_empty_out_link_is_a_usage_error(pure, expr, tmp_path):
    """`-o ''` is refused before anything is built (it built, then tried to make the working
    directory the result link: "something else than a symlink is there")."""
    f = expr('default = sh("emptyo", "$B echo hi > $out")\n')
    p = build(pure, tmp_path, f, "-o", "", check=False)
    assert p.returncode == 2 and p.stdout == "" and "will be built" not in p.stderr
    assert p.stderr == "error: -o/--out-link needs a name for the result link (or --no-link for none)\n"
    assert build(pure, tmp_path, f, "-o", "", "--no-link").stdout.strip().endswith("-emptyo")


def test_multiple_outputs_link_result_dash_output_and_out_link_name(pure, expr, tmp_path):
    f = expr('default = sh("multi", "$B mkdir $out $dev; echo $dev > $out/devpath; echo d > $dev/x", '
             'outputs=["out", "dev"])\n')
    p = build(pure, tmp_path, f, "-o", "res")
    outs = p.stdout.split()
    assert len(outs) == 2
    assert (tmp_path / "res").is_symlink() and (tmp_path / "res-dev").is_symlink()
    assert (tmp_path / "res-dev" / "x").read_text() == "d\n"
    info = {i["path"]: i for i in json.loads(pure("store", "path-info", "--json", *outs).stdout)}
    out_path = next(o for o in outs if not o.endswith("-dev"))
    dev_path = next(o for o in outs if o.endswith("-dev"))
    assert info[out_path]["references"] == [dev_path]  # out refers to dev, not the other way
    assert info[dev_path]["references"] == []
    build(pure, tmp_path, f, "--no-link", "-o", "other")
    assert not (tmp_path / "other").exists()


def test_references_are_scanned_only_among_inputs_and_self(pure, expr, tmp_path):
    f = expr('''\
a = sh("a", "$B mkdir $out; echo hi > $out/f; $B ln -s $out/f $out/self")
unrelated = sh("unrelated", "echo x > $out")
hidden = "".join(reversed(str(unrelated)))  # no string context: not an input of b
b = sh("b", f"$B mkdir $out; echo {a} > $out/ref; echo {hidden} | $B rev > $out/noref")
default = [b, unrelated]
''')
    p = build(pure, tmp_path, f, "--no-link", "-j", "1")
    b = next(l for l in p.stdout.split() if l.endswith("-b"))
    unrelated = next(l for l in p.stdout.split() if l.endswith("-unrelated"))
    assert Path(f"{tmp_path}/root{b}/noref").read_text().strip() == unrelated
    info = json.loads(pure("store", "path-info", "--json", "-r", b).stdout)
    by = {i["path"].rsplit("-", 1)[1]: i for i in info}
    assert by["a"]["references"] == [by["a"]["path"]]  # self-reference kept
    assert by["b"]["references"] == [by["a"]["path"]]  # the unrelated hash is not an input: ignored


def test_a_builder_killed_by_a_signal_is_told_from_one_that_exits_with_128_plus_n(pure, expr, tmp_path):
    """A builder that dies of a signal (a stack overflow: PID 1 of its namespace ignores a `kill`)
    is said to be killed by it; one that exits with status 139 (as a shell does after its child
    crashed) exited with status 139: it was said to be killed by SIGSEGV too."""
    f = expr('crash = sh("crash", "ulimit -s 256; f(){ f; }; f")\n'
             'status = sh("status", "exit 139")\n')
    p = build(pure, tmp_path, f, "-A", "crash", check=False)
    assert p.returncode == 1 and "-crash.drv was killed by signal 11 (SIGSEGV)\n" in p.stderr, p.stderr
    p = build(pure, tmp_path, f, "-A", "status", check=False)
    assert p.returncode == 1 and "-status.drv exited with status 139\n" in p.stderr, p.stderr


def test_an_attribute_no_environment_can_hold_is_named(pure, expr, tmp_path):
    """A NUL byte in an attribute or an argument, an '=' in an attribute's name: the error names
    the attribute or argument (it blamed the builder: "cannot run builder '…/busybox' in the
    sandbox: embedded null byte", and recorded a sandbox refusal); passAsFile takes any bytes."""
    f = expr('nul = sh("nul", "$B mkdir $out", foo="a\\0b")\n'
             'arg = derivation(name="arg", system="x86_64-linux", builder=B, args=["-c", "x\\0y"], B=B)\n'
             'eq = sh("eq", "$B mkdir $out", **{"A=B": "1"})\n'
             'empty = derivation(name="empty", system="x86_64-linux", builder="", args=[])\n'
             'file = sh("file", "$B mkdir $out; $B cat $fooPath > $out/f", foo="a\\0b", passAsFile=["foo"])\n')
    said = {"nul": "attribute 'foo' holds a NUL byte (at offset 1), which no environment variable can; "
                   "pass it as a file instead (passAsFile = ['foo'])",
            "arg": "its argument 2 ('x\\x00y') holds a NUL byte",
            "eq": "attribute 'A=B' cannot be an environment variable",
            "empty": "its builder is empty"}  # (was "execve: argv first element cannot be empty")
    for attr, what in said.items():
        p = build(pure, tmp_path, f, "-A", attr, "--no-link", check=False)
        assert p.returncode == 1 and f"-{attr}.drv: {what}" in p.stderr, p.stderr
        assert "busybox" not in p.stderr.split("error:", 1)[1]
    out = build(pure, tmp_path, f, "-A", "file", "--no-link").stdout.strip()
    assert (tmp_path / "root" / out.lstrip("/") / "f").read_bytes() == b"a\0b"
    # a builtin builder is given the derivation, not an environment: it takes any attribute
    import base64
    import hashlib
    (tmp_path / "payload").write_bytes(b"x")
    sri = "sha256-" + base64.b64encode(hashlib.sha256(b"x").digest()).decode()
    g = expr(f'default = fetchurl(url="file://{tmp_path}/payload", hash="{sri}", note="a\\0b", **{{"A=B": "1"}})\n',
             name="g.py")
    assert build(pure, tmp_path, g, "--no-link").stdout.strip().endswith("-payload")


def test_system_builtin_takes_only_a_builtin_builder(pure, expr, tmp_path, store_root):
    """A derivation for system 'builtin' whose builder is a program is refused, as Nix refuses
    it (it was run in the sandbox as if it were for x86_64-linux)."""
    f = expr('default = derivation(name="sysb", system="builtin", builder=B, args=["sh", "-c", "$B mkdir $out"], B=B)\n')
    p = build(pure, tmp_path, f, check=False)
    assert p.returncode == 1 and "-sysb.drv is for system 'builtin', which only a builtin builder " \
        "(builtin:NAME) builds, but its builder is '/pure/store/" in p.stderr, p.stderr
    st = open_store(store_root)
    try:
        assert [x for x in st.valid_paths() if x.name == "sysb"] == []
    finally:
        st.close()


def test_an_attribute_or_argument_too_big_for_linux_is_named(pure, expr, tmp_path):
    """An attribute or an argument over Linux's 128 KiB for one string is named, with passAsFile
    as the way out; attributes too big together say so (each was "cannot run builder '…/busybox'
    in the sandbox: Argument list too long"). One just under the limit builds."""
    f = expr('big = sh("big", "$B mkdir $out", foo="x" * 200000)\n'
             'edge = sh("edge", "$B mkdir $out; echo ${#foo} > $out/n", foo="x" * (131072 - 6))\n'
             'arg = sh("arg", "$B mkdir $out #" + "x" * 200000)\n'
             'file = sh("file", "$B mkdir $out; $B wc -c < $fooPath > $out/n", foo="x" * 200000, '
             'passAsFile=["foo"])\n'
             'default = [big, arg]\n')
    p = build(pure, tmp_path, f, "--no-link", "-k", check=False)
    assert p.returncode == 1
    assert ("-big.drv: attribute 'foo' is too big for an environment variable (200005 bytes, Linux takes "
            "131072 at most); pass it as a file instead (passAsFile = ['foo'])") in p.stderr
    assert "-arg.drv: its argument 3 ('$B mkdir $out #xxx" in p.stderr
    assert "is too big for an argument (200016 bytes, Linux takes 131072 at most)" in p.stderr
    p = build(pure, tmp_path, f, "-A", "edge", "-A", "file", "--no-link")
    assert [(tmp_path / "root" / o.lstrip("/") / "n").read_text().strip() for o in p.stdout.split()] == \
        ["131066", "200000"]
    # 7 MiB together: more than Linux takes whatever the stack limit (3/4 of 8 MiB at most)
    g = expr('default = sh("many", "$B mkdir $out", **{f"v{i}": "x" * 100000 for i in range(70)})\n', name="g.py")
    p = build(pure, tmp_path, g, "--no-link", check=False)
    assert p.returncode == 1 and "-many.drv: cannot run builder '/pure/store/" in p.stderr
    assert "Argument list too long (its arguments and environment together are more than Linux takes; pass " \
        "the big attributes as files: passAsFile)" in p.stderr


def test_failed_build_registers_nothing_and_shows_status_tail_and_log(pure, expr, tmp_path, store_root):
    lines = "; ".join(f"echo line{i}" for i in range(40))
    f = expr(f'default = sh("broken", "{lines}; $B mkdir $out; exit 3")\n')
    p = build(pure, tmp_path, f, check=False)
    assert p.returncode == 1
    assert "builder for " in p.stderr and "broken.drv" in p.stderr and "exited with status 3" in p.stderr
    assert "line39" in p.stderr and "line15" in p.stderr and "line14\n" not in p.stderr  # last 25 lines
    assert "Traceback" not in p.stderr
    assert "pure log" in p.stderr
    assert not (tmp_path / "result").exists()
    st = open_store(store_root)
    try:
        assert [p for p in st.valid_paths() if p.name == "broken"] == []
        drvp = next(p for p in st.valid_paths() if p.name == "broken.drv")
        log = pure("log", st.print_path(drvp)).stdout
        assert log.splitlines()[0] == "line0" and log.splitlines()[-1] == "line39"
        from purestore.store import events
        b = events.query_builds(st)
        assert b[0]["status"] == "failed" and b[0]["name"] == "broken"
    finally:
        st.close()


def test_long_lines_are_cut_in_the_tail_of_a_failed_build_not_in_its_log(pure, expr, tmp_path):
    """25 lines of 50,000 characters made an error message (and a --json event) of 1.25 MB:
    each tail line keeps its first 4096 characters and says how many more `pure log` has."""
    f = expr("default = sh('long', \"for i in $($B seq 30); do $B head -c 50000 /dev/zero | $B tr '\\\\0' x; "
             "echo; done; exit 2\")\n")
    p = build(pure, tmp_path, f, check=False)
    assert p.returncode == 1 and len(p.stderr) < 25 * 4300, len(p.stderr)
    assert p.stderr.count(f"  > {'x' * 4096} … (45904 more characters: see `pure log`)\n") == 25, p.stderr[-500:]
    drv = next(w for w in p.stderr.split() if w.endswith("long.drv)")).rstrip(")")
    assert pure("log", drv).stdout.splitlines() == ["x" * 50000] * 30


def test_crlf_line_ends_are_line_ends_in_the_tail_and_with_L(pure, expr, tmp_path):
    """A builder that ends its lines with CRLF (a Windows-made script, some test runners): the
    tail of a failed build and -L show the lines without a trailing \\r (as the post-build
    hook's lines are shown); `pure log` gives the bytes as written."""
    f = expr("default = sh('crlf', \"printf 'one\\\\r\\\\ntwo\\\\r\\\\n'; exit 2\")\n")
    p = build(pure, tmp_path, f, "-L", check=False)
    assert p.returncode == 1 and "  > one\n  > two\n" in p.stderr and "crlf> one\n" in p.stderr, p.stderr
    assert "\\r" not in p.stderr
    drv = next(w for w in p.stderr.split() if w.endswith("crlf.drv)")).rstrip(")")
    assert pure("log", drv, input=b"").stdout == b"one\r\ntwo\r\n"  # (bytes: no newline translation)


def test_failed_build_tail_shows_control_sequences_the_stored_log_keeps_them(pure, expr, tmp_path, store_root):
    """A builder's output may hold terminal control sequences (retitle the window, clear the
    screen, overwrite with \\r or backspace): in the tail of a failed build and with -L, pure shows
    them as text (\\x1b...) instead of sending them to the terminal; `pure log` gives the bytes."""
    import re

    from conftest import pure_env, run_pure_on_tty
    script = r"printf 'ok\033]0;pwned\007\033[2Jwiped\rfake\010x\n'; exit 2"
    f = expr(f"default = sh('esc', {script!r})\n")
    shown = r"ok\x1b]0;pwned\x07\x1b[2Jwiped\rfake\x08x"
    p = build(pure, tmp_path, f, "-L", check=False, input=b"")
    err = p.stderr.decode()
    assert p.returncode == 1 and "exited with status 2" in err
    assert f"  > {shown}\n" in err and f"esc> {shown}\n" in err  # the tail, and the -L line
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", err), err
    drv = re.search(r"pure log (\S+\.drv)\)", err)[1]
    log = pure("log", drv, input=b"").stdout
    assert log == b"ok\x1b]0;pwned\x07\x1b[2Jwiped\rfake\x08x\n"
    # on a terminal (pure's own status line uses \r and \x1b[K; the builder's sequences are text)
    rc, _, text = run_pure_on_tty("build", f, "--no-link", "-L", cwd=tmp_path, env=pure_env(store_root))
    assert rc == 1 and shown in text
    for raw in ("\x1b]0;", "\x07", "\x1b[2J", "\x08"):
        assert raw not in text, raw


def test_keep_failed_keeps_the_build_dir_and_says_where(pure, expr, tmp_path):
    f = expr('default = sh("kf", "echo data > /build/left; exit 1")\n')
    p = build(pure, tmp_path, f, "--keep-failed", check=False)
    assert p.returncode == 1
    line = next(l for l in p.stderr.splitlines() if l.startswith("keeping build directory "))
    kept = Path(line.split()[3])  # <tmp>/pure-build-kf-XXXX/build
    assert kept.name == "build" and kept.parent.name.startswith("pure-build-kf-"), kept
    assert (kept / "left").read_text() == "data\n"
    shutil.rmtree(kept.parent)  # only the kept directory: never its parent (the shared TMPDIR)


def test_fail_fast_by_default_and_keep_going_on_request(pure, expr, tmp_path, store_root):
    f = expr('''\
bad = sh("bad", "exit 1")
slow = [sh(f"ok{i}", f"echo {i} > $out") for i in range(4)]
after = sh("after", f"echo {bad} > $out")
default = [bad, after] + slow
''')
    p = build(pure, tmp_path, f, "-k", "-j", "1", "--no-link", check=False)
    assert p.returncode == 1
    st = open_store(store_root)
    try:
        names = {p.name for p in st.valid_paths()}
    finally:
        st.close()
    assert {"ok0", "ok1", "ok2", "ok3"} <= names and "bad" not in names and "after" not in names


def test_keep_going_says_which_derivations_a_failure_leaves_unbuilt(pure, expr, tmp_path, store_root):
    """-k: a derivation whose dependency failed is not built; a line and a `failed` event say
    so (before, the plan listed it and nothing more was said of it: no event ended it, and the
    status line counted it as queued to the end)."""
    f = expr('''\
bad = sh("bad", "exit 1")
after = sh("after", f"echo {bad} > $out")
later = sh("later", f"echo {after} > $out")
ok = sh("fine", "echo ok > $out")
default = [bad, later, ok]
''')
    p = build(pure, tmp_path, f, "-k", "--no-link", "--json", check=False)
    assert p.returncode == 1
    evs = [json.loads(line) for line in p.stdout.splitlines()]
    [plan] = [e for e in evs if e["type"] == "plan"]
    assert len(plan["willBuild"]) == 4
    ended = {e["drv"]: e for e in evs if e["type"] in ("built", "failed")}
    assert sorted(ended) == sorted(plan["willBuild"])
    by_name = {e["name"]: e for e in ended.values()}
    assert by_name["fine"]["type"] == "built" and by_name["bad"]["type"] == "failed"
    bad, after = by_name["bad"]["drv"], by_name["after"]["drv"]
    assert by_name["after"]["error"] == f"not built: its dependency {bad} failed"
    assert by_name["later"]["error"] == f"not built: its dependency {after} failed"
    assert by_name["after"]["dependencyFailed"] is True and "dependencyFailed" not in by_name["bad"]
    assert evs[-1]["type"] == "error" and evs[-1]["error"].startswith(f"builder for {bad} exited with status 1")
    p = build(pure, tmp_path, f, "-k", "--no-link", check=False)  # the same, for people
    assert p.returncode == 1
    assert f"not building '{after}': its dependency '{bad}' failed\n" in p.stderr
    assert f"not building '{by_name['later']['drv']}': its dependency '{after}' failed\n" in p.stderr
    # the status line counts the failure and what it left unbuilt apart, as the final error
    # does ("builder for ... exited": one failure)
    from conftest import pure_env, run_pure_on_tty
    rc, _, text = run_pure_on_tty("build", f, "-k", "--no-link", cwd=tmp_path, env=pure_env(store_root))
    assert rc == 1 and "failed 1, not built 2" in text and "failed 3" not in text


def test_setuid_bits_do_not_survive_and_writable_outputs_are_refused(pure, expr, tmp_path, store_root):
    f = expr('''\
suid = sh("suid", "$B mkdir $out; $B cp $B $out/x; $B chmod 6755 $out/x; $B chmod 1755 $out")
ww = sh("ww", "$B mkdir $out; echo x > $out/f; $B chmod 666 $out/f")
''')
    p = build(pure, tmp_path, f, "-A", "suid")
    out = p.stdout.strip()
    real = f"{store_root}{out}"
    assert oct(os.lstat(real + "/x").st_mode & 0o7777) == oct(0o555)
    assert oct(os.lstat(real).st_mode & 0o7777) == oct(0o555)
    p = build(pure, tmp_path, f, "-A", "ww", check=False)
    assert p.returncode == 1 and "world-writable" in p.stderr and "/f" in p.stderr
    st = open_store(store_root)
    try:
        assert not [x for x in st.valid_paths() if x.name == "ww"]
        from purestore.store import events
        assert any("writable" in r["what"] for r in events.query_sandbox_refusals(st))
    finally:
        st.close()


def test_cycle_between_outputs_is_an_error(pure, expr, tmp_path):
    f = expr('default = sh("cyc", "$B mkdir $out $dev; echo $dev > $out/d; echo $out > $dev/o", '
             'outputs=["out", "dev"])\n')
    p = build(pure, tmp_path, f, check=False)
    assert p.returncode == 1 and "cycle" in p.stderr


def test_builder_environment_is_exactly_as_specified(pure, expr, tmp_path, store_root):
    f = expr('default = sh("envdump", "$B env > $out; $B id -u >> $out; $B hostname >> $out; echo $$ >> $out", '
             'FOO="bar")\n')
    p = build(pure, tmp_path, f, "--cores", "3")
    text = Path(f"{store_root}{p.stdout.strip()}").read_text().splitlines()
    env = dict(l.split("=", 1) for l in text if "=" in l)
    assert text[-3:] == ["1000", "localhost", "1"]
    assert env["PATH"] == "/path-not-set" and env["HOME"] == "/homeless-shelter"
    assert env["NIX_BUILD_CORES"] == "3" and env["NIX_STORE"] == "/pure/store"
    assert env["SOURCE_DATE_EPOCH"] == "315532800"
    assert env["TMPDIR"] == env["TEMPDIR"] == env["TMP"] == env["TEMP"] == env["PWD"] == "/build"
    assert env["FOO"] == "bar" and env["name"] == "envdump" and env["out"] == p.stdout.strip()
    expected = {"PATH", "HOME", "NIX_STORE", "NIX_BUILD_CORES", "NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP",
                "TEMP", "PWD", "NIX_LOG_FD", "TERM", "SOURCE_DATE_EPOCH", "SHLVL",
                "name", "system", "builder", "out", "B", "FOO"}
    assert set(env) == expected


def test_pass_as_file(pure, expr, tmp_path, store_root):
    f = expr('default = sh("paf", "$B cat $bigPath > $out; echo >> $out; echo $bigPath >> $out", '
             'big="some\\ntext", passAsFile=["big"])\n')
    p = build(pure, tmp_path, f)
    # the file name is Nix's: .attr-<nix32 of sha256 of the attribute name>
    assert Path(f"{store_root}{p.stdout.strip()}").read_text() == \
        "some\ntext\n/build/.attr-1lak0mvllw8rv9i9ygkglvhqsq19qi9ynl4bi7gbf69ab5nzw89a\n"


def test_json_events(pure, expr, tmp_path):
    f = expr('default = sh("js", "echo hi; echo $B > $out")\n')
    p = build(pure, tmp_path, f, "--json", "-L")
    evs = [json.loads(l) for l in p.stdout.splitlines()]
    types = [e["type"] for e in evs]
    assert types[0] == "plan" and "start" in types and "built" in types and types[-1] == "result"
    assert any(e["type"] == "log" and e["line"] == "hi" for e in evs)
    assert evs[-1]["results"][0]["outputs"]["out"].endswith("-js")


def test_print_build_logs(pure, expr, tmp_path):
    f = expr('default = sh("pl", "echo visible-line; echo x > $out")\n')
    p = build(pure, tmp_path, f, "-L")
    assert "pl> visible-line" in p.stderr


def test_store_realise_and_log_of_an_output(pure, drvs, store_root):
    d = drvs.add("rl", "echo from-the-builder; echo x > $out")
    p = pure("store", "realise", d)
    assert p.stdout.strip() == drvs.out(d)
    assert pure("log", drvs.out(d)).stdout == "from-the-builder\n"
    assert pure("log", d).stdout == "from-the-builder\n"


def test_a_truncated_build_log_is_an_error_not_shown_as_complete(pure, drvs, store_root):
    """A stored log cut short (a full disk, damage): `pure log` says so instead of printing
    what it could decompress as if it were the whole log."""
    import glob
    d = drvs.add("cut", "i=0; while [ $i -lt 3000 ]; do echo line $i $i $i; i=$((i+1)); done; echo x > $out")
    pure("store", "realise", d)
    assert pure("log", d).stdout.endswith("line 2999 2999 2999\n")
    (log,) = glob.glob(str(store_root / "**" / "log" / "*" / "*.zst"), recursive=True)
    with open(log, "r+b") as f:
        f.truncate(f.seek(0, 2) * 2 // 3)
    p = pure("log", d, check=False)
    assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error: the build log ") and "is truncated" in p.stderr, p.stderr


def test_live_status_line_on_a_terminal_plain_lines_otherwise(expr, tmp_path, store_root):
    import re
    from conftest import pure_env, run_pure_on_tty
    f = expr('default = [sh(f"tty{i}", f"$B sleep 0.3; echo {i} > $out") for i in range(3)]\n')
    rc, _out, text = run_pure_on_tty("build", f, "--no-link", "-j", "1", cwd=tmp_path, env=pure_env(store_root))
    assert rc == 0, text
    assert re.search(r"\r\x1b\[K\[0:\d\d\] built \d/3, running 1, queued \d \| tty\d", text), text
    # not a terminal: no control sequences
    p2 = build(lambda *a, **k: run_pure(*a, root=store_root, **k), tmp_path, f, "--no-link", "--check")
    assert "\x1b" not in p2.stderr and "checking" in p2.stderr


def test_a_real_build_sees_only_its_inputs_and_no_network(pure, expr, tmp_path, store_root):
    """One build probes its sandbox: another valid store path, host files, the host's loopback
    server, DNS, writing to inputs and to the store dir root."""
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    hits = []

    def serve():
        try:
            c, _ = srv.accept()
            hits.append(1)
            c.close()
        except OSError:
            pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    repo = Path(__file__).resolve().parent.parent
    f = expr(f'''\
secret = sh("secret", "echo s > $out")
hidden = "".join(reversed(str(secret)))  # no string context: not an input of probe
probe = sh("probe", """
  r=$($B echo {{hidden}} | $B rev)
  [ -e $r ] && echo SEES-SECRET
  for p in /etc/shadow /root {repo} /bin/sh /usr; do [ -e $p ] && echo SEES-HOST $p; done
  $B nc -w 2 127.0.0.1 {port} </dev/null && echo REACHED-HOST
  $B nslookup example.com >/dev/null 2>&1 && echo RESOLVED
  $B touch {{bb}}/x 2>/dev/null && echo WROTE-INPUT
  $B touch /etc/passwd 2>/dev/null && echo WROTE-ETC
  $B ls /pure/store
  $B id -u; $B hostname; echo $$
  $B mkdir $out
""".replace("{{hidden}}", hidden).replace("{{bb}}", str(bb)))
''')
    build(pure, tmp_path, f, "-A", "secret", "--no-link")
    p = build(pure, tmp_path, f, "-A", "probe", "--no-link", "-L")
    srv.close()
    log = "\n".join(l.split("> ", 1)[1] for l in p.stderr.splitlines() if l.startswith("probe> "))
    for bad in ("SEES-SECRET", "SEES-HOST", "REACHED-HOST", "RESOLVED", "WROTE-INPUT", "WROTE-ETC"):
        assert bad not in log, log
    assert hits == []
    lines = log.splitlines()
    assert lines[-3:] == ["1000", "localhost", "1"]
    import re
    entries = [l for l in lines if re.fullmatch(r"[0-9a-df-np-sv-z]{32}-.*", l)]
    assert len(entries) == 1 and entries[0].endswith("-bb"), log  # only the busybox source is visible
    assert "refused" in log or "unreachable" in log  # the connection was tried, and failed


def _reachable_by_others(path: str) -> bool:
    """Can a user other than the owner reach ``path`` (every directory on the way has o+x)?"""
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & 0o001 for d in [p, *p.parents])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged uid")
def test_pure_build_works_for_an_unprivileged_user(tmp_path):
    """uid 65534, its own rooted store, user namespaces only: a two-step build succeeds."""
    import sysconfig
    import tempfile
    python = sys.executable
    if not os.access(python, os.X_OK) or "/root/" in os.path.realpath(python):
        python = "/usr/bin/python3"  # ours lives in a private directory: use the system's
    if not os.path.exists(python):
        pytest.skip("no Python interpreter that uid 65534 can execute")
    repo = Path(__file__).resolve().parent.parent
    work = Path(tempfile.mkdtemp(prefix="purestore-test-unpriv-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    try:
        (work / "bb" / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, work / "bb" / "bin" / "busybox")
        (work / "e.py").write_text(HEADER + '''\
dep = sh("dep", "$B mkdir $out; $B id -u > $out/uid")
default = sh("top", f"$B cat {dep}/uid > $out; $B hostname >> $out")
''')
        for p in [work, *work.rglob("*")]:
            os.chown(p, 65534, 65534, follow_symlinks=False)
        path = [str(repo), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
        if not all(_reachable_by_others(d) for d in path):
            # the checkout or the venv sits under a private directory (CI clones under /root):
            # give uid 65534 a readable copy of purestore and the installed packages
            lib = work / "pylib"
            for d in path[1:]:
                shutil.copytree(d, lib, dirs_exist_ok=True, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pth"))
            shutil.copytree(repo / "purestore", lib / "purestore", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
            subprocess.run(["chmod", "-R", "a+rX", str(lib)], check=True)
            path = [str(lib)]
        env = {"PATH": "/usr/bin:/bin", "PURE_CONFIG": "/dev/null", "PYTHONPATH": ":".join(path)}
        p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-m",
                            "purestore.cli.main", "--store", str(work / "root"), "build", "e.py"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=300)
        if p.returncode != 0 and ("cannot create the namespaces" in p.stderr or "ModuleNotFoundError" in p.stderr
                                  or "Permission denied" in p.stderr and python in p.stderr):
            pytest.skip(f"cannot run pure as uid 65534 here: {p.stderr.strip()[-300:]}")
        assert p.returncode == 0, p.stderr
        assert (work / "result").read_text() == "1000\nlocalhost\n"
        assert os.stat(work / "root" / "pure" / "store").st_uid == 65534
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def test_output_locks_are_taken_all_or_none(tmp_path):
    """While one output's lock is busy (another process substitutes it, and may wait for our
    other output), the builder holds none of them: no cycle of waits (a deadlock between a
    build and a copy of a multi-output derivation's outputs)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    import trio
    import trio.testing

    from purestore.build.derivation_builder import DerivationBuilder
    from purestore.formats.store_path import StorePath
    from purestore.store.lock import PathLocks

    locks_dir = tmp_path / "locks"
    locks_dir.mkdir()
    out, dev = StorePath("a" * 32, "mo"), StorePath("b" * 32, "mo-dev")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from purestore.store.lock import PathLocks; l = PathLocks(sys.argv[1]); "
        "l.acquire(sys.argv[2]); print('held', flush=True); sys.stdin.readline()"), str(locks_dir), dev.base_name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        said = []
        me = SimpleNamespace(store=SimpleNamespace(locks=PathLocks(str(locks_dir)),
                                                   print_path=lambda p: p.absolute("/pure/store")),
                             progress=SimpleNamespace(message=said.append,
                                                      event=lambda *a, **kw: said.append((a, kw))))
        node = SimpleNamespace(outputs={"out": out, "dev": dev}, label="/pure/store/x-mo.drv")
        got = []

        async def lock():
            got.append(await DerivationBuilder._lock_outputs(me, node))
        async with trio.open_nursery() as n:
            n.start_soon(lock)
            # (until it waits: it blocks in a thread, waiting for dev's lock)
            await trio.testing.wait_all_tasks_blocked()
            # waiting for dev, it does not hold out: another process can take out meanwhile
            probe = subprocess.run([sys.executable, "-c", (
                "import sys; from purestore.store.lock import PathLocks; "
                "sys.exit(0 if PathLocks(sys.argv[1]).acquire(sys.argv[2], blocking=False) else 1)"),
                str(locks_dir), out.base_name])
            assert probe.returncode == 0 and not got
            holder.stdin.write("\n")
            holder.stdin.flush()
        assert sorted(got[0]) == sorted([out.base_name, dev.base_name])
        assert said == [f"waiting for another process to finish '{dev.absolute('/pure/store')}'",
                        (("waiting",), {"drv": node.label, "path": dev.absolute("/pure/store")})]
    finally:
        holder.kill()
        holder.wait()


def test_json_failures_end_with_an_error_line(pure, expr, tmp_path):
    """--json: a build that fails, or an expression that does not evaluate, ends stdout with an
    ``error`` object (message, hint, exit status), as well as the ``error:`` line on stderr."""
    f = expr('default = sh("jf", "echo about-to-fail; exit 3")\n')
    p = build(pure, tmp_path, f, "--json", check=False)
    assert p.returncode == 1
    evs = [json.loads(l) for l in p.stdout.splitlines()]
    assert any(e["type"] == "failed" for e in evs)
    assert evs[-1]["type"] == "error" and evs[-1]["exitStatus"] == 1
    assert evs[-1]["error"] in p.stderr
    bad = tmp_path / "bad.py"
    bad.write_text("default = undefined_name\n")
    p = build(pure, tmp_path, bad, "--json", check=False)
    assert p.returncode == 1
    [ev] = [json.loads(l) for l in p.stdout.splitlines()]
    assert ev["type"] == "error" and "undefined_name" in ev["error"]


def test_a_result_link_replaces_only_a_link(pure, expr, tmp_path):
    """-o names something that is not a symlink (a file of the user's, /dev/null): it is left
    alone and the error says why; an old result link is replaced as usual."""
    f = expr('default = sh("rl", "echo x > $out")\n')
    keep = tmp_path / "notes.txt"
    keep.write_text("mine\n")
    p = build(pure, tmp_path, f, "-o", keep, check=False)
    assert p.returncode == 1 and "something else than a symlink is there" in p.stderr
    assert keep.read_text() == "mine\n"
    build(pure, tmp_path, f, "-o", tmp_path / "res")
    build(pure, tmp_path, f, "-o", tmp_path / "res")
    assert os.path.islink(tmp_path / "res")


def test_a_drv_whose_output_path_its_contents_do_not_give_is_refused(pure, drvs, store_root):
    """A hand-edited .drv claiming another derivation's output path (and $out) was built into
    that path: whatever it wrote became 'victim' for everything that used victim afterwards.
    As Nix's checkDerivationOutputs, the output paths must be those the contents give."""
    import attrs
    from purestore.formats.derivation import DerivationOutput
    victim = drvs.add("victim", "echo genuine > $out")
    stolen = drvs.out(victim)
    honest = drvs._lookup(drvs.add("forger", "echo forged > $out"))
    forged = attrs.evolve(honest, outputs={"out": DerivationOutput(stolen)}, env={**honest.env, "out": stolen})
    sp = drvs.store.add_text("forger.drv", render_aterm(forged), drv_references(forged, drvs.sd))
    p = pure("store", "realise", drvs.store.print_path(sp), check=False)
    assert p.returncode == 1
    assert p.stderr.startswith(f"error: derivation '{drvs.store.print_path(sp)}' has incorrect output "
                               f"'{stolen}', should be '{drvs.sd}/")
    assert "Traceback" not in p.stderr
    assert not drvs.store.is_valid(drvs.store.parse_path(stolen))
    pure("store", "realise", victim)
    assert open(drvs.store.real_path(drvs.store.parse_path(stolen))).read() == "genuine\n"


def test_a_drv_with_structured_attributes_is_refused_as_such(pure, drvs, store_root):
    """A .drv with structured attributes (__json, as Nix writes for __structuredAttrs) is refused
    saying so; its builder was run without the .attrs.json and .attrs.sh Nix gives it, and failed
    with whatever it made of that."""
    import json as _json
    d = drvs.add("structured", ". /build/.attrs.sh; $B mkdir $out", env={"__json": _json.dumps({"x": 1})})
    p = pure("store", "realise", d, check=False)
    assert p.returncode == 1 and (
        f"\nerror: {d} uses structured attributes (__json), which purestore does not support") in p.stderr, p.stderr
    assert "building '" not in p.stderr
    assert not drvs.store.is_valid(drvs.store.parse_path(drvs.out(d)))


def test_content_addressed_drvs_of_nix_are_refused_as_unsupported_not_damaged(pure, drvs, store_root):
    """A .drv with a floating content-addressed output, an impure one or a deferred one (as Nix
    writes them with its ca-derivations and impure-derivations) is refused naming what it is;
    they were said to be damaged in the store, with the advice to repair them (a floating one:
    "expected both or neither"), or failed with "path '' is not in the store dir"."""
    for name, out, said in (
            ("floating", DerivationOutput("", "r:sha256", ""), "output 'out' has hash algorithm 'r:sha256' but "
                                                               "no hash: a content-addressed derivation"),
            ("impure", DerivationOutput("", "r:sha256", "impure"), "output 'out' is impure"),
            ("deferred", DerivationOutput(""), "has no path for its output 'out': a deferred output")):
        drv = Derivation(outputs={"out": out}, input_drvs={}, input_srcs=frozenset([drvs.busybox]),
                         system="x86_64-linux", builder=drvs.sh, args=("sh", "-c", "$B mkdir $out"),
                         env={"name": name, "out": "", "B": drvs.sh})
        sp = drvs.store.print_path(drvs.store.add_text(name + ".drv", render_aterm(drv),
                                                       drv_references(drv, drvs.sd)))
        p = pure("store", "realise", sp, check=False)
        assert p.returncode == 1 and p.stderr.startswith(f"error: {sp}") and said in p.stderr, p.stderr
        assert "which purestore does not support" in p.stderr and "hint:" not in p.stderr, p.stderr


# -- limits of a build: max-silent-time, timeout, max-build-log-size -----------------------------


def _no_sleepers_left(marker: str) -> bool:
    """No process whose command line holds ``marker`` is alive (the sandbox was killed whole)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    return False
            except OSError:
                pass
    return True


# each test's builder sleeps for a number of seconds of its own: what it looks for in /proc is
# then its own sandbox's process, not one of another test run on the same machine (a number
# drawn for this run: pytest's pid modulo 10000 was shared by one concurrent run in 10000)
_SLEEP = f"sleep {5 * 10**11 + uuid.uuid4().int % 10**11}{{n}}"


def _limit_failed(p, store_root, name, how, marker):
    import time
    err = p.stderr
    assert p.returncode == 1, err
    assert f"builder for " in err and f"{name}.drv {how}" in err, err
    assert "Traceback" not in err and "pure log" in err
    st = open_store(store_root)
    try:
        assert [q for q in st.valid_paths() if q.name == name] == []
        from purestore.store import events
        assert events.query_builds(st)[0]["status"] == "failed"
    finally:
        st.close()
    deadline = time.monotonic() + 5
    while not _no_sleepers_left(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _no_sleepers_left(marker)


def test_max_silent_time_kills_a_builder_that_writes_nothing(pure, expr, tmp_path, store_root):
    """--max-silent-time N (setting max-silent-time): a builder silent for N seconds is killed
    with its whole sandbox, the build fails naming the limit, nothing is registered; a builder
    that keeps writing is not silent however long it runs."""
    import time
    marker = _SLEEP.format(n=1)
    f = expr(f'default = sh("quiet", "echo started; $B {marker}; $B mkdir $out")\n'
             # a line every 0.1 s for 1.6 s at least, each wait a shell builtin's (`read -t` on a
             # FIFO that nobody writes), not a process started: they were 0.3 s `sleep`s, 0.7 s
             # from the limit, on a machine whose load can hold a new process up
             'chatty = sh("chatty", "$B mkfifo never; exec 3<>never; i=0; while [ $i -lt 16 ]; do '
             'echo $i; read -t 0.1 x <&3; i=$((i+1)); done; $B mkdir $out")\n')
    t = time.monotonic()
    p = pure("--max-silent-time", "1", "build", f, "--no-link", cwd=tmp_path, check=False)
    assert time.monotonic() - t < 30
    _limit_failed(p, store_root, "quiet", "timed out after 1 second of silence (setting max-silent-time)", marker)
    assert "  > started" in p.stderr  # the log's tail
    ok = pure("--max-silent-time", "1", "build", f, "-A", "chatty", "--no-link", cwd=tmp_path)
    assert ok.stdout.strip().endswith("-chatty")


def test_timeout_kills_a_builder_that_runs_too_long_even_while_writing(pure, expr, tmp_path, store_root):
    marker = _SLEEP.format(n=2)
    f = expr(f'default = sh("slow", "while :; do echo tick; $B sleep 0.2; done & $B {marker}; $B mkdir $out")\n')
    p = pure("--timeout", "2", "--max-silent-time", "60", "build", f, "--no-link", cwd=tmp_path, check=False)
    _limit_failed(p, store_root, "slow", "timed out after 2 seconds (setting timeout)", marker)
    assert "  > tick" in p.stderr


def test_max_build_log_size_kills_a_builder_that_writes_too_much(pure, expr, tmp_path, store_root):
    """The setting from the config file; what was written before the limit is in the log."""
    conf = tmp_path / "pure.conf"
    conf.write_text("max-build-log-size = 100000\n")
    marker = _SLEEP.format(n=3)
    f = expr(f'default = sh("loud", "$B yes loud & $B {marker}; $B mkdir $out")\n')
    p = build(pure, tmp_path, f, "--no-link", check=False, env={"PURE_CONFIG": str(conf)})
    _limit_failed(p, store_root, "loud", "was killed after writing more than 100000 bytes of log output "
                                         "(setting max-build-log-size)", marker)
    drv = next(w for w in p.stderr.split() if w.endswith("loud.drv"))
    log = pure("log", drv).stdout
    assert log.startswith("loud\nloud\n") and len(log) > 100000


def test_build_limits_reject_bad_values(pure, expr, tmp_path):
    f = expr('default = sh("x", "$B mkdir $out")\n')
    p = pure("--timeout", "-1", "build", f, cwd=tmp_path, check=False)
    assert p.returncode == 2 and "--timeout" in p.stderr and "expected 0 (no limit) or more, got '-1'" in p.stderr
    conf = tmp_path / "pure.conf"
    conf.write_text("max-silent-time = soon\n")
    p = build(pure, tmp_path, f, check=False, env={"PURE_CONFIG": str(conf)})
    assert p.returncode != 0 and f"{conf}:1: max-silent-time must be an integer, got 'soon'" in p.stderr
    # beyond 64 bits (Nix's time_t): refused; it ended in an OverflowError traceback when the
    # builder started (the deadline is a float); the largest value is as good as no limit
    big = "1" + "0" * 400
    p = pure("--timeout", big, "build", f, cwd=tmp_path, check=False)
    assert p.returncode == 2 and "expected at most 9223372036854775807" in p.stderr, p.stderr
    p = pure("--option", "max-silent-time", big, "build", f, cwd=tmp_path, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert "--option: max-silent-time must be at most 9223372036854775807" in p.stderr
    most = str(2**63 - 1)
    assert pure("--timeout", most, "--max-silent-time", most, "build", f, "--no-link",
                cwd=tmp_path).stdout.strip().endswith("-x")


def test_a_build_log_that_cannot_be_written_is_an_error_and_leaves_nothing(pure, expr, tmp_path, store_root):
    """The disk (or the file size limit) runs out while a builder's output is logged: the build
    stops with an `error:` naming the log and why (it was a traceback), its temporary log file is
    removed, the store stays consistent, and the same build works once there is room again."""
    import resource
    f = expr('default = sh("noisy", "$B head -c 6000000 /dev/urandom; $B mkdir $out")\n')
    build(pure, tmp_path, f, "--dry-run")  # (the busybox source goes in unlimited)
    limit = 4 << 20  # less than the compressed log, more than anything else written

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    cmd = [sys.executable, "-m", "purestore.cli.main", "build", str(f), "--no-link"]
    from conftest import pure_env
    p = subprocess.run(cmd, cwd=tmp_path, env=pure_env(store_root), capture_output=True, text=True,
                       preexec_fn=limited, timeout=600)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    last = p.stderr.splitlines()[-1]
    assert last.startswith("error: cannot write the build log '") and last.endswith("noisy.drv.zst': File too large")
    log_dir = store_root / "pure" / "var" / "pure" / "log"
    assert [q.name for q in log_dir.rglob("*") if q.is_file()] == []
    assert pure("store", "verify", "--check-contents").returncode == 0
    out = build(pure, tmp_path, f, "--no-link").stdout.strip()
    assert out.endswith("-noisy")
    assert len(pure("log", out, input=b"").stdout) == 6000000


def test_a_store_path_that_is_not_a_derivation_is_a_usage_error(pure, expr, tmp_path, store_root):
    """`pure build ./result` (or an output's path, logical or physical; `pure store realise`
    alike) is a usage error naming the store path. Before, an output was read as a damaged .drv
    ("cannot read derivation ...: Is a directory", with the hint to repair it), and a result
    link to a file was evaluated as a Python expression."""
    f = expr('d = sh("dir", "$B mkdir $out")\nfile = sh("file", "echo x > $out")\n')
    out = build(pure, tmp_path, f, "-A", "d").stdout.strip()
    build(pure, tmp_path, f, "-A", "file", "-o", "rf")
    physical = str(store_root) + out
    for args, named in [(["build", "./result"], f"'./result' (the store path '{out}')"),
                        (["build", "./rf"], "'./rf' (the store path '/pure/store/"),
                        (["build", out], f"'{out}'"),
                        (["build", physical], f"'{physical}' (the store path '{out}')"),
                        (["store", "realise", "./result"], f"'./result' (the store path '{out}')")]:
        p = pure(*args, cwd=tmp_path, check=False)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.startswith(f"error: {named}"), (args, p.stderr)
        assert "is not a derivation: this takes " in p.stderr and "Traceback" not in p.stderr
        assert "damaged" not in p.stderr and "evaluating" not in p.stderr
    drv = json.loads(pure("store", "path-info", "--json", out).stdout)[0]["deriver"]
    assert build(pure, tmp_path, drv, "--no-link").stdout.strip() == out


def test_result_link_in_a_removed_working_directory_says_so(expr, tmp_path, store_root):
    """The working directory removed while the build ran (or before): ./result cannot be made;
    it was a FileNotFoundError traceback after the build, it is an error saying that the
    outputs are built, and --no-link or an absolute -o work."""
    from conftest import pure_env
    f = expr('default = sh("cwd", "echo x > $out")\n')
    gone = tmp_path / "gone"

    def build_in_gone(*args):
        gone.mkdir()
        return subprocess.run([sys.executable, "-m", "purestore.cli.main", "build", str(f), *args], cwd=gone,
                              preexec_fn=lambda: os.rmdir(gone), capture_output=True, text=True,
                              env=pure_env(store_root), timeout=600)
    p = build_in_gone()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.splitlines()[-2] == ("error: cannot create the result link 'result': the working directory "
                                         "no longer exists (the outputs are built and valid)")
    p = build_in_gone("-o", tmp_path / "res")
    assert p.returncode == 0 and os.readlink(tmp_path / "res").endswith(p.stdout.strip())


def test_attr_with_a_drv_path_is_a_usage_error(pure, expr, tmp_path):
    """`pure build X.drv -A foo` built the whole .drv and ignored -A; it is a usage error, as
    for pure show-derivation, pure shell and pure run."""
    f = expr('default = sh("ad", "echo x > $out")\n')
    drv = pure("instantiate", f).stdout.strip()
    p = build(pure, tmp_path, drv, "-A", "foo", check=False)
    assert p.returncode == 2 and p.stderr == "error: -A selects from an expression file, not from a .drv path\n"
    assert not (tmp_path / "result").exists()


def test_a_drv_file_outside_the_store_is_a_usage_error(pure, expr, tmp_path):
    """A .drv file outside the store (copied from another store, or written by hand) is a usage
    error saying so; it was evaluated as a Python expression ("NameError: name 'Derive' is not
    defined")."""
    f = expr('default = sh("away", "echo x > $out")\n')
    drv = pure("instantiate", f).stdout.strip()
    copy = tmp_path / "away.drv"
    copy.write_bytes((tmp_path / "root" / drv.lstrip("/")).read_bytes())
    p = build(pure, tmp_path, copy, check=False)
    assert p.returncode == 2 and p.stderr.startswith(
        f"error: '{copy}' is a derivation outside the store (/pure/store): this takes an expression file "
        f"or a .drv store path\nhint: "), p.stderr
