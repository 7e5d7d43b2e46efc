"""Shared test helpers: run the real `pure` CLI as a subprocess against a rooted store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

HAVE_NIX = shutil.which("nix-store") is not None
needs_nix = pytest.mark.skipif(not HAVE_NIX, reason="Nix (nix-bin) is not installed")


def pure_env(root: Path | None, store_dir: str | None = None, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PURE_")}
    env["PURE_CONFIG"] = "/dev/null"  # never read the host's config in tests
    if root is not None:
        env["PURE_STORE"] = str(root)
    if store_dir is not None:
        env["PURE_STORE_DIR"] = store_dir
    env["PYTHONPATH"] = str(REPO)
    if extra:
        env.update(extra)
    return env


def run_pure(*args, root=None, store_dir=None, input=None, check=True, env=None, cwd=None,
             timeout=600) -> subprocess.CompletedProcess:
    """Run `pure ARGS` as a real process; returns the completed process (text mode)."""
    cmd = [sys.executable, "-m", "purestore.cli.main", *map(str, args)]
    p = subprocess.run(
        cmd, input=input, capture_output=True, env=pure_env(root, store_dir, env), cwd=cwd,
        timeout=timeout, text=not isinstance(input, bytes),
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"pure {' '.join(map(str, args))} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
        )
    return p


@pytest.fixture
def store_root(tmp_path) -> Path:
    """An empty directory to hold a rooted store."""
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def pure(store_root):
    """`pure(...)` runs the CLI against the test's rooted store (store dir /pure/store)."""
    def _pure(*args, **kw):
        kw.setdefault("root", store_root)
        return run_pure(*args, **kw)
    return _pure


@pytest.fixture
def settings(store_root):
    from purestore.store.settings import load_settings
    return load_settings(env={"PURE_CONFIG": "/dev/null"}, root=str(store_root))
