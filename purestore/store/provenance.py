"""Where a store keeps the signed provenance of its paths.

One DSSE envelope per path, at ``<state_dir>/provenance/<hashpart>.provenance`` (the same file
name it has next to the narinfo in a binary cache).  Written atomically (temporary file, rename);
removed with :func:`delete_provenance`.  The contents are not trusted by being here: readers
verify the signature and subject (:mod:`purestore.formats.provenance`) before relying on them.
"""

from __future__ import annotations

import os
import secrets
from typing import Iterable

from ..errors import StoreError
from ..formats.provenance import STATE_SUBDIR, provenance_file_name
from ..formats.store_path import StorePath


def provenance_dir(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_SUBDIR)


def provenance_path(store, sp: StorePath) -> str:
    """The file holding ``sp``'s provenance in ``store`` (it may not exist)."""
    return os.path.join(provenance_dir(store.state_dir), provenance_file_name(sp.hash_part))


def read_provenance(store, sp: StorePath) -> bytes | None:
    """The stored DSSE envelope of ``sp``, or None when the store has none."""
    try:
        with open(provenance_path(store, sp), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"cannot read provenance of {store.print_path(sp)!r}: {e.strerror}") from e


def write_provenance(store, sp: StorePath, data: bytes) -> str:
    """Store ``data`` as ``sp``'s provenance (replacing any); returns the file's path."""
    target = provenance_path(store, sp)
    d = os.path.dirname(target)
    tmp = os.path.join(d, f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(d, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, target)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StoreError(f"cannot write provenance {target!r}: {e.strerror}") from e
    return target


def delete_provenance(store, sp: StorePath) -> None:
    try:
        os.unlink(provenance_path(store, sp))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StoreError(f"cannot remove provenance of {store.print_path(sp)!r}: {e.strerror}") from e


def delete_provenance_of(store, paths: Iterable[StorePath]) -> int:
    """Remove the kept provenance of ``paths`` (paths that are no longer valid: deleted or
    collected); returns how many there were.

    A statement is about the contents a path had: once the path is gone, a later build of it
    may give other contents, and the old statement must not travel with them (``pure copy
    --to`` uploads what is kept here).  The directory is listed once, so collecting many paths
    costs one ``listdir`` and an unlink per statement actually kept.
    """
    d = provenance_dir(store.state_dir)
    try:
        kept = set(os.listdir(d))
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise StoreError(f"cannot list provenance in {d!r}: {e.strerror}") from e
    n = 0
    for sp in paths:
        name = provenance_file_name(sp.hash_part)
        if name not in kept:
            continue
        try:
            os.unlink(os.path.join(d, name))
            n += 1
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"cannot remove provenance of {store.print_path(sp)!r}: {e.strerror}") from e
    return n
