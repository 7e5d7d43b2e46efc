"""What a `pure cache serve` killed in an upload, or a copy killed in the middle of a NAR, left in
the cache directory (``.tmp-…`` files, purestore/cache/_temps.py): they name the process and
the machine, and the next serve, push, copy or prune removes them at once once that process of
this machine is gone; those that name another machine (a directory shared over NFS) wait for
the age rule."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import pure_env, run_pure
from test_cache_support import PUB, SEC, make_path, open_store, start_server, stop_server

from purestore._pids import this_machine


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _wait_for(cond, proc, what: str):
    deadline = time.monotonic() + 60
    while not (found := cond()):
        assert proc.poll() is None, f"exited {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"no {what} after 60 s"
        time.sleep(0.01)
    return found


def test_a_serve_killed_in_an_upload_leaves_a_file_the_next_serve_removes(tmp_path):
    cache, token = tmp_path / "cache", tmp_path / "token"
    (cache / "nar").mkdir(parents=True)
    (cache / "log").mkdir()
    token.write_text("s3cret\n")
    proc, url = start_server(cache, token_file=token)
    try:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"PUT /nar/x.nar HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                      b"Content-Length: 1000000\r\n\r\n" + b"x" * 300_000)
            [left] = _wait_for(lambda: list((cache / "nar").glob(".tmp-upload-*")), proc, "upload file")
            proc.kill()
            proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert left.exists() and left.name.startswith(f".tmp-upload-{proc.pid}-{this_machine()}-")
    dead = _dead_pid()
    gone = [cache / f".tmp-{dead}-{this_machine()}-abc", cache / "log" / f".tmp-upload-{dead}-{this_machine()}-d"]
    kept = [cache / "nar" / f".tmp-upload-{dead}-elsewhere.0123abcd-e",  # another machine's
            cache / "nar" / f".tmp-push-{os.getpid()}-{this_machine()}-f.nar",  # a live process's
            cache / "nar" / ".tmp-push-0123456789abcdef.nar",  # no pid (an older version's), recent
            cache / "nar" / f"{dead}-{this_machine()}-g.nar"]  # not a temporary file
    for f in gone + kept:
        f.write_bytes(b"partial")
    proc, url = start_server(cache, token_file=token)  # once it serves, the leftovers are gone
    try:
        assert not left.exists() and not any(f.exists() for f in gone)
        assert all(f.exists() for f in kept)
    finally:
        stop_server(proc)


def test_a_copy_killed_in_a_nar_leaves_a_file_the_next_copy_removes(tmp_path):
    """The copy reads from a server that sends half the NAR and then nothing: killed then, it
    has a temporary NAR file in the destination's nar/."""
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open_store(tmp_path / "a") as store:
        p = store.print_path(make_path(store, "big", {"": os.urandom(1 << 20)}))
    run_pure("copy", "--to", f"file://{src}?compression=none", "--secret-key-file", key, p, root=tmp_path / "a")
    release = threading.Event()

    class Stalling(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if not self.path.startswith("/nar/"):
                return super().do_GET()
            data = (src / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            release.wait(120)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Stalling, directory=str(src)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "copy", "--from",
                                 f"http://127.0.0.1:{server.server_address[1]}/", "--to", f"file://{dst}",
                                 "--trusted-public-keys", PUB, p], env=pure_env(None),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            [left] = _wait_for(lambda: list(dst.glob("nar/.tmp-push-*")), proc, "a NAR file begun")
            proc.kill()
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert left.exists() and left.name.startswith(f".tmp-push-{proc.pid}-{this_machine()}-")
    run_pure("copy", "--from", f"file://{src}", "--to", f"file://{dst}", "--trusted-public-keys", PUB, p)
    assert not left.exists() and not list((dst / "nar").glob(".tmp-*"))
    run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, f"file://{dst}", p)


def test_a_prune_removes_what_a_gone_process_of_this_machine_left_at_once(tmp_path):
    cache = tmp_path / "cache"
    (cache / "nar").mkdir(parents=True)
    (cache / "nix-cache-info").write_text("StoreDir: /pure/store\n")
    dead = _dead_pid()
    gone = cache / "nar" / f".tmp-push-{dead}-{this_machine()}-a.nar"
    kept = [cache / "nar" / f".tmp-push-{dead}-elsewhere.0123abcd-b.nar",
            cache / f".tmp-{os.getpid()}-{this_machine()}-c"]
    for f in [gone, *kept]:
        f.write_bytes(b"partial")
    r = run_pure("cache", "prune", f"file://{cache}", "--older-than", "30d", "--json")
    assert not gone.exists() and all(f.exists() for f in kept), r.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare for a pid namespace")
def test_pids_are_judged_only_where_proc_shows_this_pid_namespace():
    """In a pid namespace of its own, a process's name for temporaries differs from the host's
    (its pids are not the host's), and it judges no pid when /proc is still the host's
    (`unshare --pid` without a /proc of its own: /proc/<pid> would be another process's)."""
    check = ("from purestore._pids import this_machine, writer_gone; "
             "print(this_machine()); print(writer_gone(f'.tmp-99999999-{this_machine()}-x', '.tmp-', machine=True))")
    outs = {}
    for mount in ((), ("--mount-proc",)):
        r = subprocess.run(["unshare", "--pid", "--fork", *mount, sys.executable, "-c", check],
                           capture_output=True, text=True, env=pure_env(None), timeout=60)
        if r.returncode != 0:
            pytest.skip(f"unshare --pid does not work here: {r.stderr.strip()}")
        outs[bool(mount)] = r.stdout.split()
    assert outs[False][1] == "False" and outs[True][1] == "True"
    assert this_machine() not in (outs[False][0], outs[True][0])
