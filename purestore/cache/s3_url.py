"""What an ``s3://BUCKET[/PREFIX]`` cache URL says: where the bucket is (:func:`http_url`: the
HTTP base URL, virtual-hosted on Amazon S3 or path-style at ``endpoint=``), how big files are
uploaded (:func:`upload_options`: ``multipart-upload``, ``buffer-size``) and which small files
are stored compressed (:func:`stored_encodings`: ``narinfo-``, ``ls-``, ``log-compression``).
Used by :mod:`.s3_backend`; each parameter is checked, with a message naming the URL.
"""

from __future__ import annotations

import re
import urllib.parse

from ..errors import CacheError
from .content_encoding import WRITABLE as WRITABLE_ENCODINGS
from .url import CacheURL, url_flag

MIN_PART = 5 << 20  # S3's smallest part (but the last) of a multipart upload


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z0-9-]+$")


def http_url(cu: CacheURL) -> tuple[str, str, str]:
    """(the bucket's HTTP base URL ending in '/', the bucket, the region) for an ``s3://`` URL."""
    u = urllib.parse.urlsplit(cu.url)
    bucket = u.netloc
    if not _BUCKET.match(bucket):
        raise CacheError(f"cache URL {cu.url!r}: {bucket!r} is not an S3 bucket name",
                         hint="bucket names have 3 to 63 lower-case letters, digits, dots and hyphens")
    region = cu.param("region") or "us-east-1"
    if not _REGION.match(region):
        raise CacheError(f"cache URL {cu.url!r}: bad region {region!r}")
    scheme = cu.param("scheme")
    if scheme is not None and scheme not in ("http", "https"):
        raise CacheError(f"cache URL {cu.url!r}: scheme must be https or http, got {scheme!r}")
    prefix = u.path.strip("/")
    prefix = urllib.parse.quote(prefix + "/", safe="/-_.~") if prefix else ""
    endpoint = cu.param("endpoint")
    if endpoint:
        given, sep, host = endpoint.partition("://")  # a URL where a host is expected: its scheme counts
        if sep:
            if given not in ("http", "https") or (scheme is not None and scheme != given):
                raise CacheError(f"cache URL {cu.url!r}: endpoint {endpoint!r} and scheme {scheme!r} disagree"
                                 if given in ("http", "https") else
                                 f"cache URL {cu.url!r}: endpoint must be HOST[:PORT], got {endpoint!r}")
            scheme, endpoint = given, host
        scheme = scheme or "https"
        endpoint = endpoint.rstrip("/")
        if not endpoint or "/" in endpoint:
            raise CacheError(f"cache URL {cu.url!r}: endpoint must be HOST[:PORT], got {cu.param('endpoint')!r}")
        base = f"{scheme}://{endpoint}/{bucket}/{prefix}"
        try:  # (parse_url checks the host of an http URL; this one comes from a parameter)
            urllib.parse.urlsplit(base)
        except ValueError as e:  # a '[' without its ']', or no IP address between them
            raise CacheError(f"cache URL {cu.url!r}: endpoint must be HOST[:PORT], got "
                             f"{cu.param('endpoint')!r} (malformed host: {e})",
                             hint="an IPv6 address is written between '[' and ']': endpoint=[::1]:9000") from None
        return base, bucket, region
    return f"{scheme or 'https'}://{bucket}.s3.{region}.amazonaws.com/{prefix}", bucket, region


def upload_options(cu: CacheURL) -> tuple[bool, int]:
    """(``multipart-upload``, ``buffer-size``) of an ``s3://`` URL, checked."""
    multipart = url_flag(cu, "multipart-upload")
    raw = cu.param("buffer-size")
    if raw is None:
        return multipart, MIN_PART
    try:
        size = int(raw)
    except ValueError:
        size = -1
    if size < MIN_PART:
        raise CacheError(f"cache URL {cu.url!r}: buffer-size must be a number of bytes of at least "
                         f"{MIN_PART} (5 MiB, S3's smallest part), got {raw!r}")
    return multipart, size


def stored_encodings(cu: CacheURL) -> dict[str, str]:
    """Which small files of an ``s3://`` cache are stored compressed, with which method (Nix's
    ``narinfo-compression``, ``ls-compression``, ``log-compression``): kind → method."""
    out = {}
    for kind in ("narinfo", "ls", "log"):
        method = cu.param(f"{kind}-compression")
        if method in (None, "", "none"):
            continue
        if method not in WRITABLE_ENCODINGS:
            raise CacheError(f"cache URL {cu.url!r}: {kind}-compression must be one of "
                             f"{', '.join(WRITABLE_ENCODINGS)} or none, got {method!r}")
        out[kind] = method
    return out


def _kind(name: str) -> str | None:
    if name.startswith("log/"):
        return "log"
    if "/" not in name and name.endswith(".narinfo"):
        return "narinfo"
    if "/" not in name and name.endswith(".ls"):
        return "ls"
    return None

