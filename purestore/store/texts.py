"""Text objects (``.drv`` files, ``to_file`` texts): :class:`TextObjects`, the part of
:class:`~purestore.store.local.LocalStore` that adds them, many in one transaction, and writes
damaged ones again."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from typing import Iterable

from ..errors import StoreError
from ..formats.hash import Hash
from ..formats.nar import nar_of_bytes
from ..formats.path_info import PathInfo
from ..formats.store_path import StorePath, make_text_path
from ._sync import syncfs as _syncfs
from .fstree import remove_tree
from .query import _chunks


class TextObjects:
    """Mixed into :class:`~purestore.store.local.LocalStore` (whose database, locks, temporary
    names, ``durable`` flag and ``register`` these use)."""

    def add_text(self, name: str, data: bytes, references: Iterable[StorePath] = ()) -> StorePath:
        """Add a text object (``.drv``, ``to_file``); no-op if already valid."""
        return self.add_texts([(name, data, references)])[0]

    def add_texts(self, items: Iterable[tuple[str, bytes, Iterable[StorePath]]]) -> list[StorePath]:
        """Add many text objects, registering all new ones in ONE transaction.

        Text paths are content-addressed: two writers of one path write identical bytes, and a
        rename over an unregistered file is atomic, so no path lock is needed.  References must
        be valid or among ``items``.  Returns the paths in the order of ``items``.
        """
        prepared = []
        for name, data, refs in items:
            if isinstance(data, str):
                data = data.encode()
            refs = frozenset(refs)
            sp = make_text_path(name, data, refs, self.store_dir)
            prepared.append((sp, data, refs))
        paths = [p[0] for p in prepared]
        if not prepared:
            return paths
        self.add_temp_roots(dict.fromkeys(paths))
        valid: set[str] = set()
        names = sorted({sp.base_name for sp in paths})
        for chunk in _chunks(names):
            valid.update(r[0] for r in self.db.query(
                f"SELECT path FROM ValidPaths WHERE path IN ({','.join('?' * len(chunk))})", chunk))
        infos: dict[StorePath, PathInfo] = {}
        todo: list[tuple[StorePath, bytes]] = []
        now = int(time.time())
        for sp, data, refs in prepared:
            if sp.base_name in valid or sp in infos:
                continue
            nar = nar_of_bytes(data)
            infos[sp] = PathInfo(sp, Hash("sha256", hashlib.sha256(nar).digest()), len(nar), references=refs,
                                 ca=f"text:sha256:{Hash.of_bytes(data).nix32}", registration_time=now)
            todo.append((sp, data))
        if len(todo) > 64:
            # creating files is mostly waiting on the file system: overlap it in a few threads
            import concurrent.futures  # (here: its import, with logging's, costs every command 6 ms)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                for f in [pool.submit(self._write_texts, todo[i::4]) for i in range(4)]:
                    f.result()
        else:
            self._write_texts(todo)
        if infos:
            if self.durable:
                _syncfs(self.real_store_dir)
            self.register(infos.values())
        return paths

    def repair_texts(self, items: Iterable[tuple[str, bytes, Iterable[StorePath]]]) -> list[StorePath]:
        """Write again the text objects of ``items`` that are valid but whose file is missing or
        holds other bytes (a damaged ``.drv``): a text path's content is known from ``items``
        exactly, so no substituter is needed.  Paths not valid are left to :meth:`add_texts`.
        Returns the paths written again."""
        damaged: dict[StorePath, bytes] = {}
        for name, data, refs in items:
            if isinstance(data, str):
                data = data.encode()
            sp = make_text_path(name, data, frozenset(refs), self.store_dir)
            if sp in damaged or not self.is_valid(sp):
                continue
            try:
                with open(self.real_path(sp), "rb") as f:
                    ok = stat.S_ISREG(os.fstat(f.fileno()).st_mode) and f.read(len(data) + 1) == data
            except OSError:
                ok = False
            if not ok:
                damaged[sp] = data
        if damaged:
            with self.lock_paths(damaged):
                self._write_texts(list(damaged.items()))
                if self.durable:
                    _syncfs(self.real_store_dir)
        return list(damaged)

    def _write_texts(self, todo: list[tuple[StorePath, bytes]]) -> None:
        """Write text objects at their real paths (temp name, canonical metadata, rename)."""
        for sp, data in todo:
            tmp = self.temp_name(sp)
            real = self.real_path(sp)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                os.utime(tmp, (1, 1))
                try:
                    os.rename(tmp, real)
                except OSError:
                    if not os.path.isdir(real):
                        raise
                    remove_tree(real)  # a stale unregistered directory of that name
                    os.rename(tmp, real)
            except OSError as e:
                remove_tree(tmp)
                raise StoreError(f"cannot write {real!r}: {e.strerror}") from e
