"""What `pure build` fetches and builds when a binary cache holds some outputs, and
`pure build --dry-run`, which says so without doing it.

The expression: ``app`` is built with ``tool`` (a build-time input: app's output copies a line
from tool's, so it does not refer to it).  A package found in a cache is fetched with its
run-time closure only; its build-time inputs are neither fetched nor built (as in Nix).
"""

from __future__ import annotations

import json
import os

import pytest

from test_build import build, expr, needs_sandbox, open_store  # noqa: F401 - fixtures

pytestmark = needs_sandbox

BODY = '''\
tool = sh("tool", "$B mkdir $out; echo tool > $out/t")
default = sh("app", f"$B mkdir $out; $B cat {tool}/t > $out/f; echo app >> $out/f")
'''


@pytest.fixture
def scene(pure, expr, tmp_path, store_root):
    """Build app (and tool) in the test store, make a key; returns a helper object."""
    try:
        import purestore.cache.substituter  # noqa: F401
    except ImportError:
        pytest.skip("the caches layer is not installed")
    f = expr(BODY)
    app = build(pure, tmp_path, f, "--no-link").stdout.strip()
    tool = next(p for p in pure("store", "ls").stdout.split() if p.endswith("-tool"))
    drvs = pure("store", "ls").stdout.split()
    app_drv = next(p for p in drvs if p.endswith("-app.drv"))
    tool_drv = next(p for p in drvs if p.endswith("-tool.drv"))
    pure("key", "generate", "--name", "test-cache-1", "--secret-out", tmp_path / "k.sec",
         "--public-out", tmp_path / "k.pub")

    class Scene:
        pass
    s = Scene()
    s.f, s.app, s.tool, s.app_drv, s.tool_drv = f, app, tool, app_drv, tool_drv
    s.pub = (tmp_path / "k.pub").read_text().strip()
    s.cache = tmp_path / "cache"
    s.url = f"file://{s.cache}"

    def push(*paths):
        pure("copy", "--to", s.url, "--secret-key-file", tmp_path / "k.sec", *paths)

    def fresh(name, *args, check=True, env=None):
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        return pure("--substituters", s.url, "--trusted-public-keys", s.pub, "build", f, "--no-link",
                    *args, root=root, cwd=tmp_path, check=check, env=env), root

    s.push, s.fresh = push, fresh
    return s


def _keyed_push(pure, tmp_path, *paths):
    """Make the key test-cache-1 (tmp_path/k.sec, k.pub) and push ``paths`` with it to a file://
    cache at tmp_path/cache, which is returned."""
    pure("key", "generate", "--name", "test-cache-1", "--secret-out", tmp_path / "k.sec",
         "--public-out", tmp_path / "k.pub")
    cache = tmp_path / "cache"
    pure("copy", "--to", f"file://{cache}", "--secret-key-file", tmp_path / "k.sec", *paths)
    return cache


def _valid(root, path):
    st = open_store(root)
    try:
        return st.is_valid(st.parse_path(path))
    finally:
        st.close()


def _events(root):
    from purestore.store import events
    st = open_store(root)
    try:
        return ([b["drv"] for b in events.query_builds(st)],
                sorted(s["path"] for s in events.query_substitutions(st)))
    finally:
        st.close()


def test_a_package_in_the_cache_is_fetched_without_its_build_inputs(scene):
    scene.push(scene.app, scene.tool)  # the cache has both; only app is needed
    p, root = scene.fresh("b")
    assert p.stdout.strip() == scene.app
    assert "this path will be fetched (0.00 MiB download, 0.00 MiB unpacked):\n  " + scene.app in p.stderr
    assert "will be built" not in p.stderr and "warning" not in p.stderr
    # progress (no terminal): a status line every 5 s while it runs (none for a quick one), a summary
    assert "fetching 0/1 paths" not in p.stderr
    assert "fetched 1 path (" in p.stderr and " unpacked) in " in p.stderr
    assert not _valid(root, scene.tool)
    assert _events(root) == ([], [scene.app])


def test_a_build_input_missing_from_the_cache_is_not_warned_about(scene):
    scene.push(scene.app)
    p, root = scene.fresh("b")
    assert p.stdout.strip() == scene.app
    assert "warning" not in p.stderr, p.stderr
    assert not _valid(root, scene.tool)


def test_what_the_cache_lacks_is_built_from_what_it_has(scene):
    scene.push(scene.tool)
    p, root = scene.fresh("b")
    assert p.stdout.strip() == scene.app
    fetched = p.stderr.index("this path will be fetched")
    assert p.stderr.index(scene.tool) > fetched
    assert "this derivation will be built:\n  " + scene.app_drv in p.stderr
    assert _events(root) == ([scene.app_drv], [scene.tool])


def test_dry_run_says_what_would_happen_and_does_nothing(scene, tmp_path):
    scene.push(scene.tool)
    p, root = scene.fresh("b", "--dry-run")
    assert p.stdout == ""
    assert "this derivation will be built:\n  " + scene.app_drv in p.stderr
    assert "this path will be fetched (0.00 MiB download, 0.00 MiB unpacked):\n  " + scene.tool in p.stderr
    assert not _valid(root, scene.tool) and not _valid(root, scene.app)
    assert _events(root) == ([], [])
    assert not (tmp_path / "result").exists()
    p, _ = scene.fresh("b", "--dry-run", "--json")
    plan = json.loads(p.stdout)
    assert plan["willBuild"] == [scene.app_drv]
    [fetch] = plan["willFetch"]
    assert fetch["path"] == scene.tool and fetch["url"] == scene.url
    assert fetch["narSize"] > 0 and fetch["downloadSize"] > 0
    assert plan["narSize"] == fetch["narSize"] and plan["downloadSize"] == fetch["downloadSize"]
    # with the package itself in the cache: only it is fetched (a fresh store: "b" remembers for
    # a while that the cache did not have app, as Nix does)
    scene.push(scene.app)
    p, _ = scene.fresh("b2", "--dry-run", "--json")
    assert json.loads(p.stdout)["willBuild"] == [] and [x["path"] for x in json.loads(p.stdout)["willFetch"]] == [scene.app]
    # built: nothing to do
    scene.fresh("b2")
    p, _ = scene.fresh("b2", "--dry-run")
    assert "nothing to build or fetch" in p.stderr


def test_dry_run_offline_and_untrusted(scene, pure, tmp_path):
    scene.push(scene.app)
    root = tmp_path / "d"
    root.mkdir()
    p = pure("--offline", "--substituters", scene.url, "--trusted-public-keys", scene.pub, "build", scene.f,
             "--dry-run", root=root, cwd=tmp_path)
    assert "these 2 derivations will be built" in p.stderr and "fetched" not in p.stderr
    other = "test-cache-1:" + "A" * 43 + "="
    p = pure("--substituters", scene.url, "--trusted-public-keys", other, "build", scene.f, "--dry-run",
             root=root, cwd=tmp_path)
    assert "these 2 derivations will be built" in p.stderr
    assert f"warning: cannot substitute '{scene.app}': narinfo" in p.stderr
    assert "is not trusted: invalid signature by 'test-cache-1'; building it" in p.stderr
    p = pure("build", scene.f, "--dry-run", "--check", root=root, cwd=tmp_path, check=False)
    assert p.returncode != 0 and "error: --dry-run does not combine with --check" in p.stderr


def test_a_fetch_that_fails_falls_back_to_building_with_inputs_fetched(scene):
    """The cache lists app, but its NAR is corrupt: app is built after all, and tool, now
    needed, is fetched from the cache rather than built."""
    scene.push(scene.app, scene.tool)
    hash_part = scene.app.rsplit("/", 1)[1].split("-", 1)[0]
    text = (scene.cache / f"{hash_part}.narinfo").read_text()
    nar = scene.cache / next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
    nar.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    p, root = scene.fresh("b")
    assert p.stdout.strip() == scene.app
    assert f"warning: cannot substitute '{scene.app}'" in p.stderr
    assert _events(root) == ([scene.app_drv], [scene.tool])
    st = open_store(root)
    try:
        assert st.verify(check_contents=True).ok
    finally:
        st.close()


def test_each_narinfo_is_asked_for_once(scene, pure, tmp_path):
    """The lookup that decides what to fetch hands its narinfos to the download: over HTTP, a
    build asks for each narinfo and for nix-cache-info once, and downloads only app's NAR (here
    from a plain static server that records requests)."""
    import functools
    import http.server
    import threading

    scene.push(scene.app, scene.tool)
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(scene.cache)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root = tmp_path / "h"
        root.mkdir()
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        p = pure("--substituters", url, "--trusted-public-keys", scene.pub, "build", scene.f, "--no-link",
                 root=root, cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert p.stdout.strip() == scene.app
    narinfos = [a for a in asked if a.endswith(".narinfo")]
    app_hash = scene.app.rsplit("/", 1)[1].split("-", 1)[0]
    # all missing outputs are looked up at once (one round trip, not one per level), each once
    assert f"/{app_hash}.narinfo" in narinfos and len(narinfos) == len(set(narinfos)) == 2, asked
    assert sum(a.startswith("/nar/") for a in asked) == 1
    # the lookup and the download share one session on the cache: nix-cache-info is read once
    assert asked.count("/nix-cache-info") == 1, asked


def test_an_unusable_cache_is_warned_about_once(scene, pure, tmp_path):
    scene.push(scene.app)
    root = tmp_path / "u"
    root.mkdir()
    gone = tmp_path / "gone"
    p = pure("--substituters", f"file://{gone} {scene.url}", "--trusted-public-keys", scene.pub,
             "build", scene.f, "--no-link", root=root, cwd=tmp_path)
    assert p.stdout.strip() == scene.app
    warning = f"warning: not using binary cache 'file://{gone}': directory '{gone}' does not exist"
    assert p.stderr.count(warning) == 1, p.stderr
    assert p.stderr.count("binary cache") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    root2 = tmp_path / "u2"
    root2.mkdir()
    p = pure("--substituters", f"file://{empty} {scene.url}", "--trusted-public-keys", scene.pub,
             "build", scene.f, "--no-link", root=root2, cwd=tmp_path)
    assert (f"warning: not using binary cache 'file://{empty}': it has no nix-cache-info (is it a cache?)"
            in p.stderr), p.stderr
    # an HTTP cache that answers with an error: its URL is said once, not again by the reason
    import http.server
    import threading

    class Broken(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(500)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    broken = f"http://127.0.0.1:{server.server_address[1]}/"
    root3 = tmp_path / "u3"
    root3.mkdir()
    try:
        p = pure("--substituters", f"{broken} {scene.url}", "--trusted-public-keys", scene.pub,
                 "build", scene.f, "--no-link", root=root3, cwd=tmp_path)
    finally:
        server.shutdown()
    warning = [line for line in p.stderr.splitlines() if "not using binary cache" in line]
    assert len(warning) == 1 and warning[0].startswith(f"warning: not using binary cache '{broken}': "), p.stderr
    assert warning[0].count(broken) == 1, warning


def test_a_malformed_substituter_url_is_warned_about_and_left_out(scene, pure, tmp_path):
    scene.push(scene.app)
    root = tmp_path / "m"
    root.mkdir()
    bad_prio = f"{scene.url}?priority=high"
    p = pure("--substituters", f"ssh://host {bad_prio} {scene.url}", "--trusted-public-keys", scene.pub,
             "build", scene.f, "--no-link", root=root, cwd=tmp_path)
    assert p.stdout.strip() == scene.app  # fetched from the good one
    assert p.stderr.count("warning: not using binary cache: unsupported cache URL 'ssh://host'") == 1, p.stderr
    assert p.stderr.count(f"warning: not using binary cache: cache URL '{bad_prio}': priority must be a "
                          "whole number, got 'high'") == 1, p.stderr
    assert "building" not in p.stderr


def test_a_nar_that_failed_is_not_downloaded_again_when_the_build_falls_back(pure, expr, tmp_path, store_root):
    """app refers to tool, which it is also built with.  tool's NAR in the cache is corrupt:
    fetching app fails with it; tool is built, without downloading its bad NAR a second time
    (one warning, one GET; a static server that records requests), and then app is fetched
    after all (its reference is valid now, built here), not built: as Nix does.  app's NAR,
    which came and passed its checks before tool failed, is not downloaded again for that
    (it was), and its restored tree is not left behind."""
    import functools
    import http.server
    import threading

    f = expr('''\\
tool = sh("tool", "$B mkdir $out; echo tool > $out/t")
default = sh("app", f"$B mkdir $out; $B cat {tool}/t > $out/f; echo {tool} > $out/ref")
''')
    app = build(pure, tmp_path, f, "--no-link").stdout.strip()
    tool = next(p for p in pure("store", "ls").stdout.split() if p.endswith("-tool"))
    cache = _keyed_push(pure, tmp_path, app)
    text = (cache / (tool.rsplit("/", 1)[1][:32] + ".narinfo")).read_text()
    tool_nar = next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
    app_text = (cache / (app.rsplit("/", 1)[1][:32] + ".narinfo")).read_text()
    app_nar = next(line[5:] for line in app_text.splitlines() if line.startswith("URL: "))
    (cache / tool_nar).write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(cache)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root = tmp_path / "b"
        root.mkdir()
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        p = pure("--substituters", url, "--trusted-public-keys", (tmp_path / "k.pub").read_text().strip(),
                 "build", f, "--no-link", root=root, cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert p.stdout.strip() == app
    assert os.listdir(root / "pure" / "store" / ".tmp") == []  # (before a store is opened: that cleans up)
    assert asked.count("/" + tool_nar) == 1, asked
    assert p.stderr.count(f"warning: cannot substitute '{tool}'") == 1, p.stderr
    built, fetched = _events(root)
    assert sorted(d.rsplit("-", 1)[1] for d in built) == ["tool.drv"] and fetched == [app]
    assert f"fetched {app} (once what it refers to was built here)" in p.stderr
    assert asked.count("/" + app_nar) == 1, asked
    assert os.listdir(root / "pure" / "store" / ".tmp") == []  # (before a store is opened: that cleans up)


def test_json_events_use_camel_case_and_say_a_fetch_failed(scene, pure, tmp_path):
    """build --json: keys as in the other --json outputs (willFetch, downloadSize…), and a
    planned fetch that fails says so (fetch-failed) before the path is built instead."""
    import json as json_

    scene.push(scene.app, scene.tool)
    hash_part = scene.app.rsplit("/", 1)[1].split("-", 1)[0]
    text = (scene.cache / f"{hash_part}.narinfo").read_text()
    (scene.cache / next(line[5:] for line in text.splitlines() if line.startswith("URL: "))).write_bytes(b"junk")
    p, _root = scene.fresh("j", "--json")
    events = [json_.loads(line) for line in p.stdout.splitlines()]
    fetch_plan = next(e for e in events if e["type"] == "fetch-plan")
    assert set(fetch_plan) == {"type", "willFetch", "downloadSize", "narSize"} and fetch_plan["willFetch"] == [scene.app]
    failed = [e for e in events if e["type"] == "fetch-failed"]
    assert [e["path"] for e in failed] == [scene.app] and "/nar/" in failed[0]["error"], failed
    plan = next(e for e in events if e["type"] == "plan")
    assert scene.app_drv in plan["willBuild"] and "willSubstitute" in plan
    assert [e["type"] for e in events][-2:] == ["done", "result"]
    # nothing to do (a shortcut past the scheduler): the same frame of events
    p, _root = scene.fresh("j", "--json")
    assert [json_.loads(line)["type"] for line in p.stdout.splitlines()] == ["plan", "done", "result"]


def test_offline_may_follow_the_build_command(scene, pure, tmp_path):
    """`pure build FILE --offline` as `pure --offline build FILE`: no cache is asked."""
    root = tmp_path / "off"
    root.mkdir()
    gone = tmp_path / "gone"
    p = pure("--substituters", f"file://{gone}", "build", scene.f, "--no-link", "--offline", "--dry-run",
             root=root, cwd=tmp_path)
    assert "binary cache" not in p.stderr and "will be built" in p.stderr, p.stderr
    p = pure("--substituters", f"file://{gone}", "build", scene.f, "--no-link", "--dry-run", root=root, cwd=tmp_path)
    assert "not using binary cache" in p.stderr  # (without it, the cache is asked)


def test_fallback_goes_down_a_chain_of_build_inputs_as_far_as_it_must(pure, expr, tmp_path, store_root):
    """d4 is built with d3, d3 with d2 … d1 with d0 (build-time inputs only).  The cache has all
    five, but the NARs of d1 to d4 are corrupt: each fails in turn and is built, and d0, which
    the cache has intact, is fetched, not built (before, the fallback gave up after three
    rounds and built d1 and d0 without trying them), each fetch said before it is made."""
    body = 'd0 = sh("d0", "$B mkdir $out; echo d0 > $out/f")\n'
    for i in range(1, 5):
        body += f'd{i} = sh("d{i}", f"$B mkdir $out; $B cat {{d{i - 1}}}/f > $out/f; echo d{i} >> $out/f")\n'
    body += "default = d4\n"
    f = expr(body)
    build(pure, tmp_path, f, "--no-link")
    outs = {p.rsplit("-", 1)[1]: p for p in pure("store", "ls").stdout.split() if not p.endswith(".drv")
            and p.rsplit("-", 1)[1] in {f"d{i}" for i in range(5)}}
    cache = _keyed_push(pure, tmp_path, *outs.values())
    for i in range(1, 5):
        text = (cache / (outs[f"d{i}"].rsplit("/", 1)[1][:32] + ".narinfo")).read_text()
        nar = next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
        (cache / nar).write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    root = tmp_path / "b"
    root.mkdir()
    p = pure("--substituters", f"file://{cache}", "--trusted-public-keys", (tmp_path / "k.pub").read_text().strip(),
             "build", f, "--no-link", "--json", root=root, cwd=tmp_path)
    built, fetched = _events(root)
    assert sorted(d.rsplit("-", 1)[1] for d in built) == ["d1.drv", "d2.drv", "d3.drv", "d4.drv"]
    assert fetched == [outs["d0"]]
    plans = [json.loads(line) for line in p.stdout.splitlines() if '"fetch-plan"' in line]
    assert [e["willFetch"] for e in plans] == [[outs[f"d{i}"]] for i in (4, 3, 2, 1, 0)], plans


def test_max_jobs_0_fetches_and_never_builds(scene, tmp_path):
    """max-jobs = 0 (or -j 0), as in Nix: what the caches have is fetched, and a build that would
    be needed is an error that names it, with nothing built."""
    scene.push(scene.tool)
    p, root = scene.fresh("b", "-j", "0", check=False)
    assert p.returncode == 1 and "cannot build 1 derivation (" + scene.app_drv + "): max-jobs is 0" in p.stderr
    assert _events(root)[0] == [] and not _valid(root, scene.app)
    # --dry-run -j 0 says so too (it listed what "will be built" as if it would be)
    p, _root = scene.fresh("b2", "-j", "0", "--dry-run")
    assert "will be built:" in p.stderr and "max-jobs is 0: a real run would build none of them" in p.stderr
    p, _root = scene.fresh("b3", "--dry-run")
    assert "will be built:" in p.stderr and "max-jobs is 0" not in p.stderr
    scene.push(scene.app)
    conf = tmp_path / "jobs0.conf"
    conf.write_text("max-jobs = 0\n")
    p, root = scene.fresh("c", check=False, env={"PURE_CONFIG": str(conf)})
    assert p.returncode == 0 and p.stdout.strip() == scene.app
    assert _events(root) == ([], [scene.app])
    p, _root = scene.fresh("d", "-j", "-1", check=False)
    assert p.returncode == 2 and "--max-jobs must be 0" in p.stderr


def test_json_events_come_in_the_documented_order_fetches_then_plan_then_builds(scene):
    """docs/building.md: the fetches made before the builds come first, then `plan` (its
    willBuild counts the builds a failed fetch adds), then the builds, `done`, `result`."""
    scene.push(scene.tool)
    p, _root = scene.fresh("b", "--json")
    evs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [e["type"] for e in evs] == ["fetch-plan", "fetched", "plan", "start", "built", "done", "result"]
    assert evs[2]["willBuild"] == [scene.app_drv] and evs[2]["willSubstitute"] == [scene.tool]
    # app's NAR is corrupt: its fetch fails, then tool, now needed, is fetched, then the plan
    scene.push(scene.app)
    hash_part = scene.app.rsplit("/", 1)[1].split("-", 1)[0]
    text = (scene.cache / f"{hash_part}.narinfo").read_text()
    (scene.cache / next(line[5:] for line in text.splitlines() if line.startswith("URL: "))).write_bytes(b"junk")
    p, _root = scene.fresh("c", "--json")
    evs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [(e["type"], e.get("path") or e.get("willFetch")) for e in evs[:4]] == [
        ("fetch-plan", [scene.app]), ("fetch-failed", scene.app), ("fetch-plan", [scene.tool]),
        ("fetched", scene.tool)]
    assert [e["type"] for e in evs[4:]] == ["plan", "start", "built", "done", "result"]
    assert evs[4]["willBuild"] == [scene.app_drv]


def test_max_jobs_0_does_not_say_it_builds_what_it_cannot_fetch(scene, pure, tmp_path):
    """A cache has app but it cannot be used (not signed by a trusted key, or no provenance with
    --require-provenance); with -j 0 the warning said '; building it', and then nothing was
    built: it says that max-jobs 0 forbids building it, before the error naming the build."""
    scene.push(scene.app)
    other = "test-cache-1:" + "A" * 43 + "="
    root = tmp_path / "b"
    root.mkdir()
    p = pure("--substituters", scene.url, "--trusted-public-keys", other, "build", scene.f, "--no-link",
             "-j", "0", root=root, cwd=tmp_path, check=False)
    assert p.returncode == 1 and "building it" not in p.stderr, p.stderr
    assert (f"warning: cannot substitute '{scene.app}': narinfo" in p.stderr
            and "; and max-jobs is 0, so it is not built here either" in p.stderr), p.stderr
    assert "error: cannot build 2 derivations (" in p.stderr
    p, _root = scene.fresh("c", "-j", "0", "--require-provenance", check=False)
    assert p.returncode == 1 and "building it" not in p.stderr, p.stderr
    assert "; and max-jobs is 0, so it is not built here either" in p.stderr, p.stderr
    # with builds allowed, it is built
    p, _root = scene.fresh("d", "--require-provenance")
    assert f"warning: cannot substitute '{scene.app}': " in p.stderr and "; building it" in p.stderr, p.stderr


def test_fallback_false_fails_where_a_fetch_fails_instead_of_building(scene, tmp_path):
    """fallback = false (Nix's default; pure's is true): the cache lists app but its NAR is
    corrupt: the build fails naming it, and nothing is built."""
    scene.push(scene.app, scene.tool)
    hash_part = scene.app.rsplit("/", 1)[1].split("-", 1)[0]
    text = (scene.cache / f"{hash_part}.narinfo").read_text()
    (scene.cache / next(line[5:] for line in text.splitlines() if line.startswith("URL: "))).write_bytes(b"junk")
    conf = tmp_path / "nofallback.conf"
    conf.write_text("fallback = false\n")
    p, root = scene.fresh("b", check=False, env={"PURE_CONFIG": str(conf)})
    assert p.returncode == 1 and f"warning: cannot substitute '{scene.app}'" in p.stderr
    assert "1 path listed by the substituters could not be fetched (said above), and fallback = false" in p.stderr
    assert _events(root)[0] == []


def test_fallback_false_fails_where_a_lookup_fails_instead_of_building(scene, tmp_path):
    """fallback = false, as Nix without --fallback: a cache that cannot be asked for a path (its
    narinfo unreadable: an error, not an answer) fails the build with nothing built; with the
    default (true) the path is built, with a warning that says why."""
    scene.push(scene.app, scene.tool)
    hash_part = scene.app.rsplit("/", 1)[1].split("-", 1)[0]
    narinfo = scene.cache / f"{hash_part}.narinfo"
    narinfo.unlink()
    narinfo.mkdir()  # read fails: "not a regular file"
    conf = tmp_path / "nofallback.conf"
    conf.write_text("fallback = false\n")
    p, root = scene.fresh("b", check=False, env={"PURE_CONFIG": str(conf)})
    assert p.returncode == 1, p.stderr
    assert f"error: cannot look up '{scene.app}' in the binary caches: " in p.stderr
    assert "not a regular file" in p.stderr and "fallback = false" in p.stderr
    assert _events(root) == ([], [])
    dry, _root = scene.fresh("d", "--dry-run", check=False, env={"PURE_CONFIG": str(conf)})
    assert dry.returncode == 1 and f"error: cannot look up '{scene.app}'" in dry.stderr  # as the run
    assert "hint: give --fallback, or set fallback = true" in p.stderr
    # the options, as Nix's: --no-fallback as the setting, --fallback over the setting
    p, root = scene.fresh("n", "--no-fallback", check=False)
    assert p.returncode == 1 and f"error: cannot look up '{scene.app}'" in p.stderr
    p, root = scene.fresh("f", "--fallback", env={"PURE_CONFIG": str(conf)})
    assert p.stdout.strip() == scene.app and _events(root)[0] == [scene.app_drv]
    p, root = scene.fresh("c")
    assert p.stdout.strip() == scene.app
    assert f"warning: cannot substitute '{scene.app}': " in p.stderr and "not a regular file" in p.stderr
    assert _events(root)[0] == [scene.app_drv]


def test_fallback_false_ignores_a_failed_lookup_of_what_the_build_does_not_need(scene):
    """app is in the cache; its build input tool cannot be looked up (an error): with
    --no-fallback app is fetched all the same, as Nix does (it never asks for tool).  The
    failed lookup of a build input failed the build."""
    scene.push(scene.app)
    tool_hash = scene.tool.rsplit("/", 1)[1].split("-", 1)[0]
    (scene.cache / f"{tool_hash}.narinfo").mkdir()
    p, root = scene.fresh("b", "--no-fallback")
    assert p.stdout.strip() == scene.app
    assert _events(root) == ([], [scene.app])


def _library_gap(pure, expr, tmp_path, gap, *, tool=None):
    """app refers to lib; the cache has app but not lib (``gap``: "no narinfo"), or lib signed
    by a key not trusted ("untrusted narinfo").  Returns (expression, app, lib, lib's .drv,
    the global options that use the cache).  ``tool``: a file app is also built with (fetched
    by a fixed-output derivation, "tool"), a build-only input: app copies its text, and does
    not refer to it."""
    body = 'lib = sh("lib", "$B mkdir $out; echo lib > $out/l")\n'
    if tool is None:
        body += 'default = sh("app", f"$B mkdir $out; echo {lib} > $out/ref")\n'
    else:
        body += (f'tool = fetchurl(url="file://{tool}", hash="{_sri(tool.read_bytes())}", name="tool")\n'
                 'default = sh("app", f"$B mkdir $out; echo {lib} > $out/ref; $B cat {tool} >> $out/ref")\n')
    f = expr(body)
    app = build(pure, tmp_path, f, "--no-link").stdout.strip()
    lib = next(p for p in pure("store", "ls").stdout.split() if p.endswith("-lib"))
    lib_drv = next(p for p in pure("store", "ls").stdout.split() if p.endswith("-lib.drv"))
    cache = _keyed_push(pure, tmp_path, app)
    lib_narinfo = cache / (lib.rsplit("/", 1)[1][:32] + ".narinfo")
    if gap == "no narinfo":
        lib_narinfo.unlink()
    else:
        pure("key", "generate", "--name", "other-1", "--secret-out", tmp_path / "o.sec",
             "--public-out", tmp_path / "o.pub")
        text = "".join(line for line in lib_narinfo.read_text().splitlines(True) if not line.startswith("Sig: "))
        lib_narinfo.write_text(text)
        pure("cache", "sign", f"file://{cache}", "--key-file", tmp_path / "o.sec", "--no-check-sigs")
    keys = ("--substituters", f"file://{cache}", "--trusted-public-keys", (tmp_path / "k.pub").read_text().strip())
    return f, app, lib, lib_drv, keys


def _sri(data: bytes) -> str:
    import base64
    import hashlib
    return "sha256-" + base64.b64encode(hashlib.sha256(data).digest()).decode()


@pytest.mark.parametrize("gap", ["no narinfo", "untrusted narinfo"])
def test_a_package_whose_library_no_cache_can_give_is_fetched_once_the_library_is_built(
        pure, expr, tmp_path, store_root, gap):
    """The cache has app, which refers to lib, but not lib (or lib signed by a key not trusted):
    lib is built here, then app is fetched (its reference now has the same path here), as Nix
    does.  Before, the lookup already marked app unfetchable and it was built too."""
    f, app, lib, _lib_drv, keys = _library_gap(pure, expr, tmp_path, gap)
    root = tmp_path / "b"
    root.mkdir()
    dry = pure(*keys, "build", f, "--no-link", "--dry-run", root=root, cwd=tmp_path)
    assert f"cannot substitute '{app}'" not in dry.stderr, dry.stderr  # as the run itself
    p = pure(*keys, "build", f, "--no-link", root=root, cwd=tmp_path)
    assert p.stdout.strip() == app
    built, fetched = _events(root)
    assert [d.rsplit("-", 1)[1] for d in built] == ["lib.drv"], built
    assert fetched == [app]
    assert f"fetched {app} (once what it refers to was built here)" in p.stderr
    assert f"cannot substitute '{app}'" not in p.stderr
    st = open_store(root)
    try:
        assert st.verify(check_contents=True).ok
    finally:
        st.close()


def test_the_plan_lists_a_package_fetched_once_its_library_is_built_apart_from_the_builds(
        pure, expr, tmp_path, store_root):
    """The plan (--dry-run, its --json, and the one printed before a build) lists app, which
    is fetched once lib is built, as such, not among the derivations to build: before, app's
    derivation was listed as to be built, and a script could not tell."""
    f, app, _lib, lib_drv, keys = _library_gap(pure, expr, tmp_path, "no narinfo")
    root = tmp_path / "b"
    root.mkdir()
    dry = pure(*keys, "build", f, "--no-link", "--dry-run", root=root, cwd=tmp_path)
    assert "this derivation will be built:\n  " + lib_drv + "\n" in dry.stderr, dry.stderr
    assert "-app.drv" not in dry.stderr, dry.stderr
    assert ("this path will be fetched once what it refers to is built here (0.00 MiB download, "
            "0.00 MiB unpacked):\n  " + app) in dry.stderr, dry.stderr
    plan = json.loads(pure(*keys, "build", f, "--no-link", "--dry-run", "--json", root=root, cwd=tmp_path).stdout)
    assert plan["willBuild"] == [lib_drv] and plan["willFetch"] == []
    [late] = plan["willFetchAfterBuild"]
    assert late["path"] == app and late["narSize"] > 0 and late["downloadSize"] > 0
    p = pure(*keys, "build", f, "--no-link", root=root, cwd=tmp_path)
    assert "this derivation will be built:\n  " + lib_drv + "\n" in p.stderr, p.stderr
    assert "this path will be fetched once what it refers to is built here:\n  " + app in p.stderr, p.stderr
    assert "-app.drv" not in p.stderr, p.stderr
    root = tmp_path / "j"
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", "--json", root=root, cwd=tmp_path)
    [plan] = [e for e in map(json.loads, p.stdout.splitlines()) if e["type"] == "plan"]
    assert plan["willBuild"] == [lib_drv] and plan["willFetchAfterBuild"] == [app], plan


def test_max_jobs_0_names_only_what_must_be_built_and_says_a_late_fetch_waits_for_it(
        pure, expr, tmp_path, store_root):
    """With -j 0, the cache has app but not lib: the error names lib's derivation, the one to
    build, and says that app can only be fetched once lib is built here, which -j 0 forbids.
    Before, it counted app's derivation among those it "cannot build" (2 derivations)."""
    f, app, lib, lib_drv, keys = _library_gap(pure, expr, tmp_path, "no narinfo")
    root = tmp_path / "b"
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", "-j", "0", root=root, cwd=tmp_path, check=False)
    assert p.returncode == 1, p.stderr
    assert f"error: cannot build 1 derivation ({lib_drv}): max-jobs is 0, so nothing is built here, " in p.stderr
    assert (f"and 1 path a cache has ({app}) can only be fetched once what it refers to is built here, "
            "which max-jobs 0 forbids") in p.stderr, p.stderr
    assert "-app.drv" not in p.stderr, p.stderr
    assert _events(root) == ([], []) and not _valid(root, lib)


def test_the_fetch_summary_counts_what_is_fetched_once_its_reference_is_built(pure, expr, tmp_path, store_root):
    """app refers to lib and x; the cache has all three, but lib's NAR is corrupt.  x is fetched
    before the builds, lib is built, and app is fetched then: the one summary of the run counts
    both paths and their bytes (it counted x only, and said so before app came).  With no
    fetch before the builds (lib not in the cache), the late fetch has its summary too (there
    was none), and --json says "fetched" once for it."""
    from purestore.cache.progress import format_size

    f = expr('lib = sh("lib", "$B mkdir $out; echo lib > $out/l")\n'
             'x = sh("x", "$B mkdir $out; echo x > $out/x")\n'
             'default = sh("app", f"$B mkdir $out; echo {lib} {x} > $out/ref")\n')
    app = build(pure, tmp_path, f, "--no-link").stdout.strip()
    outs = {p.rsplit("-", 1)[1]: p for p in pure("store", "ls").stdout.split() if not p.endswith(".drv")}
    cache = _keyed_push(pure, tmp_path, app)

    def narinfo(name):
        return cache / (outs[name].rsplit("/", 1)[1][:32] + ".narinfo")

    def field(name, key):
        return next(line.split(": ", 1)[1] for line in narinfo(name).read_text().splitlines()
                    if line.startswith(key + ": "))
    (cache / field("lib", "URL")).write_bytes(b"junk")
    keys = ("--substituters", f"file://{cache}", "--trusted-public-keys", (tmp_path / "k.pub").read_text().strip())
    root = tmp_path / "b"
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", root=root, cwd=tmp_path)
    built, fetched = _events(root)
    assert [d.rsplit("-", 1)[1] for d in built] == ["lib.drv"] and fetched == sorted([app, outs["x"]])
    size = format_size(int(field("x", "NarSize")) + int(field("app", "NarSize")))
    summaries = [line for line in p.stderr.splitlines() if line.startswith("fetched ") and " unpacked) in " in line]
    assert len(summaries) == 1 and summaries[0].startswith(f"fetched 2 paths ({size} unpacked) in "), p.stderr
    assert p.stderr.index(summaries[0]) > p.stderr.index(f"fetched {app} (once what it refers to was built here)")
    narinfo("lib").unlink()
    root = tmp_path / "c"
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", root=root, cwd=tmp_path)
    summaries = [line for line in p.stderr.splitlines() if line.startswith("fetched ") and " unpacked) in " in line]
    assert len(summaries) == 1 and summaries[0].startswith(f"fetched 2 paths ({size} unpacked) in "), p.stderr
    root = tmp_path / "j"
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", "--json", root=root, cwd=tmp_path)
    fetched = [e["path"] for e in map(json.loads, p.stdout.splitlines()) if e["type"] == "fetched"]
    assert sorted(fetched) == sorted([app, outs["x"]]), fetched


def test_a_late_fetch_shows_its_paths_and_bytes_in_the_live_status_line_beside_the_builds(
        pure, expr, tmp_path, store_root):
    """On a terminal, app, fetched once lib is built, shows in the status line as the fetches
    before the builds do (paths and bytes), after the builds' counts: before, a late fetch
    showed nothing while it ran."""
    import re
    from conftest import pure_env, run_pure_on_tty

    f, app, _lib, _lib_drv, keys = _library_gap(pure, expr, tmp_path, "no narinfo")
    root = tmp_path / "b"
    root.mkdir()
    rc, out, text = run_pure_on_tty(*keys, "build", f, "--no-link", cwd=tmp_path, env=pure_env(root))
    assert rc == 0 and out.decode().strip() == app, text
    assert _events(root)[1] == [app]
    assert re.search(r"\r\x1b\[K\[0:\d\d\] built 1/1, running 0, queued 0 \| fetching 1/1 paths, "
                     r"\d+(\.\d)? K?i?B/\d+(\.\d)? K?i?B", text), repr(text)


def test_the_status_line_adds_the_late_fetches_running_at_once_to_the_builds():
    """The late fetches running at the same time count together in the status line (paths and
    bytes, done of those expected), after the builds' counts and before the names of the
    builds; once none runs, the line is the builds' again."""
    import io
    from purestore.build.progress import Progress
    out = io.StringIO()
    p = Progress(out, live=True)
    p.event("plan", will_build=["/pure/store/x.drv", "/pure/store/y.drv"])
    p.event("start", drv="/pure/store/x.drv", name="x")
    p.event("built", drv="/pure/store/x.drv", name="x", outputs={})
    p.event("start", drv="/pure/store/y.drv", name="y")
    a, b = p.fetch_progress(late=True), p.fetch_progress(late=True)
    a.expect(1, 2048)
    b.expect(1, 1024)
    a.add_bytes(2048)
    a.path_done("/pure/store/a")
    last = out.getvalue().rsplit("\r\x1b[K", 1)[1]
    assert last == "[0:00] built 1/2, running 1, queued 0 | fetching 1/2 paths, 2.0 KiB/3.0 KiB | y", repr(last)
    p.fetch_finished(a, summary=False)  # b goes on: a is still counted
    b.add_bytes(1024)
    b.path_done("/pure/store/b")
    last = out.getvalue().rsplit("\r\x1b[K", 1)[1]
    assert last == "[0:00] built 1/2, running 1, queued 0 | fetching 2/2 paths, 3.0 KiB/3.0 KiB | y", repr(last)
    p.fetch_finished(b, summary=False)
    last = out.getvalue().rsplit("\r\x1b[K", 1)[1]
    assert last == "[0:00] built 1/2, running 1, queued 0 | y", repr(last)
    c = p.fetch_progress(late=True)  # a new burst: counted afresh
    c.expect(1, 10)
    c.path_done("/pure/store/c")
    assert out.getvalue().rsplit("\r\x1b[K", 1)[1].startswith(
        "[0:00] built 1/2, running 1, queued 0 | fetching 1/1 paths, 0 B/10 B"), repr(out.getvalue())
    p.fetch_finished(c, summary=False)
    p.fetch_summary()
    assert "fetched 3 paths (3.0 KiB unpacked) in " in out.getvalue()


def test_check_with_max_jobs_0_is_refused(scene):
    scene.push(scene.app)
    p, _root = scene.fresh("b")
    p, _root = scene.fresh("b", "--check", "-j", "0", check=False)
    assert p.returncode == 1 and "--check builds again, and max-jobs is 0" in p.stderr


def test_many_packages_above_a_library_whose_nar_fails_are_fetched_once_it_is_built(pure, expr, tmp_path, store_root):
    """lib's NAR in the cache is corrupt; twelve packages refer to lib and are built with it.
    lib is built (its bad NAR fetched and warned about once), and each package is then fetched,
    once lib is registered (not while it is being registered: then lib was fetched again); the
    plan printed after the failed fetch says so (it listed the twelve among the builds)."""
    body = 'lib = sh("lib", "$B mkdir $out; echo lib > $out/l")\n'
    for i in range(12):
        body += f'p{i} = sh("p{i}", f"$B mkdir $out; echo {{lib}} > $out/ref")\n'
    body += "default = [" + ", ".join(f"p{i}" for i in range(12)) + "]\n"
    f = expr(body)
    build(pure, tmp_path, f, "--no-link")
    outs = [p for p in pure("store", "ls").stdout.split() if not p.endswith(".drv")]
    lib = next(p for p in outs if p.endswith("-lib"))
    cache = _keyed_push(pure, tmp_path, *outs)
    text = (cache / (lib.rsplit("/", 1)[1][:32] + ".narinfo")).read_text()
    (cache / next(line[5:] for line in text.splitlines() if line.startswith("URL: "))).write_bytes(b"junk")
    keys = ("--substituters", f"file://{cache}", "--trusted-public-keys", (tmp_path / "k.pub").read_text().strip())
    root = tmp_path / "none"  # nothing built (lib must be): the restored NARs kept are removed
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", "-j", "0", root=root, cwd=tmp_path, check=False)
    assert p.returncode == 1 and "error: cannot build 1 derivation (" in p.stderr, p.stderr  # lib's only
    assert "; and 12 paths a cache has (" in p.stderr and " …) can only be fetched once what they refer" in p.stderr
    assert os.listdir(root / "pure" / "store" / ".tmp") == []
    root = tmp_path / "b"
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", "-j", "4", root=root, cwd=tmp_path)
    assert os.listdir(root / "pure" / "store" / ".tmp") == []  # the restored NARs kept were used
    built, fetched = _events(root)
    assert [d.rsplit("-", 1)[1] for d in built] == ["lib.drv"], built
    assert len(fetched) == 12 and lib not in fetched
    lib_drv = next(p for p in pure("store", "ls").stdout.split() if p.endswith("-lib.drv"))
    assert "this derivation will be built:\n  " + lib_drv + "\n" in p.stderr, p.stderr
    assert "these 12 paths will be fetched once what they refer to is built here:\n" in p.stderr, p.stderr
    assert p.stderr.count(f"warning: cannot substitute '{lib}'") == 1, p.stderr
    assert p.stderr.count("warning: ") == 1, p.stderr  # the cause only, not each package above it
    st = open_store(root)
    try:
        assert st.verify(check_contents=True).ok
    finally:
        st.close()


def _tool_gap(pure, expr, tmp_path):
    """_library_gap with a build-only input, tool; returns its results and tool's .drv."""
    src = tmp_path / "tool.txt"
    src.write_text("tool\n")
    f, app, lib, lib_drv, keys = _library_gap(pure, expr, tmp_path, "no narinfo", tool=src)
    tool_drv = next(p for p in pure("store", "ls").stdout.split() if p.endswith("-tool.drv"))
    return f, app, lib, lib_drv, tool_drv, keys


@pytest.mark.parametrize("keep_going", [False, True])
def test_a_package_fetched_once_its_library_is_built_does_not_wait_for_its_build_only_inputs(
        pure, expr, tmp_path, store_root, keep_going):
    """app refers to lib (in no cache) and is built with tool, which it does not refer to: lib
    is built and app fetched; tool is neither built nor fetched, and its build failing (its
    source is gone) does not fail app.  Before (as in Nix 2.8), app's late fetch waited for all
    its inputs, tool was built for nothing, and app failed with "dependency ... failed"."""
    f, app, lib, lib_drv, tool_drv, keys = _tool_gap(pure, expr, tmp_path)
    (tmp_path / "tool.txt").unlink()  # tool cannot be built any more
    root = tmp_path / "b"
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", *(["--keep-going"] if keep_going else []), root=root, cwd=tmp_path)
    assert p.stdout.strip() == app, p.stderr
    assert _events(root) == ([lib_drv], [app])
    assert "-tool" not in p.stderr, p.stderr


@pytest.mark.parametrize("tool_in_cache", [False, True])
def test_a_package_whose_late_fetch_fails_is_built_with_its_build_only_inputs_then(
        pure, expr, tmp_path, store_root, tool_in_cache):
    """As above, but app's NAR in the cache is corrupt: its late fetch fails once lib is built,
    and only then is tool needed: tool is built (or fetched, when a cache has it), then app is
    built, although the plan did not list them."""
    f, app, lib, lib_drv, tool_drv, keys = _tool_gap(pure, expr, tmp_path)
    cache = tmp_path / "cache"
    tool = next(p for p in pure("store", "ls").stdout.split() if p.endswith("-tool"))
    if tool_in_cache:
        pure("copy", "--to", f"file://{cache}", "--secret-key-file", tmp_path / "k.sec", tool)
    text = (cache / (app.rsplit("/", 1)[1][:32] + ".narinfo")).read_text()
    (cache / next(line[5:] for line in text.splitlines() if line.startswith("URL: "))).write_bytes(b"junk")
    root = tmp_path / "b"
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", "--json", root=root, cwd=tmp_path)
    evs = [json.loads(line) for line in p.stdout.splitlines()]
    [plan] = [e for e in evs if e["type"] == "plan"]
    assert plan["willBuild"] == [lib_drv] and plan["willFetchAfterBuild"] == [app], plan
    built = [e["drv"] for e in evs if e["type"] == "start"]  # in the order they started
    app_drv = next(d for d in built if d.endswith("-app.drv"))
    if tool_in_cache:
        assert built == [lib_drv, app_drv] and _events(root)[1] == [tool], (built, _events(root))
        root2 = tmp_path / "c"
        root2.mkdir()
        p2 = pure(*keys, "build", f, "--no-link", root=root2, cwd=tmp_path)
        assert f"fetched {tool} (to build {app_drv}, whose fetch failed)" in p2.stderr, p2.stderr
    else:
        assert built == [lib_drv, tool_drv, app_drv] and _events(root)[1] == [], (built, _events(root))
    assert sorted(_events(root)[0]) == sorted(built)
    assert [e["path"] for e in evs if e["type"] == "fetch-failed"] == [app]
    st = open_store(root)
    try:
        assert st.is_valid(st.parse_path(app)) and st.verify(check_contents=True).ok
    finally:
        st.close()


def test_the_plan_of_a_late_fetch_does_not_list_its_build_only_inputs(pure, expr, tmp_path, store_root):
    """The plan (--dry-run, its --json, the one printed before the build, and the build's
    --json) lists lib as the only build, app as fetched once lib is built, and not tool: it
    listed tool among the builds.  So does the error of -j 0 (it said "2 derivations")."""
    f, app, lib, lib_drv, tool_drv, keys = _tool_gap(pure, expr, tmp_path)
    root = tmp_path / "b"
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", "-j", "0", root=root, cwd=tmp_path, check=False)
    assert p.returncode == 1 and f"error: cannot build 1 derivation ({lib_drv}): " in p.stderr, p.stderr
    dry = pure(*keys, "build", f, "--no-link", "--dry-run", root=root, cwd=tmp_path)
    assert "this derivation will be built:\n  " + lib_drv + "\n" in dry.stderr, dry.stderr
    assert "-tool" not in dry.stderr and "-app.drv" not in dry.stderr, dry.stderr
    plan = json.loads(pure(*keys, "build", f, "--no-link", "--dry-run", "--json", root=root, cwd=tmp_path).stdout)
    assert plan["willBuild"] == [lib_drv] and plan["willFetch"] == [], plan
    assert [x["path"] for x in plan["willFetchAfterBuild"]] == [app]
    p = pure(*keys, "build", f, "--no-link", root=root, cwd=tmp_path)
    assert "this derivation will be built:\n  " + lib_drv + "\n" in p.stderr, p.stderr
    assert "-tool" not in p.stderr, p.stderr
    root = tmp_path / "j"
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", "--json", root=root, cwd=tmp_path)
    [plan] = [e for e in map(json.loads, p.stdout.splitlines()) if e["type"] == "plan"]
    assert plan["willBuild"] == [lib_drv] and plan["willFetchAfterBuild"] == [app], plan


def test_a_late_fetch_waits_for_what_it_refers_to_through_a_build_only_input(pure, expr, tmp_path, store_root):
    """app refers to lib and, through the text it copies from tool (a build-only input), to
    zlib, tool's input and not app's; the cache has app but neither lib nor zlib: lib and zlib
    are built, app fetched, tool not built.  Before, app waited only for lib (the one input
    whose output it names): its fetch found zlib missing and failed, and app, tool and zlib
    were all built."""
    f = expr('zlib = sh("zlib", "$B mkdir $out; echo zlib > $out/z")\n'
             'tool = sh("tool", f"$B mkdir $out; echo {zlib} > $out/t")\n'
             'lib = sh("lib", "$B mkdir $out; echo lib > $out/l")\n'
             'default = sh("app", f"$B mkdir $out; echo {lib} > $out/ref; $B cat {tool}/t >> $out/ref")\n')
    app = build(pure, tmp_path, f, "--no-link").stdout.strip()
    listed = pure("store", "ls").stdout.split()
    lib, zlib = (next(p for p in listed if p.endswith(s)) for s in ("-lib", "-zlib"))
    lib_drv, zlib_drv = (next(p for p in listed if p.endswith(s)) for s in ("-lib.drv", "-zlib.drv"))
    cache = _keyed_push(pure, tmp_path, app)
    for p in (lib, zlib):
        (cache / (p.rsplit("/", 1)[1][:32] + ".narinfo")).unlink()
    keys = ("--substituters", f"file://{cache}", "--trusted-public-keys", (tmp_path / "k.pub").read_text().strip())
    root = tmp_path / "b"
    root.mkdir()
    p = pure(*keys, "build", f, "--no-link", root=root, cwd=tmp_path)
    assert p.stdout.strip() == app, p.stderr
    built, fetched = _events(root)
    assert sorted(built) == sorted([lib_drv, zlib_drv]) and fetched == [app], (built, fetched, p.stderr)
    assert "cannot substitute" not in p.stderr, p.stderr
