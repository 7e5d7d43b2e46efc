"""``pure cache serve`` (a binary cache directory) and ``pure store serve`` (the local store, as
nix-serve does): binary caches over HTTP.

Presentation only; the work is in :mod:`purestore.cache.server` and
:mod:`purestore.cache.store_server`.  See docs/caches.md.
"""

from __future__ import annotations

import os
import re
import sys

from ._outfiles import file_name

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


def register(reg) -> None:
    reg.group("cache", help="binary cache server and checks")  # (as cache_cmd: whichever comes first)
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
    from ..cache.http_auth import read_token_file
    from ..errors import CacheError, UsageError
    try:
        text, mode = read_token_file(path, what)
    except CacheError as e:
        raise UsageError(str(e)) from e
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
    if token is not None and token == reader:  # (as with PURE_CACHE_TOKEN: reading never makes writable)
        print(f"warning: the read token ({args.read_token_file!r}) is the upload token "
              f"({args.upload_token_file!r}): whoever may read the cache may also upload to it; "
              "give uploaders a token of their own", file=sys.stderr)
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
