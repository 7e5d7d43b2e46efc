"""NARs -> file trees, and trees made canonical: the writing half of ``fsnar`` (DESIGN.md, FORMATS.md 3 and 6).

- :func:`restore_nar` materialises a NAR stream as a new tree, never writing outside it, with
  canonical metadata set on the way when asked (substitution);
- :func:`canonicalise_path` applies canonical metadata to an existing tree (builder outputs,
  profiles);
- :func:`remove_tree` removes a tree whatever its modes (the one tree remover of the store layer).

Direct writes (``restore_nar(..., direct=True)``, substitution into a store that flushes before
it registers, ``fsync-store-paths``): files of :data:`DIRECT_MIN` bytes and more are written with
``O_DIRECT``, through an aligned buffer, and only their last partial block through the page
cache.  Their data has to reach the disk before the path is registered anyway; written straight
there it is not copied into page-cache pages first and written back by the kernel later.  On
this machine's VM, where every freshly filled page-cache page costs a fault in the host, that
copy was a quarter of a substitution's CPU time.  A file system that refuses ``O_DIRECT``
(``EINVAL`` on open or write) gets ordinary writes instead, for the rest of the restore.

Canonical metadata: mtime 1 on everything (symlinks too), files 0444 or 0555 when the owner x bit
was set, directories 0555, no setuid/setgid/sticky bits, no extended attributes.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import threading

from ..errors import NarError, StoreError
from ..formats import nar as _nar
from .fsnar import _O_CREATE, _oserror, _show, _unsupported, _write_all


def restore_nar(source, dest: str, *, canonical: bool = False, direct: bool = False,
                umask: int | None = None) -> None:
    """Materialise the NAR read from ``source`` at ``dest``, which must not exist.

    Strict (the NAR reader rejects anything malformed); never writes outside ``dest`` and never
    follows a symlink: every entry is created relative to its parent directory's descriptor with
    ``O_EXCL``/``O_NOFOLLOW``.  Files get mode 0644 or 0755, directories 0755; with
    ``canonical``, the store's canonical metadata instead (0444/0555, directories 0555, mtime 1),
    set through the descriptors while restoring, so that no second walk over the tree is needed.
    On any error the partial tree is removed and the error re-raised (:class:`NarError` for a bad
    NAR, :class:`StoreError` for the file system).  ``direct``: big files are written with
    ``O_DIRECT`` where the file system allows it (see the module's docstring).  ``umask``: the
    process's umask, read by a caller that restores many NARs in a row (:func:`read_umask`, ~25 µs
    a read); None: read here.
    """
    if os.path.lexists(dest):
        raise StoreError(f"cannot restore a NAR to {dest!r}: it already exists")
    parent = os.path.dirname(os.path.abspath(dest)) or "/"
    created = False
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:  # (the parent is what is missing or unusable: name it)
        raise StoreError(f"cannot restore a NAR to {dest!r}: its parent directory {parent!r}: "
                         f"{e.strerror}") from e
    # New files inherit a default ACL of the directory as extended attributes: then the
    # canonical metadata needs the full pass after all (it strips them).
    walk_after = canonical and _has_default_acl(pfd)
    canonical = canonical and not walk_after
    base = os.fsencode(os.path.basename(os.path.abspath(dest)))
    dirs: list[tuple[tuple, int]] = []  # open directories: (path, fd)
    fchmod, utime, close = os.fchmod, os.utime, os.close
    if not canonical:
        umask = 0o777
    elif umask is None:
        umask = read_umask()  # for each restore unless given: callers may change it
    writer = _DirectWriter() if direct and _O_DIRECT else None
    try:
        for ev in _nar.parse_nar(source):
            path = ev.path
            if not path:
                at_fd, name = pfd, base
            else:
                while dirs and dirs[-1][0] != path[:-1]:
                    _finish_dir(dirs, canonical, dest)
                if not dirs:  # cannot happen with a valid event stream
                    raise NarError(f"entry {_nar.render_path(path)!r} outside any directory")
                at_fd, name = dirs[-1][1], path[-1]
            created = True
            try:
                if isinstance(ev, _nar.NarRegular):
                    mode = (0o555 if ev.executable else 0o444) if canonical else 0o600
                    big = writer is not None and writer.on and ev.size >= DIRECT_MIN
                    fd = writer.open(name, mode, at_fd) if big else os.open(name, _O_CREATE, mode, dir_fd=at_fd)
                    try:
                        if big:
                            writer.write_file(fd, ev.chunks, name)
                        else:
                            for chunk in ev.chunks:
                                _write_all(fd, chunk, name)
                        if canonical:
                            # created with its final mode (opened for writing all the same)
                            # unless the umask took bits away
                            if umask & mode:
                                fchmod(fd, mode)
                            utime(fd, _EPOCH1)
                        else:
                            fchmod(fd, 0o755 if ev.executable else 0o644)
                    finally:
                        close(fd)
                elif isinstance(ev, _nar.NarDirectory):
                    os.mkdir(name, 0o755, dir_fd=at_fd)
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=at_fd)
                    dirs.append((path, fd))
                    if umask & 0o700:
                        fchmod(fd, 0o755)  # writable for us whatever the umask
                else:
                    os.symlink(ev.target, name, dir_fd=at_fd)
                    if canonical:
                        utime(name, _EPOCH1, dir_fd=at_fd, follow_symlinks=False)
            except OSError as e:
                raise StoreError(
                    f"cannot restore {_nar.render_path(path)!r} under {dest!r}: {e.strerror or e}"
                ) from e
        while dirs:
            _finish_dir(dirs, canonical, dest)
    except BaseException:
        for _p, fd in dirs:
            close(fd)
        dirs = []
        if created:
            remove_tree(dest)
        raise
    finally:
        for _p, fd in dirs:
            close(fd)
        close(pfd)
    if walk_after:
        canonicalise_path(dest)


_EPOCH1 = (1, 1)

_O_DIRECT = getattr(os, "O_DIRECT", 0)
DIRECT_MIN = 64 << 10  # smaller files go through the page cache (8 to 256 KiB measured alike)
_ALIGN = 4096  # offsets and lengths of direct writes (any block size up to a page)
_DIRECT_BUF = 1 << 20
_buffers = threading.local()  # one aligned buffer per thread, kept: fresh pages cost faults


class _DirectWriter:
    """Writes a restore's big files with ``O_DIRECT`` until the file system refuses it."""

    def __init__(self):
        self.on = True
        buf = getattr(_buffers, "buf", None)
        if buf is None:
            buf = _buffers.buf = memoryview(mmap.mmap(-1, _DIRECT_BUF))  # page-aligned
        self.buf = buf

    def open(self, name: bytes, mode: int, at_fd: int) -> int:
        try:
            return os.open(name, _O_CREATE | _O_DIRECT, mode, dir_fd=at_fd)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        # refused (older kernels create the file before they check for O_DIRECT support: the
        # name may exist now, made by us a moment ago in the new tree)
        self.on = False
        return os.open(name, _O_CREATE & ~os.O_EXCL, mode, dir_fd=at_fd)

    def write_file(self, fd: int, chunks, name: bytes) -> None:
        buf, size = self.buf, _DIRECT_BUF
        n = 0
        for chunk in chunks:
            with memoryview(chunk) as cv:
                pos, length = 0, len(cv)
                while pos < length:
                    take = min(size - n, length - pos)
                    buf[n:n + take] = cv[pos:pos + take]
                    n += take
                    pos += take
                    if n == size:
                        self._write(fd, buf, name)
                        n = 0
        whole = n & ~(_ALIGN - 1)
        if whole:
            self._write(fd, buf[:whole], name)
        if n > whole:  # the last partial block: through the page cache
            self._buffered(fd)
            _write_all(fd, buf[whole:n], name)

    def _write(self, fd: int, view, name: bytes) -> None:
        done, n = 0, len(view)
        while done < n:
            try:
                done += os.write(fd, view[done:])
            except OSError as e:
                # refused (alignment, or not for this file): write on through the page cache
                if e.errno == errno.EINVAL and self._buffered(fd):
                    self.on = False
                    continue
                raise _oserror("write", name, e) from e

    @staticmethod
    def _buffered(fd: int) -> bool:
        """Clear ``O_DIRECT`` on ``fd``; False if it was not set."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if not flags & _O_DIRECT:
            return False
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
        return True


def read_umask() -> int:
    """The process's umask, without changing it (Linux reports it in /proc since 4.7)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def _finish_dir(dirs: list, canonical: bool, dest: str) -> None:
    """Close the innermost open directory of a restore, all its entries written (canonical:
    read-only, mtime 1, now that nothing more is created in it)."""
    path, fd = dirs[-1]
    try:
        if canonical:
            os.fchmod(fd, 0o555)
            os.utime(fd, _EPOCH1)
    except OSError as e:
        raise StoreError(f"cannot restore {_nar.render_path(path)!r} under {dest!r}: {e.strerror or e}") from e
    dirs.pop()
    os.close(fd)


def _has_default_acl(dir_fd: int) -> bool:
    try:
        return "system.posix_acl_default" in os.listxattr(dir_fd)
    except OSError:
        return False


def remove_tree(path: str, *, count: bool = False) -> int:
    """Remove a file, symlink or tree, making read-only directories (0555 store paths) writable
    first; a missing path is fine.  The one tree remover of the store layer.

    With ``count``, returns the bytes this freed: the sizes of the files and symlinks whose last
    link it removed (a file hard-linked elsewhere, e.g. by ``pure store optimise``, frees
    nothing yet), as Nix counts them; otherwise 0 (no ``lstat`` per file).

    It walks the tree with one directory descriptor at a time (down by name, back up by
    ``..``), not by recursion or by full paths: a builder's output nested thousands of
    directories deep, which the store refuses to register, must still be removable, and its
    paths are longer than ``PATH_MAX``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return st.st_size if count and st.st_nlink == 1 else 0
    if st.st_mode & 0o700 != 0o700:
        os.chmod(path, 0o700)
    freed = [0] if count else None
    fd = os.open(path, _DIR_FLAGS)
    try:
        frames = [("", _clear_files(fd, freed))]   # (name in the parent, subdirectories left to remove)
        while True:
            name, subdirs = frames[-1]
            if subdirs:
                sub = subdirs.pop()
                if os.stat(sub, dir_fd=fd, follow_symlinks=False).st_mode & 0o700 != 0o700:
                    os.chmod(sub, 0o700, dir_fd=fd)
                child = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                frames.append((sub, _clear_files(fd, freed)))
                continue
            frames.pop()
            if not frames:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)
    return freed[0] if freed is not None else 0


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _clear_files(dir_fd: int, freed: list[int] | None = None) -> list[str]:
    """Unlink every entry of the directory ``dir_fd`` that is not a directory; return the names
    of its subdirectories.  ``freed[0]`` (if given) grows by the size of each entry whose last
    link went."""
    subdirs = []
    with os.scandir(dir_fd) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.name)
            else:
                if freed is not None:
                    try:
                        st = os.stat(e.name, dir_fd=dir_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if st.st_nlink == 1:
                        freed[0] += st.st_size
                os.unlink(e.name, dir_fd=dir_fd)
    return subdirs


def canonicalise_path(path: str, *, reject_writable: bool = False) -> None:
    """Give the tree at ``path`` canonical metadata in place (directories after their children).

    With ``reject_writable``, raise :class:`StoreError` naming the first group- or
    world-writable file or directory (builder outputs).  setuid/setgid/sticky bits are stripped,
    extended attributes removed.  Raises :class:`StoreError` for sockets, FIFOs and devices.
    """
    _canon(os.fsencode(path), reject_writable, 0)


def _canon(p: bytes, reject_writable: bool, depth: int) -> None:
    try:
        st = os.lstat(p)
    except OSError as e:
        raise _oserror("read", p, e) from e
    mode = st.st_mode
    if reject_writable and not stat.S_ISLNK(mode) and mode & 0o022:
        raise StoreError(
            f"{_show(p)!r} is group- or world-writable (mode {stat.S_IMODE(mode):04o}): "
            "refusing a suspicious build output"
        )
    try:
        if stat.S_ISLNK(mode):
            if st.st_mtime_ns != 1_000_000_000:
                os.utime(p, (1, 1), follow_symlinks=False)
            return
        if stat.S_ISREG(mode):
            _strip_xattrs(p)
            want = 0o555 if mode & 0o100 else 0o444
            if stat.S_IMODE(mode) != want:
                os.chmod(p, want)
            if st.st_mtime_ns != 1_000_000_000:
                os.utime(p, (1, 1))
            return
        if stat.S_ISDIR(mode):
            if depth >= _nar.MAX_DEPTH:
                raise StoreError(f"{_show(p)!r} is nested more than {_nar.MAX_DEPTH} directories deep")
            if mode & 0o700 != 0o700:
                os.chmod(p, 0o700)
            with os.scandir(p) as it:
                names = [e.name for e in it]
            for n in names:
                _canon(p + b"/" + n, reject_writable, depth + 1)
            _strip_xattrs(p)
            os.chmod(p, 0o555)
            os.utime(p, (1, 1))
            return
    except StoreError:
        raise
    except OSError as e:
        raise _oserror("canonicalise", p, e) from e
    raise _unsupported(p, mode)


def _strip_xattrs(p: bytes) -> None:
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:
        return
    for n in names:
        try:
            os.removexattr(p, n, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
                raise
