"""Reading a cache server's answers, for the HTTP and S3 backends (:mod:`.http_backend`,
:mod:`.s3_backend`): plain functions of a response, no requests.

- :func:`_status_line` words an answer's status (``HTTP 401 Unauthorized``), and
  :func:`_server_says` quotes the short line of text a server gives as its reason;
- :func:`_retry_after_header` reads ``Retry-After`` (seconds or an HTTP date, bounded);
- :func:`whole_limit` is the most bytes read of a file fetched whole; :func:`_small` says
  whether an answer declares a small body, :func:`_no_chunks` is an empty one.
"""

from __future__ import annotations

import datetime
import email.utils
import time
from typing import AsyncIterator

from ..formats.narinfo import MAX_SIZE


def _status_line(r) -> str:
    """``HTTP 401 Unauthorized``: with the standard reason when the server sent none (HTTP/2
    style servers such as hypercorn)."""
    reason = r.reason
    if not reason:
        import http as stdlib_http
        try:
            reason = stdlib_http.HTTPStatus(r.status).phrase
        except ValueError:
            return f"HTTP {r.status}"
    return f"HTTP {r.status} {reason}"


def _server_says(r, data: bytes) -> str:
    """``: "TEXT"`` for an answer whose body is one short line of plain text (what a cache
    server says about a refusal), else ""."""
    if not r.headers.get("content-type", "text/plain").lower().startswith("text/plain"):
        return ""
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return ""
    if not text or len(text) > 200 or "\n" in text or not text.isprintable():
        return ""
    return f': "{text}"'


def _small(r, limit: int = 1 << 16) -> bool:
    """The response declares a body of at most ``limit`` bytes."""
    try:
        return int(r.headers.get("content-length", "")) <= limit
    except ValueError:
        return False


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield


MAX_SMALL_FILE = MAX_SIZE  # bytes of a narinfo or nix-cache-info read at most


def whole_limit(name: str) -> int:
    """The most bytes read of file ``name`` of a cache, fetched whole: a narinfo or
    ``nix-cache-info`` is a few KiB (16 MiB would be a path with 200,000 references), a small
    NAR is fetched whole only up to 1 MiB; listings and logs may be big, but not without end."""
    from .content_encoding import MAX_DECODED
    if name == "nix-cache-info" or name.endswith(".narinfo"):
        return MAX_SMALL_FILE
    return MAX_DECODED


MAX_RETRY_AFTER = 60  # seconds of a server's Retry-After honoured at most


def _retry_after_header(r, now: float | None = None) -> float:
    """``Retry-After: SECONDS`` or ``Retry-After: HTTP-DATE`` → seconds from ``now`` (default the
    clock), at most :data:`MAX_RETRY_AFTER`; 0 when absent, past or unreadable."""
    v = r.headers.get("retry-after", "").strip()
    if v.isascii() and v.isdigit():
        v = v.lstrip("0") or "0"
        if len(v) > 9:  # (more than int() reads, 4300 digits, too: the most it is)
            return float(MAX_RETRY_AFTER)
        return float(min(int(v), MAX_RETRY_AFTER))
    try:
        dt = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0
    when = (dt if dt.tzinfo else dt.replace(tzinfo=datetime.timezone.utc)).timestamp()  # HTTP dates are GMT
    return min(max(when - (time.time() if now is None else now), 0.0), float(MAX_RETRY_AFTER))
