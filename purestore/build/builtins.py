"""Builtin builders: derivations whose builder is ``builtin:NAME`` run here, not in a sandbox.

Each entry of :data:`BUILTIN_BUILDERS` is ``fn(drv, out, log)``: ``drv`` the
:class:`~purestore.formats.derivation.Derivation`, ``out`` the physical path of the output to
create (it does not exist yet), ``log(line)`` adds a line to the build log (and ``log.alive()``,
where ``log`` has it, says that a download made progress: see :mod:`._builtin_child`).  It runs
in a process of its own (:func:`.running.run_builtin`: the settings' ``timeout``,
``max-silent-time`` and ``max-build-log-size`` bound it, and an interrupt ends it, as they do a
sandboxed builder), outside the sandbox, and may use the network; it raises
:class:`~purestore.errors.BuildError` on failure.  Builtin builders are only allowed for
fixed-output derivations, whose output hash the scheduler checks afterwards.

``builtin:fetchurl`` (Nix's ``builtin:fetchurl``): env ``url`` (or ``urls``, space-separated,
tried in order), optional ``executable`` ("1"), ``unpack`` is not supported.  http, https and
file URLs, through urllib.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from typing import Callable

from ..errors import BuildError
from ..formats.derivation import Derivation

Log = Callable[[str], None]

FETCH_TIMEOUT = 60


def fetchurl(drv: Derivation, out: str, log: Log) -> None:
    urls = (drv.env.get("urls") or drv.env.get("url") or "").split()
    if not urls:
        raise BuildError(f"builtin:fetchurl for {drv.env.get('name', '?')!r} has no 'url' attribute")
    if drv.env.get("unpack") == "1":
        raise BuildError("builtin:fetchurl: unpack = True is not supported")
    alive = getattr(log, "alive", lambda: None)  # (a download that goes on is not silent)
    errors = []
    for url in urls:
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("http", "https", "file"):
            errors.append(f"{url}: unsupported URL scheme {scheme!r} (expected http, https or file)")
            continue
        log(f"downloading '{url}'...")
        tmp = out + ".part"
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "purestore"})
            with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT) as resp, open(tmp, "wb") as f:
                while chunk := resp.read(1 << 16):
                    f.write(chunk)
                    alive()
                _check_complete(resp)
            os.rename(tmp, out)
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            if isinstance(e, urllib.error.HTTPError):
                reason = f"HTTP error {e.code} ({e.reason})"
            elif isinstance(e, http.client.IncompleteRead):
                reason = "the connection ended before the end of the download" + (
                    f" ({e.expected} more bytes were expected)" if e.expected else "")
            elif isinstance(e, http.client.HTTPException) and not isinstance(e, OSError):
                # a malformed response (BadStatusLine, LineTooLong, a bad chunk ...): a message
                # that names the class, as the message alone may be just the offending line
                reason = f"malformed HTTP response ({type(e).__name__}: {str(e)[:200]!r})"
            else:
                reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
            errors.append(f"{url}: {reason}")
            log(f"error: {url}: {reason}")
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            continue
        os.chmod(out, 0o755 if drv.env.get("executable") == "1" else 0o644)
        return
    raise BuildError("builtin:fetchurl could not download " + drv.env.get("name", "?") + ":\n  "
                     + "\n  ".join(errors))


def _check_complete(resp) -> None:
    """Raise IncompleteRead when the body ended before its Content-Length: reading in chunks
    (``read(amt)``), http.client takes the connection closing early for the end of the body."""
    if isinstance(resp, http.client.HTTPResponse) and resp.length:
        raise http.client.IncompleteRead(b"", resp.length) from None


BUILTIN_BUILDERS: dict[str, Callable[[Derivation, str, Log], None]] = {
    "builtin:fetchurl": fetchurl,
}

# Registry fetchers for the bootstrap seeds and source tarballs (pip, apt): see registry_fetch.py.
from .registry_fetch import BUILTINS as _REGISTRY_FETCHERS  # noqa: E402
BUILTIN_BUILDERS.update(_REGISTRY_FETCHERS)
