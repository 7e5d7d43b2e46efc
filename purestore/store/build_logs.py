"""Where the store keeps build logs, and reading one: ``<state_dir>/log/<first 2 chars of the
.drv base name>/<rest of it>.zst`` (like Nix's ``log/drvs/``).  The builder writes them
(:mod:`purestore.build.logs`); ``pure log``, pushes and ``pure store serve`` read them."""

from __future__ import annotations

import os

import zstandard

from ..errors import StoreError


def log_path(state_dir: str, drv_base: str) -> str:
    """Where the log of the derivation with base name ``<hash>-<name>.drv`` is kept."""
    return os.path.join(state_dir, "log", drv_base[:2], drv_base[2:] + ".zst")


def read_log(state_dir: str, drv_base: str) -> bytes | None:
    """The stored log of a derivation, or None if there is none; :class:`StoreError` when it
    cannot be read or is corrupt."""
    p = log_path(state_dir, drv_base)
    try:
        with open(p, "rb") as f:
            return zstandard.ZstdDecompressor().stream_reader(f).read()
    except FileNotFoundError:
        return None
    except (OSError, zstandard.ZstdError) as e:
        raise StoreError(f"cannot read the build log {p!r}: {e}") from e
