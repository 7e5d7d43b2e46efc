"""Adding files and trees to a store: checking the source and computing the path it gets
(shared by :meth:`LocalStore.add_path <purestore.store.local.LocalStore.add_path>` and
``pure store add --dry-run``)."""

from __future__ import annotations

import hashlib
import os
import stat

from ..errors import InvalidStorePath, StoreError
from ..formats.hash import Hash
from ..formats.store_path import StorePath, check_name, make_fixed_output_path, make_source_path


def check_add_source(src: str, name: str | None, flat: bool) -> tuple[str, str]:
    """The absolute path to read and the store path name for adding ``src``."""
    src = os.path.abspath(src)
    given = src
    if flat:  # a flat add follows symlinks (to the file whose contents are hashed)
        src = os.path.realpath(src)
    try:
        st = os.stat(src) if flat else os.lstat(src)
    except OSError as e:
        if flat and os.path.islink(given):  # (--flat follows it; the link is there, its target not)
            raise StoreError(f"cannot add {given!r} flat: it is a symlink to {os.readlink(given)!r}, "
                             f"which does not exist", hint="without --flat the symlink itself is added") from e
        raise StoreError(f"cannot add {given!r} to the store: {_lower(e.strerror)}") from e
    if name is None:  # like Nix: the base name of the path as given, even for a followed link
        name = os.path.basename(given.rstrip("/")) or "root"
        try:
            check_name(name)
        except InvalidStorePath as e:
            raise InvalidStorePath(f"cannot add {given!r}: {e}", hint="give a valid name with --name") from e
    else:
        check_name(name)
    if flat and not stat.S_ISREG(st.st_mode):
        raise StoreError(f"cannot add {given!r} flat: expected a regular file, got a "
                         f"{'directory' if stat.S_ISDIR(st.st_mode) else 'special file'}")
    return src, name


def add_error(src: str, e: OSError) -> StoreError:
    where = e.filename or src
    return StoreError(f"cannot add {src!r} to the store: {where!r}: {_lower(e.strerror)}")


def compute_add_path(src: str, name: str | None = None, *, flat: bool = False,
                     store_dir: str) -> StorePath:
    """The path :meth:`LocalStore.add_path` would give ``src``, computed without any store.

    Raises the errors of :meth:`LocalStore.add_path`.
    """
    from . import fsnar

    src, name = check_add_source(src, name, flat)
    try:
        if flat:
            return make_fixed_output_path(name, file_sha256(src), False, store_dir)
        nar_hash, _size = fsnar.hash_path(src)
    except OSError as e:
        if isinstance(e, StoreError):
            raise
        raise add_error(src, e) from e
    return make_source_path(name, nar_hash, (), store_dir)


def file_sha256(path: str) -> Hash:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return Hash("sha256", h.digest())


def _lower(msg: str | None) -> str:
    return (msg[:1].lower() + msg[1:]) if msg else "unknown error"
