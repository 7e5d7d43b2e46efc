"""Removing the files of dead paths: unlinked at once, or (directories) moved into a trash
directory inside the store and removed there by a few threads, counting the bytes that frees.

Used by :mod:`purestore.store.gc`, which holds the collection's lock while it unlinks and moves
(:func:`unlink_or_move`) and removes the trash after (:func:`remove_trash`).  The trash is
``<store>/.tmp/<pid>-gc-trash``: a trash left by a process that died is removed by the next
``LocalStore.open``, like every temporary of the store.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import threading

from ..errors import StoreError
from .fstree import remove_tree

TRASH_SUFFIX = "-gc-trash"


def _block_signals() -> None:
    """In a worker thread: leave SIGINT and SIGTERM to the main thread.  Python raises
    KeyboardInterrupt there in any case, but only once its wait ends when a worker took the
    signal, so Ctrl-C or SIGTERM would come after the work and not stop it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _in_threads(work, parts: list[list[str]]) -> list:
    """``work(part, stop)`` for each part, one thread each; their results in order.

    An exception in the waiting main thread (KeyboardInterrupt: Ctrl-C, or SIGTERM through
    the CLI) or in a worker sets ``stop`` (a :class:`threading.Event` the workers check between
    items) and is raised once every worker has stopped.
    """
    stop = threading.Event()
    import concurrent.futures  # (here: with logging it costs 6 ms, and a gc deleting little never gets here)
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=len(parts), initializer=_block_signals)
    try:
        futures = [ex.submit(work, part, stop) for part in parts]
        return [f.result() for f in futures]
    except BaseException:
        stop.set()
        raise
    finally:
        ex.shutdown(wait=True)


def _split(items: list[str], workers: int) -> list[list[str]]:
    chunk = (len(items) + workers - 1) // workers
    return [items[i:i + chunk] for i in range(0, len(items), chunk)]


def remove_many(paths: list[str], workers: int) -> int:
    """Remove the trees ``paths``; the bytes freed (files whose last link went)."""
    def work(part: list[str], stop: threading.Event | None = None) -> int:
        freed = 0
        for p in part:
            if stop is not None and stop.is_set():
                break
            freed += remove_tree(p, count=True)
        return freed

    if workers <= 1 or len(paths) < 64:
        return work(paths)
    return sum(_in_threads(work, _split(paths, workers)))


def unlink_or_move(store_dir: str, names: list[str], trash: str, workers: int) -> int:
    """Unlink each non-directory ``store_dir/name``; rename directories into ``trash``.
    Returns the bytes the unlinking freed (files whose last link went; the directories' files
    count when the trash is removed).

    Runs in ``workers`` threads (the system calls release the GIL).  Ctrl-C or SIGTERM stops it
    between names; those not reached stay where they are.
    """
    def work(part: list[str], stop: threading.Event | None = None) -> int:
        freed = 0
        for name in part:
            if stop is not None and stop.is_set():
                break
            src = f"{store_dir}/{name}"
            try:
                st = os.lstat(src)
                if stat.S_ISDIR(st.st_mode):
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), src)
                os.unlink(src)
                if st.st_nlink == 1:
                    freed += st.st_size
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno not in (errno.EISDIR, errno.EPERM):
                    raise StoreError(f"cannot remove dead path {src!r}: {e.strerror}") from e
                try:
                    rename_into(src, trash, name)
                except OSError as e2:
                    raise StoreError(f"cannot move dead path {src!r} to the trash {trash!r}: "
                                     f"{e2.strerror}") from e2
        return freed

    if workers <= 1 or len(names) < 256:
        return work(names)
    return sum(_in_threads(work, _split(names, workers)))


def rename_into(src: str, trash: str, name: str) -> bool:
    dst = os.path.join(trash, name)
    try:
        os.rename(src, dst)
        return True
    except FileNotFoundError:
        return False
    except PermissionError:
        # moving a directory needs write access to it (its ".." changes) unless we are root
        os.chmod(src, 0o755)
        os.rename(src, dst)
        return True


def trash_dir(store) -> str:
    d = os.path.join(store.real_store_dir, ".tmp", f"{os.getpid()}{TRASH_SUFFIX}")
    os.makedirs(d, exist_ok=True)
    return d


def remove_trash(trash: str, workers: int, interrupted: KeyboardInterrupt | None) -> int:
    """Remove the trash directory with what is in it, then raise ``interrupted`` if given;
    returns the bytes freed (files whose last link went).

    Ctrl-C or SIGTERM (``interrupted``: one that stopped the collection before, or one that
    comes now) does not stop this: the trash is the collection's temporary, and a command stopped
    so removes its temporaries before it exits.  Only a second one does; the next
    :meth:`LocalStore.open` then removes the rest (the directory is named by this process's pid,
    like every temporary of the store).
    """
    freed = 0
    while True:
        try:
            try:
                freed = remove_many([os.path.join(trash, n) for n in os.listdir(trash)], workers)
                os.rmdir(trash)
            except OSError as e:
                raise StoreError(f"cannot remove dead paths in {trash!r}: {e.strerror}") from e
            break
        except KeyboardInterrupt as e:
            if interrupted is not None:
                raise
            interrupted = e
    if interrupted is not None:
        raise interrupted
    return freed


def linked_inodes(real_store_dir: str) -> set[int]:
    """The inodes of the ``.links`` entries of ``pure store optimise`` (empty without any)."""
    from .optimise import links_dir
    out: set[int] = set()
    try:
        it = os.scandir(links_dir(real_store_dir))
    except (FileNotFoundError, NotADirectoryError):
        return out
    with it:
        for e in it:
            try:
                out.add(e.inode())
            except OSError:
                pass
    return out


def would_free(path: str, linked: set[int]) -> int:
    """The bytes that removing the tree at ``path`` would free, known before removing it: the
    sizes of its files and symlinks that have no other link, or whose only other link is their
    ``.links`` entry (``linked``: :func:`linked_inodes`), which goes unused then.  A file that
    several dead paths share counts in none of them (so this errs low); directories count
    nothing, as when removing (:func:`remove_many`)."""
    def size(st: os.stat_result) -> int:
        if st.st_nlink == 1 or (st.st_nlink == 2 and st.st_ino in linked):
            return st.st_size
        return 0

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return size(st)
    total, stack = 0, [path]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:  # (a 0000 directory: a builder's odd output; it frees what it frees)
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    else:
                        total += size(e.stat(follow_symlinks=False))
                except FileNotFoundError:
                    pass
    return total
