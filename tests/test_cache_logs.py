"""`pure log` finds build logs in binary caches (log/<drv>, as `pure copy --to` and Nix's
`nix store copy-log` write them) when the local store has none; with Nix 2.8 both ways."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import zstandard

from conftest import BUSYBOX, needs_nix, run_pure
from test_cache_support import SEC, make_path, open_store, start_server, stop_server

LOG = b"building thing\nstep 2 of 2\ndone\n"


@pytest.fixture
def keyfile(tmp_path):
    p = tmp_path / "k.sec"
    p.write_text(SEC)
    return p


def _keep_log(store, drv, data: bytes) -> None:
    """Store ``data`` as ``drv``'s build log, where the builder keeps logs."""
    from purestore.store.build_logs import log_path
    p = log_path(store.state_dir, drv.base_name)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(data))


def _pushed(tmp_path, keyfile, *, store_dir="/pure/store", log=LOG, cache=None, name="thing"):
    """A path built by ``<name>.drv`` whose log the store keeps, pushed to a file:// cache.
    Returns (cache dir, output path, drv path), both paths printed."""
    from purestore.formats.store_path import StorePath
    root = tmp_path / "builder"
    cache = cache or tmp_path / "cache"
    drv = StorePath("1" * 32, f"{name}.drv")
    with open_store(root, store_dir) as store:
        out = make_path(store, name, {"": b"built\n"}, deriver=drv)
        _keep_log(store, drv, log)
        out_p, drv_p = store.print_path(out), store.print_path(drv)
    run_pure("copy", "--to", f"file://{cache}", "--secret-key-file", keyfile, out_p, root=root, store_dir=store_dir)
    assert (cache / "log" / drv.base_name).read_bytes() == log
    return cache, out_p, drv_p


def test_log_of_an_output_comes_from_the_cache_by_its_narinfo_deriver(tmp_path, keyfile):
    cache, out, drv = _pushed(tmp_path, keyfile)
    other = tmp_path / "other"  # a store that never saw the path
    for what in (out, drv):
        r = run_pure("--substituters", f"file://{cache}", "log", what, root=other)
        assert r.stdout == LOG.decode()
        assert r.stderr == f"build log of {drv} from file://{cache} (cache logs are not signed)\n"


def test_the_local_store_s_deriver_is_asked_for_when_the_cache_has_no_narinfo(tmp_path, keyfile):
    from test_cache_support import PUB
    cache, out, drv = _pushed(tmp_path, keyfile)
    other = tmp_path / "other"
    run_pure("copy", "--from", f"file://{cache}", "--trusted-public-keys", PUB, out, root=other)
    for ni in cache.glob("*.narinfo"):
        ni.unlink()
    r = run_pure("--substituters", f"file://{cache}", "log", out, root=other)
    assert r.stdout == LOG.decode()


def test_the_local_log_comes_first_and_offline_asks_no_cache(tmp_path, keyfile):
    cache, out, drv = _pushed(tmp_path, keyfile)
    (cache / "log" / os.path.basename(drv)).write_bytes(b"the cache's copy\n")
    r = run_pure("--substituters", f"file://{cache}", "log", out, root=tmp_path / "builder")
    assert r.stdout == LOG.decode() and r.stderr == ""
    r = run_pure("--offline", "--substituters", f"file://{cache}", "log", out, root=tmp_path / "other", check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"error: no build log for {out!r} (its deriver is unknown here; "
                        "--offline: binary caches not asked)\n")
    r = run_pure("log", drv, root=tmp_path / "other", check=False)
    assert r.returncode == 1
    assert r.stderr == (f"error: no build log for {drv!r} (looked for the logs of {drv}; "
                        "no binary caches configured)\n")


def test_caches_are_asked_in_priority_order_past_unusable_ones_and_misses(tmp_path, keyfile):
    first, out, drv = _pushed(tmp_path, keyfile, log=b"from the first\n", cache=tmp_path / "c1")
    second, _, _ = _pushed(tmp_path, keyfile, log=b"from the second\n", cache=tmp_path / "c2")
    other = tmp_path / "other"
    urls = f"file://{tmp_path / 'missing'} file://{first}?priority=50 file://{second}?priority=10"
    r = run_pure("--substituters", urls, "log", out, root=other)
    assert r.stdout == "from the second\n"
    assert f"warning: not using binary cache 'file://{tmp_path / 'missing'}'" in r.stderr
    # a cache without the log (nor the narinfo) is passed over for the next one
    shutil.rmtree(second / "log")
    (second / f"{os.path.basename(out)[:32]}.narinfo").unlink()
    r = run_pure("--substituters", urls, "log", out, root=other)
    assert r.stdout == "from the first\n"
    assert f"from file://{first}?priority=50 " in r.stderr


def test_no_log_anywhere_says_where_it_looked(tmp_path, keyfile):
    cache, out, drv = _pushed(tmp_path, keyfile)
    shutil.rmtree(cache / "log")
    r = run_pure("--substituters", f"file://{cache}", "log", out, root=tmp_path / "other", check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"error: no build log for {out!r} (looked for the logs of {drv} in the local store "
                        f"and in the binary caches file://{cache})\n")
    for ni in cache.glob("*.narinfo"):
        ni.unlink()
    r = run_pure("--substituters", f"file://{cache}", "log", out, root=tmp_path / "other", check=False)
    assert r.stderr == (f"error: no build log for {out!r} (its deriver is unknown: neither the local store "
                        f"nor the binary caches file://{cache} name it)\n")
    r = run_pure("--substituters", f"file://{tmp_path / 'missing'}", "log", drv, root=tmp_path / "other", check=False)
    assert r.returncode == 1
    assert r.stderr.endswith(f"error: no build log for {drv!r} (looked for the logs of {drv} in the local store; "
                             "no binary cache could be used)\n")
    r = run_pure("--substituters", f"file://{tmp_path / 'missing'}", "log", out, root=tmp_path / "other", check=False)
    assert r.stderr.endswith(f"error: no build log for {out!r} (its deriver is unknown here, and no binary cache "
                             "could be used)\n")


def test_a_bad_narinfo_in_a_cache_is_warned_about_not_trusted(tmp_path, keyfile):
    cache, out, drv = _pushed(tmp_path, keyfile)
    (ni,) = cache.glob("*.narinfo")
    ni.write_text("StorePath: nonsense\n")
    r = run_pure("--substituters", f"file://{cache}", "log", out, root=tmp_path / "other", check=False)
    assert r.returncode == 1
    assert "warning: " in r.stderr and ni.name in r.stderr
    assert r.stderr.splitlines()[-1].startswith(f"error: no build log for {out!r} (its deriver is unknown")


@pytest.mark.parametrize("name", ["thing", "q?x=y+z"])
def test_log_over_http_from_pure_cache_serve(tmp_path, keyfile, name):
    """Also for a derivation whose name has a `?` (Nix allows it in store path names): its log
    was refused as "a bad segment", and its push failed with the narinfo not written."""
    cache, out, drv = _pushed(tmp_path, keyfile, name=name)
    assert f"{out.rsplit('/', 1)[1][:32]}.narinfo" in os.listdir(cache)
    r = run_pure("--substituters", f"file://{cache}", "log", out, root=tmp_path / "other")
    assert r.stdout == LOG.decode()
    proc, url = start_server(cache)
    try:
        r = run_pure("--substituters", url, "log", out, root=tmp_path / "other")
    finally:
        stop_server(proc)
    assert r.stdout == LOG.decode()
    assert f"from {url} " in r.stderr


# -- with Nix 2.8 ------------------------------------------------------------------------------------

NIX_ENV = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command\n"
                                       "sandbox = true\nbuild-users-group ="}

LOGGED_NIX = """
let B = "${./bb}/bin/busybox"; in
derivation { name = "logged"; system = "x86_64-linux"; builder = B; inherit B;
             args = [ "sh" "-c" "echo hello from the build; echo second line >&2; echo x > $out" ]; }
"""


def _nix(*args, cwd=None) -> str:
    p = subprocess.run([str(a) for a in args], env=NIX_ENV, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert p.returncode == 0, f"{args} failed: {p.stderr}"
    return p.stdout


def nix_build(tmp_path, expr: str) -> tuple:
    """Build the Nix expression ``expr`` (which may use ``./bb/bin/busybox``, a static busybox)
    in a Nix chroot store, in the sandbox; returns (store root, output path, .drv path)."""
    (tmp_path / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, tmp_path / "bb" / "bin" / "busybox")
    (tmp_path / "expr.nix").write_text(expr)
    nixroot = tmp_path / "nixroot"
    out = _nix("nix-build", "--store", nixroot, "--no-out-link", "expr.nix", cwd=tmp_path).strip()
    drv = _nix("nix-instantiate", "--store", nixroot, "expr.nix", cwd=tmp_path).strip()
    return nixroot, out, drv


@needs_nix
def test_a_log_nix_copied_to_a_cache_is_read_by_pure_log(tmp_path):
    nixroot, out, drv = nix_build(tmp_path, LOGGED_NIX)
    cache = tmp_path / "nixcache"
    _nix("nix", "store", "copy-log", "--store", nixroot, "--to", f"file://{cache}", drv)
    _nix("nix", "copy", "--store", nixroot, "--to", f"file://{cache}?compression=zstd", out)
    r = run_pure("--substituters", f"file://{cache}", "log", out, root=tmp_path / "pure", store_dir="/nix/store")
    assert r.stdout == "hello from the build\nsecond line\n"
    assert f"build log of {drv} from file://{cache}" in r.stderr
    subprocess.run(["chmod", "-R", "u+w", str(nixroot)], check=False)


@needs_nix
def test_a_log_pushed_by_pure_is_read_by_nix_log(tmp_path, keyfile):
    cache, out, _drv = _pushed(tmp_path, keyfile, store_dir="/nix/store")
    # (Nix wants a .drv given by name to be in the store: the output's narinfo names it)
    p = subprocess.run(["nix", "log", "--store", f"file://{cache}", out], env=NIX_ENV,
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == LOG


def test_a_deriver_that_is_also_recorded_as_the_derivation_of_the_output_is_named_once(tmp_path):
    """A path built (or substituted after an instantiate) here has its deriver both in its path
    info and in the derivation outputs table: the message names that .drv once."""
    from purestore.formats.store_path import StorePath
    root = tmp_path / "store"
    drv = StorePath("1" * 32, "thing.drv")
    with open_store(root, "/pure/store") as store:
        out = make_path(store, "thing", {"": b"built\n"}, deriver=drv)
        store.register_derivation_outputs(drv, {"out": out})
        out_p, drv_p = store.print_path(out), store.print_path(drv)
    r = run_pure("log", out_p, root=root, check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"error: no build log for {out_p!r} (looked for the logs of {drv_p}; "
                        "no binary caches configured)\n")
