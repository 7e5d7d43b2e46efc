"""``pure copy``: store paths and their closures to or from a binary cache, or from one cache to
another.

Presentation only; the work is in :mod:`purestore.cache.push`, :mod:`purestore.cache.substituter`
and :mod:`purestore.cache.mirror`.  See docs/caches.md.
"""

from __future__ import annotations

import json

from ._cache_paths import base_name_paths, check_store_dir, count_paths, shown_url

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


def register(reg) -> None:
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
                ctx.info(f"copied {count_paths(len(res.uploaded))} to {shown_url(args.to)} "
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
                ctx.info(f"note: {count_paths(n)} already there {'was' if n == 1 else 'were'} not signed again"
                         f"{'' if res.unsigned is not None else ' (if they lack the key)'}; to add signatures "
                         f"in place: {_sign_again_command(args.to, [store.print_path(p) for p in lacking])} "
                         "(it signs only what a trusted key signed already: add --trusted-public-keys KEYS, "
                         "or --no-check-sigs)")
            return 0
        from ..cache._present import present_report
        paths = [store.parse_path(p) for p in args.paths]
        trusted = args.copy_trusted_keys.split() if args.copy_trusted_keys is not None else None
        already = [p for p in paths if store.is_valid(p)]

        def report_json(rep, failures) -> None:
            print(json.dumps({"fetched": sorted(store.print_path(p) for p in rep.fetched),
                              "skipped": sorted({store.print_path(p) for p in [*already, *rep.present]}),
                              "failed": {store.print_path(p): why for p, why in sorted(failures.items())},
                              "narBytes": rep.nar_bytes}, indent=2))
        # every path valid already: copy_from's answer without a trio run (nor trio's import)
        rep = present_report(store, args.from_, paths, trusted) if len(already) == len(paths) else None
        if rep is not None:
            if args.json:
                report_json(rep, {})
        else:
            from ..cache.substituter import copy_from
            # fork_worker: nothing else runs in this process, so a forked restoring process is safe
            rep = _run_copy(progress, lambda: copy_from(store, settings, args.from_, paths, trusted_keys=trusted,
                                                        progress=progress, jobs=args.jobs, fork_worker=True),
                            report_json if args.json else None)
        if not args.json:
            meanwhile = f"; {count_paths(len(rep.present))} registered meanwhile by another process" \
                if rep.present else ""
            ctx.info(f"fetched {count_paths(len(rep.fetched))} ({_size(rep.nar_bytes)} of NAR) from "
                     f"{shown_url(args.from_)}{meanwhile}")
    return 0


def _sign_again_command(url: str, roots: list[str]) -> str:
    """The `pure cache sign` that signs the closures of ``roots`` in the cache at ``url`` (the
    URL without the push's own parameters; over HTTP it keeps its token-file, and a login's
    password is written ``***``)."""
    import shlex
    import urllib.parse

    from ..cache.url import hide_password, query_pairs
    base, _, query = hide_password(url).partition("?")
    keep = [(k, v) for k, v in query_pairs(query)
            if k not in ("secret-key", "compression", "compression-level", "parallel-compression",
                         "write-nar-listing", "index-debug-info")]
    if keep:  # (quoted as the URL is read: a '+' is a '+', a space %20)
        base += "?" + "&".join(f"{urllib.parse.quote(k, safe='')}={urllib.parse.quote(v, safe='/+')}"
                               for k, v in keep)
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
    paths = base_name_paths(args.paths)
    keys = [load_secret_key(f) for f in args.secret_key_file]
    trusted = args.copy_trusted_keys.split() if args.copy_trusted_keys is not None else None
    check_store_dir(args.paths, args.from_, ctx.settings)
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
        ctx.info(f"copied {count_paths(len(res.copied))} from {shown_url(args.from_)} to "
                 f"{shown_url(args.to)} ({_size(res.nar_bytes)} of NAR, {_size(res.file_bytes)} "
                 f"of NAR files transferred); {len(res.skipped)} already there")
    return 0
