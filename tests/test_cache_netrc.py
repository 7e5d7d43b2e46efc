"""Private HTTP caches: the login for a cache's host comes from a netrc file (``netrc-file``,
as in Nix) and is sent with HTTP basic authentication; a 401 says what to do."""

from __future__ import annotations

import pytest
import trio

from test_cache_retry import FlakyCache, cache, fetch_all  # noqa: F401 - fixture
from test_cache_support import settings_for
from purestore.cache.http_backend import netrc_login
from purestore.errors import CacheError, UsageError

LOGIN = ("alice", "s3cret w1th spaces?")


def write_netrc(path, text: str):
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_the_login_of_a_host_or_the_default_one_is_found(tmp_path):
    f = write_netrc(tmp_path / "netrc", """
machine cache.example.org login bob password hunter2
machine 127.0.0.1
  login alice
  password "s3cret w1th spaces?"
default login anyone password anything
""")
    assert netrc_login(str(f), "cache.example.org") == ("bob", "hunter2")
    assert netrc_login(str(f), "127.0.0.1") == LOGIN
    assert netrc_login(str(f), "elsewhere.example.org") == ("anyone", "anything")
    write_netrc(f, "machine cache.example.org login bob password hunter2\nmachine no.login.example.org\n")
    assert netrc_login(str(f), "elsewhere.example.org") is None
    assert netrc_login(str(f), "no.login.example.org") is None
    assert netrc_login(str(tmp_path / "none"), "cache.example.org") is None
    assert netrc_login(None, "cache.example.org") is None
    assert netrc_login("", "cache.example.org") is None


def test_a_broken_netrc_file_is_an_error_that_says_where(tmp_path):
    f = write_netrc(tmp_path / "netrc", "machine a login x password y\nsomething else\n")
    with pytest.raises(CacheError) as e:
        netrc_login(str(f), "a")
    assert str(e.value) == f"netrc file {str(f)!r}, line 2: bad follower token 'something'"
    assert "machine HOST login NAME password SECRET" in e.value.hint
    d = tmp_path / "a-dir"
    d.mkdir()
    with pytest.raises(CacheError, match="cannot read netrc file .*a-dir'"):
        netrc_login(str(d), "a")
    (tmp_path / "latin1").write_bytes(b"machine a login al\xe9 password y\n")
    with pytest.raises(CacheError, match=r"netrc file '.*latin1' is not UTF-8 text \(byte 18\)"):
        netrc_login(str(tmp_path / "latin1"), "a")


@pytest.mark.parametrize("text,line,says", [
    ("machine 127.0.0.1 login", 1, "'login' has no value (the file ends after it)"),
    ("machine a login alice password\n", 1, "'password' has no value (the file ends after it)"),
    ("machine a\n  login alice\n  password\ndefault login b password c\n", 3,
     "'password' has no value (the next word is 'default'; if that is the value, quote it: \"default\")"),
    ("# notes\nmacdef init\nlogin\n\nmachine a login alice account\n", 5, "'account' has no value"),
])
def test_a_keyword_without_its_value_is_an_error_that_says_where(tmp_path, text, line, says):
    """The standard parser takes a missing value as an empty one (or the next entry's first word
    as the value); the docs promise an error naming the file and the line."""
    f = write_netrc(tmp_path / "netrc", text)
    with pytest.raises(CacheError) as e:
        netrc_login(str(f), "a")
    assert str(e.value).startswith(f"netrc file {str(f)!r}, line {line}: {says}")
    assert "machine HOST login NAME password SECRET" in e.value.hint


def test_values_that_look_like_keywords_or_comments_are_values(tmp_path):
    f = write_netrc(tmp_path / "netrc", '# login\nmacdef m\npassword\n\nmachine a login "" password "#machine"\n'
                                        'machine b login "password" password machines # password\n')
    assert netrc_login(str(f), "a") is None  # (no login: no basic authentication)
    assert netrc_login(str(f), "b") == ("password", "machines")


def test_netrc_file_is_a_setting(tmp_path):
    from purestore.store.settings import load_settings, parse_config
    assert settings_for(tmp_path).netrc_file == "/etc/pure/netrc"  # as Nix's /etc/nix/netrc
    assert parse_config("netrc-file = /srv/pure/netrc\n", "pure.conf") == {"netrc_file": "/srv/pure/netrc"}
    conf = tmp_path / "pure.conf"
    conf.write_text("netrc-file = /srv/pure/netrc\n")
    assert load_settings(env={"PURE_CONFIG": str(conf)}).netrc_file == "/srv/pure/netrc"
    with pytest.raises(UsageError, match="unknown setting 'netrc'"):
        parse_config("netrc = x\n", "pure.conf")


async def test_a_private_cache_is_substituted_with_the_netrc_login(cache, tmp_path):  # noqa: F811
    c, lib, app, big = cache
    netrc = write_netrc(tmp_path / "netrc", f'machine 127.0.0.1 login {LOGIN[0]} password "{LOGIN[1]}"\n')
    server = FlakyCache(c, login=LOGIN)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        rep, _root = await fetch_all(tmp_path, server, [app, big], netrc_file=str(netrc))
        n.cancel_scope.cancel()
    assert sorted(rep.fetched) == sorted([lib, app, big])
    assert server.asked and all(st == 200 for *_x, st in server.asked)


@pytest.mark.parametrize("netrc_text,says", [
    (None, "HTTP 401 Unauthorized (the cache wants a login: put 'machine 127.0.0.1 login NAME password SECRET' in {netrc}, the netrc-file setting)"),
    ("machine cache.example.org login alice password x\n", "HTTP 401 Unauthorized (the cache wants a login: put 'machine 127.0.0.1 login NAME password SECRET' in {netrc}, the netrc-file setting)"),
    ("machine 127.0.0.1 login alice password wrong\n", "HTTP 401 Unauthorized (the cache refused the login 'alice' for 127.0.0.1 in {netrc})"),
], ids=["no-file", "other-host", "wrong-password"])
async def test_a_private_cache_without_the_right_login_says_what_to_do(cache, tmp_path, netrc_text, says):  # noqa: F811
    from purestore.cache import substituter
    c, lib, app, big = cache
    netrc = tmp_path / "netrc"
    if netrc_text is not None:
        write_netrc(netrc, netrc_text)
    server = FlakyCache(c, login=LOGIN)
    root = tmp_path / "dst"
    async with trio.open_nursery() as n:
        await n.start(server.run)
        with pytest.raises(CacheError) as e:
            from test_cache_support import PUB, open_store
            with open_store(root) as store:
                await substituter.copy_from(store, settings_for(root, netrc_file=str(netrc)), server.url, [app],
                                            trusted_keys=[PUB])
        n.cancel_scope.cancel()
    assert says.format(netrc=netrc) in str(e.value)
    assert [st for *_x, st in server.asked] == [401]  # a 401 is an answer: not retried
    with open_store(root) as store:
        assert list(store.valid_paths()) == []


def _authorizations(server) -> set[str]:
    """The Authorization headers of the requests the server got ('' for none)."""
    found = set()
    for raw in server.requests:
        head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
        values = [v.strip() for k, _, v in (h.partition(":") for h in head) if k.strip().lower() == "authorization"]
        assert len(values) <= 1, raw
        found.add(values[0] if values else "")
    return found


async def test_the_environment_s_upload_token_never_goes_with_reads(cache, tmp_path, monkeypatch):  # noqa: F811
    """PURE_CACHE_TOKEN is meant for `pure copy --to`; every configured cache would get it if
    reads carried it.  Reads carry the netrc login, if any, and nothing else."""
    c, lib, app, big = cache
    monkeypatch.setenv("PURE_CACHE_TOKEN", "for-uploads-only")
    server = FlakyCache(c)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        await fetch_all(tmp_path, server, [app], netrc_file=str(tmp_path / "none"))
        n.cancel_scope.cancel()
    assert _authorizations(server) == {""}

    netrc = write_netrc(tmp_path / "netrc", f'machine 127.0.0.1 login {LOGIN[0]} password "{LOGIN[1]}"\n')
    server = FlakyCache(c, login=LOGIN)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        await fetch_all(tmp_path / "again", server, [app, big], netrc_file=str(netrc))
        n.cancel_scope.cancel()
    import base64
    assert _authorizations(server) == {"Basic " + base64.b64encode(":".join(LOGIN).encode()).decode()}


async def test_the_url_s_token_file_goes_with_every_request_to_that_cache(cache, tmp_path):  # noqa: F811
    from purestore.cache import substituter
    from test_cache_support import PUB, open_store
    c, lib, app, big = cache
    (tmp_path / "tok").write_text("reader-token\n")
    server = FlakyCache(c)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        root = tmp_path / "dst"
        with open_store(root) as store:
            await substituter.copy_from(store, settings_for(root), f"{server.url}?token-file={tmp_path / 'tok'}",
                                        [app, big], trusted_keys=[PUB])
        n.cancel_scope.cancel()
    assert _authorizations(server) == {"Bearer reader-token"}


def test_uploads_carry_the_environment_s_token(tmp_path):
    from conftest import run_pure
    from test_cache_support import SEC, make_closure, open_store, start_server, stop_server
    key, token = tmp_path / "k.sec", tmp_path / "token"
    key.write_text(SEC)
    token.write_text("s3cret\n")
    served = tmp_path / "served"
    served.mkdir()
    with open_store(tmp_path / "a") as store:
        _lib, app = make_closure(store)
        app_p = store.print_path(app)
    proc, url = start_server(served, token_file=token)
    try:
        run_pure("copy", "--to", url, "--secret-key-file", key, app_p, root=tmp_path / "a",
                 env={"PURE_CACHE_TOKEN": "s3cret"})
    finally:
        stop_server(proc)
    assert (served / f"{app.hash_part}.narinfo").exists()
