"""``pure cache verify/info/path-info/sign/prune/ls/cat``: inspecting and maintaining binary
caches, without a store.

Presentation only; the work is in :mod:`purestore.cache` (``verify``, ``ping``, ``query``,
``sign``, ``prune``, ``browse``).  The cache servers are in :mod:`.serve_cmd`, ``pure copy``
in :mod:`.copy_cmd`.  See docs/caches.md.
"""

from __future__ import annotations

import json
import os
import sys

from ._cache_paths import base_name_paths, check_store_dir, count_paths, link_target, shown_url

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
'pure copy --to' (which renews the narinfo's Last-Modified at most once an hour). With an
age, unfinished multipart uploads started before it are aborted too. A bucket has no lock: do
not prune while anyone pushes into the same prefix. Needs s3:ListBucket, s3:GetObject and
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
  pure cache sign https://cache.example.org/?token-file=up.token -r \\
      --key-file new.sec /pure/store/…-app

Without PATHs every narinfo of a file:// or s3:// cache is signed (an HTTP cache cannot be
listed; it must take uploads). A narinfo is signed only if a trusted key
(--trusted-public-keys, or the trusted-public-keys setting) signed it already, unless
--no-check-sigs; with --check-contents its NAR is also read and checked against it first.
Every narinfo is checked before the first is rewritten, so a refusal changes nothing. Only Sig
lines are added.
"""


def register(reg) -> None:
    reg.group("cache", help="binary cache server and checks")  # (as serve_cmd, which may come first)
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


def cmd_cache_verify(args, ctx) -> int:
    from .._run import run_trio
    from ..cache.progress import TextProgress
    from ..cache.verify import verify_cache
    from ._warnings import warnings_to

    settings = ctx.settings
    paths = base_name_paths(args.paths) if args.paths else None
    keys = args.verify_trusted_keys.split() if args.verify_trusted_keys is not None else None
    check_store_dir(args.paths, args.url, settings)
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
        ctx.info(f"checked {count_paths(len(rep.results))} in {shown_url(args.url)}: "
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
    paths = base_name_paths(args.paths)
    keys = (args.info_trusted_keys.split() if args.info_trusted_keys is not None
            else list(settings.trusted_public_keys))
    check_store_dir(args.paths, args.url, settings)
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
    paths = base_name_paths(args.paths) if args.paths else None
    trusted = args.sign_trusted_keys.split() if args.sign_trusted_keys is not None else None
    check_store_dir(args.paths, args.url, ctx.settings)
    progress = TextProgress("checking" if args.check_contents else "signing")
    with warnings_to(progress.note):
        res = run_trio(lambda: sign_cache(ctx.settings, args.url, keys, paths, recursive=args.recursive,
                                          trusted_keys=trusted, check_sigs=not args.no_check_sigs,
                                          check_contents=args.check_contents, progress=progress))
    if args.json:
        print(json.dumps({"signed": [p.absolute(res.store_dir) for p in res.signed],
                          "unchanged": [p.absolute(res.store_dir) for p in res.unchanged]}, indent=2))
    else:
        ctx.info(f"signed {count_paths(len(res.signed))} in {shown_url(args.url)}; "
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
            plan = _prune_bucket(ctx, d, age, [link_target(k) for k in args.keep], args.dry_run, errors)
            return _prune_report(args, ctx, d.split("?")[0], plan, errors)
        if cu.scheme != "file":
            raise UsageError(f"cannot prune {d!r}: only a local cache directory (file:// URL) or an s3:// "
                             "bucket can be pruned", hint="prune an HTTP cache on the machine that holds its files")
        d = cu.base
    if not os.path.isdir(d):
        raise CacheError(f"cache directory {d!r} " + ("is not a directory" if os.path.lexists(d) else "does not exist"))
    with cache_lock(d, exclusive=True,
                    on_wait=lambda: ctx.info(f"waiting for the push into {d!r} to finish...")):
        plan = plan_prune(d, older_than=age, keep=[link_target(k) for k in args.keep])
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
    ctx.info(f"{what} {count_paths(len(plan.removed))} ({len(plan.files)} files, {format_size(plan.freed)}) "
             f"from {d!r}; {count_paths(len(plan.kept))} kept{uploads}")
    return 1 if errors else 0


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
        from ..formats import nix_json
        sys.stdout.buffer.write((nix_json.dumps(node.to_json(args.recursive), separators=(",", ":"))
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
