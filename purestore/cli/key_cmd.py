"""``pure key generate``, ``pure key public``, ``pure store sign``: the signing keys of binary
caches, and signatures on the paths of the local store.

Presentation only; the work is in :mod:`purestore.formats.signing` (keys are read by
:func:`purestore.cache.push.load_secret_key`).  See docs/caches.md.
"""

from __future__ import annotations

import os
import sys

from ._outfiles import file_name

_KEYGEN_HELP = """\
Generate an Ed25519 signing key pair in Nix's formats.

The secret key file holds NAME:BASE64(seed + public key) and is created with mode 0600; the
public key is NAME:BASE64(public key). Give the public key to every machine that should trust
the cache (trusted-public-keys in pure.conf); keep the secret key on the machine that pushes.
Without --secret-out the secret key is printed on stdout.
"""


def register(reg) -> None:
    reg.group("key", help="signing keys for binary caches")
    p = reg.command("generate", "generate a signing key pair", cmd_key_generate, group="key",
                    description=_KEYGEN_HELP)
    p.add_argument("--name", required=True, help="key name, e.g. cache.example.org-1")
    p.add_argument("--secret-out", metavar="FILE", type=file_name, help="write the secret key here (mode 0600)")
    p.add_argument("--public-out", metavar="FILE", type=file_name, help="write the public key here")
    p.add_argument("--force", action="store_true", help="overwrite existing files")

    reg.command("public", "print the public key of a secret key read from stdin", cmd_key_public,
                group="key", description="Read a secret key file on stdin; print its public key.")

    p = reg.command("sign", "sign valid paths with a secret key", cmd_store_sign, group="store",
                    description="Add signatures by the secret key in KEYFILE to the path infos of valid\n"
                                "paths (kept in the store database and copied into narinfos).")
    p.add_argument("--key-file", "-k", required=True, metavar="KEYFILE", action="append",
                   help="secret key file (may be repeated)")
    p.add_argument("-r", "--recursive", action="store_true", help="sign the closures of PATHs")
    p.add_argument("paths", nargs="+", metavar="PATH")


def _write_files(files: list[tuple[str, str, int]], force: bool) -> None:
    """Write each (path, text, mode) as a new file, all or none: every output is checked before
    anything is written, each is written to a temporary name next to it (created with its mode,
    so a secret key is never readable by others, even for a moment or over an existing file)
    and then moved into place (without ``force``, never over a file that appeared meanwhile)."""
    from ..errors import PurestoreError, UsageError  # (not being able to write is no usage error)
    paths = [os.path.abspath(p) for p, _t, _m in files]
    if len(set(paths)) != len(paths):
        raise UsageError(f"{files[0][0]!r} is given for both keys: the secret and the public key need "
                         "a file each")
    if len({os.path.realpath(p) for p in paths}) != len(paths):  # through a symlink (of a directory)
        raise UsageError(f"{files[0][0]!r} and {files[1][0]!r} lead to the same file "
                         f"({os.path.realpath(paths[0])!r}): the secret and the public key need a file each")
    from ._outfiles import final_path, write_through, written_through
    special = [written_through(full) for full in paths]  # /dev/stdout, a FIFO: written into
    paths = [full if through else final_path(full) for full, through in zip(paths, special)]  # links stay links
    for (path, _t, _m), full, through in zip(files, paths, special):
        if through:
            continue
        if not os.path.isdir(os.path.dirname(full)):
            raise PurestoreError(f"cannot write {path!r}: directory {os.path.dirname(full)!r} does not exist")
        if os.path.isdir(full):
            raise PurestoreError(f"cannot write {path!r}: it is a directory")
        if not force and os.path.lexists(full):
            raise UsageError(f"{path!r} already exists", hint="use --force to overwrite it")
    for (path, text, _m), full, through in zip(files, paths, special):
        if through:
            try:
                write_through(full, text)
            except OSError as e:
                raise PurestoreError(f"cannot write {path!r}: {e.strerror}") from e
    files = [f for f, through in zip(files, special) if not through]
    paths = [p for p, through in zip(paths, special) if not through]
    temps: list[str] = []
    try:
        for (path, text, mode), full in zip(files, paths):
            tmp = f"{full}.tmp-{os.getpid()}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            except OSError as e:
                raise PurestoreError(f"cannot write {path!r}: {e.strerror}") from e
            temps.append(tmp)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, mode)  # exactly this mode, whatever the umask
        for (path, _t, _m), full, tmp in zip(files, paths, temps):
            try:
                if force:
                    os.rename(tmp, full)
                else:
                    os.link(tmp, full)  # fails if the name was taken meanwhile
                    os.unlink(tmp)
            except FileExistsError:
                raise UsageError(f"{path!r} already exists", hint="use --force to overwrite it") from None
            except OSError as e:
                raise PurestoreError(f"cannot write {path!r}: {e.strerror}") from e
    finally:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def cmd_key_generate(args, ctx) -> int:
    from ..errors import KeyError_, UsageError
    from ..formats.signing import SecretKey
    try:
        key = SecretKey.generate(args.name)
    except KeyError_ as e:  # a bad --name: a usage error, as a clash of output files is (status 2)
        raise UsageError(f"--name: {e}", hint=e.hint) from None
    files = []
    if args.secret_out:
        files.append((args.secret_out, key.render(), 0o600))
    if args.public_out:
        files.append((args.public_out, key.public_key().render(), 0o644))
    _write_files(files, args.force)
    if not args.secret_out:
        print(key.render())
    if args.secret_out and not args.public_out:
        print(key.public_key().render())
    return 0


def cmd_key_public(args, ctx) -> int:
    from ..formats.signing import SecretKey
    print(SecretKey.parse(_read_secret_key_from_stdin()).public_key().render())
    return 0


def _read_secret_key_from_stdin() -> str:
    """The text on standard input; an error that says why when there is none to read (stdin
    closed, a directory, an unreadable file) or it is not UTF-8 text (whatever the locale)."""
    from ..errors import KeyError_, PurestoreError
    cannot = "cannot read the secret key from standard input"
    hint = "give the secret key file on stdin: pure key public < FILE"
    if sys.stdin is None:  # (`pure key public <&-`)
        raise PurestoreError(f"{cannot}: it is closed", hint=hint)
    try:
        data = sys.stdin.buffer.read()
    except IsADirectoryError as e:
        # (the `pure` executable does not get here: CPython refuses to start with a directory
        # as stdin; a caller of main() whose stdin became one since does)
        raise PurestoreError(f"{cannot}: it is a directory", hint=hint) from e
    except OSError as e:
        raise PurestoreError(f"{cannot}: {e.strerror}", hint=hint) from e
    if not data.strip():  # (`pure key public < /dev/null`, an empty file, a closed pipe)
        raise KeyError_("standard input is empty: expected a secret key (NAME:BASE64)", hint=hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyError_("the secret key on standard input is not UTF-8 text", hint=hint) from None


def cmd_store_sign(args, ctx) -> int:
    from ..cache.push import load_secret_key
    keys = [load_secret_key(f) for f in args.key_file]
    from ..formats.narinfo import fingerprint
    with ctx.open_store() as store:
        paths = {store.parse_path(p, valid=True) for p in args.paths}
        if args.recursive:
            paths = store.query_closure(paths)
        n = 0
        for sp in sorted(paths):
            info = store.query_path_info(sp)
            fp = fingerprint(store.store_dir, sp, info.nar_hash, info.nar_size, info.references)
            sigs = {k.sign(fp).render() for k in keys}
            if not sigs <= info.sigs:
                store.add_signatures(sp, sigs)
                n += 1
        ctx.info(f"added signatures to {n} path{'s' if n != 1 else ''}")
    return 0
