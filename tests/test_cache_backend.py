"""Cache backends (file://, http:// against the real trio server) behind one interface, the cache
server's HTTP behaviour, cache URLs and nix-cache-info."""

from __future__ import annotations

import os

import httpx
import pytest
import trio
from hypothesis import given, settings, strategies as st

from purestore.cache.backend import CacheMissing, check_name, open_backend, parse_url
from purestore.cache.info import CacheInfo
from purestore.cache.server import serve_cache
from purestore.cache.url import hide_password
from purestore.errors import CacheError


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "nar/../../x", "a//b", ".hidden", "nar/.tmp-1",
                                  "http://evil/x", "", "a/./b", "x y", "nar/\x00"])
def test_check_name_refuses_names_that_could_leave_the_cache(name):
    with pytest.raises(CacheError):
        check_name(name)


@pytest.mark.parametrize("name", ["nix-cache-info", "abc.narinfo", "nar/0abc.nar.zst", "log/x-foo.drv",
                                  "abc.ls"])
def test_check_name_accepts_cache_files(name):
    assert check_name(name) == name


@given(st.text(max_size=40))
def test_check_name_never_accepts_an_escape(name):
    try:
        check_name(name)
    except CacheError:
        return
    parts = name.split("/")
    assert ".." not in parts and "" not in parts and not name.startswith("/")


def test_parse_url():
    u = parse_url("file:///srv/cache?compression=xz&secret-key=/k")
    assert (u.scheme, u.base, u.param("compression"), u.param("secret-key")) == ("file", "/srv/cache", "xz", "/k")
    assert parse_url("http://127.0.0.1:8080").base == "http://127.0.0.1:8080/"
    assert parse_url("https://h/prefix").base == "https://h/prefix/"
    with pytest.raises(CacheError, match="unknown parameter"):
        parse_url("file:///x?nope=1")
    for url in ("file:///c?compression=xz&compression=zstd", "http://h/?priority=1&priority=1",
                "s3://b?region=eu-west-1&compression=xz&region=us-east-1"):
        with pytest.raises(CacheError, match=r"parameter '(compression|priority|region)' is given twice"):
            parse_url(url)
    # a priority of more digits than int() reads (4300): an error, not a ValueError traceback
    with pytest.raises(CacheError, match=r"priority '9+'(\.\.\.)? is out of range \(at most 18 digits\)"):
        parse_url("file:///x?priority=" + "9" * 5000)
    assert parse_url("file:///x?priority=-0000000000000000000000007").priority == -7
    assert parse_url("file:///x?priority=" + "0" * 5000 + "7").priority == 7


def test_a_login_s_password_is_in_the_base_only():
    """http://NAME:PASSWORD@HOST/: the base (which the backend connects with) keeps it; the URL
    that messages, --json and the store's records show has it as *** (and parse_url's errors)."""
    u = parse_url("https://alice:p%40ss:w@cache.example:8443/pre?priority=3")
    assert u.base == "https://alice:p%40ss:w@cache.example:8443/pre/"
    assert u.url == "https://alice:***@cache.example:8443/pre?priority=3" and u.priority == 3
    for url in ("http://alice@h/", "http://h/a:b@c", "http://h/?x=a:b@c", "file:///a:b@c", "s3://b?region=eu-west-1"):
        assert parse_url(url.replace("?x=a:b@c", "")).url == url.replace("?x=a:b@c", "")  # nothing to hide
    assert hide_password("http://h/?token-file=a:b@c") == "http://h/?token-file=a:b@c"
    assert hide_password("HTTP://u:p@h") == "HTTP://u:***@h"
    with pytest.raises(CacheError) as e:
        parse_url("http://alice:s3cret@h/?nope=1")
    assert "s3cret" not in str(e.value) and "'http://alice:***@h/?nope=1'" in str(e.value)


def test_parse_url_refuses_an_unmatched_bracket_with_a_cache_error():
    """A '[' without its ']' in the host is a CacheError naming the URL, not urlsplit's ValueError."""
    for url in ("http://[::1/", "file://[x/", "https://[::1:8080/"):
        with pytest.raises(CacheError, match=r"cache URL '.*\[.*': malformed host") as e:
            parse_url(url)
        assert e.value.hint and "[::1]" in e.value.hint


def test_port_0_in_a_cache_url_is_refused():
    """Port 0 is no port a server listens on; it does not silently mean the scheme's default."""
    for url in ("http://127.0.0.1:0/", "https://h:0/prefix"):
        with pytest.raises(CacheError, match="port 0 is not"):
            open_backend(url)


def test_a_port_that_is_no_port_is_named_in_the_error():
    """A port past 65535 or not a number says what it got and what a port is (it said "bad
    port", with no hint of which part of the URL was wrong)."""
    for url, got in (("http://127.0.0.1:99999/", "99999"), ("https://h:abc/prefix", "abc"),
                     ("http://u:p@h:-1/", "-1")):
        with pytest.raises(CacheError) as e:
            open_backend(url)
        shown = url.replace("u:p@", "u:***@")  # (a login's password is not said)
        assert str(e.value) == f"cache URL {shown!r}: the port must be a number from 1 to 65535, got {got!r}"


def test_cache_info_round_trip_and_store_dir_check():
    info = CacheInfo.parse("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n", "x")
    assert info == CacheInfo("/nix/store", True, 40)
    assert CacheInfo.parse(info.render(), "x") == info
    with pytest.raises(CacheError, match="is for store dir '/nix/store'"):
        info.check_store_dir("/pure/store", "file:///c")
    with pytest.raises(CacheError, match="no 'StoreDir' line"):
        CacheInfo.parse("Priority: 1\n", "x")


def test_cache_info_is_read_as_nix_reads_it():
    """Lines without ':' are passed over and a priority may be negative (Nix 2.8 takes both);
    a priority that is no whole number (Unicode digits included) is refused, not a crash."""
    assert CacheInfo.parse("StoreDir: /nix/store\nsome junk line\nPriority: -5\n", "x") \
        == CacheInfo("/nix/store", False, -5)
    # only "\n" ends a line: a form feed inside a value does not make a new one
    assert CacheInfo.parse("StoreDir: /nix/store\x0cPriority: 1\n", "x").store_dir == "/nix/store\x0cPriority: 1"
    for bad in ("\u00b2", "10x", ""):
        with pytest.raises(CacheError, match="Priority must be a whole number"):
            CacheInfo.parse(f"StoreDir: /nix/store\nPriority: {bad}\n", "x")
    # digits beyond what int() reads (4300): an error, not a ValueError traceback
    with pytest.raises(CacheError, match=r"Priority '9+'(\.\.\.)? is out of range \(at most 18 digits\)"):
        CacheInfo.parse(f"StoreDir: /nix/store\nPriority: {'9' * 5000}\n", "x")
    assert CacheInfo.parse("StoreDir: /nix/store\nPriority: -00000000000000000000042\n", "x").priority == -42
    assert CacheInfo.parse(f"StoreDir: /nix/store\nPriority: +{'0' * 5000}42\n", "x").priority == 42
    with pytest.raises(CacheError, match="a web page"):
        CacheInfo.parse("<!DOCTYPE html>\n<title>StoreDir: x</title>\n", "x")
    # a file written by an editor that starts it with a byte order mark: its first line is
    # still the StoreDir line (Nix takes "\ufeffStoreDir" for an unknown key and the file for
    # one of its own store dir; refusing it would turn away a cache Nix uses)
    for text in ("\ufeffStoreDir: /nix/store\n", "\ufeffStoreDir: /nix/store\r\nPriority: 30\n"):
        assert CacheInfo.parse(text, "x").store_dir == "/nix/store"
        assert CacheInfo.parse(text.encode(), "x").store_dir == "/nix/store"


def test_what_cannot_be_a_nix_cache_info_is_refused_naming_the_line():
    """Bytes that are not text (random bytes, a NUL, a compressed answer) and text without a
    single 'Key: value' line are no nix-cache-info: an error naming the file and the line, where
    Nix takes either for an empty one (a cache for its own store dir); an empty file, or one of
    blank lines, is still such a cache."""
    where = "http://h/nix-cache-info"
    for data, line, why in [(b"\x8f\x03\xd9garbage\xff", 1, r"not UTF-8: '\\x8f\\x03\\xd9garbage\\xff'"),
                            (b"StoreDir: /pure/store\n\x00\x01\n", 2, r"a NUL byte: '\\x00\\x01'"),
                            (bytes(range(256)) * 4, 1, "a NUL byte: ")]:
        with pytest.raises(CacheError, match=rf"^{where}: this is not a nix-cache-info: line {line} is not text "
                                             rf"\({why}") as e:
            CacheInfo.parse(data, where, default_store_dir="/pure/store")
        assert e.value.hint == "is the URL a binary cache's?"
    with pytest.raises(CacheError, match=rf"^{where}: this is not a nix-cache-info: no line is 'Key: value' "
                                         r"\(line 2: 'Service unavailable'\)$"):
        CacheInfo.parse(b"\nService unavailable\nplease retry later\n", where, default_store_dir="/pure/store")
    for empty in (b"", b"\n", b" \n\r\n"):
        assert CacheInfo.parse(empty, where, default_store_dir="/pure/store") == CacheInfo("/pure/store")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=512))
def test_random_bytes_as_nix_cache_info_are_refused_or_read_never_a_crash(data):
    """Whatever bytes a server sends: a CacheInfo, or a CacheError; bytes that are not UTF-8
    are always an error."""
    try:
        data.decode("utf-8")
        text = True
    except UnicodeDecodeError:
        text = False
    try:
        CacheInfo.parse(data, "x", default_store_dir="/pure/store")
    except CacheError:
        return
    assert text and b"\0" not in data
    assert parse_url("file:///x?priority=-3").priority == -3
    assert parse_url("file:///x").priority is None
    with pytest.raises(CacheError, match="priority must be a whole number, got '\u00b2'"):
        parse_url("file:///x?priority=%C2%B2")


async def exercise(backend, cache_dir):
    """The same checks for every backend."""
    assert await backend.get("nix-cache-info") is None
    assert not await backend.exists("nix-cache-info")
    await backend.put("nix-cache-info", b"StoreDir: /pure/store\n")
    assert await backend.exists("nix-cache-info")
    assert await backend.get("nix-cache-info") == b"StoreDir: /pure/store\n"
    big = os.urandom(3 << 20)
    local = cache_dir.parent / "upload.bin"
    local.write_bytes(big)
    await backend.put_file("nar/big.nar", str(local))
    async with backend.open_read("nar/big.nar") as chunks:
        got = b"".join([c async for c in chunks])
    assert got == big
    assert (cache_dir / "nar" / "big.nar").read_bytes() == big
    assert not [p for p in (cache_dir / "nar").iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(CacheMissing):
        async with backend.open_read("nar/missing.nar") as chunks:
            pass
    with pytest.raises(CacheError):
        await backend.get("../outside")


async def test_file_backend(tmp_path):
    c = tmp_path / "cache"
    async with open_backend(f"file://{c}") as b:
        await exercise(b, c)


async def test_http_backend_against_our_server(tmp_path):
    c = tmp_path / "cache"
    c.mkdir()
    async with trio.open_nursery() as n:
        (url,) = await n.start(lambda task_status: serve_cache(str(c), "127.0.0.1:0", upload_token="tok",
                                                               task_status=task_status))
        async with open_backend(url + "/", token="tok") as b:
            await exercise(b, c)
        async with open_backend(url + "/", token="wrong") as b:
            with pytest.raises(CacheError, match="refused \\(HTTP 401 Unauthorized"):
                await b.put("x.narinfo", b"x")
        async with httpx.AsyncClient() as client:
            r = await client.put(url + "/x.narinfo", content=b"x")
            assert r.status_code == 401
            r = await client.request("DELETE", url + "/nix-cache-info")
            assert r.status_code == 405
            r = await client.get(url + "/nix-cache-info")
            assert r.headers["content-type"] == "text/x-nix-cache-info"
        assert not (c / "x.narinfo").exists()
        n.cancel_scope.cancel()


def test_a_token_that_cannot_be_sent_is_an_error_naming_its_source(tmp_path, monkeypatch):
    """A token file (or PURE_CACHE_TOKEN) with several lines, a byte a header cannot carry, or
    nothing in it is refused when the cache is opened: one error naming the file (or the
    variable), without the token, instead of a header error retried as a transient failure."""
    monkeypatch.delenv("PURE_CACHE_TOKEN", raising=False)
    for content, said in ((b"s3cret\nmore\n", "has several lines"), (b"s3\rcret", "has several lines"),
                          (b"s3cr\xfft\n", "has a character an HTTP header cannot carry"),
                          (b"s3 cret\n", "has a character an HTTP header cannot carry"), (b"\n\n", "is empty")):
        tok = tmp_path / "t.tok"
        tok.write_bytes(content)
        with pytest.raises(CacheError, match=f"token file '{tok}' {said}") as e:
            open_backend(f"http://127.0.0.1:9/?token-file={tok}")
        assert "s3" not in str(e.value)
    tok.write_text("s3cret\n")
    monkeypatch.setenv("PURE_CACHE_TOKEN", "s3cret\nmore")
    with pytest.raises(CacheError, match="environment variable PURE_CACHE_TOKEN has several lines") as e:
        open_backend(f"http://127.0.0.1:9/?token-file={tok}")
    assert "s3" not in str(e.value)
    monkeypatch.setenv("PURE_CACHE_TOKEN", "s3cret\n")  # white space at the ends is not the token's
    assert open_backend("http://127.0.0.1:9/").upload_token == "s3cret"


async def test_http_backend_connect_error_is_a_cache_error(tmp_path):
    async with open_backend("http://127.0.0.1:9/", connect_timeout=2) as b:
        with pytest.raises(CacheError, match="cannot connect"):
            await b.get("nix-cache-info")


async def test_a_file_cache_reads_files_asked_for_together_and_a_fifo_holds_up_none_of_them(tmp_path):
    """Small files asked for at once are read together in one worker thread; a FIFO among them
    (read as the stream someone writes into it) is waited for on its own: here it is written to
    only once the other read has come back."""
    c = tmp_path / "c"
    c.mkdir()
    (c / "a.narinfo").write_bytes(b"A\n")
    (c / "b.narinfo").write_bytes(b"B\n")
    os.mkfifo(c / "f.narinfo")
    got = {}

    def feed() -> None:
        with open(c / "f.narinfo", "wb") as f:
            f.write(b"F\n")

    async with open_backend(f"file://{c}") as b:
        async def read(name: str) -> None:
            got[name] = await b.get(name)
            if name == "a.narinfo":
                await trio.to_thread.run_sync(feed)
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for name in ("f.narinfo", "a.narinfo", "b.narinfo", "nope.narinfo"):
                    n.start_soon(read, name)
    assert got == {"a.narinfo": b"A\n", "b.narinfo": b"B\n", "f.narinfo": b"F\n", "nope.narinfo": None}
