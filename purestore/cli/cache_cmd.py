"""``pure key``, ``pure store sign``, ``pure copy``, ``pure cache serve``: signed binary caches.

Presentation only; the work is in :mod:`purestore.formats.signing` and :mod:`purestore.cache`.
See docs/caches.md.
"""

from __future__ import annotations

import json
import os
import re
import sys

from ._outfiles import file_name

_KEYGEN_HELP = """\
Generate an Ed25519 signing key pair in Nix's formats.

The secret key file holds NAME:BASE64(seed + public key) and is created with mode 0600; the
public key is NAME:BASE64(public key). Give the public key to every machine that should trust
the cache (trusted-public-keys in pure.conf); keep the secret key on the machine that pushes.
Without --secret-out the secret key is printed on stdout.
"""

_COPY_HELP = """\
Copy store paths and their closures to or from a binary cache.

  pure copy --to 'file:///srv/cache?compression=zstd&secret-key=/etc/pure/cache.sec' PATH...
  pure copy --to http://127.0.0.1:8080/ --secret-key-file cache.sec PATH...
  pure copy --from http://cache.example:8080/ --trusted-public-keys 'cache-1:...' PATH...
  pure copy --to 's3://bucket?region=eu-west-1&secret-key=cache.sec' PATH...

--to uploads references first, skips paths the cache already has, signs narinfos with the
secret keys given (the cache itself never needs a key), and writes nix-cache-info, narinfo,
nar/<filehash>.nar.<ext>, optional .ls listings and build logs under log/. URL parameters:
compression=zstd|xz|none (default zstd), compression-level=N, parallel-compression=true
(each NAR compressed on all cores: faster for one big path, but the bytes differ from the
single-threaded ones), secret-key=FILE, write-nar-listing=true, index-debug-info=true
(debuginfo/<build id> links to the NARs holding lib/debug/.build-id files),
token-file=FILE (bearer token sent to that cache; env PURE_CACHE_TOKEN: sent with uploads
only). Logins for HTTP caches come from the netrc-file
setting; an https cache's own CA from ssl-cert-file; s3://BUCKET[/PREFIX] takes region=,
endpoint=HOST[:PORT], scheme=http, profile=, multipart-upload=true and buffer-size=BYTES (files
over it go up in parts; over 5 GiB always), narinfo-compression=, ls-compression= and
log-compression= (br, gzip, xz, bzip2, zstd: stored compressed, sent with that
Content-Encoding), and AWS credentials (docs/caches.md).

--from fetches PATHs (store paths, which need not be valid yet) with their closures; only
narinfos signed by a trusted key are used, and every NAR is checked against its hashes and sizes.

--from and --to together copy the closures from one cache to the other without a store
(mirroring; PATHs in the caches' store dir): narinfos must be signed by a trusted key (unless
--no-check-sigs), each NAR file is checked as above and copied as it is (no recompression),
and each narinfo is published only after its references', unchanged unless --secret-key-file
adds signatures. Listings, provenance and build logs come along.
  pure copy --from https://cache.example.org/ --to file:///srv/mirror /nix/store/…-hello-2.10
"""

_SERVE_HELP = """\
Serve a binary cache directory over HTTP/1.1 (GET and HEAD).

With --upload-token-file FILE the server also accepts PUT with
'Authorization: Bearer TOKEN', so that 'pure copy --to http://HOST:PORT/?token-file=FILE'
can push to it. The server never needs a signing key: clients sign before uploading.
Any static web server can serve the same directory read-only.

A private cache: --read-token-file FILE makes GET and HEAD need that bearer token too (clients
add ?token-file=FILE to the cache's URL); --tls-cert and --tls-key serve https.
"""

_STORE_SERVE_HELP = """\
Serve the local store as a binary cache over HTTP/1.1, as nix-serve does: other machines
substitute its valid paths with 'pure copy --from http://HOST:PORT/' or by listing it in their
substituters (Nix too). Nothing is written beforehand: each narinfo and NAR is made from the
store when asked for (NARs checked against the registered hash as they are sent; uncompressed
unless --compression says otherwise).

With --secret-key-file the narinfos are signed as they are served (the server holds the key;
for a cache whose server never sees a key, push with 'pure copy --to' and use 'pure cache
serve'). Without one, only the signatures the store already has are served, and clients that
trust none of them refuse the paths.

A private cache: --read-token-file FILE makes every request need that bearer token (clients add
?token-file=FILE to the cache's URL); --tls-cert and --tls-key serve https.
"""

_VERIFY_HELP = """\
Check a binary cache as it stands, without a store: for each path's narinfo, that it is there
and parses, is signed by a trusted key (when keys are given, or set as trusted-public-keys),
that its URL stays inside the cache and its NAR file is there (with the size FileSize says, for
a file:// cache), and that every path it refers to is in the cache too. With --check-contents
each NAR file is also read whole and checked as substitution would check it: FileSize,
FileHash, NarSize, NarHash, a well-formed NAR. Nothing is written.

Without PATHs, every narinfo of a file:// or s3:// cache is checked (an HTTP cache cannot be
listed). With -r, the closures of the PATHs are: what a substitution of them would need.
Prints one line per problem ('bad: PATH: reason') and exits 1 if there is any.
"""

_PATH_INFO_HELP = """\
Show what a binary cache holds for store paths, without fetching anything and without a store:
from each path's narinfo, the NAR size, references, deriver, signatures and the download. Like
`nix path-info --store URL`, with the same --json output.

  pure cache path-info -rsS https://cache.example.org/ /nix/store/…-hello-2.10

The cache's own store dir (its nix-cache-info) is used to read the paths. With trusted keys
(--trusted-public-keys, or the trusted-public-keys setting) each line ends with 'trusted by
KEY' or 'untrusted: why' (and --json says "trusted"/"untrusted" in those cases only). Exits 1
when a path (or, with -r/-S, a path of its closure) is not in the cache.
"""


_LS_HELP = """\
List the files of a store path held by a binary cache, without installing it; like
`nix store ls --store URL`, with the same output.

  pure cache ls -lR https://cache.example.org/ /nix/store/…-hello-2.10
  pure cache ls file:///srv/cache /pure/store/…-hello-2.10/bin

PATH is a store path or a path inside one, in the cache's own store dir. Its narinfo must be
signed by a trusted key (--trusted-public-keys, or the trusted-public-keys setting) unless
--no-check-sigs. The cache's <hash>.ls listing is used when it has one (written by
'pure copy --to ...?write-nar-listing=true' or Nix); listings are not signed, so
--no-listing reads the NAR instead, checked against the narinfo's hashes and sizes.
Symlinks are shown, not followed.
"""

_CAT_HELP = """\
Print a file of a store path held by a binary cache, without installing it; like
`nix store cat --store URL`.

  pure cache cat https://cache.example.org/ /nix/store/…-hello-2.10/share/info/hello.info

The narinfo must be signed by a trusted key (unless --no-check-sigs), and the whole NAR is
read and checked against it (FileSize, FileHash, NarSize, NarHash) before anything is printed:
a file from a tampered NAR is never shown.
"""


_PRUNE_HELP = """\
Remove from a binary cache directory (or S3 bucket) the paths nobody pushed or fetched for a
while, keeping every closure whole.

  pure cache prune /srv/cache --older-than 30d --dry-run
  pure cache prune file:///srv/cache --older-than 90d --keep /pure/store/…-toolchain
  pure cache prune 's3://team-cache/ci?region=eu-west-1' --older-than 30d

Kept: the paths whose narinfo was written or used within AGE (30d, 12h, 90m, 2w; used: found
already there by 'pure copy --to' (from a store or another cache), fetched from the
directory by pure, or served by 'pure cache serve'), the --keep paths, and everything these
refer to. Removed: every other path's narinfo, .ls listing and provenance, the NAR files no
kept path uses once they are older than AGE too, debuginfo links to removed NARs, and the
build logs of the removed paths' derivations. Narinfos go first, so the cache is consistent
at every moment. A running 'pure copy --to' into the directory (also from another cache),
'pure cache sign' of it, or an upload through 'pure cache serve' is waited for (and waits
for the prune); do not prune while Nix writes to it.

An S3 bucket (s3://BUCKET[/PREFIX]?...) is pruned the same way, with one difference: a
bucket records writes, not reads, so "used" there means pushed, or found already there by
'pure copy --to' (which renews the narinfo's Last-Modified at most once an hour). With an age, unfinished
multipart uploads started before it are aborted too. A bucket has no lock: do not prune
while anyone pushes into the same prefix. Needs s3:ListBucket, s3:GetObject and
s3:DeleteObject (and s3:ListBucketMultipartUploads, s3:AbortMultipartUpload).
"""


_INFO_HELP = """\
Check binary caches as substitution would use them: is each one reachable, does it have a
nix-cache-info, is it for this store's dir, with which priority and in which order would it
be asked (like `nix store ping --store URL`, for all caches at once).

  pure cache info                           # the configured substituters
  pure cache info https://cache.example.org/ s3://team-cache?region=eu-west-1

Prints one line per cache, usable ones first in the order substitution asks them (lower
priority first, from the URL's ?priority= or nix-cache-info), with the time nix-cache-info
took to arrive; then why each other cache is not used. Also says when caches are off
(--offline) and how many trusted public keys are set. Exit status 1 when a cache is not usable.
Whether a cache has a given path, signed by a trusted key: 'pure cache path-info URL PATH'.
"""


_SIGN_HELP = """\
Add signatures to the narinfos a binary cache holds, in place and without a store: a new key
for a cache whose paths an old key signed (key rotation), or a signature for paths pushed
without one. Like `nix store sign --store URL`.

  pure cache sign file:///srv/cache --key-file new.sec
  pure cache sign https://cache.example.org/?token-file=up.token -r --key-file new.sec /pure/store/…-app

Without PATHs every narinfo of a file:// or s3:// cache is signed (an HTTP cache cannot be listed; it
must take uploads). A narinfo is signed only if a trusted key (--trusted-public-keys, or the
trusted-public-keys setting) signed it already, unless --no-check-sigs; with --check-contents
its NAR is also read and checked against it first. Every narinfo is checked before the first is
rewritten, so a refusal changes nothing. Only Sig lines are added.
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
                    description="Add signatures by the secret key in KEYFILE to the path infos of "
                                "valid paths (kept in the store database and copied into narinfos).")
    p.add_argument("--key-file", "-k", required=True, metavar="KEYFILE", action="append",
                   help="secret key file (may be repeated)")
    p.add_argument("-r", "--recursive", action="store_true", help="sign the closures of PATHs")
    p.add_argument("paths", nargs="+", metavar="PATH")

    p = reg.command("copy", "copy paths to or from a binary cache", cmd_copy, description=_COPY_HELP)
    p.add_argument("--to", metavar="URL", help="cache to push to")
    p.add_argument("--from", dest="from_", metavar="URL",
                   help="cache to fetch from (with --to: copy from this cache to that one)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--secret-key-file", "-k", metavar="FILE", action="append", default=[],
                   help="sign pushed narinfos with this key (may be repeated)")
    p.add_argument("--compression", choices=["zstd", "xz", "none"], help="NAR compression (default zstd)")
    p.add_argument("--compression-level", type=int, metavar="N", help="compression level")
    p.add_argument("--parallel-compression", action="store_true",
                   help="compress each NAR on all cores (as ?parallel-compression=true)")
    p.add_argument("--write-nar-listing", action="store_true", help="also write <hash>.ls listings")
    p.add_argument("-j", "--jobs", type=int, metavar="N",
                   help="paths compressed (--to) or downloaded and restored (--from) in parallel, the "
                        "biggest first (default: the number of cores for --to; for --from, 16 small "
                        "NARs over HTTP at once, which wait on the network, while restores from a "
                        "file:// cache and of NARs over 1 MiB run one per core); with two or more, one "
                        "of them runs in a forked copy of pure (for --to; for --from, restores from a "
                        "file:// cache and of NARs over 1 MiB)")
    p.add_argument("--trusted-public-keys", dest="copy_trusted_keys", metavar="KEYS",
                   help="keys trusted for --from (default: the trusted-public-keys setting)")
    p.add_argument("--json", action="store_true", help="print what was copied as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="name each path as it is copied")
    p.add_argument("--require-provenance", action="store_true",
                   help="--from: refuse paths without a valid provenance statement by a trusted key")
    p.add_argument("--no-check-sigs", action="store_true",
                   help="--from with --to: copy narinfos that no trusted key signed (they are still "
                        "checked against their NARs); installing into the store always needs a "
                        "trusted signature")

    reg.group("cache", help="binary cache server and checks")
    p = reg.command("serve", "serve a binary cache directory over HTTP", cmd_cache_serve,
                    group="cache", description=_SERVE_HELP)
    p.add_argument("dir", metavar="DIR", help="the cache directory (or its file:///DIR URL)")
    p.add_argument("--upload-token-file", metavar="FILE", help="enable PUT for this bearer token")
    _server_options(p, "GET and HEAD only with this bearer token (or the upload token)")

    p = reg.command("serve", "serve the local store as a binary cache over HTTP (like nix-serve)",
                    cmd_store_serve, group="store", description=_STORE_SERVE_HELP)
    p.add_argument("--secret-key-file", "-k", metavar="FILE", action="append", default=[],
                   help="sign the narinfos served with this key (may be repeated)")
    p.add_argument("--priority", type=int, default=30, metavar="N",
                   help="the Priority this cache announces in nix-cache-info (default 30; clients "
                        "ask caches with lower numbers first)")
    p.add_argument("--compression", choices=["none", "zstd", "xz"], default="none",
                   help="compress NARs as they are sent (default none: the fastest on a local network)")
    p.add_argument("--compression-level", type=int, metavar="N", help="compression level")
    _server_options(p, "requests only with this bearer token")

    p = reg.command("verify", "check a binary cache: narinfos, signatures, NAR files, closure",
                    cmd_cache_verify, group="cache", description=_VERIFY_HELP)
    p.add_argument("url", metavar="URL")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="store paths to check (default: all, for a file:// or s3:// cache)")
    p.set_defaults(intermixed="paths")
    p.add_argument("--trusted-public-keys", dest="verify_trusted_keys", metavar="KEYS",
                   help="keys a narinfo must be signed by (default: the trusted-public-keys setting; "
                        "none: signatures are not checked)")
    p.add_argument("--check-contents", action="store_true",
                   help="read every NAR file and check its hashes, sizes and format")
    p.add_argument("-r", "--recursive", action="store_true",
                   help="check the closures of the PATHs: every path they refer to, directly or not, "
                        "is checked like them (without -r only its narinfo's presence is)")
    p.add_argument("--json", action="store_true", help="print a JSON report")

    p = reg.command("info", "check that binary caches answer and can be used, in substitution order",
                    cmd_cache_info, group="cache", description=_INFO_HELP)
    p.add_argument("urls", nargs="*", metavar="URL", help="caches to check (default: the substituters setting)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")

    p = reg.command("path-info", "show what a binary cache holds for store paths (sizes, references, signatures)",
                    cmd_cache_path_info, group="cache", description=_PATH_INFO_HELP)
    p.add_argument("url", metavar="URL")
    p.add_argument("paths", nargs="+", metavar="PATH", help="store paths (need not be valid here)")
    p.add_argument("-r", "--recursive", action="store_true", help="show the whole closure of each PATH")
    p.add_argument("-s", "--size", action="store_true", help="show the NAR size")
    p.add_argument("-S", "--closure-size", action="store_true",
                   help="show the closure's NAR size (and, with --json, its download size)")
    p.add_argument("--download-size", action="store_true", help="show the compressed (download) size")
    p.add_argument("--sigs", action="store_true", help="show the signatures")
    p.add_argument("--trusted-public-keys", dest="info_trusted_keys", metavar="KEYS",
                   help="say for each path whether one of these keys signed it (default: the "
                        "trusted-public-keys setting)")
    p.add_argument("--json", action="store_true", help="print JSON like `nix path-info --json --store URL`")

    p = reg.command("sign", "add signatures to the narinfos of a binary cache, in place",
                    cmd_cache_sign, group="cache", description=_SIGN_HELP)
    p.add_argument("url", metavar="URL")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="store paths to sign (default: all, for a file:// or s3:// cache)")
    p.set_defaults(intermixed="paths")
    p.add_argument("--key-file", "-k", required=True, metavar="KEYFILE", action="append",
                   help="secret key file (may be repeated)")
    p.add_argument("-r", "--recursive", action="store_true", help="sign the closures of PATHs")
    p.add_argument("--trusted-public-keys", dest="sign_trusted_keys", metavar="KEYS",
                   help="keys one of which must have signed a narinfo already (default: the "
                        "trusted-public-keys setting)")
    p.add_argument("--no-check-sigs", action="store_true",
                   help="sign narinfos that no trusted key signed (paths pushed without a key)")
    p.add_argument("--check-contents", action="store_true",
                   help="read each NAR and check it against its narinfo before signing")
    p.add_argument("--json", action="store_true", help="print what was signed as JSON")

    p = reg.command("prune", "remove old paths from a binary cache directory or S3 bucket, keeping closures whole",
                    cmd_cache_prune, group="cache", description=_PRUNE_HELP)
    p.add_argument("directory", metavar="DIR|URL", help="the cache directory (or its file:// URL), or an s3:// URL")
    p.add_argument("--older-than", metavar="AGE", help="remove paths not pushed within AGE (e.g. 30d)")
    p.add_argument("--keep", metavar="PATH", action="append", default=[],
                   help="keep this store path and its closure whatever its age (may be repeated)")
    p.add_argument("-n", "--dry-run", action="store_true", help="say what would be removed; remove nothing")
    p.add_argument("--json", action="store_true", help="print what was (or would be) removed as JSON")

    for name, func, short, desc in (
            ("ls", cmd_cache_ls, "list the files of a path in a binary cache, without installing it", _LS_HELP),
            ("cat", cmd_cache_cat, "print a file of a path in a binary cache (its NAR checked first)", _CAT_HELP)):
        p = reg.command(name, short, func, group="cache", description=desc)
        p.add_argument("url", metavar="URL")
        p.add_argument("path", metavar="PATH", help="a store path, or a path inside one")
        p.add_argument("--trusted-public-keys", dest="browse_trusted_keys", metavar="KEYS",
                       help="keys one of which must have signed the narinfo (default: the "
                            "trusted-public-keys setting)")
        p.add_argument("--no-check-sigs", action="store_true",
                       help="do not require a trusted signature (the NAR is still checked against the narinfo)")
        if name == "ls":
            p.add_argument("-l", "--long", action="store_true", help="show type, permissions and size")
            p.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")
            p.add_argument("-d", "--directory", action="store_true",
                           help="show a directory itself, not its entries")
            p.add_argument("--no-listing", action="store_true",
                           help="read the NAR (checked) even when the cache has a .ls listing")
            p.add_argument("--json", action="store_true", help="print JSON like `nix store ls --json`")


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
    print(SecretKey.parse(sys.stdin.read()).public_key().render())
    return 0


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


def _paths(n: int) -> str:
    return f"{n} path" if n == 1 else f"{n} paths"


def cmd_copy(args, ctx) -> int:
    from ..cache.progress import TextProgress, format_size as _size
    from ..errors import UsageError
    if not args.to and not args.from_:
        raise UsageError("say where to copy: --to URL, --from URL, or both (from one cache to another)")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    if args.to and args.from_:
        return _copy_between(args, ctx)
    if args.to and args.compression_level is not None:  # (with --from: refused below)
        from ..cache.backend import parse_url
        from ..cache.compression import check_level
        from ..errors import CacheError
        method = args.compression or parse_url(args.to).param("compression") or "zstd"  # (a bad URL: its error)
        try:
            check_level(method, args.compression_level)
        except CacheError as e:
            raise UsageError(f"--compression-level: {e}") from None
    if args.no_check_sigs:
        raise UsageError("--no-check-sigs applies to copies between two caches (--from with --to); "
                         "paths installed into the store always need a trusted signature")
    if args.from_:
        push_only = [flag for flag, given in (
            ("--secret-key-file", args.secret_key_file), ("--compression", args.compression),
            ("--compression-level", args.compression_level is not None),
            ("--parallel-compression", args.parallel_compression),
            ("--write-nar-listing", args.write_nar_listing)) if given]
        if push_only:
            raise UsageError(f"{push_only[0]} applies to pushing (--to), not to --from")
    elif getattr(args, "require_provenance", False):
        raise UsageError("--require-provenance applies to fetching (--from), not to pushing (--to): "
                         "a push sends what the store holds")
    settings = ctx.settings
    if getattr(args, "require_provenance", False):
        settings = settings.evolve(require_provenance=True)
    with ctx.open_store() as store:
        progress = TextProgress("copying", verbose=args.verbose)
        if args.to:
            from ..cache.backend import parse_url
            from ..cache.push import copy_to, load_secret_key
            cu = parse_url(args.to)
            keys = [load_secret_key(f) for f in args.secret_key_file]
            paths = [store.parse_path(p, valid=True) for p in args.paths]

            def push_json(res, failures) -> None:
                print(json.dumps({
                    "uploaded": sorted(store.print_path(p) for p in res.uploaded),
                    "skipped": sorted(store.print_path(p) for p in res.skipped),
                    "failed": {store.print_path(p): why for p, why in sorted(failures.items())},
                    "narBytes": res.nar_bytes, "fileBytes": res.file_bytes,
                }, indent=2))
            res = _run_copy(progress, lambda: copy_to(
                store, settings, args.to, paths, secret_keys=keys, compression=args.compression,
                level=args.compression_level, parallel=True if args.parallel_compression else None,
                write_listing=True if args.write_nar_listing else None,
                jobs=args.jobs, progress=progress, fork_worker=True),  # nothing else runs here
                push_json if args.json else None)
            if not args.json:
                ctx.info(f"copied {_paths(len(res.uploaded))} to {args.to.split('?')[0]} "
                         f"({_size(res.nar_bytes)} of NAR, {_size(res.file_bytes)} compressed); "
                         f"{len(res.skipped)} already there")
            if not keys and not cu.param("secret-key") and res.uploaded:  # last, to be seen
                ctx.info("warning: no secret key given: the narinfos carry only the paths' existing "
                         "signatures (use --secret-key-file FILE or ?secret-key=FILE)")
            elif (keys or cu.param("secret-key")) and res.skipped and not args.json and res.unsigned != ():
                # the paths already there without this key's signature (all of them, for a bucket,
                # whose narinfos are not read)
                lacking = res.skipped if res.unsigned is None else res.unsigned
                n = len(lacking)
                ctx.info(f"note: {_paths(n)} already there {'was' if n == 1 else 'were'} not signed again"
                         f"{'' if res.unsigned is not None else ' (if they lack the key)'}; to add signatures "
                         f"in place: {_sign_again_command(args.to, [store.print_path(p) for p in lacking])} "
                         "(it signs only what a trusted key signed already: add --trusted-public-keys KEYS, "
                         "or --no-check-sigs)")
            return 0
        from ..cache.substituter import copy_from
        paths = [store.parse_path(p) for p in args.paths]
        trusted = args.copy_trusted_keys.split() if args.copy_trusted_keys is not None else None
        already = [p for p in paths if store.is_valid(p)]

        def report_json(rep, failures) -> None:
            print(json.dumps({"fetched": sorted(store.print_path(p) for p in rep.fetched),
                              "skipped": sorted({store.print_path(p) for p in [*already, *rep.present]}),
                              "failed": {store.print_path(p): why for p, why in sorted(failures.items())},
                              "narBytes": rep.nar_bytes}, indent=2))
        # fork_worker: nothing else runs in this process, so a forked restoring process is safe
        rep = _run_copy(progress, lambda: copy_from(store, settings, args.from_, paths, trusted_keys=trusted,
                                                    progress=progress, jobs=args.jobs, fork_worker=True),
                        report_json if args.json else None)
        if not args.json:
            meanwhile = f"; {_paths(len(rep.present))} registered meanwhile by another process" \
                if rep.present else ""
            ctx.info(f"fetched {_paths(len(rep.fetched))} ({_size(rep.nar_bytes)} of NAR) from "
                     f"{args.from_.split('?')[0]}{meanwhile}")
    return 0


def _sign_again_command(url: str, roots: list[str]) -> str:
    """The `pure cache sign` that signs the closures of ``roots`` in the cache at ``url`` (the
    URL without the push's own parameters; over HTTP it keeps its token-file)."""
    import shlex
    import urllib.parse
    base, _, query = url.partition("?")
    keep = [(k, v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)
            if k not in ("secret-key", "compression", "compression-level", "parallel-compression",
                         "write-nar-listing", "index-debug-info")]
    if keep:
        base += "?" + urllib.parse.urlencode(keep, safe="/")
    shown = " ".join(shlex.quote(p) for p in roots[:3]) + (" ..." if len(roots) > 3 else "")
    return f"pure cache sign --key-file KEY -r {shlex.quote(base)} {shown}"


def _run_copy(progress, copy, report_json):
    """``trio.run(copy)`` with warnings shown through ``progress``; returns its result.  With
    ``report_json(result, failures)`` (--json) the result is printed, and also what a copy that
    failed for some paths did (:class:`CopyIncomplete`), before its error is raised."""
    from .._run import run_trio
    from ..errors import CopyIncomplete
    from ._warnings import warnings_to
    try:
        with warnings_to(progress.note):
            res = run_trio(copy)
    except CopyIncomplete as e:
        if report_json is not None:
            report_json(e.result, e.failures)
        raise
    if report_json is not None:
        report_json(res, {})
    return res


def _copy_between(args, ctx) -> int:
    """``pure copy --from A --to B``: no store involved (see :mod:`purestore.cache.mirror`)."""
    from ..cache.mirror import copy_between
    from ..cache.progress import TextProgress, format_size as _size
    from ..cache.push import load_secret_key
    from ..errors import UsageError

    recompress = [flag for flag, given in (
        ("--compression", args.compression), ("--compression-level", args.compression_level is not None),
        ("--parallel-compression", args.parallel_compression)) if given]
    if recompress:
        raise UsageError(f"{recompress[0]} does not apply to a copy between caches: the source's NAR "
                         "files are copied as they are")
    paths = _base_name_paths(args.paths)
    keys = [load_secret_key(f) for f in args.secret_key_file]
    trusted = args.copy_trusted_keys.split() if args.copy_trusted_keys is not None else None
    _check_store_dir(args.paths, args.from_, ctx.settings)
    progress = TextProgress("copying", verbose=args.verbose)

    def report_json(res, failures) -> None:
        print(json.dumps({
            "copied": [p.absolute(res.store_dir) for p in res.copied],
            "skipped": [p.absolute(res.store_dir) for p in res.skipped],
            "failed": {p.absolute(res.store_dir): why for p, why in sorted(failures.items())},
            "narBytes": res.nar_bytes, "fileBytes": res.file_bytes,
        }, indent=2))
    res = _run_copy(progress, lambda: copy_between(
        ctx.settings, args.from_, args.to, paths, trusted_keys=trusted,
        check_sigs=not args.no_check_sigs, require_provenance=args.require_provenance,
        secret_keys=keys, write_listing=True if args.write_nar_listing else None,
        jobs=args.jobs, progress=progress), report_json if args.json else None)
    if not args.json:
        ctx.info(f"copied {_paths(len(res.copied))} from {args.from_.split('?')[0]} to "
                 f"{args.to.split('?')[0]} ({_size(res.nar_bytes)} of NAR, {_size(res.file_bytes)} "
                 f"of NAR files transferred); {len(res.skipped)} already there")
    return 0


def _server_options(p, reads: str) -> None:
    """The options both servers take: address, read token, TLS, access log."""
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8080; port 0 picks a free one)")
    p.add_argument("--read-token-file", metavar="FILE",
                   help=f"a private cache: {reads}; clients give it with ?token-file=FILE in the cache's URL")
    p.add_argument("--tls-cert", metavar="FILE", help="serve https with this PEM certificate (chain)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key")
    p.add_argument("--access-log", metavar="FILE", type=file_name,
                   help="append a line per request to FILE ('-': stdout), in the combined log format "
                        "of nginx and Apache")


def _read_token_file(path: str, what: str) -> str:
    from ..cache.http_auth import token_problem
    from ..errors import UsageError
    try:
        with open(path, "rb") as f:
            raw = f.read().strip()
            mode = os.fstat(f.fileno()).st_mode
    except OSError as e:
        raise UsageError(f"cannot read {what} token file {path!r}: {e.strerror}") from e
    problem = token_problem(raw)
    if problem:
        raise UsageError(f"{what} token file {path!r} {problem}")
    text = raw.decode("ascii")
    if mode & 0o077:
        print(f"warning: {what} token file {path!r} can be read by others (mode {mode & 0o777:04o}); "
              f"'chmod 600 {path}' keeps the token yours", file=sys.stderr)
    return text


def _check_listen(listen: str) -> None:
    """A --listen that is no HOST:PORT is a usage error (status 2), not a failure to listen."""
    from ..cache.listen import parse_listen
    from ..errors import CacheError, UsageError
    try:
        parse_listen(listen)
    except CacheError as e:
        raise UsageError(e.message, hint=e.hint) from None


def _tls_args(args) -> tuple[str, str] | None:
    from ..errors import UsageError
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    return (args.tls_cert, args.tls_key) if args.tls_cert else None


def _run_server(ctx, start, describe) -> None:
    """Run the server task ``start(task_status=)`` until SIGTERM or SIGINT; ``describe(urls)``
    is the line said once it listens."""
    import logging
    import signal

    import trio
    from .._run import run_trio
    from ..cache._nursery import open_nursery

    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    async def main():
        async with open_nursery() as n:
            urls = await n.start(start)
            ctx.info(describe(urls))
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    n.cancel_scope.cancel()
                    break

    run_trio(main)


def cmd_cache_serve(args, ctx) -> int:
    import trio
    from ..cache.server import serve_cache

    # only from a file named here: PURE_CACHE_TOKEN is for clients pushing (exported for that, it
    # must not make a server writable)
    token = _read_token_file(args.upload_token_file, "upload") if args.upload_token_file else None
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", args.dir) and not args.dir.startswith("file:"):
        from ..errors import UsageError
        raise UsageError(f"cannot serve {args.dir!r}: pure cache serve serves a directory (or a file:// URL) "
                         "on this machine", hint="to make a local copy of another cache, use "
                         f"'pure copy --from {args.dir} --to file://DIR PATH…', then serve DIR")
    if args.dir.startswith("file:"):  # the URL clients use for a cache in a directory
        from ..cache.backend import parse_url
        args.dir = parse_url(args.dir).base
    reader = _read_token_file(args.read_token_file, "read") if args.read_token_file else None
    _check_listen(args.listen)
    tls = _tls_args(args)
    _run_server(ctx, lambda task_status=trio.TASK_STATUS_IGNORED: serve_cache(
        args.dir, args.listen, upload_token=token, read_token=reader, tls=tls,
        access_log=args.access_log, task_status=task_status),
        lambda urls: f"serving {args.dir!r} on {' '.join(urls)}"
        + (" (uploads enabled" if token else " (read-only")
        + ("; reads need the read token)" if reader else ")"))
    return 0


def cmd_store_serve(args, ctx) -> int:
    import trio
    from ..cache.http_server import access_logger
    from ..cache.listen import check_listen_and_tls, run_app
    from ..cache.push import load_secret_key
    from ..cache.store_server import StoreCache, make_store_app

    from ..errors import UsageError
    if args.compression_level is not None and args.compression == "none":
        raise UsageError("--compression-level needs --compression zstd or xz "
                         "(NARs are sent uncompressed by default)")
    keys = [load_secret_key(f) for f in args.secret_key_file]
    reader = _read_token_file(args.read_token_file, "read") if args.read_token_file else None
    _check_listen(args.listen)
    tls = _tls_args(args)
    check_listen_and_tls(args.listen, tls)
    settings = ctx.settings
    if not os.path.exists(os.path.join(settings.state_dir, "db", "db.sqlite")):
        # opening a store makes a new one: serving that, every request would get 404
        where = settings.root or settings.store_dir
        other = _other_store_dir(settings.root) if settings.root else None
        if other is not None:
            raise UsageError(f"the store at {where!r} is for store dir {other!r}, not {settings.store_dir!r}",
                             hint=f"give --store-dir {other}")
        raise UsageError(f"there is no store at {where!r} to serve",
                         hint="check --store and --store-dir (a typo makes a new, empty store elsewhere)")
    with ctx.open_store() as store:
        cache = StoreCache(store, store.store_dir, keys, args.priority, args.compression, args.compression_level)
        app = make_store_app(cache, reader, access_logger(args.access_log) if args.access_log else None)
        signed = ", ".join(k.name for k in keys)
        _run_server(ctx, lambda task_status=trio.TASK_STATUS_IGNORED: run_app(
            app, args.listen, tls=tls, task_status=task_status),
            lambda urls: f"serving the store {store.real_store_dir!r} on {' '.join(urls)}"
            + (f" (NARs compressed with {args.compression}" if args.compression != "none" else " (NARs uncompressed")
            + (f"; narinfos signed by {signed}" if keys else "; narinfos not signed here")
            + ("; requests need the read token)" if reader else ")"))
    return 0


def cmd_cache_verify(args, ctx) -> int:
    from .._run import run_trio
    from ..cache.progress import TextProgress
    from ..cache.verify import verify_cache
    from ._warnings import warnings_to

    settings = ctx.settings
    paths = _base_name_paths(args.paths) if args.paths else None
    keys = args.verify_trusted_keys.split() if args.verify_trusted_keys is not None else None
    _check_store_dir(args.paths, args.url, settings)
    progress = TextProgress("checking")
    with warnings_to(progress.note):
        rep = run_trio(lambda: verify_cache(settings, args.url, paths, trusted_keys=keys,
                                            check_contents=args.check_contents, recursive=args.recursive,
                                            progress=progress))
    bad = rep.bad
    if args.json:
        print(json.dumps({
            "url": rep.url, "storeDir": rep.store_dir, "checked": len(rep.results),
            "signaturesChecked": rep.signatures_checked, "contentsChecked": rep.contents_checked,
            "ok": not bad,
            "problems": [{"narinfo": n, "path": rep.paths.get(n), "message": m}
                         for n, ms in bad.items() for m in ms],
        }, indent=2))
    else:
        for n, ms in bad.items():
            for m in ms:
                print(f"bad: {rep.label(n)!r}: {m}")
        how = ["signatures checked" if rep.signatures_checked else "signatures not checked: no trusted keys",
               "NAR contents checked" if rep.contents_checked else "NAR contents not read"]
        ctx.info(f"checked {_paths(len(rep.results))} in {args.url.split('?')[0]}: "
                 + ("no problems" if not bad else f"{len(bad)} bad") + f" ({'; '.join(how)})")
    return 0 if not bad else 1


def cmd_cache_info(args, ctx) -> int:
    from .._run import run_trio
    from ..cache.ping import cache_status
    from ..errors import UsageError

    settings = ctx.settings
    urls = list(args.urls) or list(settings.substituters)
    if not urls:
        raise UsageError("no binary caches to check: the substituters setting is empty",
                         hint="give URLs, or set substituters in pure.conf (or --substituters)")
    found = run_trio(lambda: cache_status(settings, urls))
    keys = list(settings.trusted_public_keys)
    if args.json:
        print(json.dumps({"caches": [c.to_json() for c in found], "offline": settings.offline,
                          "trustedPublicKeys": [k.split(":", 1)[0] for k in keys]}, indent=2))
    else:
        n = 0
        for c in found:
            if c.usable:
                n += 1
                extra = ", WantMassQuery" if c.want_mass_query else ""
                print(f"{n}. {c.url}  ok ({c.millis:.0f} ms): StoreDir {c.store_dir}, Priority {c.priority}{extra}")
        for c in found:
            if not c.usable:  # the reason names the cache (said once is enough), else the URL does
                print(f"-  not used: {c.error}" if c.url in c.error else f"-  {c.url}  not used: {c.error}")
        named = [k.split(":", 1)[0] for k in dict.fromkeys(keys)]  # a key listed twice is one
        names = ", ".join(f"{n} ({named.count(n)} keys)" if named.count(n) > 1 else n
                          for n in dict.fromkeys(named)) or "none"
        ctx.info(f"{n} of {_caches(len(found))} usable; trusted public keys: {names}"
                 + ("; offline: caches are not asked (--offline or offline = true)" if settings.offline else ""))
    return 0 if all(c.usable for c in found) else 1


def _caches(n: int) -> str:
    return f"{n} cache" + ("" if n == 1 else "s")


def cmd_cache_path_info(args, ctx) -> int:
    from .._run import run_trio
    from ..cache.query import cache_path_infos

    settings = ctx.settings
    paths = _base_name_paths(args.paths)
    keys = (args.info_trusted_keys.split() if args.info_trusted_keys is not None
            else list(settings.trusted_public_keys))
    _check_store_dir(args.paths, args.url, settings)
    q = run_trio(lambda: cache_path_infos(settings, args.url, paths, recursive=args.recursive,
                                          closure_sizes=args.closure_size, trusted_keys=keys))
    if args.json:
        out = []
        for i in q.infos:
            obj = i.to_json(q.store_dir)
            if i.trusted:
                obj["trusted"] = i.trusted
            elif i.untrusted_reason:
                obj["untrusted"] = i.untrusted_reason
            out.append(obj)
        print(json.dumps(out, separators=(",", ":")))
        return 0
    from ..cache._graph import references_first
    by_path = {i.info.store_path: i for i in q.infos}  # in the order of nix path-info's lines
    infos = [by_path[p] for p in references_first(by_path, lambda p: by_path[p].info.references)]
    padded = args.size or args.download_size or args.closure_size or args.sigs
    width = max((len(i.info.store_path.absolute(q.store_dir)) for i in infos), default=0)
    for i in infos:
        ni = i.info
        name = ni.store_path.absolute(q.store_dir)
        cols = [name.ljust(width) if padded else name]  # as Nix: the path column padded
        if args.size:
            cols.append(f"{ni.nar_size:>11}")
        if args.download_size:
            cols.append(f"{ni.file_size or 0:>11}")
        if args.closure_size:
            cols.append(f"{i.closure_size:>11}")
        if args.sigs:  # as Nix: the content address first, as "ca:…"
            cols.append(" ".join([*([f"ca:{ni.ca}"] if ni.ca else []), *ni.sigs]))
        if i.trusted:
            cols.append(f"trusted by {i.trusted}")
        elif i.untrusted_reason:
            cols.append(f"untrusted: {i.untrusted_reason}")
        print("\t".join(cols))
    return 0


def cmd_cache_sign(args, ctx) -> int:
    from .._run import run_trio
    from ..cache.progress import TextProgress
    from ..cache.push import load_secret_key
    from ..cache.sign import sign_cache
    from ..errors import UsageError
    from ._warnings import warnings_to

    if args.recursive and not args.paths:
        raise UsageError("-r needs PATHs (without PATHs every narinfo is signed)")
    keys = [load_secret_key(f) for f in args.key_file]
    paths = _base_name_paths(args.paths) if args.paths else None
    trusted = args.sign_trusted_keys.split() if args.sign_trusted_keys is not None else None
    _check_store_dir(args.paths, args.url, ctx.settings)
    progress = TextProgress("checking" if args.check_contents else "signing")
    with warnings_to(progress.note):
        res = run_trio(lambda: sign_cache(ctx.settings, args.url, keys, paths, recursive=args.recursive,
                                          trusted_keys=trusted, check_sigs=not args.no_check_sigs,
                                          check_contents=args.check_contents, progress=progress))
    if args.json:
        print(json.dumps({"signed": [p.absolute(res.store_dir) for p in res.signed],
                          "unchanged": [p.absolute(res.store_dir) for p in res.unchanged]}, indent=2))
    else:
        ctx.info(f"signed {_paths(len(res.signed))} in {args.url.split('?')[0]}; "
                 f"{len(res.unchanged)} had the signatures already")
    return 0


def cmd_cache_prune(args, ctx) -> int:
    from ..cache.prune import apply_prune, cache_lock, check_what_to_keep, parse_age, plan_prune
    from ..errors import CacheError, UsageError

    d = args.directory
    try:  # a bad age, or nothing to go by: usage errors (status 2), found before the cache is read
        age = parse_age(args.older_than) if args.older_than is not None else None
        check_what_to_keep(age, args.keep)
    except CacheError as e:
        raise UsageError(e.message, hint=e.hint) from None
    errors: list[str] = []
    if "://" in d:
        from ..cache.backend import parse_url  # (imports trio: only for a URL)
        cu = parse_url(d)
        if cu.scheme == "s3":
            plan = _prune_bucket(ctx, d, age, [_link_target(k) for k in args.keep], args.dry_run, errors)
            return _prune_report(args, ctx, d.split("?")[0], plan, errors)
        if cu.scheme != "file":
            raise UsageError(f"cannot prune {d!r}: only a local cache directory (file:// URL) or an s3:// "
                             "bucket can be pruned", hint="prune an HTTP cache on the machine that holds its files")
        d = cu.base
    if not os.path.isdir(d):
        raise CacheError(f"cache directory {d!r} " + ("is not a directory" if os.path.lexists(d) else "does not exist"))
    with cache_lock(d, exclusive=True,
                    on_wait=lambda: ctx.info(f"waiting for the push into {d!r} to finish...")):
        plan = plan_prune(d, older_than=age, keep=[_link_target(k) for k in args.keep])
        if not args.dry_run:
            apply_prune(d, plan, errors.append)
    return _prune_report(args, ctx, d, plan, errors)


def _prune_bucket(ctx, url: str, age, keep, dry_run: bool, errors: list[str]):
    from .._run import run_trio

    from ..cache.backend import backend_for
    from ..cache.prune_bucket import apply_prune_bucket, plan_prune_bucket

    async def run():
        async with backend_for(url, ctx.settings) as backend:
            plan = await plan_prune_bucket(backend, older_than=age, keep=keep, say=ctx.info)
            if not dry_run:
                await apply_prune_bucket(backend, plan, errors.append)
            return plan
    return run_trio(run)


def _prune_report(args, ctx, d: str, plan, errors: list[str]) -> int:
    from ..cache.progress import format_size

    sd = plan.store_dir
    if args.json:
        obj = plan.to_json(d, args.dry_run)
        obj["errors"] = errors
        print(json.dumps(obj, indent=2))
    else:
        verb = "would remove" if args.dry_run else "removing"
        for p in plan.removed:
            print(f"{verb} '{p.absolute(sd)}'")
    for line in plan.unreadable:
        ctx.info(f"warning: kept a narinfo that cannot be read: {line}")
    for p, r in plan.missing:
        ctx.info(f"warning: {p.absolute(sd)} refers to {r.absolute(sd)}, which the cache lacks "
                 "(it was missing before this prune)")
    for e in errors:
        ctx.info(f"error: {e}")
    what = "would remove" if args.dry_run else "tried to remove" if errors else "removed"
    uploads = (f"; {'would abort' if args.dry_run else 'aborted'} {len(plan.uploads)} unfinished "
               f"upload{'s' if len(plan.uploads) != 1 else ''}" if plan.uploads else "")
    ctx.info(f"{what} {_paths(len(plan.removed))} ({len(plan.files)} files, {format_size(plan.freed)}) "
             f"from {d!r}; {_paths(len(plan.kept))} kept{uploads}")
    return 1 if errors else 0


def _other_store_dir(root: str) -> str | None:
    """The store dir of a rooted store at ``root`` made for another store dir than the one asked
    for: its database is at ``<root><parent of store dir>/var/pure/db``, next to the store."""
    import glob
    base = glob.escape(root)
    for db in sorted([*glob.glob(os.path.join(base, "*", "var", "pure", "db", "db.sqlite")),
                      *glob.glob(os.path.join(base, "*", "*", "var", "pure", "db", "db.sqlite"))]):
        parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(db))))
        for name in sorted(os.listdir(parent)):
            if name != "var" and os.path.isdir(os.path.join(parent, name)):
                return "/" + os.path.relpath(os.path.join(parent, name), root)
    return None


def _browse_keys(args):
    return args.browse_trusted_keys.split() if args.browse_trusted_keys is not None else None


def cmd_cache_ls(args, ctx) -> int:
    from .._run import run_trio
    from ..cache.browse import cache_tree, find, ls_lines

    loc, root = run_trio(lambda: cache_tree(ctx.settings, args.url, args.path, trusted_keys=_browse_keys(args),
                                            check_sigs=not args.no_check_sigs, use_listing=not args.no_listing))
    node = find(root, loc)
    if args.json:
        # as `nix store ls --json`: names as they are (UTF-8, or their bytes when they are not)
        sys.stdout.flush()
        sys.stdout.buffer.write((json.dumps(node.to_json(args.recursive), ensure_ascii=False, separators=(",", ":"))
                                 + "\n").encode("utf-8", "surrogateescape"))
        sys.stdout.buffer.flush()
    else:
        # names that are not UTF-8 are printed as their bytes, as Nix does (and as ls does)
        sys.stdout.flush()
        sys.stdout.buffer.write("".join(
            line + "\n" for line in ls_lines(node, loc, long=args.long, recursive=args.recursive,
                                              directory=args.directory)).encode("utf-8", "surrogateescape"))
        sys.stdout.buffer.flush()
    return 0


def cmd_cache_cat(args, ctx) -> int:
    from .._run import run_trio
    from ..cache.browse import cache_cat

    out = sys.stdout.buffer
    run_trio(lambda: cache_cat(ctx.settings, args.url, args.path, out, trusted_keys=_browse_keys(args),
                               check_sigs=not args.no_check_sigs))
    out.flush()
    return 0


def _base_name_paths(texts):
    """Store paths named by their base names: a cache's store dir is known only once it is read
    (:func:`_check_store_dir`).  A symlink (``./result``) names the store path it points to."""
    from ..errors import InvalidStorePath, UsageError
    from ..formats.store_path import StorePath
    paths = []
    for p in texts:
        name = _link_target(p)
        try:
            paths.append(StorePath.from_base_name(os.path.basename(name.rstrip("/"))))
        except InvalidStorePath as e:
            raise UsageError(f"{p!r} is not a store path: {e}") from None
    return paths


def _link_target(text: str) -> str:
    """What a symlink (``./result``, a link to one…) names in the end; any other text as it is."""
    p = text.rstrip("/") or text
    for _ in range(40):  # as the kernel's limit on links followed
        if not os.path.islink(p):
            break
        target = os.readlink(p)
        p = target if os.path.isabs(target) else os.path.join(os.path.dirname(p), target)
    return p


def _check_store_dir(texts, url: str, settings) -> None:
    """The absolute paths among ``texts`` are in the store dir of the cache at ``url`` (read
    now): a path of another store dir is another path, even with the same base name."""
    from ..errors import CacheError, UsageError
    from .._run import run_trio
    given = [p for p in texts or () if p.startswith("/") and not os.path.islink(p.rstrip("/") or p)]
    if not given:
        return
    try:
        sd = run_trio(lambda: _cache_store_dir(settings, url))
    except CacheError:
        return  # an unusable cache: the command itself says why, in its own words
    for p in given:
        if os.path.dirname(p.rstrip("/")) != sd:
            raise UsageError(f"{p!r} is not in the store dir of {url.split('?')[0]!r}, {sd!r}",
                             hint=f"name it by its base name, or as {sd}/{os.path.basename(p.rstrip('/'))}")


async def _cache_store_dir(settings, url: str) -> str:
    from ..cache.backend import backend_for, parse_url
    from ..cache.info import read_cache_info
    async with backend_for(parse_url(url), settings) as backend:
        return (await read_cache_info(backend, url, default_store_dir=settings.store_dir)).store_dir
