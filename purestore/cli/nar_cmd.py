"""``pure nar dump|restore|ls``: write, unpack and inspect NAR archives."""

from __future__ import annotations

import sys

_DUMP_HELP = """\
Write the NAR serialisation of PATH (a file, directory or symlink, which is not followed) to
standard output, like `nix-store --dump` / `nix nar dump-path`.

example:
  pure nar dump ./src > src.nar
"""

_RESTORE_HELP = """\
Read a NAR from standard input and unpack it at DEST, which must not exist, like
`nix-store --restore`. The NAR is checked strictly (sorted unique names, no '.', '..', '/' or
NUL in names, padding, no trailing bytes...); nothing is ever written outside DEST. On error,
the partial tree is removed.

example:
  pure nar restore ./out < src.nar
"""

_LS_HELP = """\
List the contents of NARFILE at PATH (default '/'), like `nix nar ls`. With -R recurse into
directories; -l print type, permissions and size; --json print the listing as JSON
({"type": "directory", "entries": {...}}, regular files with size, executable and narOffset).

examples:
  pure nar ls -lR src.nar
  pure nar ls --json src.nar /bin/hello
"""


def register(reg) -> None:
    reg.group("nar", help="create, unpack and inspect NAR archives")
    p = reg.command("dump", "write the NAR of a path to standard output", cmd_dump, group="nar",
                    description=_DUMP_HELP)
    p.add_argument("path", metavar="PATH")
    p = reg.command("restore", "unpack a NAR from standard input at DEST", cmd_restore, group="nar",
                    description=_RESTORE_HELP)
    p.add_argument("dest", metavar="DEST")
    p = reg.command("ls", "list the contents of a NAR file", cmd_ls, group="nar",
                    description=_LS_HELP)
    p.add_argument("nar", metavar="NARFILE", help="the NAR file ('-' for standard input)")
    p.add_argument("path", metavar="PATH", nargs="?", default="/",
                   help="absolute path inside the NAR (default '/')")
    p.add_argument("-R", "--recursive", action="store_true", help="list directories recursively")
    p.add_argument("-l", "--long", action="store_true", help="show type, permissions and size")
    p.add_argument("-d", "--directory", action="store_true",
                   help="show a directory itself rather than its contents")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")


def cmd_dump(args, ctx) -> int:
    from ..store.fsnar import dump_path

    if sys.stdout.isatty():
        from ..errors import UsageError

        raise UsageError("refusing to write a NAR to a terminal; redirect standard output")
    out = sys.stdout.buffer
    dump_path(args.path, out)
    out.flush()
    return 0


class _Stdin:
    """Standard input as a NAR source: a read error (say, stdin is a directory) is an error
    that says so, not a traceback."""

    def __init__(self, hint: str):
        from ..errors import PurestoreError

        if sys.stdin is None:  # (`pure nar restore DEST <&-`)
            raise PurestoreError("cannot read the NAR from standard input: it is closed", hint=hint)
        self._f = sys.stdin.buffer
        self._hint = hint

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except OSError as e:
            from ..errors import PurestoreError

            raise PurestoreError(f"cannot read the NAR from standard input: {e.strerror or e}",
                                 hint=self._hint) from e

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass  # (standard input stays open)


def cmd_restore(args, ctx) -> int:
    from ..store.fstree import restore_nar

    restore_nar(_Stdin("give the NAR on stdin: pure nar restore DEST < FILE.nar"), args.dest)
    return 0


def cmd_ls(args, ctx) -> int:
    from ..errors import UsageError
    from ..formats import nar as N

    if not args.path.startswith("/"):
        raise UsageError(f"path in NAR {args.path!r} is not absolute, expected it to start with '/'")
    want = tuple(p.encode("utf-8", "surrogateescape") for p in args.path.split("/") if p)
    if any(p in (b".", b"..") for p in want):
        raise UsageError(f"path in NAR {args.path!r} must not contain '.' or '..'")
    try:
        f = _Stdin("give the NAR on stdin, or its file: pure nar ls FILE.nar") if args.nar == "-" else open(args.nar, "rb")
    except OSError as e:
        from ..errors import StoreError

        raise StoreError(f"cannot open NAR file {args.nar!r}: {e.strerror}") from e
    with f:
        # Build the tree under the wanted path only (one streaming pass).
        root = None
        k = len(want)
        for ev in N.parse_nar(f):
            path = ev.path
            if path[:k] != want:
                continue
            rel = path[k:]
            if isinstance(ev, N.NarDirectory):
                node = {"type": "directory", "entries": {}}
            elif isinstance(ev, N.NarSymlink):
                node = {"type": "symlink", "target": ev.target}
            else:
                node = {"type": "regular", "size": ev.size, "executable": ev.executable,
                        "narOffset": ev.offset}
            if not rel:
                root = node
            else:
                parent = root
                for name in rel[:-1]:
                    parent = parent["entries"][name]
                parent["entries"][rel[-1]] = node
    if root is None:
        from ..errors import NarError

        raise NarError(f"path {args.path!r} does not exist in NAR {args.nar!r}")

    if args.json:
        from ..formats import nix_json

        if args.directory:
            raise UsageError("'--directory' is useless with '--json'")

        text = nix_json.dumps(_json(root, args.recursive, top=not args.directory), separators=(",", ":")) + "\n"
        sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
        return 0
    lines: list[str] = []
    if root["type"] == "directory" and not args.directory:
        _list(root, ".", args.recursive, args.long, lines)
    else:
        # like Nix: a directory (with -d) shows as ".", a file or symlink as its base name, which
        # for the root of a NAR of one file or symlink is "" (`nix nar ls -l f.nar /` prints
        # '-r--r--r--   6 ', with no name)
        name = "." if root["type"] == "directory" else _dec(want[-1]) if want else ""
        lines.append(_line(root, name, args.long))
    out = "".join(line + "\n" for line in lines)
    sys.stdout.buffer.write(out.encode("utf-8", "surrogateescape"))
    return 0


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _line(node: dict, path: str, long: bool) -> str:
    if not long:
        return path
    t = node["type"]
    if t == "directory":
        return f"dr-xr-xr-x {0:20} {path}"
    if t == "symlink":
        return f"lrwxrwxrwx {0:20} {path} -> {_dec(node['target'])}"
    mode = "-r-xr-xr-x" if node["executable"] else "-r--r--r--"
    return f"{mode} {node['size']:20} {path}"


def _list(node: dict, prefix: str, recursive: bool, long: bool, lines: list) -> None:
    for name in sorted(node["entries"]):
        child = node["entries"][name]
        path = f"{prefix}/{_dec(name)}"
        lines.append(_line(child, path, long))
        if recursive and child["type"] == "directory":
            _list(child, path, recursive, long, lines)


def _json(node: dict, recursive: bool, top: bool) -> dict:
    t = node["type"]
    if t == "symlink":
        return {"type": "symlink", "target": _dec(node["target"])}
    if t == "regular":
        out = {"type": "regular", "size": node["size"]}
        if node["executable"]:
            out["executable"] = True
        out["narOffset"] = node["narOffset"]
        return out
    out = {"type": "directory"}
    if top or recursive:
        out["entries"] = {
            _dec(name): (_json(child, recursive, False) if recursive else {})
            for name, child in sorted(node["entries"].items())
        }
    return out
