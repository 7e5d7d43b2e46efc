"""Where the store keeps build logs, and reading one: ``<state_dir>/log/<first 2 chars of the
.drv base name>/<rest of it>.zst`` (like Nix's ``log/drvs/``).  The builder writes them
(:mod:`purestore.build.logs`); ``pure log``, pushes and ``pure store serve`` read them."""

from __future__ import annotations

import os
import re

import zstandard

from .._pids import writer_gone
from ..errors import StoreError


def log_path(state_dir: str, drv_base: str, variant: str | None = None) -> str:
    """Where the log of the derivation with base name ``<hash>-<name>.drv`` is kept; with
    ``variant`` (``check-2``, ``round-2``: a rebuild of ``--check``/``--rounds``, by round number,
    the valid outputs being round 1), the log of that rebuild, next to it (``….drv.check-2.zst``),
    so that the log of the build that made the valid outputs stays what ``pure log`` shows."""
    tail = f".{variant}.zst" if variant else ".zst"
    return os.path.join(state_dir, "log", drv_base[:2], drv_base[2:] + tail)


_TEMP = re.compile(r"(.+\.zst\.tmp-)[0-9]+-[0-9]+")  # (see BuildLog: ``f"{path}.tmp-{pid}-{n}"``)


def remove_stale_log_temps(state_dir: str) -> int:
    """Remove the temporary files of logs whose writer died (``<log>.tmp-<pid>-…`` of a pid that
    is not running: a SIGKILLed build); returns how many (``pure gc`` calls this)."""
    top = os.path.join(state_dir, "log")
    n = 0
    try:
        subdirs = [e.path for e in os.scandir(top) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    for d in subdirs:
        try:
            # only what BuildLog names its temporary (``<log>.zst.tmp-<pid>-<n>``): a finished
            # log ends in .zst, also one of a derivation named ``x.tmp-123-y`` (whose ``123``
            # is no pid)
            temps = [(x, m.group(1)) for x in os.listdir(d) if (m := _TEMP.fullmatch(x))]
        except OSError:
            continue
        for name, prefix in temps:
            if writer_gone(name, prefix):
                try:
                    os.unlink(os.path.join(d, name))
                    n += 1
                except OSError:
                    pass
    return n


def read_log(state_dir: str, drv_base: str) -> bytes | None:
    """The stored log of a derivation, or None if there is none; :class:`StoreError` when it
    cannot be read, is corrupt or is truncated."""
    p = log_path(state_dir, drv_base)
    try:
        with open(p, "rb") as f:
            dec = zstandard.ZstdDecompressor().decompressobj()
            parts = []
            while chunk := f.read(1 << 20):
                parts.append(dec.decompress(chunk))
    except FileNotFoundError:
        return None
    except (OSError, zstandard.ZstdError) as e:
        raise StoreError(f"cannot read the build log {p!r}: {e}") from e
    if not dec.eof:  # (a log is renamed into place complete: cut since, or the disk filled up)
        got = sum(map(len, parts))
        raise StoreError(f"the build log {p!r} is truncated: its compressed data ends early "
                         f"(after {got} bytes of log)")
    return b"".join(parts)
