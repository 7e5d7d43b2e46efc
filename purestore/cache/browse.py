"""Looking inside a path held by a binary cache without installing it: ``pure cache ls`` and
``pure cache cat`` (Nix's ``nix store ls --store URL`` and ``nix store cat --store URL``).

The narinfo is read in the cache's own store dir and, unless told not to, must be signed by a
trusted key, as for substitution.  ``cat`` then reads the whole NAR and checks it against the
narinfo (FileSize, FileHash, NarSize, NarHash) *before* it prints a byte: a file from a tampered
NAR is never shown.  ``ls`` uses the cache's ``<hash>.ls`` listing when there is one (as Nix
does; a listing is not covered by any signature, so it is only as good as the cache), and
otherwise reads and checks the NAR the same way.  Symlinks are shown, never followed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import BinaryIO, Iterable

import attrs
import trio

from ..errors import CacheError, FormatError, SignatureError
from ..formats import nar as _nar
from ..formats.narinfo import NarInfo
from ..formats.signing import parse_public_keys, verify_any
from ..formats.store_path import StorePath
from ._files import open_regular
from .backend import FileBackend, backend_for, check_name
from .info import read_cache_info
from .nar_jobs import VerifyingReader
from .query import _narinfo

SPOOL = 16 << 20  # bytes of a file for `cat` kept in memory before spilling to a temporary file


@attrs.define
class Node:
    """One entry of a NAR: ``type`` is ``directory``, ``regular`` or ``symlink``."""

    type: str
    size: int = 0
    executable: bool = False
    target: str = ""
    nar_offset: int | None = None
    entries: dict[str, "Node"] | None = None

    def to_json(self, recursive: bool, depth: int = 0) -> dict:
        """The object ``nix store ls --json`` prints (a directory below the first level only as
        ``{}`` unless ``recursive``)."""
        if self.type == "directory":
            out: dict = {"type": "directory"}
            if recursive or depth == 0:
                out["entries"] = {n: e.to_json(recursive, depth + 1) for n, e in (self.entries or {}).items()}
            return out if (recursive or depth == 0) else {}
        if depth > 0 and not recursive:
            return {}
        if self.type == "symlink":
            return {"type": "symlink", "target": self.target}
        out = {"type": "regular", "size": self.size}
        if self.executable:
            out["executable"] = True
        if self.nar_offset is not None:
            out["narOffset"] = self.nar_offset
        return out


@attrs.frozen
class Located:
    """A path in a cache: its narinfo, the part inside it (``()`` for the whole path) and where
    it was read (for messages)."""

    info: NarInfo
    sub: tuple[str, ...]
    store_dir: str
    where: str

    @property
    def absolute(self) -> str:
        return "/".join((self.info.store_path.absolute(self.store_dir), *self.sub))


def _split(text: str, store_dir: str, url: str) -> tuple[StorePath, tuple[str, ...]]:
    from ..errors import InvalidStorePath
    text = os.path.normpath(text) if text.startswith("/") else text
    try:
        path, rest = StorePath.parse_prefix(text, store_dir)
    except InvalidStorePath as e:
        raise CacheError(f"{text!r} is not a path in binary cache {url!r} (store dir {store_dir!r}): {e}") from None
    return path, tuple(p for p in rest.split("/") if p)


async def locate(settings, url: str, text: str, *, trusted_keys: Iterable[str] | None = None,
                 check_sigs: bool = True):
    """Open the cache, read the narinfo of the store path ``text`` names (``/store/dir/base/sub``)
    and check its signature; returns (backend, :class:`Located`).  The caller closes the
    backend."""
    backend = backend_for(url, settings)
    url = backend.url  # (what is said of it: a login's password as ***)
    try:
        info = await read_cache_info(backend, url, default_store_dir=settings.store_dir)
        sd = info.store_dir
        path, sub = _split(text, sd, url)
        ni = await _narinfo(backend, url, sd, path, None)
        if check_sigs:
            keys = parse_public_keys(list(settings.trusted_public_keys) if trusted_keys is None else trusted_keys)
            if not keys:
                raise CacheError("no trusted public keys to check the narinfo's signature with",
                                 hint="give --trusted-public-keys KEYS (or set trusted-public-keys), or "
                                      "--no-check-sigs to look without checking")
            try:
                verify_any(ni.fingerprint(sd), ni.sigs, keys)
            except SignatureError as e:
                raise CacheError(f"narinfo of {path.absolute(sd)!r} in {url!r} is not trusted: {e}",
                                 hint="--no-check-sigs looks anyway (the NAR is still checked "
                                      "against the narinfo)") from None
        where = f"{url.split('?')[0].rstrip('/')}/{ni.url}"
        return backend, Located(ni, sub, sd, where)
    except BaseException:
        await backend.aclose()
        raise


async def _nar_file(backend, loc: Located, stack) -> str:
    """A local file holding the compressed NAR (the cache's own for ``file://``)."""
    try:
        check_name(loc.info.url, loc.where)
    except CacheError:
        raise CacheError(f"narinfo of {loc.info.store_path.absolute(loc.store_dir)!r} has URL "
                         f"{loc.info.url!r}, which points outside the cache") from None
    if isinstance(backend, FileBackend):
        p = backend.local_path(loc.info.url)
        if not os.path.isfile(p):
            raise CacheError(f"{loc.where} is missing from the cache")
        return p
    fd, tmp = tempfile.mkstemp(prefix="pure-nar-")
    stack.callback(os.unlink, tmp)
    with os.fdopen(fd, "wb") as f:
        async with backend.open_read(loc.info.url) as chunks:
            async for c in chunks:
                await trio.to_thread.run_sync(f.write, c)
    return tmp


def _read_nar(nar_file: str, loc: Located, want: tuple[str, ...] | None, spool):
    """Parse and check the NAR; returns the tree.  With ``want``, the chunks of that regular
    file go to ``spool``."""
    with open_regular(nar_file) as f:
        reader = VerifyingReader(lambda: f.read(1 << 20), loc.info, loc.where, None)
        root = None
        dirs: dict[tuple, Node] = {}
        try:
            for ev in _nar.parse_nar(reader):
                # names that are not UTF-8 keep their bytes through surrogateescape (as a path
                # given on the command line has them: ``cache cat`` finds such a file)
                name_path = tuple(p.decode("utf-8", "surrogateescape") for p in ev.path)
                if isinstance(ev, _nar.NarDirectory):
                    node = Node("directory", entries={})
                    dirs[ev.path] = node
                elif isinstance(ev, _nar.NarSymlink):
                    node = Node("symlink", target=ev.target.decode("utf-8", "surrogateescape"))
                else:
                    node = Node("regular", size=ev.size, executable=ev.executable, nar_offset=ev.offset)
                    copy = want is not None and name_path == want
                    for c in ev.chunks:
                        if copy:
                            spool.write(c)
                if not ev.path:
                    root = node
                else:
                    dirs[ev.path[:-1]].entries[name_path[-1]] = node
            while reader.read():
                pass
        except FormatError as e:
            raise CacheError(f"NAR {loc.where} is malformed: {e}") from None
        reader.verify()
    return root


def _count(v) -> bool:
    """A byte count or position: an int (not a bool) of 0 or more."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _from_listing(data: bytes, where: str) -> Node:
    def node(obj, at: str, depth: int) -> Node:
        if not isinstance(obj, dict):
            raise ValueError(f"{at}: expected an object")
        t = obj.get("type")
        if t == "directory":
            if depth >= _nar.MAX_DEPTH:  # (as the NAR reader counts: the root directory is depth 0)
                raise ValueError(f"{at}: nested more than {_nar.MAX_DEPTH} directories deep, as no NAR can be")
            entries = obj.get("entries", {})
            if not isinstance(entries, dict):
                raise ValueError(f"{at}: entries must be an object")
            for n in entries:  # a NAR's names: what a file system can hold in one directory
                if n in ("", ".", "..") or "/" in n or "\0" in n:
                    raise ValueError(f"{at}: {n!r} is not a name a NAR can hold")
            return Node("directory", entries={n: node(e, f"{at}/{n}", depth + 1) for n, e in sorted(entries.items())})
        if t == "symlink":
            target = obj.get("target")
            if not isinstance(target, str) or "\0" in target:
                raise ValueError(f"{at}: a symlink's target must be a string, got {target!r}")
            return Node("symlink", target=target)
        if t == "regular":
            size, off, exe = obj.get("size", 0), obj.get("narOffset"), obj.get("executable", False)
            if not _count(size) or (off is not None and not _count(off)):
                raise ValueError(f"{at}: size and narOffset must be whole numbers of bytes, got {size!r} and {off!r}")
            if not isinstance(exe, bool):
                raise ValueError(f"{at}: executable must be true or false, got {exe!r}")
            return Node("regular", size=size, executable=exe, nar_offset=off)
        raise ValueError(f"{at}: unknown type {t!r}")
    try:
        doc = json.loads(data.decode("utf-8", "surrogateescape"))  # Nix writes such names' bytes as they are
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ValueError("not a version 1 listing")
        return node(doc.get("root"), ".", 0)
    except RecursionError:  # (JSON nested deeper than Python's decoder goes: no NAR's listing)
        raise CacheError(f"listing {where} is malformed: nested more than {_nar.MAX_DEPTH} directories deep, "
                         "as no NAR can be") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"listing {where} is malformed: {e}",
                         hint="--no-listing reads the path's NAR instead (checked against its signed narinfo)"
                         ) from None


def find(root: Node, loc: Located) -> Node:
    """The node of ``loc.sub`` (symlinks are not followed, as in Nix's NAR accessor)."""
    node = root
    for i, part in enumerate(loc.sub):
        if node.type != "directory" or part not in (node.entries or {}):
            raise CacheError(f"path {loc.absolute!r} does not exist"
                             + (f" ({'/'.join(loc.sub[:i])} is a symlink)" if node.type == "symlink" and i else ""))
        node = node.entries[part]  # type: ignore[index]
    return node


async def cache_tree(settings, url: str, text: str, *, trusted_keys=None, check_sigs: bool = True,
                     use_listing: bool = True) -> tuple[Located, Node]:
    """Where the store path ``text`` names is in the cache, and its tree (from the ``.ls``
    listing, or else from the checked NAR)."""
    backend, loc = await locate(settings, url, text, trusted_keys=trusted_keys, check_sigs=check_sigs)
    async with backend:
        if use_listing:
            data = await backend.get(f"{loc.info.store_path.hash_part}.ls")
            if data is not None:
                root = _from_listing(data, f"{url.split('?')[0].rstrip('/')}/{loc.info.store_path.hash_part}.ls")
                return loc, root
        with contextlib.ExitStack() as stack:
            nar = await _nar_file(backend, loc, stack)
            root = await trio.to_thread.run_sync(_read_nar, nar, loc, None, None)
    return loc, root


async def cache_cat(settings, url: str, text: str, out: BinaryIO, *, trusted_keys=None,
                    check_sigs: bool = True) -> Located:
    """Write the regular file ``text`` names to ``out``, only once its whole NAR was checked."""
    backend, loc = await locate(settings, url, text, trusted_keys=trusted_keys, check_sigs=check_sigs)
    async with backend:
        with contextlib.ExitStack() as stack:
            nar = await _nar_file(backend, loc, stack)
            spool = stack.enter_context(tempfile.SpooledTemporaryFile(SPOOL))
            root = await trio.to_thread.run_sync(_read_nar, nar, loc, loc.sub, spool)
            node = find(root, loc)
            if node.type != "regular":
                raise CacheError(f"path {loc.absolute!r} is not a regular file"
                                 + (f" (a symlink to {node.target!r})" if node.type == "symlink" else ""))
            spool.seek(0)
            shutil.copyfileobj(spool, out)
    return loc


def ls_lines(node: Node, loc: Located, *, long: bool, recursive: bool, directory: bool) -> list[str]:
    """What ``nix store ls`` prints (Nix 2.8's format)."""
    lines: list[str] = []

    def show(n: Node, rel: str) -> None:
        if long:
            mode = {"regular": "-r-xr-xr-x" if n.executable else "-r--r--r--",
                    "symlink": "lrwxrwxrwx"}.get(n.type, "dr-xr-xr-x")
            line = f"{mode} {n.size if n.type == 'regular' else 0:20d} {rel}"
            if n.type == "symlink":
                line += f" -> {n.target}"
            lines.append(line)
        else:
            lines.append(rel)
        if recursive and n.type == "directory":
            list_dir(n, rel)

    def list_dir(n: Node, rel: str) -> None:
        # in byte order, as the NAR has them (names that are not UTF-8 are surrogate-escaped)
        for name, e in sorted((n.entries or {}).items(), key=lambda i: i[0].encode("utf-8", "surrogateescape")):
            show(e, f"{rel}/{name}")

    if node.type == "directory" and not directory:
        list_dir(node, ".")
    else:
        base = loc.sub[-1] if loc.sub else loc.info.store_path.base_name
        show(node, "." if node.type == "directory" else base)
    return lines
