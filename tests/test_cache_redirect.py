"""HTTP caches that redirect (NAR downloads handed to a CDN or an object store): redirects are
followed for reads, a login never goes to another origin, https never drops to http."""

from __future__ import annotations

import base64
import logging
import os

import pytest
import trio

from test_cache_netrc import LOGIN, _authorizations, write_netrc
from test_cache_retry import FlakyCache, cache, fetch_all, nar_requests, retry_fast  # noqa: F401 - fixtures
from purestore.errors import CacheError

BASIC = "Basic " + base64.b64encode(":".join(LOGIN).encode()).decode()


async def _two_servers(nursery, directory, *, login=None, **faults):
    """The cache (``login`` required) and a second origin serving the same files (the CDN)."""
    main, cdn = FlakyCache(directory, login=login), FlakyCache(directory, **faults)
    await nursery.start(main.run)
    await nursery.start(cdn.run)
    return main, cdn


async def test_nars_redirected_to_another_origin_are_fetched_without_the_login(cache, tmp_path):  # noqa: F811
    c, lib, app, big = cache
    netrc = write_netrc(tmp_path / "netrc", f'machine 127.0.0.1 login {LOGIN[0]} password "{LOGIN[1]}"\n')
    async with trio.open_nursery() as n:
        main, cdn = await _two_servers(n, c, login=LOGIN)
        main.redirects["nar/"] = cdn.url
        rep, _root = await fetch_all(tmp_path, main, [app, big], netrc_file=str(netrc))
        n.cancel_scope.cancel()
    assert sorted(rep.fetched) == sorted([lib, app, big])
    assert {st for _m, _n, _r, st in nar_requests(main)} == {302}
    assert len(nar_requests(cdn)) == 3 and {st for *_x, st in cdn.asked} == {200}
    assert _authorizations(main) == {BASIC}
    assert _authorizations(cdn) == {""}  # the login stays with the cache's origin


async def test_a_redirect_on_the_same_origin_keeps_the_login(cache, tmp_path):  # noqa: F811
    c, lib, app, big = cache
    os.symlink(".", c / "mirror")
    netrc = write_netrc(tmp_path / "netrc", f'machine 127.0.0.1 login {LOGIN[0]} password "{LOGIN[1]}"\n')
    server = FlakyCache(c, login=LOGIN)
    server.redirects["nar/"] = "/mirror/"  # a path: relative to the cache's origin
    async with trio.open_nursery() as n:
        await n.start(server.run)
        rep, _root = await fetch_all(tmp_path, server, [app, big], netrc_file=str(netrc))
        n.cancel_scope.cancel()
    assert sorted(rep.fetched) == sorted([lib, app, big])
    assert sorted(name for _m, name, _r, st in server.asked if st == 200 and "nar/" in name) == sorted(
        f"mirror/{name}" for _m, name, _r, st in nar_requests(server) if st == 302)
    assert _authorizations(server) == {BASIC}


async def test_a_download_cut_at_the_cdn_resumes_through_the_redirect(cache, tmp_path, retry_fast, caplog):  # noqa: F811
    c, lib, app, big = cache
    nar = next(ln.split(": ", 1)[1] for ln in (c / f"{big.hash_part}.narinfo").read_text().splitlines()
               if ln.startswith("URL: "))
    async with trio.open_nursery() as n:
        main, cdn = await _two_servers(n, c, faults={nar: ["cut"]})
        main.redirects["nar/"] = cdn.url
        with caplog.at_level(logging.WARNING, "purestore.cache"):
            rep, _root = await fetch_all(tmp_path, main, [big])
        n.cancel_scope.cancel()
    assert big in rep.fetched
    (first, second) = [(r, st) for _m, name, r, st in cdn.asked if name == nar]
    assert first == (None, 200) and second[0].startswith("bytes=") and second[1] == 206
    assert "(redirected to http://127.0.0.1:" in caplog.text  # the warning says where it broke


@pytest.mark.parametrize("how,says", [
    ("loop", "more than 5 redirects (the last to 'http://127.0.0.1:"),
    ("!nolocation", "HTTP 302 Found without a Location"),
])
async def test_redirects_that_lead_nowhere_are_errors(cache, tmp_path, how, says):  # noqa: F811
    from purestore.cache import substituter
    from test_cache_support import PUB, open_store, settings_for
    c, lib, app, big = cache
    server = FlakyCache(c)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        server.redirects["nar/"] = server.url if how == "loop" else how
        root = tmp_path / "dst"
        with open_store(root) as store:
            with pytest.raises(CacheError) as e:
                await substituter.copy_from(store, settings_for(root), server.url, [lib], trusted_keys=[PUB])
            assert list(store.valid_paths()) == []
        n.cancel_scope.cancel()
    assert says in str(e.value)
    if how == "loop":
        assert len(nar_requests(server)) == 6


@pytest.mark.parametrize("base,location,says", [
    ("https://cache.example.org/", "http://cdn.example.org/nar/x.nar", "redirected from https to "
     "'http://cdn.example.org/nar/x.nar': refused (plain http)"),
    ("http://cache.example.org/", "ftp://cdn.example.org/nar/x.nar", "redirected to "
     "'ftp://cdn.example.org/nar/x.nar', which is not an http(s) URL"),
    ("http://cache.example.org/", "http://cdn.example.org:99999/x", "redirected to "
     "'http://cdn.example.org:99999/x', whose port is not valid"),
])
def test_redirects_not_followed(base, location, says):
    import types
    from purestore.cache.backend import open_backend
    b = open_backend(base)
    r = types.SimpleNamespace(status=302, reason="Found", headers={"location": location})
    with pytest.raises(CacheError) as e:
        b._redirect(r, "GET", "get", "nar/x.nar", 0, base + "nar/x.nar")
    assert str(e.value).startswith(f"cache {base!r}: cannot get 'nar/x.nar': ")
    assert str(e.value).endswith(says)
    # a redirect to a PUT is not followed: the answer is the upload's
    assert b._redirect(r, "PUT", "upload", "nar/x.nar", 0, base + "nar/x.nar") is None
