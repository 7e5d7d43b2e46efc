"""Temporary files named by the process that made them (``<prefix><pid>-<more>``): whether that
process is gone, so that the file is a leftover of a killed run and may be removed.

In a directory that several machines may share (a binary cache on NFS), a pid means nothing on
another machine: such temporaries also name the machine (``<prefix><pid>-<machine>-<more>``,
:func:`temp_stem`), and only those that name this one are judged by their pid
(``writer_gone(..., machine=True)``)."""

from __future__ import annotations

import functools
import os
import re


@functools.cache
def this_machine() -> str:
    """This machine as temporaries' names give it: its host name (characters other than ASCII
    letters, digits and ``.`` as ``_``, so that it holds no ``-``), then ``.`` and the first 8
    hex digits of the kernel's boot id where there is one (two machines of the same name, or
    this one after a reboot, do not take each other's files for their own), and ``.`` and the
    number of this process's pid namespace (a container's pids are not the host's)."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", os.uname().nodename)[:64] or "_"
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = re.sub(r"[^0-9a-f]", "", f.read())[:8]
    except OSError:
        boot = ""
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = ""
    return ".".join(x for x in (host, boot, pidns) if x)


def _proc_is_ours() -> bool:
    """Whether ``/proc`` shows this process's pid namespace (it is mounted, and not the one of
    another namespace: ``unshare --pid`` without a new ``/proc``), so that ``/proc/<pid>`` says
    whether a pid of ours runs."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def temp_stem(prefix: str) -> str:
    """``<prefix><pid>-<machine>-``: how the name of a temporary file this process makes in a
    directory other machines may share starts (the rest: something random)."""
    return f"{prefix}{os.getpid()}-{this_machine()}-"


def writer_gone(name: str, prefix: str, *, machine: bool = False) -> bool:
    """True when ``name`` is ``<prefix><pid>-…`` and no process ``pid`` runs on this machine;
    with ``machine``, only when it is ``<prefix><pid>-<machine>-…`` (:func:`temp_stem`) and
    ``<machine>`` is this one.  False where this machine's processes cannot be seen (no
    ``/proc``, or another pid namespace's)."""
    if not name.startswith(prefix):
        return False
    pid, dash, rest = name[len(prefix):].partition("-")
    if not (dash and pid.isascii() and pid.isdigit()):
        return False
    if machine:
        tag, dash, _ = rest.partition("-")
        if not dash or tag != this_machine():
            return False
    return process_gone(pid)


def process_gone(pid: str) -> bool:
    """True when ``pid`` (decimal text) names no process running on this machine; False where
    this machine's processes cannot be seen (see :func:`writer_gone`)."""
    return pid.isascii() and pid.isdigit() and _proc_is_ours() and not os.path.exists(f"/proc/{pid}")
