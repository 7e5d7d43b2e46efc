"""Writers of one cache at the same time: a narinfo uploaded through `pure cache serve` is
checked (it parses, its NAR is there: a prune may have removed a NAR a push found present) and
keeps the signatures of the narinfo it replaces, as a push into a directory does."""

from __future__ import annotations

import shutil

import attrs
import pytest
import trio

from purestore.cache.backend import backend_for
from purestore.cache.server import serve_cache
from purestore.errors import CacheError
from purestore.formats.narinfo import NarInfo
from purestore.formats.signing import SecretKey
from test_cache_mirror import NIX_CACHE, NIX_PATHS
from test_cache_support import settings_for

SD = "/nix/store"
TOKEN = "up-token"


def narinfo_name(path: str) -> str:
    return path.split("/")[-1][:32] + ".narinfo"


async def with_cache(tmp_path, job):
    """Nix's golden cache copied to tmp_path, served with an upload token; ``job(backend, dir)``."""
    d = tmp_path / "cache"
    shutil.copytree(NIX_CACHE, d)
    (tmp_path / "token").write_text(TOKEN)
    async with trio.open_nursery() as n:
        (url,) = await n.start(lambda task_status: serve_cache(str(d), "127.0.0.1:0", upload_token=TOKEN,
                                                               task_status=task_status))
        async with backend_for(f"{url}?token-file={tmp_path / 'token'}", settings_for(tmp_path / "s", SD)) as b:
            await job(b, d)
        n.cancel_scope.cancel()


async def test_an_uploaded_narinfo_keeps_the_signatures_of_the_one_it_replaces(tmp_path):
    name = narinfo_name(NIX_PATHS[0])

    async def job(b, d):
        old = NarInfo.parse((d / name).read_bytes(), SD)
        keys = [SecretKey.generate("two-1"), SecretKey.generate("three-1")]
        for k in keys:  # each writer knew only the narinfo as it was before either wrote
            ni = attrs.evolve(old, sigs=(*old.sigs, k.sign(old.fingerprint(SD)).render()))
            await b.put_narinfo(name, ni.render(SD).encode(), SD)
        got = NarInfo.parse((d / name).read_bytes(), SD)
        assert sorted(s.split(":")[0] for s in got.sigs) == sorted(
            [s.split(":")[0] for s in old.sigs] + ["three-1", "two-1"])
    await with_cache(tmp_path, job)


async def test_a_narinfo_whose_nar_is_gone_is_refused_with_409_and_said_so(tmp_path):
    """What a push meets when a prune removed the NAR it had found present: the narinfo is not
    published (no narinfo without its NAR), and the error says what to do."""
    name = narinfo_name(NIX_PATHS[0])

    async def job(b, d):
        before = (d / name).read_bytes()
        ni = NarInfo.parse(before, SD)
        (d / ni.url).unlink()
        (d / name).unlink()
        with pytest.raises(CacheError) as e:
            await b.put_narinfo(name, before, SD)
        assert f"HTTP 409 Conflict: \"its NAR {ni.url} is not in the cache (pruned since" in str(e.value)
        assert "run the push again" in str(e.value)
        assert not (d / name).exists()
        # a NAR of another size than the narinfo's FileSize: the same
        (d / ni.url).write_bytes(b"short")
        with pytest.raises(CacheError, match="is 5 bytes, not"):
            await b.put_narinfo(name, before, SD)
        assert not (d / name).exists()
    await with_cache(tmp_path, job)


@pytest.mark.parametrize("text, says", [
    (b"hello\n", "is not a narinfo (no StorePath line)"),
    (b"StorePath: /nix/store/" + b"a" * 32 + b"-x\nURL: nar/x\n", "missing field 'NarHash'"),
    (None, "another path"),
    ("escape", "points outside the cache"),
])
async def test_a_bad_narinfo_upload_is_refused_with_400(tmp_path, text, says):
    name = narinfo_name(NIX_PATHS[0])

    async def job(b, d):
        before = (d / name).read_bytes()
        ni = NarInfo.parse(before, SD)
        if text is None:  # another path's narinfo under this name
            data = (d / narinfo_name(NIX_PATHS[1])).read_bytes()
        elif text == "escape":
            data = attrs.evolve(ni, url="../outside.nar").render(SD).encode()
        else:
            data = text
        with pytest.raises(CacheError) as e:
            await b.put_narinfo(name, data, SD)
        assert "400" in str(e.value) and says in str(e.value)
        assert (d / name).read_bytes() == before
    await with_cache(tmp_path, job)


async def test_a_fifo_in_place_of_a_narinfo_is_replaced_not_waited_on(tmp_path):
    """Writing a narinfo reads the one it replaces: a FIFO there (nobody writing to it) must not
    hang the writer, in a directory or behind `cache serve`."""
    import os
    name = narinfo_name(NIX_PATHS[0])
    d = tmp_path / "dir"
    shutil.copytree(NIX_CACHE, d)
    data = (d / name).read_bytes()
    (d / name).unlink()
    os.mkfifo(d / name)
    with trio.fail_after(10):
        async with backend_for(f"file://{d}", settings_for(tmp_path / "s", SD)) as b:
            await b.put_narinfo(name, data, SD)
    assert (d / name).read_bytes() == data

    async def job(b, served):
        (served / name).unlink()
        os.mkfifo(served / name)
        with trio.fail_after(10):
            await b.put_narinfo(name, data, SD)
        assert (served / name).read_bytes() == data
    await with_cache(tmp_path, job)
