"""Profiles: generations as symlinks, merged user environments, rollback, GC roots."""

from __future__ import annotations

import json
import os

import pytest

from test_gc import _build, busybox_expr, valid


def make_pkg(tmp_path, pure, name: str, files: dict[str, str]) -> str:
    d = tmp_path / "pkgsrc" / name
    for rel, text in files.items():
        f = d / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        if rel.startswith("bin/"):
            f.chmod(0o755)
    return pure("store", "add", d, "--name", name).stdout.strip()


@pytest.fixture
def pkgs(tmp_path, pure):
    return {
        "hello": make_pkg(tmp_path, pure, "hello-1.0", {"bin/hello": "#!/bin/sh\necho hello\n",
                                                        "share/man/hello.1": "man"}),
        "tool": make_pkg(tmp_path, pure, "tool-2.0", {"bin/tool": "#!/bin/sh\necho tool\n",
                                                      "share/doc/tool.txt": "doc"}),
    }


def profile_dir(store_root) -> str:
    return os.path.join(store_root, "pure/var/pure/profiles")


def test_install_makes_generations_with_a_merged_tree(pure, pkgs, store_root):
    env1 = pure("profile", "install", pkgs["hello"]).stdout.strip()
    env2 = pure("profile", "install", pkgs["tool"]).stdout.strip()
    pd = profile_dir(store_root)
    assert os.readlink(f"{pd}/default") == "default-2-link"
    assert os.readlink(f"{pd}/default-1-link") == env1
    assert os.readlink(f"{pd}/default-2-link") == env2
    real = os.path.join(store_root, env2.lstrip("/"))
    assert os.readlink(f"{real}/bin/hello") == f"{pkgs['hello']}/bin/hello"
    assert os.readlink(f"{real}/bin/tool") == f"{pkgs['tool']}/bin/tool"
    assert os.path.isdir(f"{real}/share") and not os.path.islink(f"{real}/share")
    assert os.readlink(f"{real}/share/doc") == f"{pkgs['tool']}/share/doc"  # unshared dirs stay links
    manifest = json.load(open(f"{real}/manifest.json"))
    assert [e["name"] for e in manifest["elements"]] == ["hello-1.0", "tool-2.0"]
    refs = set(pure("store", "references", env2).stdout.split())
    assert refs == {pkgs["hello"], pkgs["tool"]}, "the environment refers to what it holds"
    lines = pure("profile", "list").stdout.splitlines()
    assert lines == [f"0 hello-1.0 {pkgs['hello']}", f"1 tool-2.0 {pkgs['tool']}"]
    j = json.loads(pure("profile", "list", "--json").stdout)
    assert j["generation"] == 2 and j["path"] == env2


def test_history_rollback_switch_and_errors(pure, pkgs, store_root):
    pure("profile", "install", pkgs["hello"])
    pure("profile", "install", pkgs["tool"])
    pure("profile", "remove", "hello")
    assert pure("profile", "list").stdout.split()[1] == "tool-2.0"
    hist = pure("profile", "history").stdout
    assert "Version 1" in hist and "Version 3" in hist and "(current)" in hist.splitlines()[-2] + hist
    h = json.loads(pure("profile", "history", "--json").stdout)
    assert [r["generation"] for r in h] == [1, 2, 3]
    assert h[0]["added"] == ["hello-1.0"] and h[2]["removed"] == ["hello-1.0"] and h[2]["current"]
    pure("profile", "rollback")
    assert [e.split()[1] for e in pure("profile", "list").stdout.splitlines()] == ["hello-1.0", "tool-2.0"]
    pure("profile", "switch-generation", "1")
    assert os.readlink(f"{profile_dir(store_root)}/default") == "default-1-link"
    r = pure("profile", "rollback", check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "no generation older than 1" in r.stderr
    r = pure("profile", "switch-generation", "9", check=False)
    assert r.returncode == 1 and "no generation 9 (generations: 1, 2, 3)" in r.stderr
    r = pure("profile", "remove", "nothing-here", check=False)
    assert r.returncode == 1 and "has no element 'nothing-here'" in r.stderr
    r = pure("profile", "list", "-p", "bad/name", check=False)
    assert r.returncode == 1 and "bad profile name" in r.stderr


def test_rollback_with_nothing_to_roll_back_to_says_why(pure, pkgs, store_root):
    """An empty profile said it had "no generation older than the current one", though it has
    none at all; each case now says what the profile has, and how to act where one can."""
    r = pure("profile", "rollback", check=False)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: cannot roll back profile 'default': it has no generations yet",
        "hint: `pure profile install` makes its first generation"]
    pure("profile", "install", pkgs["hello"])
    r = pure("profile", "rollback", check=False)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: cannot roll back profile 'default': it has no generation older than 1 (its only one)"]
    pure("profile", "install", pkgs["tool"])
    pure("profile", "rollback")
    r = pure("profile", "rollback", check=False)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: cannot roll back profile 'default': it has no generation older than 1 (generations: 1, 2)",
        "hint: `pure profile switch-generation 2` goes to the newest"]
    os.unlink(os.path.join(profile_dir(store_root), "default"))  # generations, none current
    r = pure("profile", "rollback", check=False)
    assert r.returncode == 1 and "no generation is current (generations: 1, 2)" in r.stderr
    assert "hint: `pure profile switch-generation N`" in r.stderr


def test_reinstalling_a_name_replaces_it(pure, pkgs, tmp_path):
    pure("profile", "install", pkgs["hello"])
    newer = make_pkg(tmp_path, pure, "hello-1.1", {"bin/hello": "#!/bin/sh\necho hello 1.1\n"})
    pure("profile", "install", newer)
    assert pure("profile", "list").stdout.splitlines() == [f"0 hello-1.1 {newer}"]


def test_the_same_package_given_twice_is_installed_once(pure, pkgs):
    """`profile install P P` put P in the manifest twice (listed twice, `installed` said twice,
    and each later `remove` by index had two entries to tell apart); it is installed once."""
    r = pure("profile", "install", pkgs["hello"], pkgs["tool"], pkgs["hello"])
    assert r.stderr.count("installed hello-1.0") == 1
    assert pure("profile", "list").stdout.splitlines() == [
        f"0 hello-1.0 {pkgs['hello']}", f"1 tool-2.0 {pkgs['tool']}"]


def test_installing_what_is_installed_makes_no_new_generation(pure, pkgs, tmp_path, store_root):
    """Each `install` added a generation, also one identical to the newest (installing hello
    again piled up generations), and a reinstalled package moved to the end of the list.  As in
    Nix, a user environment the newest generation already has is switched to, not added; a
    replaced package keeps its place."""
    pure("profile", "install", pkgs["hello"], pkgs["tool"])
    r = pure("profile", "install", pkgs["hello"])
    assert "profile 'default' is unchanged: generation 1 has this already" in r.stderr, r.stderr
    assert sorted(os.listdir(profile_dir(store_root))) == ["default", "default-1-link", "default.lock"]
    newer = make_pkg(tmp_path, pure, "hello-1.1", {"bin/hello": "#!/bin/sh\necho hello 1.1\n"})
    pure("profile", "install", newer)
    assert pure("profile", "list").stdout.splitlines() == [f"0 hello-1.1 {newer}", f"1 tool-2.0 {pkgs['tool']}"]
    pure("profile", "rollback")
    r = pure("profile", "install", newer)  # what generation 2 holds: back to it
    assert "profile 'default' is now at generation 2" in r.stderr, r.stderr
    assert [g["generation"] for g in json.loads(pure("profile", "history", "--json").stdout)] == [1, 2]
    assert os.readlink(os.path.join(profile_dir(store_root), "default")) == "default-2-link"


def test_profile_names_may_have_dashes_and_profiles_keep_their_own_generations(pure, pkgs, store_root):
    """`-p my-tools` was refused ("bad profile name"): names with '-' are common (Nix allows
    them).  A profile whose name starts like another's ('my' and 'my-tools') has its own
    generations; names that would clash with generation or temporary links stay refused."""
    pure("profile", "install", "-p", "my-tools", pkgs["hello"])
    pure("profile", "install", "-p", "my-tools", pkgs["tool"])
    pure("profile", "install", "-p", "my", pkgs["tool"])
    def numbers(name):
        return [g["generation"] for g in json.loads(pure("profile", "history", "-p", name, "--json").stdout)]
    assert numbers("my-tools") == [1, 2] and numbers("my") == [1]
    pure("profile", "rollback", "-p", "my-tools")
    assert pure("profile", "list", "-p", "my-tools").stdout.splitlines() == [f"0 hello-1.0 {pkgs['hello']}"]
    assert pure("profile", "list", "-p", "my").stdout.splitlines() == [f"0 tool-2.0 {pkgs['tool']}"]
    for bad in ("my-2-link", "-x", "my.tmp-12", "my.lock"):
        r = pure("profile", "list", f"--profile={bad}", check=False)
        assert r.returncode == 1 and f"bad profile name {bad!r}" in r.stderr, r.stderr
    # a name with no generation (misspelt): listed empty, with a word on stderr naming the others
    for cmd in ("list", "history"):
        r = pure("profile", cmd, "-p", "my-tool")
        assert r.stdout in ("", "[]\n") and r.stderr == (
            "profile 'my-tool' has no generations yet (profiles of this store: my, my-tools)\n"), r.stderr
    assert pure("profile", "list").stderr == ""  # (the default profile, empty: nothing to say)


def test_installing_an_attribute_with_no_package_is_an_error(pure, tmp_path, store_root):
    """An attribute that is an empty list installed nothing and made an empty generation 1,
    silently; it is an error, and the profile is left alone."""
    expr = busybox_expr(tmp_path, "empty = []\n")
    r = pure("profile", "install", expr, "-A", "empty", check=False, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == (
        f"error: nothing to install: {expr} -A empty gives no package"), r.stderr
    assert not os.path.lexists(os.path.join(profile_dir(store_root), "default"))


def test_collisions_are_refused(pure, pkgs, tmp_path):
    other = make_pkg(tmp_path, pure, "other-hello", {"bin/hello": "#!/bin/sh\necho another\n"})
    pure("profile", "install", pkgs["hello"])
    r = pure("profile", "install", other, check=False)
    assert r.returncode == 1 and "collision: 'bin/hello'" in r.stderr
    assert len(pure("profile", "list").stdout.splitlines()) == 1


def test_links_to_directories_of_other_store_paths_merge_in_a_rooted_store(pure, tmp_path, store_root):
    """Two packages whose `share` is a symlink to a directory of another store path merge into
    one `share` directory, also in a rooted store, where those links name the logical store dir
    (/pure/store/…) that does not exist on the host: the merge follows them into the store
    under the root.  (It listed the link as it was and failed with "cannot build the user
    environment …: No such file or directory".)"""
    libs = [make_pkg(tmp_path, pure, f"lib{i}", {f"share/{i}.txt": str(i)}) for i in (1, 2)]
    wraps = []
    for i, lib in enumerate(libs, 1):
        d = tmp_path / "wrapsrc" / f"wrap{i}"
        d.mkdir(parents=True)
        os.symlink(f"{lib}/share", d / "share")
        assert lib.startswith("/pure/store/") and not os.path.exists(lib)  # a rooted store
        wraps.append(pure("store", "add", d, "--name", f"wrap{i}").stdout.strip())
    pure("profile", "install", wraps[0])
    env = pure("profile", "install", wraps[1]).stdout.strip()
    real = os.path.join(store_root, env.lstrip("/"))
    assert os.path.isdir(f"{real}/share") and not os.path.islink(f"{real}/share")
    assert os.readlink(f"{real}/share/1.txt") == f"{wraps[0]}/share/1.txt"
    assert os.readlink(f"{real}/share/2.txt") == f"{wraps[1]}/share/2.txt"


def test_a_package_that_is_a_link_to_another_store_path_installs_in_a_rooted_store(pure, tmp_path, store_root):
    """A package whose store path is a symlink to another package's directory (an alias) is
    installed in a rooted store too, where the link names the logical store dir that does not
    exist on the host: the merge lists it through the store under the root.  (It listed the
    link as it was and failed with "cannot build the user environment …: No such file or
    directory", the case the merge of a package's entries already handled.)"""
    lib = make_pkg(tmp_path, pure, "aliased", {"share/a.txt": "a"})
    assert lib.startswith("/pure/store/") and not os.path.exists(lib)  # a rooted store
    (tmp_path / "aliassrc").mkdir()
    os.symlink(lib, tmp_path / "aliassrc" / "alias")
    alias = pure("store", "add", tmp_path / "aliassrc" / "alias").stdout.strip()
    env = pure("profile", "install", alias).stdout.strip()
    real = os.path.join(store_root, env.lstrip("/"))
    assert os.readlink(f"{real}/share") == f"{alias}/share"


def test_generations_are_gc_roots_until_deleted(pure, pkgs):
    pure("profile", "install", pkgs["hello"])
    pure("profile", "install", pkgs["tool"])
    pure("profile", "remove", "0")
    pure("gc")
    assert {pkgs["hello"], pkgs["tool"]} <= valid(pure), "older generations still root hello"
    pure("profile", "delete-generations", "old")
    deleted = pure("gc").stdout.split()
    assert pkgs["hello"] in deleted and pkgs["tool"] not in deleted
    r = pure("profile", "delete-generations", "3", check=False)
    assert r.returncode == 1 and "it is the current one" in r.stderr


def test_deleting_a_generation_named_twice_deletes_it_once(pure, pkgs, store_root):
    """`delete-generations 1 1` deleted generation 1, then ended in a FileNotFoundError
    traceback on unlinking its link again; the repeated number now counts once."""
    pure("profile", "install", pkgs["hello"])
    pure("profile", "install", pkgs["tool"])
    pure("profile", "remove", "hello")
    r = pure("profile", "delete-generations", "1", "2", "1", check=False)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("deleted generations 1, 2 of profile 'default'")
    assert sorted(os.listdir(profile_dir(store_root))) == ["default", "default-3-link", "default.lock"]
    assert [g["generation"] for g in json.loads(pure("profile", "history", "--json").stdout)] == [3]


def test_a_current_generation_deleted_by_hand_says_how_to_recover(pure, pkgs, store_root):
    """The current generation's link deleted by hand: list, install and remove all stopped at
    "points to generation 2, which does not exist", saying neither what the profile has nor
    what to do.  They say both now, and the way out works."""
    pure("profile", "install", pkgs["hello"])
    pure("profile", "install", pkgs["tool"])
    os.unlink(os.path.join(profile_dir(store_root), "default-2-link"))
    for args in (["list"], ["install", pkgs["tool"]], ["remove", "0"]):
        r = pure("profile", *args, check=False)
        assert r.returncode == 1 and r.stderr.splitlines() == [
            "error: profile 'default' points to generation 2, which does not exist (generations: 1)",
            "hint: `pure profile rollback` goes back to generation 1, "
            "`pure profile switch-generation N` to generation N"], (args, r.stderr)
    pure("profile", "rollback")
    pure("profile", "install", pkgs["tool"])
    assert [line.split()[1] for line in pure("profile", "list").stdout.splitlines()] == ["hello-1.0", "tool-2.0"]
    os.unlink(os.path.join(profile_dir(store_root), "default-1-link"))
    os.unlink(os.path.join(profile_dir(store_root), "default-2-link"))  # (the install made 2 again)
    r = pure("profile", "list", check=False)
    assert r.returncode == 1 and "(it has no generations)" in r.stderr and "hint: remove the profile link" in r.stderr
    os.unlink(os.path.join(profile_dir(store_root), "default"))
    pure("profile", "install", pkgs["hello"])


def test_deleting_old_generations_with_none_current_deletes_nothing(pure, pkgs, store_root):
    """`delete-generations old` (all but the current one) with the current generation's link
    deleted by hand, or the profile link, deleted every generation, the one the error of `list`
    says to roll back to too.  It refuses and says why; numbers given still delete."""
    pd = profile_dir(store_root)
    pure("profile", "install", pkgs["hello"])
    pure("profile", "install", pkgs["tool"])
    os.unlink(os.path.join(pd, "default-2-link"))
    r = pure("profile", "delete-generations", "old", check=False)
    assert r.returncode == 1 and r.stderr.splitlines()[0] == (
        "error: cannot delete the old generations of profile 'default': its current generation 2 "
        "does not exist (generations: 1), so every generation would go"), r.stderr
    os.unlink(os.path.join(pd, "default"))
    r = pure("profile", "delete-generations", "old", check=False)
    assert r.returncode == 1 and "no generation is current (generations: 1)" in r.stderr, r.stderr
    assert "default-1-link" in os.listdir(pd)
    pure("profile", "delete-generations", "1")
    assert "default-1-link" not in os.listdir(pd)


def test_install_builds_an_expression(pure, tmp_path, store_root):
    expr = busybox_expr(tmp_path, '''
        greeter = sh("greeter-0.1", "mkdir -p $out/bin; printf '#!/bin/sh\\necho hi\\n' > $out/bin/greet; chmod +x $out/bin/greet")
    ''')
    _build(pure, expr, "-A", "greeter", cwd=tmp_path)  # skips when the sandbox is unavailable
    env = pure("profile", "install", expr, "-A", "greeter", cwd=tmp_path).stdout.strip()
    elements = json.loads(pure("profile", "list", "--json").stdout)["elements"]
    assert elements[0]["name"] == "greeter-0.1"
    assert elements[0]["source"] == {"file": expr, "attr": "greeter"}
    real = os.path.join(store_root, env.lstrip("/"))
    assert os.readlink(f"{real}/bin").endswith("-greeter-0.1/bin")  # one package: the dir is a link
    os.unlink(tmp_path / "result")
    pure("gc")
    assert elements[0]["storePaths"][0] in valid(pure)


def test_a_profile_is_usable_in_pure_shell_and_run(pure, pkgs, store_root, tmp_path):
    pure("profile", "install", pkgs["hello"], pkgs["tool"])
    link = os.path.join(profile_dir(store_root), "default")
    p = pure("shell", link, "--pure", "--command", 'hello; tool; echo "$PATH"', cwd=tmp_path)
    out = p.stdout.splitlines()
    assert out[:2] == ["hello", "tool"]
    assert out[2].split(":")[0].endswith("-user-environment/bin")
    assert pure("run", link, "--program", "tool", cwd=tmp_path).stdout == "tool\n"


def _gone_pid() -> int:
    import subprocess
    p = subprocess.Popen(["true"])
    p.wait()  # (reaped: its pid names no process now)
    return p.pid


def test_a_switch_link_left_by_a_killed_switch_is_no_root_and_goes(pure, pkgs, store_root):
    """A `<name>.tmp-<pid>` link of a switch killed between symlink and rename was listed as a
    GC root for ever: gc and the next switch of that profile now remove it (its writer gone)."""
    pure("profile", "install", pkgs["hello"])
    pure("profile", "install", pkgs["tool"])
    prof = profile_dir(store_root)
    stale = os.path.join(prof, f"default.tmp-{_gone_pid()}")
    other = os.path.join(prof, f"other.tmp-{_gone_pid()}")
    live = os.path.join(prof, f"default.tmp-{os.getpid()}")  # a switch still running
    for link in (stale, other, live):
        os.symlink("default-1-link", link)
    roots = pure("gc", "--print-roots").stdout
    assert "default.tmp-" not in roots.replace(live, "") and "other.tmp-" not in roots, roots
    pure("gc")
    assert not os.path.lexists(stale) and not os.path.lexists(other) and os.path.lexists(live)
    os.symlink("default-1-link", stale)
    pure("profile", "rollback")
    assert not os.path.lexists(stale) and os.path.lexists(live)
