"""Builtin fetchers that obtain artifacts through package-registry clients (pip, apt).

This machine reaches the outside only through package registries and only through their
ordinary clients, so the bootstrap seeds (busybox, the zig compiler) and the upstream source
tarballs are fetched with ``pip download`` and ``apt-get download`` / ``apt-get source``.
Both builders run outside the sandbox, in the fetch phase of a fixed-output derivation, and are
registered in :data:`purestore.build.builtins.BUILTIN_BUILDERS`:

``builtin:fetch-pip``
    env ``package``, ``version``, optional ``file`` (the exact file name pip must fetch),
    ``sha256`` (hex of that file), ``unpack`` (``1``: extract the wheel into ``out`` as a
    directory, executable bits taken from the zip's unix mode; else ``out`` is the file).
``builtin:fetch-apt``
    env ``package``, ``version``, ``kind`` (``binary``: ``apt-get download`` of a ``.deb``;
    ``source``: ``apt-get source --download-only`` of a Debian source package), ``file`` (the
    source package's file to keep, e.g. ``hello_2.10.orig.tar.gz``) or ``member`` (the path
    inside the ``.deb`` to keep, e.g. ``bin/busybox``), ``sha256`` (hex of the kept file),
    ``executable`` (``1``: the kept file is made executable), ``keepPath`` (``1``: ``out`` is a
    directory holding the member at its path inside the package, e.g. ``out/bin/busybox``;
    busybox picks its applet from its own name, so it must be called ``busybox``).

The check that matters is the fixed output hash, done by the builder after these return; each
fetcher also checks ``sha256`` of the artifact it picked, so a wrong download is named early
and never unpacked.  With ``PURE_SEED_CACHE`` set to a directory, artifacts are kept there by
sha256 (``<dir>/sha256-<hex>``) and reused when their hash still matches: a cache, never a
source of truth.

Source packages need ``deb-src`` entries.  Instead of editing ``/etc``, the fetcher writes a
private apt configuration (sources, lists, cache) under a state directory
(``$PURE_APT_DIR``, default ``$XDG_CACHE_HOME/purestore/apt`` or ``~/.cache/purestore/apt``)
whose ``deb-src`` stanzas mirror the Debian archive ``deb`` entries already configured on the
host, and runs ``apt-get update`` on that private configuration once.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from ..errors import BuildError, HashMismatch

Log = Callable[[str], None]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_~:-]*$")


class FetchError(BuildError):
    """Raised when a registry client fails or does not deliver the artifact asked for."""


# ---------------------------------------------------------------------------------------------
# helpers


def _env(drv, key: str, required: bool = True) -> str:
    v = drv.env.get(key, "")
    if required and not v:
        raise FetchError(f"derivation {drv.env.get('name', '?')!r}: attribute {key!r} is required "
                         f"by builder {drv.builder!r}, got nothing")
    return v


def _check_token(drv, key: str, value: str) -> str:
    if not _SAFE_NAME.match(value):
        raise FetchError(f"derivation {drv.env.get('name', '?')!r}: attribute {key!r} must be a "
                         f"package name or version, got {value!r}")
    return value


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, expected: str, what: str) -> None:
    if not expected:
        return
    got = sha256_file(path)
    if got != expected.lower():
        raise HashMismatch(f"{what}: sha256 mismatch: expected {expected.lower()}, got {got}")


def _run(cmd: list[str], log: Log, cwd: str | None = None, env: dict | None = None) -> None:
    log("$ " + " ".join(cmd))
    try:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace")
    except FileNotFoundError as e:
        raise FetchError(f"cannot run {cmd[0]!r}: not installed (needed to fetch seeds)") from e
    tail: list[str] = []
    assert p.stdout is not None
    for line in p.stdout:
        line = line.rstrip("\n")
        log(line)
        tail = (tail + [line])[-5:]
    rc = p.wait()
    if rc != 0:
        raise FetchError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} exited with status {rc}: "
                         + " | ".join(tail))


def _cache_dir() -> Path | None:
    d = os.environ.get("PURE_SEED_CACHE")
    return Path(d) if d else None


def _cache_get(sha: str, log: Log) -> Path | None:
    d = _cache_dir()
    if not d or not sha:
        return None
    p = d / f"sha256-{sha.lower()}"
    if p.is_file():
        if sha256_file(p) == sha.lower():
            log(f"using cached artifact {p}")
            return p
        log(f"ignoring corrupt cached artifact {p}")
    return None


def _cache_put(path: Path, sha: str) -> None:
    d = _cache_dir()
    if not d or not sha:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".tmp-{os.getpid()}-{sha[:8]}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, d / f"sha256-{sha.lower()}")
    except OSError:
        pass  # a cache that cannot be written is no error


def _emit_file(src: Path, out: str, executable: bool, rel: str | None = None) -> None:
    if rel:
        os.mkdir(out)
        dest = Path(out) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = str(dest)
    shutil.copyfile(src, out)
    os.chmod(out, 0o555 if executable else 0o444)


def unpack_wheel(wheel: Path, out: str) -> None:
    """Extract a wheel (zip) into directory ``out``: regular files only, no escapes.

    Modes are normalised: 0555 where the zip's unix mode has the owner x bit, else 0444
    (written as 0755/0644 so the tree stays removable; the store canonicalises afterwards).
    Raises :class:`FetchError` for a member that would escape or is not a regular file, and for
    a wheel that is not a valid zip (truncated, corrupted data, a member both file and directory)."""
    root = Path(out)
    root.mkdir()
    name = None
    try:
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                name = info.filename
                _unpack_member(z, info, wheel, root)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError) as e:
        where = f" at member {name!r}" if name is not None else ""
        raise FetchError(f"wheel {wheel.name!r} is not a valid zip archive{where}: {e}") from e
    except OSError as e:
        raise FetchError(f"wheel {wheel.name!r}: cannot unpack member {name!r}: {e.strerror or e}") from e


def _unpack_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, wheel: Path, root: Path) -> None:
    name = info.filename
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise FetchError(f"wheel {wheel.name!r}: refusing member {name!r} (escapes the target)")
    mode = info.external_attr >> 16
    if info.is_dir():
        (root / name).mkdir(parents=True, exist_ok=True)
        return
    if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        raise FetchError(f"wheel {wheel.name!r}: member {name!r} is not a regular file "
                         f"(mode {oct(mode)})")
    dest = root / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with z.open(info) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.chmod(dest, 0o755 if mode & 0o100 else 0o644)


# ---------------------------------------------------------------------------------------------
# pip


def fetch_pip(drv, out: str, log: Log) -> None:
    """``builtin:fetch-pip``: ``pip download --no-deps PACKAGE==VERSION``, verify, emit."""
    package = _check_token(drv, "package", _env(drv, "package"))
    version = _check_token(drv, "version", _env(drv, "version"))
    want_file = _env(drv, "file", required=False)
    sha = _env(drv, "sha256", required=False)
    unpack = _env(drv, "unpack", required=False) == "1"
    with tempfile.TemporaryDirectory(prefix="pure-fetch-pip-") as tmp:
        art = _cache_get(sha, log)
        if art is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
                   "--disable-pip-version-check", "--progress-bar", "off", "-d", tmp,
                   f"{package}=={version}"]
            _run(cmd, log)
            files = sorted(os.listdir(tmp))
            if want_file:
                if want_file not in files:
                    raise FetchError(f"pip download {package}=={version}: expected file "
                                     f"{want_file!r}, got {files}")
                art = Path(tmp) / want_file
            elif len(files) == 1:
                art = Path(tmp) / files[0]
            else:
                raise FetchError(f"pip download {package}=={version}: expected one file, got {files}")
            _verify(art, sha, f"pip artifact {art.name!r}")
            _cache_put(art, sha)
        log(f"fetched {package}=={version} ({art.stat().st_size} bytes)")
        if unpack:
            log(f"unpacking into {out}")
            unpack_wheel(art, out)
        else:
            _emit_file(art, out, _env(drv, "executable", required=False) == "1")


# ---------------------------------------------------------------------------------------------
# apt


def apt_state_dir() -> Path:
    d = os.environ.get("PURE_APT_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "purestore" / "apt"


def deb_src_stanzas(etc: Path = Path("/etc/apt")) -> str:
    """deb822 ``deb-src`` stanzas mirroring the host's Debian-archive ``deb`` entries.

    A stanza counts as the Debian archive when it is signed by ``debian-archive-keyring`` or
    its URI path ends in ``/debian`` or ``/debian-security``.  Both deb822 ``*.sources`` files
    and one-line ``sources.list`` entries are read."""
    out: list[str] = []

    def is_debian(text: str) -> bool:
        return ("debian-archive-keyring" in text
                or re.search(r"://[^\s/]+(/[^\s]*)?/debian(-security)?/?(\s|$)", text) is not None)

    files = sorted((etc / "sources.list.d").glob("*.sources")) if (etc / "sources.list.d").is_dir() else []
    for f in files:
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            if re.search(r"^Types:.*\bdeb\b", stanza, re.M) and is_debian(stanza) \
                    and not re.search(r"^Enabled:\s*no", stanza, re.M | re.I):
                out.append(re.sub(r"^Types:.*$", "Types: deb-src", stanza.strip(), flags=re.M))
    lists = [etc / "sources.list"]
    if (etc / "sources.list.d").is_dir():
        lists += sorted((etc / "sources.list.d").glob("*.list"))
    for f in lists:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("deb ") and is_debian(line):
                out.append("deb-src " + line[4:])
    return "\n\n".join(out)


def _apt_user_opts() -> list[str]:
    # As root, apt drops to its '_apt' user to download, which cannot write to our private
    # temp dirs; stay root for these downloads (the hash check is what we trust anyway).
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else ["-o", "Debug::NoLocking=1"]


def _apt_private(log: Log) -> list[str]:
    """Options for apt-get that use a private source list with deb-src entries (updated once)."""
    state = apt_state_dir()
    stanzas = deb_src_stanzas()
    if not stanzas:
        raise FetchError("cannot fetch Debian source packages: no Debian archive entry found in "
                         "/etc/apt/sources.list or /etc/apt/sources.list.d",
                         hint="configure apt with the Debian archive first")
    one_line = not stanzas.lstrip().startswith("Types:")
    parts = state / "sources"
    for d in (parts, state / "lists" / "partial", state / "cache" / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    src_file = parts / ("pure-deb-src.list" if one_line else "pure-deb-src.sources")
    opts = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={parts}",
            "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
            *_apt_user_opts()]
    stamp = state / "updated-for"
    if not src_file.is_file() or src_file.read_text() != stanzas + "\n" \
            or not stamp.is_file() or stamp.read_text() != stanzas + "\n":
        src_file.write_text(stanzas + "\n")
        _run(["apt-get", "-q", *opts, "update"], log)
        stamp.write_text(stanzas + "\n")
    return opts


def fetch_apt(drv, out: str, log: Log) -> None:
    """``builtin:fetch-apt``: a Debian binary package's member, or a source package's file."""
    package = _check_token(drv, "package", _env(drv, "package"))
    version = _check_token(drv, "version", _env(drv, "version"))
    kind = _env(drv, "kind", required=False) or "binary"
    sha = _env(drv, "sha256", required=False)
    executable = _env(drv, "executable", required=False) == "1"
    keep = _env(drv, "member", required=False).strip("/") \
        if _env(drv, "keepPath", required=False) == "1" else None
    if kind not in ("binary", "source"):
        raise FetchError(f"derivation {drv.env.get('name', '?')!r}: attribute 'kind' must be "
                         f"'binary' or 'source', got {kind!r}")
    art = _cache_get(sha, log)
    if art is not None:
        _emit_file(art, out, executable, keep)
        return
    with tempfile.TemporaryDirectory(prefix="pure-fetch-apt-") as tmp:
        os.chmod(tmp, 0o755)  # apt's download sandbox user must be able to write here
        if kind == "source":
            want = _env(drv, "file")
            opts = _apt_private(log)
            _run(["apt-get", "-q", *opts, "source", "--download-only", f"{package}={version}"],
                 log, cwd=tmp)
            art = Path(tmp) / want
            if not art.is_file():
                raise FetchError(f"apt-get source {package}={version}: expected file {want!r}, "
                                 f"got {sorted(os.listdir(tmp))}")
        else:
            member = _env(drv, "member").strip("/")
            if ".." in member.split("/"):
                raise FetchError(f"attribute 'member' must stay inside the package, got {member!r}")
            _run(["apt-get", "-q", *_apt_user_opts(), "download", f"{package}={version}"], log, cwd=tmp)
            debs = sorted(p for p in os.listdir(tmp) if p.endswith(".deb"))
            if len(debs) != 1:
                raise FetchError(f"apt-get download {package}={version}: expected one .deb, got {debs}")
            x = Path(tmp) / "x"
            _run(["dpkg-deb", "-x", str(Path(tmp) / debs[0]), str(x)], log)
            art = x / member
            if not art.is_file() or art.is_symlink():
                raise FetchError(f"package {package}={version} has no regular file {member!r}")
        _verify(art, sha, f"{kind} package {package}={version}: {art.name!r}")
        _cache_put(art, sha)
        log(f"fetched {package}={version}: {art.name} ({art.stat().st_size} bytes)")
        _emit_file(art, out, executable, keep)


BUILTINS = {"builtin:fetch-pip": fetch_pip, "builtin:fetch-apt": fetch_apt}
