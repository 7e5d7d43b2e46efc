"""Benchmark: push a ~350 MB, ~20,000-file closure to a file:// zstd cache and substitute it into a
fresh store, with `pure copy` and with `nix copy`; then 200 small paths substituted over HTTP.

Setup (not timed): the tree of benchmarks/_tree.py (by default with contents that compress about as
software does, 2.3 times with zstd; ``--content random`` for random bytes) is split into its ~50 top-level package
directories, each added as a store path to a rooted purestore store (--store-dir /nix/store) and
to a Nix chroot store; both give the same paths.  Then, in rounds, each tool runs all of the
following in turn (pure first in odd rounds, Nix first in even ones):

1. push:       `pure copy --to file://C?compression=zstd&secret-key=K PATHS`  vs  `nix copy --to ...`
2. substitute: `pure copy --from file://C PATHS` into a fresh rooted store      vs  `nix copy --from`
               into a fresh chroot store, each trusting the key
3. http:       200 small paths (pushed once by pure) served by `pure cache serve` on 127.0.0.1;
               `pure copy --from http://...` vs `nix copy --from http://...` into fresh stores;
               then the same served by nginx where installed (a static server much faster than
               ours, so that the clients' own speed shows, not the server's), and then through a
               proxy that delays everything by half of ``--rtt`` (10 ms) each way, as a cache
               across a network is: what parallel queries and downloads are for, which loopback
               cannot show (the proxy's threads use a little CPU, counted for both tools)
   small push: the same 200 small paths pushed to a new file:// zstd cache, by each tool from
               its own store (what a post-build hook or a `copy --to` of a whole closure does)
4. http big:   where nginx is installed, the big closure substituted over HTTP from the cache
               each tool pushed in step 1

Every timed run starts after a `sync`.  The best round of each counts (the machine is shared).
Which tool goes first alternates because the order matters here: this VM returns freed memory to
its host (free page reporting), so filling fresh page-cache pages costs a host fault each, and the
figures of a command depend on how much recently freed memory it finds; whichever tool runs first
in a round meets what the previous round left.
Nothing is deleted until the end: every round writes into new directories.  By default all of it
runs on a fresh ext4 made for the run (benchmarks/_scratchfs.py says why: this machine's root file
system makes file creation slow for minutes after a deletion, whichever tool creates them);
``--fs host`` runs in /var/tmp instead.

Substitution by pure flushes the file system before it registers the paths (``fsync-store-paths``,
on by default: a path is never valid before its files are on disk; Nix does not flush).  It is
timed both ways: the default, and with ``fsync-store-paths = false`` like Nix.
Prints each time, the ratio pure/nix of the best rounds, and the ratio within each round (the
two tools ran back to back there, in the same state of the machine) with its median.

    .venv/bin/python benchmarks/copy_cache.py [--rounds N] [--tree DIR] [--content mixed|random] [--small N]
                                              [--rtt MS] [--fs ext4|host]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from _scratchfs import available as scratch_unavailable, scratch_ext4  # noqa: E402
from _tree import CONTENTS, default_tree, make_tree  # noqa: E402
from _latency import LatencyProxy  # noqa: E402

PURE = [sys.executable, "-m", "purestore.cli.main"]
# Without PYTHONDONTWRITEBYTECODE: the untimed setup leaves compiled bytecode, as an installed
# pure has (otherwise every timed run recompiles the modules edited since the last compile).
PURE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith("PURE_") and k != "PYTHONDONTWRITEBYTECODE"}
PURE_ENV.update(PURE_CONFIG="/dev/null", PYTHONPATH=str(REPO))


def nix_env(cache_home: Path) -> dict:
    return dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command",
                XDG_CACHE_HOME=str(cache_home))


def wipe(path: Path) -> None:
    if path.exists() or path.is_symlink():
        subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def start_nginx(prefix: Path, root: Path):
    """nginx serving ``root`` on a free port of 127.0.0.1: (process, URL), or None without nginx."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if exe is None:
        return None
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prefix.mkdir()
    temps = "\n".join(f"    {k}_temp_path {prefix}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(f"""daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temps}
    types {{ text/x-nix-narinfo narinfo; }}
    default_type application/octet-stream;
    server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
""")
    proc = subprocess.Popen([exe, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}/"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    print("nginx did not start: the nginx-served part is skipped")
    return None


def busy_seconds() -> float:
    """CPU time used on the whole machine so far (user, nice, system, irq, softirq).

    Not the command's rusage: pure's worker processes are children of its forkserver, which
    outlives the command briefly and is not waited for, so their time would not be counted."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:8]
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields)
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run(cmd, env, what) -> float:
    """Wall time of the command; the machine's CPU time meanwhile is appended to CPU[what]."""
    c0 = busy_seconds()
    t0 = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    CPU.setdefault(what, []).append(busy_seconds() - c0)
    if p.returncode != 0:
        sys.exit(f"{what} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return dt


CPU: dict[str, list[float]] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tree", help="use (or create) the tree here instead of the cached default")
    ap.add_argument("--small", type=int, default=200, help="number of small paths for the HTTP part")
    ap.add_argument("--content", choices=CONTENTS, default="mixed",
                    help="what the files of the default tree hold (benchmarks/_tree.py): bytes that compress "
                         "like software (default) or random bytes, which nothing compresses")
    ap.add_argument("--rtt", type=float, default=10,
                    help="round-trip time in ms added by a proxy (benchmarks/_latency.py) in front of nginx "
                         "for a third run of the small paths (0: none)")
    ap.add_argument("--fs", choices=("ext4", "host"), default=None,
                    help="where to work: a fresh ext4 (default when root) or /var/tmp")
    args = ap.parse_args()
    tree = Path(make_tree(args.tree, content=args.content) if args.tree else default_tree(args.content))
    why_not = scratch_unavailable()
    if args.fs == "ext4" and why_not:
        sys.exit(f"cannot make a scratch ext4: {why_not}")
    if args.fs == "host" or why_not:
        print(f"working in /var/tmp{f' (no scratch ext4: {why_not})' if why_not and args.fs != 'host' else ''}")
        bench(args, tree, "/var/tmp")
    else:
        # each round keeps ~3 GB (caches and stores of both tools): size the file system for all
        with scratch_ext4(size_gb=4 + 4 * args.rounds) as mnt:
            print(f"working on a fresh ext4 mounted at {mnt}")
            bench(args, tree, mnt)


def bench(args, tree: Path, where: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-copy-cache-", dir=where))
    noflush = work / "noflush.conf"
    noflush.write_text("fsync-store-paths = false\n")
    key = REPO / "tests/data/cache/test-key-1.sec"
    pub = (REPO / "tests/data/cache/test-key-1.pub").read_text().strip()
    try:
        # -- setup ---------------------------------------------------------------------------
        pkgs = sorted(p for p in tree.iterdir() if p.is_dir())
        size = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and not f.is_symlink())
        nfiles = sum(1 for _ in tree.rglob("*"))
        src_pure, src_nix = work / "src-pure", work / "src-nix"
        out = subprocess.run(PURE + ["--store", src_pure, "--store-dir", "/nix/store", "store", "add",
                                     *pkgs], env=PURE_ENV, capture_output=True, text=True, check=True)
        paths = out.stdout.split()
        nout = subprocess.run(["nix-store", "--store", src_nix, "--add", *pkgs], env=nix_env(work / "xdg"),
                              capture_output=True, text=True, check=True)
        assert nout.stdout.split() == paths, "pure and Nix disagree on the store paths"
        print(f"closure: {len(paths)} paths, {nfiles} entries, {size / 2**20:.0f} MiB of files ({args.content} content)")

        small_pure = work / "small-pure"
        sdir = work / "small-src"
        sdir.mkdir()
        for i in range(args.small):
            (sdir / f"small-{i:03d}").write_text(f"small path {i}\n" * 20)
        small_files = sorted(sdir.iterdir())
        small_paths = subprocess.run(PURE + ["--store", small_pure, "--store-dir", "/nix/store", "store", "add",
                                             *small_files], env=PURE_ENV, capture_output=True, text=True,
                                     check=True).stdout.split()
        small_nix = work / "small-nix"
        nsmall = subprocess.run(["nix-store", "--store", small_nix, "--add", *small_files],
                                env=nix_env(work / "xdg"), capture_output=True, text=True, check=True)
        assert nsmall.stdout.split() == small_paths, "pure and Nix disagree on the small store paths"
        small_cache = work / "small-cache"
        subprocess.run(PURE + ["--store", small_pure, "--store-dir", "/nix/store", "copy", "--to",
                               f"file://{small_cache}?compression=zstd&secret-key={key}", *small_paths],
                       env=PURE_ENV, capture_output=True, check=True)

        subprocess.run(["tar", "cf", "/dev/null", str(src_pure), str(src_nix)], check=True)
        times: dict[str, list[float]] = {k: [] for k in
                                         ("push-pure", "push-nix", "subst-pure", "subst-nix", "subst0-pure",
                                          "spush-pure", "spush-nix",
                                          "http-pure", "http-nix", "nginx-pure", "nginx-nix",
                                          "lat-pure", "lat-nix", "hbig-pure", "hbig-nix")}
        nginx = start_nginx(work / "nginx", work)  # serves every cache of the run by its directory
        proxy = None
        if nginx is None:
            for k in ("nginx", "lat", "hbig"):
                del times[f"{k}-pure"], times[f"{k}-nix"]
        elif args.rtt > 0:
            host, port = nginx[1].split("//")[1].rstrip("/").split(":")
            proxy = LatencyProxy((host, int(port)), args.rtt / 2000)
            proxy_url = f"http://127.0.0.1:{proxy.port}/"
        else:
            del times["lat-pure"], times["lat-nix"]
        server = subprocess.Popen(PURE + ["cache", "serve", str(small_cache), "--listen", "127.0.0.1:0"],
                                  env=PURE_ENV, stderr=subprocess.PIPE, text=True)
        line = server.stderr.readline()
        m = re.search(r"on (http://\S+)", line)
        if not m:
            sys.exit(f"cache server did not start: {line}")
        url = m.group(1) + "/"
        try:
            for rnd in range(args.rounds):
                # who goes first alternates: the first command of a round meets the memory state
                # the previous round left, which this machine makes slower (see the docstring)
                for who in ("pure", "nix") if rnd % 2 == 0 else ("nix", "pure"):
                    cache = work / f"cache-{who}-{rnd}"
                    dst = work / f"dst-{who}-{rnd}"
                    hdst = work / f"hdst-{who}-{rnd}"
                    xdg = work / f"xdg-{who}-{rnd}"
                    subprocess.run(["sync"], check=True)
                    curl = f"file://{cache}?compression=zstd&secret-key={key}"
                    if who == "pure":
                        push = PURE + ["--store", src_pure, "--store-dir", "/nix/store", "copy", "--to", curl, *paths]
                        pull = PURE + ["--store", dst, "--store-dir", "/nix/store", "copy", "--from",
                                       f"file://{cache}", "--trusted-public-keys", pub, *paths]
                        env = PURE_ENV
                    else:
                        push = ["nix", "copy", "--store", src_nix, "--to", curl, *paths]
                        pull = ["nix", "copy", "--store", dst, "--from", f"file://{cache}",
                                "--option", "trusted-public-keys", pub, *paths]
                        env = nix_env(xdg)
                    times[f"push-{who}"].append(run(push, env, f"push-{who}"))
                    subprocess.run(["sync"], check=True)
                    times[f"subst-{who}"].append(run(pull, env, f"subst-{who}"))
                    subprocess.run(["sync"], check=True)
                    if who == "pure":  # again, without the flush before registering
                        pull[pull.index(dst)] = work / f"dst0-{who}-{rnd}"
                        times["subst0-pure"].append(run(pull, dict(env, PURE_CONFIG=str(noflush)), "subst0-pure"))
                        subprocess.run(["sync"], check=True)
                    if who == "pure":
                        hpull = PURE + ["--store", hdst, "--store-dir", "/nix/store", "copy", "--from", url,
                                        "--trusted-public-keys", pub, *small_paths]
                    else:
                        hpull = ["nix", "copy", "--store", hdst, "--from", url,
                                 "--option", "trusted-public-keys", pub, *small_paths]
                    times[f"http-{who}"].append(run(hpull, env, f"http-{who}"))
                    scurl = f"file://{work / f'scache-{who}-{rnd}'}?compression=zstd&secret-key={key}"
                    if who == "pure":  # the small paths pushed to a file:// cache of their own
                        spush = PURE + ["--store", small_pure, "--store-dir", "/nix/store", "copy", "--to",
                                        scurl, *small_paths]
                    else:
                        spush = ["nix", "copy", "--store", small_nix, "--to", scurl, *small_paths]
                    times[f"spush-{who}"].append(run(spush, env, f"spush-{who}"))
                    subprocess.run(["sync"], check=True)
                    if nginx is not None:
                        hpull[hpull.index(url)] = nginx[1] + "small-cache/"
                        hpull[hpull.index(hdst)] = work / f"ndst-{who}-{rnd}"
                        times[f"nginx-{who}"].append(run(hpull, env, f"nginx-{who}"))
                        subprocess.run(["sync"], check=True)
                        if proxy is not None:  # the same again, a round trip away
                            hpull[hpull.index(nginx[1] + "small-cache/")] = proxy_url + "small-cache/"
                            hpull[hpull.index(work / f"ndst-{who}-{rnd}")] = work / f"ldst-{who}-{rnd}"
                            times[f"lat-{who}"].append(run(hpull, env, f"lat-{who}"))
                            subprocess.run(["sync"], check=True)
                        # the big closure over HTTP, from the cache this round's push wrote
                        bpull = list(pull)
                        bpull[bpull.index(f"file://{cache}")] = f"{nginx[1]}{cache.name}/"
                        bpull[bpull.index("--store") + 1] = work / f"bdst-{who}-{rnd}"
                        times[f"hbig-{who}"].append(run(bpull, env, f"hbig-{who}"))
                print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
        finally:
            server.terminate()
            server.wait()
            if proxy is not None:
                proxy.close()
            if nginx is not None:
                nginx[0].terminate()
                nginx[0].wait()
        print()
        for what, label in (("push", "push to file:// zstd"), ("subst", "substitute from file://"),
                            ("subst0", "  the same, pure without flush"),
                            ("http", f"{args.small} small paths over HTTP"),
                            ("nginx", "  the same served by nginx"),
                            ("lat", f"  the same, {args.rtt:g} ms away"),
                            ("hbig", "the big closure from nginx"),
                            ("spush", f"push {args.small} small paths, file://")):
            if f"{what}-pure" not in times:
                continue
            nwhat = "subst" if what == "subst0" else what
            p, n = min(times[f"{what}-pure"]), min(times[f"{nwhat}-nix"])
            pc, nc = min(CPU[f"{what}-pure"]), min(CPU[f"{nwhat}-nix"])
            rounds = [a / b for a, b in zip(times[f"{what}-pure"], times[f"{nwhat}-nix"])]
            print(f"{label:32s} wall: pure {p:6.2f} s  nix {n:6.2f} s  ratio {p / n:.2f}   "
                  f"cpu: pure {pc:5.2f} s  nix {nc:5.2f} s  ratio {pc / nc:.2f}   "
                  f"each round: {' '.join(f'{r:.2f}' for r in rounds)} (median {statistics.median(rounds):.2f})")
        print(f"(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    finally:
        wipe(work)


if __name__ == "__main__":
    main()
