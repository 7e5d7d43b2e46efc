"""`pure store …` as a real process: paths equal to Nix's, crash safety, concurrency, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import DATA, needs_nix, pure_env, run_pure

GOLDEN = json.loads((DATA / "store" / "golden.json").read_text())
_spec = importlib.util.spec_from_file_location("store_trees", DATA / "store" / "trees.py")
trees = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trees)


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_store_paths_equal_the_nix_golden_files(case, tmp_path, store_root):
    """`pure --store-dir /nix/store store add [--flat]` prints the path Nix printed for the same input."""
    g = GOLDEN[case]
    src = trees.make_case(case, str(tmp_path / "in"))
    flags = ["--flat"] if g["mode"] == "flat" else []
    out = run_pure("store", "add", *flags, src, root=store_root, store_dir="/nix/store").stdout.strip()
    assert out == g["path"]
    info = json.loads(run_pure("store", "path-info", "--json", out, root=store_root, store_dir="/nix/store").stdout)[0]
    assert (info["narHash"], info["narSize"], info["ca"]) == (g["narHash"], g["narSize"], g["ca"])
    dry = run_pure("store", "add", "--dry-run", *flags, src, root=tmp_path / "other", store_dir="/nix/store")
    assert dry.stdout.strip() == g["path"]
    assert not (tmp_path / "other" / "nix" / "store" / os.path.basename(g["path"])).exists()


def _random_tree(d, seed: int) -> None:
    import random
    rnd = random.Random(seed)
    dirs = [d]
    d.mkdir()
    for i in range(60):
        parent = rnd.choice(dirs)
        kind = rnd.random()
        name = rnd.choice(["a", "b", "Ab", "z.z", "x-y", "0", "é", "long" * 10]) + str(i)
        p = parent / name
        if kind < 0.2:
            p.mkdir()
            dirs.append(p)
        elif kind < 0.3:
            os.symlink(rnd.choice(["../x", "/abs/target", name, ""]) or "t", p)
        else:
            p.write_bytes(rnd.randbytes(rnd.choice([0, 1, 7, 8, 9, 4096, 70000])))
            os.chmod(p, rnd.choice([0o644, 0o755, 0o600, 0o700, 0o444]))


@needs_nix
@pytest.mark.parametrize("seed", [1, 2])
def test_live_nix_agrees_on_random_trees(seed, tmp_path, store_root):
    src = tmp_path / "tree"
    _random_tree(src, seed)
    env = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")
    nix = subprocess.run(["nix-store", "--store", str(tmp_path / "nix"), "--add", str(src)],
                         capture_output=True, text=True, env=env, check=True).stdout.strip()
    ours = run_pure("store", "add", src, root=store_root, store_dir="/nix/store").stdout.strip()
    assert ours == nix
    subprocess.run(["chmod", "-R", "u+w", str(tmp_path / "nix")], check=True)


def test_path_info_ls_references_requisites_and_delete(pure, store_root, tmp_path):
    (tmp_path / "f").write_text("hi\n")
    a = pure("store", "add", tmp_path / "f").stdout.strip()
    assert a.startswith("/pure/store/") and a.endswith("-f")
    # a path referring to a: a text object registered through the library
    code = ("import sys; from purestore.store.local import LocalStore; from purestore.store.settings import load_settings;"
            f"s = LocalStore.open(load_settings(env={{'PURE_CONFIG': '/dev/null'}}, root={str(store_root)!r}));"
            f"b = s.add_text('b.txt', b'uses {a}', [s.parse_path({a!r})]); print(s.print_path(b))")
    b = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=pure_env(store_root)).stdout.strip()
    assert pure("store", "ls").stdout.split() == sorted([a, b])
    assert json.loads(pure("store", "ls", "--json").stdout) == sorted([a, b])
    assert pure("store", "references", b).stdout.split() == [a]
    assert pure("store", "referrers", a).stdout.split() == [b]
    assert pure("store", "requisites", b).stdout.split() == [a, b]
    info = json.loads(pure("store", "path-info", "--json", "-r", "--closure-size", b).stdout)
    assert [i["path"] for i in info] == [a, b]
    assert info[1]["references"] == [a]
    assert info[1]["closureSize"] == info[0]["narSize"] + info[1]["narSize"]
    assert info[1]["ca"].startswith("text:sha256:")
    line = pure("store", "path-info", "-sS", b).stdout.rstrip("\n").split("\t")
    assert line[0] == b and int(line[1]) == info[1]["narSize"] and int(line[2]) == info[1]["closureSize"]
    # physical path, a result link and a file inside the path are accepted too
    real = str(store_root) + b
    os.symlink(b, tmp_path / "result")
    for form in (real, tmp_path / "result", a + "/"):
        assert pure("store", "path-info", form).stdout.strip() in (a, b)
    # delete refuses while referenced, then works in order
    p = pure("store", "delete", a, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: cannot delete") and "referenced by" in p.stderr
    pure("store", "delete", b)
    pure("store", "delete", a)
    assert pure("store", "ls").stdout == ""
    assert not os.path.lexists(str(store_root) + a)


def test_verify_exits_non_zero_and_lists_problems(pure, store_root, tmp_path):
    (tmp_path / "f").write_text("hi\n")
    a = pure("store", "add", tmp_path / "f").stdout.strip()
    assert pure("store", "verify", "--check-contents").returncode == 0
    real = str(store_root) + a
    os.chmod(real, 0o644)
    with open(real, "a") as f:
        f.write("changed")
    assert pure("store", "verify").returncode == 0  # only existence is checked without --check-contents
    p = pure("store", "verify", "--check-contents", check=False)
    assert p.returncode == 1
    assert p.stdout.startswith(f"hash: path '{a}' was modified")
    rep = json.loads(pure("store", "verify", "--check-contents", "--json", check=False).stdout)
    assert rep["ok"] is False and rep["problems"][0]["kind"] == "hash"


@pytest.mark.parametrize("args, message", [
    (["store", "add", "/nonexistent/x"], "error: cannot add '/nonexistent/x' to the store: no such file"),
    (["store", "add", "--flat", "/"], "error: cannot add '/' flat: expected a regular file"),
    (["store", "add", "--name", "a b", "/etc/hostname"], "error: store path name 'a b' contains ' '"),
    (["store", "add", "--name", "x", "/etc/hostname", "/etc/hosts"], "error: --name applies to one path"),
    (["store", "path-info", "/tmp"], "error: path '/tmp' is not in the store dir '/pure/store'"),
    (["store", "path-info", "/nix/store/00000000000000000000000000000000-x"],
     "error: path '/nix/store/00000000000000000000000000000000-x' is not in the store dir '/pure/store'"
     " (physically "),
    (["store", "path-info", "/pure/store/00000000000000000000000000000000-x"],
     "error: path '/pure/store/00000000000000000000000000000000-x' is not valid"),
    (["store", "references", "/pure/store/bad"], "error: '/pure/store/bad' is not a store path"),
    (["store", "delete", "/pure/store/00000000000000000000000000000000-x"], "error: path '/pure/store/"),
])
def test_user_errors_print_error_and_exit_non_zero(pure, args, message):
    p = pure(*args, check=False)
    assert p.returncode != 0
    assert p.stderr.startswith(message), p.stderr
    assert "Traceback" not in p.stderr
    if "/nix/store" in message:  # a path of another store dir: the hint says how to use one
        assert "hint: paths of '/nix/store' need a store made for that dir (--store-dir /nix/store)" in p.stderr


def test_a_physical_path_of_another_rooted_store_gets_its_logical_name_as_hint(pure):
    """`readlink result` of a rooted store gives ROOT/pure/store/…: the hint names the path as
    '/pure/store/…' (it used to advise --store-dir ROOT/pure/store, a store of other hashes)."""
    phys = "/tmp/elsewhere/pure/store/00000000000000000000000000000000-x/bin/x"
    p = pure("store", "path-info", phys, check=False)
    assert p.returncode == 1 and "--store-dir" not in p.stderr, p.stderr
    assert ("hint: '/tmp/elsewhere/pure/store' is where the rooted store '/tmp/elsewhere' keeps its "
            "paths; name the path by its store dir: "
            "'/pure/store/00000000000000000000000000000000-x/bin/x'") in p.stderr, p.stderr


def _big_tree(d, files: int = 1500, size: int = 64 * 1024) -> None:
    import random
    rnd = random.Random(7)
    blob = rnd.randbytes(size + files)
    for i in range(files):
        sub = d / f"d{i // 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}").write_bytes(blob[i:i + size])


@pytest.mark.slow
def test_sigkill_mid_copy_leaves_the_store_consistent(tmp_path, store_root):
    """SIGKILL while `pure store add` copies a large tree: nothing becomes valid, the leftover is
    cleaned on next use, verify is clean and a retry gives the right path."""
    src = tmp_path / "big"
    _big_tree(src)
    expected = run_pure("store", "add", "--dry-run", src, root=tmp_path / "scratch").stdout.strip()
    # The add is stopped (SIGSTOP) once it has copied a few subdirectories, and killed only if,
    # stopped, it has not finished: polling alone, a loaded machine could let it finish between
    # the last look and the kill.  One that finished first is tried again in a new store.
    for attempt in range(5):
        if attempt:
            store_root = tmp_path / f"root-{attempt}"
        tmpdir = store_root / "pure" / "store" / ".tmp"
        proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "store", "add", str(src)],
                                env=pure_env(store_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        copied = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                entries = os.listdir(tmpdir)
                if entries:
                    copied = len(os.listdir(tmpdir / entries[0]))
            except FileNotFoundError:
                pass
            if copied >= 3:  # some of the 15 subdirectories are being copied
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT).si_code == os.CLD_STOPPED
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if stopped:
            break
        assert proc.returncode == 0, proc.stderr.read()  # it finished first: again
    else:
        pytest.fail("each add finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(tmpdir), "the killed add left no partial copy (nothing to clean)"
    v = run_pure("store", "verify", "--check-contents", root=store_root)
    assert "no problems" in v.stderr
    assert os.listdir(tmpdir) == [], "the partial copy was not cleaned up"
    assert run_pure("store", "ls", root=store_root).stdout == ""
    assert not os.path.lexists(str(store_root) + expected)
    again = run_pure("store", "add", src, root=store_root).stdout.strip()
    assert again == expected
    run_pure("store", "verify", "--check-contents", root=store_root)
    assert run_pure("store", "ls", root=store_root).stdout.split() == [expected]


@pytest.mark.slow
def test_two_processes_adding_the_same_tree_both_succeed_with_one_copy(tmp_path, store_root):
    src = tmp_path / "big"
    _big_tree(src, files=600)
    run_pure("store", "ls", root=store_root)  # create the store first
    cmd = [sys.executable, "-m", "purestore.cli.main", "store", "add", str(src)]
    procs = [subprocess.Popen(cmd, env=pure_env(store_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and outs[0][0].startswith("/pure/store/")
    path = outs[0][0].strip()
    store_dir = store_root / "pure" / "store"
    assert sorted(os.listdir(store_dir)) == sorted([".tmp", os.path.basename(path)])
    assert os.listdir(store_dir / ".tmp") == []
    assert run_pure("store", "ls", root=store_root).stdout.split() == [path]
    run_pure("store", "verify", "--check-contents", root=store_root)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root to mount a small tmpfs")
def test_a_full_disk_is_named_when_the_database_cannot_be_opened(tmp_path):
    """SQLite says "disk I/O error" or "database or disk is full"; the error adds which."""
    import shlex

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("hello\n")
    full = tmp_path / "full"
    full.mkdir()
    pure = f"{shlex.quote(sys.executable)} -m purestore.cli.main"
    script = (f"mount -t tmpfs -o size=2m tmpfs {full} && {pure} --store {full}/st store add {src} >/dev/null && "
              f"(dd if=/dev/zero of={full}/fill bs=64k 2>/dev/null; true) && "
              f"{pure} --store {full}/st store verify 2> {tmp_path}/err1; echo $? > {tmp_path}/rc; "
              f"{pure} --store {full}/new store verify 2> {tmp_path}/err2; echo $? >> {tmp_path}/rc")
    subprocess.run(["unshare", "-m", "sh", "-c", script], env=pure_env(None), check=True, timeout=120)
    assert (tmp_path / "rc").read_text().split() == ["1", "1"]
    for err in ("err1", "err2"):
        text = (tmp_path / err).read_text()
        assert "error: cannot open the store database" in text and "Traceback" not in text, text
        assert "(the file system holding it has no space left)" in text, text


@pytest.mark.parametrize("cmd", ["add", "path-info", "verify"])
def test_help_of_the_main_store_commands_has_examples(cmd):
    out = run_pure("store", cmd, "--help").stdout
    assert f"examples:\n  pure store {cmd} " in out and max(map(len, out.splitlines())) <= 100


def test_store_delete_help_says_roots_keep_paths():
    """Its help (one line of 115 columns) and docs/store.md said only referrers stop a delete, as if
    GC roots did not; it refuses rooted paths as `pure gc` keeps them (tests/test_gc.py)."""
    out = run_pure("store", "delete", "--help").stdout
    assert "GC root" in out and max(map(len, out.splitlines())) <= 100


def test_the_store_dir_itself_is_said_to_be_no_store_path(tmp_path):
    """`pure store path-info /pure/store` said "path '/pure/store' is not in the store dir
    '/pure/store'"."""
    root = tmp_path / "r"
    for given in ("/pure/store", f"{root}/pure/store/"):
        p = run_pure("store", "path-info", given, root=root, check=False)
        assert p.returncode == 1 and p.stderr == (f"error: {given!r} is the store dir itself, not a store path "
                                                  "in it\nhint: name a path in it: /pure/store/<hash>-<name>\n")
