"""pure build substitutes from a signed binary cache before building, and records it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_build import build, expr, needs_sandbox, open_store  # noqa: F401 - fixtures

pytestmark = needs_sandbox


def test_outputs_in_a_trusted_cache_are_fetched_not_built(pure, expr, tmp_path, store_root):
    try:
        import purestore.cache.substituter  # noqa: F401
    except ImportError:
        pytest.skip("the caches layer is not installed")
    f = expr('default = sh("fetchme", "$B mkdir $out; echo from-cache > $out/f")\n')
    out = build(pure, tmp_path, f, "--no-link").stdout.strip()
    pure("key", "generate", "--name", "test-cache-1", "--secret-out", tmp_path / "k.sec",
         "--public-out", tmp_path / "k.pub")
    cache = f"file://{tmp_path / 'cache'}"
    pure("copy", "--to", cache, "--secret-key-file", tmp_path / "k.sec", out)
    pub = (tmp_path / "k.pub").read_text().strip()

    other = tmp_path / "other-root"
    other.mkdir()
    p = pure("--substituters", cache, "--trusted-public-keys", pub, "build", f, "--no-link",
             root=other, cwd=tmp_path)
    assert p.stdout.strip() == out
    assert "will be built" not in p.stderr and "will be fetched" in p.stderr
    assert (other / out.lstrip("/") / "f").read_text() == "from-cache\n"
    st = open_store(other)
    try:
        from purestore.store import events
        assert events.query_builds(st) == []
        assert [s["path"] for s in events.query_substitutions(st)] == [out]
    finally:
        st.close()
