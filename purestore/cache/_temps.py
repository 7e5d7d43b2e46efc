"""The temporary files that pushes, copies (:mod:`.push`, :mod:`.mirror`), writes into a
``file://`` cache (:mod:`.backend`) and uploads to ``pure cache serve`` (:mod:`.server_upload`)
make in a cache directory before renaming them into place: ``.tmp-<kind><pid>-<machine>-…``
(:func:`temp_prefix`), and the removal of those that killed runs left (:func:`remove_leftovers`).

A run stopped by Ctrl-C or SIGTERM removes its own; one killed by SIGKILL (or a machine that
lost power) cannot.  Its files are removed as soon as it is seen to be gone: they name the
process and the machine, and a process of this machine that no longer runs writes no more.  A
file that names another machine (the directory shared over NFS), or no pid (written by an older
version), goes once :data:`STALE_SECONDS` old: by then no run still writes it."""

from __future__ import annotations

import os
import time

from .._pids import temp_stem, writer_gone

TEMP = ".tmp-"  # how every temporary file of ours in a cache directory is named
KINDS = (".tmp-push-", ".tmp-upload-", TEMP)
STALE_SECONDS = 24 * 3600


def temp_prefix(kind: str = TEMP) -> str:
    """The start of the name of a new temporary file (``kind``: one of :data:`KINDS`); the rest
    is random (``tempfile.mkstemp(prefix=...)``, or a token)."""
    return temp_stem(kind)


def left_by_killed_run(name: str) -> bool:
    """Whether ``name`` is a temporary file of a process of this machine that is gone."""
    return any(writer_gone(name, kind, machine=True) for kind in KINDS)


def remove_leftovers(directory: str, prefix: str = TEMP, *, max_age: float = STALE_SECONDS) -> list[str]:
    """Remove the regular files in ``directory`` named ``<prefix>…`` that a killed run left:
    those of a process of this machine that is gone (:func:`left_by_killed_run`), and any
    older than ``max_age`` seconds.  Returns their names; what cannot be listed or removed is
    passed over (the next run tries again)."""
    now = time.time()
    removed = []
    try:
        with os.scandir(directory) as it:
            entries = [e for e in it if e.name.startswith(prefix)]
    except OSError:
        return removed
    for e in entries:
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            if left_by_killed_run(e.name) or now - e.stat(follow_symlinks=False).st_mtime > max_age:
                os.unlink(e.path)
                removed.append(e.name)
        except OSError:
            pass
    return removed
