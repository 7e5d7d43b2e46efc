"""Helpers shared by the binary cache tests (no tests in here).

- :func:`open_store` opens a rooted store with the library;
- :func:`make_path` registers a synthetic input-addressed path (no content address, so even Nix
  insists on a signature) with given files and references;
- :func:`pushed_closure` pushes a small closure into a file cache with `pure copy`;
- :func:`nix_copy_from` runs `nix copy --from` into a chroot store (where Nix is installed);
- :func:`start_server` runs `pure cache serve` as a real process and returns its URL
  (:func:`start_store_server`: `pure store serve`);
- :func:`resign` rewrites a narinfo in a cache, optionally re-signing it with a key;
- :func:`read_http_request` reads one request for the fake HTTP servers of the tests.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import DATA, HAVE_NIX, pure_env, run_pure

SEC = (DATA / "cache" / "test-key-1.sec").read_text()
PUB = (DATA / "cache" / "test-key-1.pub").read_text()


def settings_for(root, store_dir="/pure/store", **kw):
    from purestore.store.settings import load_settings
    return load_settings(env={"PURE_CONFIG": "/dev/null"}, root=str(root), store_dir=store_dir, **kw)


def open_store(root, store_dir="/pure/store", **kw):
    from purestore.store.local import LocalStore
    return LocalStore.open(settings_for(root, store_dir, **kw), durable=False)


def keep_build_log(store, drv, text: bytes) -> None:
    """Keep ``text`` as the build log of the derivation ``drv`` in the store (where a build
    writes it: ``<state dir>/log/XX/REST.zst``), for pushes to upload."""
    import zstandard
    log = os.path.join(store.state_dir, "log", drv.base_name[:2], drv.base_name[2:] + ".zst")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(text))


def make_path(store, name: str, files: dict[str, bytes | str], refs=(), deriver=None):
    """Register an input-addressed path holding ``files`` (relative name → bytes; str = symlink
    target; '' key = the path is a single file) that refers to ``refs``.  Returns the StorePath."""
    from purestore.formats.path_info import PathInfo
    from purestore.formats.store_path import make_store_path
    from purestore.store.fsnar import hash_path
    from purestore.store.fstree import canonicalise_path

    refs = list(refs)
    seed = repr(sorted((k, v) for k, v in files.items())) + repr(sorted(map(str, refs)))
    sp = make_store_path("output:out", hashlib.sha256(seed.encode()).digest(), name, store.store_dir)
    tmp = store.temp_name(sp)
    if "" in files:
        Path(tmp).write_bytes(files[""])
    else:
        os.makedirs(tmp)
        for rel, data in files.items():
            p = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            if isinstance(data, str):
                os.symlink(data, p)
            else:
                Path(p).write_bytes(data)
    canonicalise_path(tmp)
    nar_hash, nar_size = hash_path(tmp)
    with store.lock_path(sp):
        store.install_path(tmp, sp)
        store.register([PathInfo(sp, nar_hash, nar_size, references=frozenset(refs), deriver=deriver)])
    return sp


def make_closure(store):
    """A small closure: lib (a file), app (a tree referring to lib and itself). Returns (lib, app)."""
    lib = make_path(store, "lib-1.0", {"": b"library contents\n" * 100})
    app_files = {
        "bin/app": b"#!/bin/sh\nexec " + store.print_path(lib).encode() + b"\n",
        "share/doc": b"documentation " * 500,
        "share/link": "../bin/app",
    }
    app = make_path(store, "app-2.0", app_files, refs=[lib])
    return lib, app


def pushed_closure(tmp_path, cache):
    """lib and app (app refers to lib), pushed by `pure copy` into ``cache`` (signed, store dir
    /nix/store where Nix is installed, so that Nix can read it too); returns (store dir, app)."""
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    store_dir = "/nix/store" if HAVE_NIX else "/pure/store"
    with open_store(tmp_path / "a", store_dir) as store:
        _lib, app = make_closure(store)
        app_p = store.print_path(app)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", key, app_p,
             root=tmp_path / "a", store_dir=store_dir)
    return store_dir, app_p


def nix_copy_from(tmp_path, url, path, *options, env=None, check=False):
    """`nix copy --from URL PATH` into a chroot store, trusting the test key.  Nix keeps the
    narinfos it read in ~/.cache for days, by URL: each test gets its own, or else a server of an
    earlier test on the same port would answer for this one."""
    env = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command",
           "XDG_CACHE_HOME": str(tmp_path / "nix-xdg-cache"), **(env or {})}
    p = subprocess.run(["nix", "copy", "--store", str(tmp_path / "nixroot"), "--from", url,
                        "--option", "trusted-public-keys", PUB, *options, path],
                       env=env, capture_output=True, text=True, timeout=120)
    assert not check or p.returncode == 0, p.stderr
    return p


async def read_http_request(stream, buf: bytes = b"") -> tuple[bytes, bytes, bytes] | None:
    """One HTTP/1.1 request read from a trio stream (``buf``: what was received already beyond
    the previous one), for fake servers: (head, body, the bytes after it); None when the
    client closes first."""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(buf) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    return head, buf[:length], buf[length:]


def start_server(directory, *options, token_file=None, env=None):
    """Run `pure cache serve DIR --listen 127.0.0.1:0 [OPTIONS]`; returns (process, base URL)."""
    args = ["cache", "serve", directory, "--listen", "127.0.0.1:0", *options]
    if token_file:
        args += ["--upload-token-file", token_file]
    return _start(args, pure_env(None, extra=env))


def start_store_server(root, store_dir, *options):
    """Run `pure store serve --listen 127.0.0.1:0 [OPTIONS]` on the rooted store at ``root``;
    returns (process, base URL).  The server's stderr is left to the caller (``proc.stderr``)."""
    return _start(["store", "serve", "--listen", "127.0.0.1:0", *options], pure_env(root, store_dir))


def _start(args, env):
    args = [sys.executable, "-m", "purestore.cli.main", *map(str, args)]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"on (https?://\S+)", line)
        if m:
            return proc, m.group(1).rstrip("/") + "/"
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"cache server did not start: {line!r}")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def narinfo_file(cache_dir, sp) -> Path:
    return Path(cache_dir) / f"{sp.hash_part}.narinfo"


def rewrite_narinfo(cache_dir, sp, store_dir="/pure/store", *, sign_with: str | None = None,
                    drop_sigs=False, **changes):
    """Change fields of a narinfo in a cache (attrs of NarInfo); re-sign with ``sign_with``."""
    import attrs
    from purestore.formats.narinfo import NarInfo
    from purestore.formats.signing import SecretKey

    f = narinfo_file(cache_dir, sp)
    ni = NarInfo.parse(f.read_text(), store_dir)
    ni = attrs.evolve(ni, **changes)
    if drop_sigs or sign_with:
        ni = attrs.evolve(ni, sigs=())
    if sign_with:
        ni = ni.with_sigs([SecretKey.parse(sign_with).sign(ni.fingerprint(store_dir)).render()])
    f.write_text(ni.render(store_dir))
    return ni
