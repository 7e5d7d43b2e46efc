"""``pure hash path|file|convert``: NAR hashes, flat file hashes, and hash encodings."""

from __future__ import annotations

import sys

_ENCODINGS = ("base16", "nix32", "base64", "sri")

_PATH_HELP = """\
Print the hash of the NAR serialisation of each PATH (file, directory or symlink, which is not
followed), like `nix hash path`. This is the NarHash of a store path holding PATH.

examples:
  pure hash path ./src                  sha256-... (SRI)
  pure hash path --base32 ./src         bare nix32, as in `sha256:<nix32>` fields
  pure hash path --type sha512 ./src
  pure hash path --json ./a ./b         [{"path": ..., "hash": ..., "narSize": ...}, ...]
"""

_FILE_HELP = """\
Print the hash of the contents of each FILE (a flat hash, as for `fetchurl`), like
`nix hash file`. Symlinks are followed.

examples:
  pure hash file hello-2.10.tar.gz            sha256-... (SRI): fetchurl(url=..., hash="sha256-...")
  pure hash file --base32 hello-2.10.tar.gz   bare nix32: fetchurl(url=..., sha256="...")
  pure hash file --type sha1 --base16 a b
"""

_CONVERT_HELP = """\
Convert hashes between encodings, like `nix hash to-base32` and friends. A HASH may be SRI
(`sha256-<base64>`), typed (`sha256:<base16|nix32|base64>`) or, with --type, bare.

examples:
  pure hash convert --to nix32 sha256-JRGNlWyqYCvmdfjv2fCyU2xj89Uca2AfCnwB7Q5MxkU=
  pure hash convert --type sha256 --to sri 00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq
"""


def _add_format(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sri", dest="encoding", action="store_const", const="sri",
                   help="print SRI, e.g. sha256-<base64> (the default)")
    g.add_argument("--base16", dest="encoding", action="store_const", const="base16",
                   help="print bare lowercase hex")
    g.add_argument("--base32", "--nix32", dest="encoding", action="store_const", const="nix32",
                   help="print bare Nix base32")
    g.add_argument("--base64", dest="encoding", action="store_const", const="base64",
                   help="print bare base64")
    p.set_defaults(encoding="sri")
    p.add_argument("--type", default="sha256", choices=("md5", "sha1", "sha256", "sha512"),
                   help="hash algorithm (default sha256)")


def register(reg) -> None:
    reg.group("hash", help="compute and convert hashes (NAR hashes, file hashes, encodings)")
    p = reg.command("path", "print the NAR hash of files, directories or symlinks", cmd_path,
                    group="hash", description=_PATH_HELP)
    p.add_argument("paths", nargs="+", metavar="PATH")
    _add_format(p)
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {path, hash, narSize} (hash in the chosen encoding)")

    p = reg.command("file", "print the hash of the contents of files", cmd_file, group="hash",
                    description=_FILE_HELP)
    p.add_argument("paths", nargs="+", metavar="FILE")
    _add_format(p)

    p = reg.command("convert", "convert hashes between base16, nix32, base64 and SRI", cmd_convert,
                    group="hash", description=_CONVERT_HELP)
    p.add_argument("hashes", nargs="+", metavar="HASH")
    p.add_argument("--from", dest="from_", choices=("base16", "nix32", "base32", "base64", "sri"),
                   help="require the input to be in this encoding")
    p.add_argument("--to", required=True, choices=("base16", "nix32", "base32", "base64", "sri"),
                   help="output encoding (base16, nix32 = base32, base64: bare digest; sri: algo-<base64>)")
    p.add_argument("--type", choices=("md5", "sha1", "sha256", "sha512"),
                   help="algorithm of bare hashes (required for them); checked against prefixed ones")


def cmd_path(args, ctx) -> int:
    from ..store.fsnar import hash_path

    results = []
    out = []
    for path in args.paths:
        h, size = hash_path(path, args.type)
        if args.json:
            results.append({"path": path, "hash": h.encode(args.encoding), "narSize": size})
        else:
            out.append(h.encode(args.encoding))
    if args.json:
        import json

        out.append(json.dumps(results))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def cmd_file(args, ctx) -> int:
    from ..store.fsnar import hash_file

    out = [hash_file(path, args.type).encode(args.encoding) for path in args.paths]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def cmd_convert(args, ctx) -> int:
    from ..errors import BadHash
    from ..formats.hash import Hash

    want = {"base32": "nix32"}.get(args.to, args.to)
    from_ = {"base32": "nix32"}.get(args.from_, args.from_)
    out = []
    for text in args.hashes:
        try:
            h = Hash.parse(text, args.type)
        except BadHash as e:
            bare = ":" not in text and "-" not in text
            if args.type is None and bare and e.hint is None:
                raise BadHash(str(e), hint="for a bare digest, name its algorithm with --type "
                              "(e.g. --type sha256)") from e
            raise
        if from_ is not None:
            got = _encoding_of(text, h)
            if got != from_:
                raise BadHash(f"hash {text!r} is in {got}, expected {from_} (--from)")
        out.append(h.encode(want))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _encoding_of(text: str, h) -> str:
    """Which encoding a hash string that parsed as ``h`` was written in."""
    if text.startswith(h.algo + "-"):
        return "sri"
    body = text.split(":", 1)[1] if ":" in text else text
    if len(body) == 2 * len(h.digest):
        return "base16"
    if body == h.nix32:
        return "nix32"
    return "base64"
