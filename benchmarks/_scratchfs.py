"""A fresh ext4 file system for benchmarks that create many files.

This machine's root file system is ext4 without a journal.  There, creating a file skips every
inode freed in the last one to five minutes (ext4's ``recently_deleted``), one inode table
lookup each: right after a 20,000-file tree was deleted, creating the next 20,000 files costs
seconds of kernel time, whichever tool does it, and the figures swing fivefold with what ran
before.  A freshly made ext4 with a journal (what ``mkfs.ext4`` makes, and what most machines
have) does not do that scan, so the benchmarks that write trees can run on one, mounted from
an image under /var/tmp through a loop device.  Root only; elsewhere the caller falls back to
/var/tmp (and says so).

The loop device uses direct I/O where it can (``losetup --direct-io=on``): without it, every
block written back to the image is first copied by a kernel thread into the page cache of the
image file, which costs CPU that a real disk (DMA) does not, and charges it to whichever tool
flushes while it runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile


def available() -> str | None:
    """Why a scratch file system cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("mkfs.ext4", "mount", "umount", "losetup"):
        if not shutil.which(tool):
            return f"{tool} is missing"
    return None


@contextlib.contextmanager
def scratch_ext4(size_gb: int = 10, where: str = "/var/tmp"):
    """Yield the mount point of a new ext4 of ``size_gb`` GiB (sparse image in ``where``)."""
    top = tempfile.mkdtemp(prefix="bench-fs-", dir=where)
    img, mnt = os.path.join(top, "fs.img"), os.path.join(top, "mnt")
    os.mkdir(mnt)
    mounted = False
    dev = None
    try:
        with open(img, "wb") as f:
            f.truncate(size_gb << 30)
        # no lazy initialisation: a background thread zeroing inode tables would run during
        # the timed work
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", img],
                       check=True)
        for extra in (["--direct-io=on"], []):  # a file system without O_DIRECT refuses the first
            r = subprocess.run(["losetup", "--find", "--show", *extra, img], capture_output=True, text=True)
            if r.returncode == 0:
                dev = r.stdout.strip()
                break
        if dev is None:
            raise RuntimeError(f"losetup failed: {r.stderr.strip()}")
        subprocess.run(["mount", dev, mnt], check=True)
        mounted = True
        try:
            with open(f"/sys/block/{os.path.basename(dev)}/loop/dio") as f:
                dio = f.read().strip() == "1"
        except OSError:
            dio = False
        print(f"scratch file system: ext4 on {dev}, direct I/O {'on' if dio else 'off'}", flush=True)
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", mnt], check=False)
        if dev is not None:
            subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def work_dir(size_gb: int):
    """Where a benchmark works: a fresh ext4 of ``size_gb`` GiB when one can be made, else
    /var/tmp (saying why)."""
    why_not = available()
    if why_not:
        print(f"working in /var/tmp (no scratch ext4: {why_not})")
        yield "/var/tmp"
        return
    with scratch_ext4(size_gb=size_gb) as mnt:
        print(f"working on a fresh ext4 mounted at {mnt}")
        yield mnt
