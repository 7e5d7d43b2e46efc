"""Cache URLs: :func:`parse_url` (``file:///dir?…``, ``http(s)://host[:port]/prefix?…``,
``s3://bucket[/prefix]?…``) and their parameters.

Kept apart from :mod:`.backend` (which re-exports these names) so that checking a URL does not
import trio and the backends: ``pure copy --from URL PATH`` with every path valid already checks
the URL and opens no cache.
"""

from __future__ import annotations

import os
import re
import urllib.parse

import attrs

from ..errors import CacheError


@attrs.frozen
class CacheURL:
    """A parsed cache URL: the base location and the ``?key=value`` parameters."""

    url: str            # as given, but for the password of a login in it (hide_password)
    scheme: str         # file, http, https, s3
    base: str           # directory for file://, URL prefix ending in '/' for http(s)
    params: dict[str, str] = attrs.field(factory=dict, hash=False)

    def param(self, key: str, default: str | None = None) -> str | None:
        return self.params.get(key, default)

    @property
    def priority(self) -> int | None:
        """``?priority=N`` (checked by :func:`parse_url`: a whole number, negative too as in Nix)."""
        prio = self.params.get("priority")
        return whole(prio) if prio is not None else None

    def __str__(self) -> str:
        return self.url


_WHOLE = re.compile(r"[-+]?[0-9]+")  # ASCII digits only ("²".isdigit() is true, int() refuses it)
MAX_DIGITS = 18  # of a priority (Nix's is an int; Python's int() reads 4300 digits at most)


def whole(text: str) -> int:
    """The value of ``text``, which matches :data:`_WHOLE` and has at most :data:`MAX_DIGITS`
    digits after its leading zeros (any number of those: int() alone counts them too)."""
    digits = text.lstrip("+-").lstrip("0") or "0"
    return -int(digits) if text.startswith("-") else int(digits)


_KNOWN_PARAMS = {
    "compression", "compression-level", "secret-key", "write-nar-listing", "priority",
    "want-mass-query", "token-file", "parallel-compression", "trusted", "index-debug-info",
}
_S3_PARAMS = {"region", "endpoint", "scheme", "profile", "multipart-upload", "buffer-size",
              "narinfo-compression", "ls-compression", "log-compression"}  # s3:// only


def query_pairs(query: str) -> list[tuple[str, str]]:
    """The ``(key, value)`` pairs of a cache URL's query, percent-decoded as Nix decodes them:
    a ``+`` stays a ``+`` (``secret-key=/keys/c++.sec``; form encoding, which
    :func:`urllib.parse.parse_qsl` follows, would make it a space).  Raise ValueError for a
    part without ``=`` (an empty one too)."""
    pairs = []
    for part in query.split("&") if query else ():
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"bad query field: {part!r}")
        pairs.append((urllib.parse.unquote(key), urllib.parse.unquote(value)))
    return pairs


def hide_password(url: str) -> str:
    """``url`` with the password of a login in an http(s) URL (``http://NAME:PASSWORD@HOST/``)
    written ``***``: what messages, ``--json`` and the store's records show of it."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")  # (as urlsplit splits it)
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}{rest[end:]}"


def parse_url(url: str) -> CacheURL:
    """Parse ``file:///dir?…``, ``http(s)://host:port/prefix?…`` or ``s3://bucket[/prefix]?…``;
    raise :class:`CacheError`.  The password of a login in the URL is in the result's ``base``
    only (its ``url``, and the errors, show ``***``: :func:`hide_password`)."""
    given, url = url, hide_password(url)
    if any(c.isspace() for c in url):
        raise CacheError(f"cache URL {url!r} contains white space",
                         hint="give one URL here; a space in a directory name is written %20")
    try:
        u = urllib.parse.urlsplit(given)
    except ValueError as e:  # a '[' without its ']' in the host ("Invalid IPv6 URL"), or the like
        raise CacheError(f"cache URL {url!r}: malformed host ({e})",
                         hint="an IPv6 address is written between '[' and ']': http://[::1]:8080/") from None
    if u.fragment or url.endswith("#"):
        # dropped, Nix drops it too: `file:///srv/c#1` wrote to /srv/c, said to be file:///srv/c#1
        raise CacheError(f"cache URL {url!r} has a fragment ('#{u.fragment}'), which a cache URL has no use for",
                         hint="a '#' in a directory name is written %23")
    try:
        pairs = query_pairs(u.query)
    except ValueError:
        raise CacheError(f"cache URL {url!r}: malformed query {u.query!r}") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:  # which one was meant? (Nix takes the first, a dict the last)
            raise CacheError(f"cache URL {url!r}: parameter {key!r} is given twice "
                             f"({params[key]!r} and {value!r})",
                             hint="give each parameter once" + (
                                 "; more keys are given with --secret-key-file (repeatable)"
                                 if key == "secret-key" else ""))
        params[key] = value
    allowed = _KNOWN_PARAMS
    if u.scheme == "s3":  # (token-file gets an error of its own, below)
        unknown = sorted(set(params) - _KNOWN_PARAMS - _S3_PARAMS)
        allowed = (_KNOWN_PARAMS | _S3_PARAMS) - {"token-file"}
    else:
        unknown = sorted(set(params) - _KNOWN_PARAMS)
        s3_only = sorted(set(params) & _S3_PARAMS)
        if s3_only:
            raise CacheError(f"cache URL {url!r}: {s3_only[0]!r} applies to s3:// caches only")
    if unknown:
        raise CacheError(f"cache URL {url!r}: unknown parameter {unknown[0]!r}, expected one of "
                         f"{', '.join(sorted(allowed))}")
    prio = params.get("priority")
    if prio is not None and not _WHOLE.fullmatch(prio):
        raise CacheError(f"cache URL {url!r}: priority must be a whole number, got {prio!r}")
    if prio is not None and len(prio.lstrip("+-").lstrip("0")) > MAX_DIGITS:  # (int() reads 4300 at most)
        raise CacheError(f"cache URL {url[:80]!r}{'...' if len(url) > 80 else ''}: priority "
                         f"{prio[:40]!r}{'...' if len(prio) > 40 else ''} is out of range (at most {MAX_DIGITS} digits)")
    if u.scheme == "file":
        if u.netloc not in ("", "localhost"):
            raise CacheError(f"cache URL {url!r}: file URLs must be file:///absolute/dir")
        path = urllib.parse.unquote(u.path)
        if not path.startswith("/"):
            raise CacheError(f"cache URL {url!r}: expected an absolute directory")
        return CacheURL(url, "file", os.path.normpath(path), params)
    if u.scheme in ("http", "https"):
        if not u.netloc:
            raise CacheError(f"cache URL {url!r}: missing host")
        path = u.path if u.path.endswith("/") else u.path + "/"
        return CacheURL(url, u.scheme, f"{u.scheme}://{u.netloc}{path}", params)  # (base: with the login)
    if u.scheme == "s3":
        if not u.netloc:
            raise CacheError(f"cache URL {url!r}: missing bucket (s3://BUCKET[/PREFIX])")
        if "token-file" in params:
            raise CacheError(f"cache URL {url!r}: an S3 cache signs its requests with AWS credentials, "
                             "not a token-file")
        return CacheURL(url, "s3", f"s3://{u.netloc}{u.path.rstrip('/')}/", params)
    if re.fullmatch(r"[A-Za-z0-9.-]+:\d+(/.*)?", url.split("?")[0]):  # host:port, no scheme
        hint = f"an HTTP cache is given with its scheme: http://{url}"
    elif not u.scheme and "/" not in u.path and "." in u.path and not os.path.exists(u.path):
        hint = (f"an HTTP cache is given with its scheme (http://{u.path}/), a cache directory as a "
                f"file URL (file://{os.path.abspath(u.path)})")
    elif not u.scheme:
        hint = f"a cache directory is given as a file URL: file://{os.path.abspath(u.path)}"
    elif u.scheme.startswith("ssh"):
        hint = "ssh caches are not supported yet"
    else:
        hint = None
    raise CacheError(f"unsupported cache URL {url!r}: expected file:///dir, http(s)://host[:port]/ or s3://bucket",
                     hint=hint)


def url_flag(cu: CacheURL, key: str) -> bool:
    """A true/false parameter of a cache URL (as Nix reads one: ``true``/``yes``/``1`` or
    ``false``/``no``/``0``; absent: false)."""
    v = cu.param(key, "false")
    if v in ("true", "yes", "1"):
        return True
    if v in ("false", "no", "0"):
        return False
    raise CacheError(f"cache URL {cu.url!r}: {key} must be true or false, got {v!r}")
