"""What an HTTP cache client shows the server and what it trusts of it: tokens, logins, CAs.

- :func:`read_token_file` reads a token file (the client's ``token-file``, a server's upload
  and read tokens);
- :func:`token_problem` says what makes a token (a token file's, ``PURE_CACHE_TOKEN``, or
  the token files a server is started with) unfit to be sent as ``Authorization: Bearer
  TOKEN``, without quoting it;
- :func:`netrc_login` finds the login for a host in the netrc file (``netrc-file``), as Nix
  gives curl one, with errors that say where the file is wrong;
- :func:`_ssl_context` makes the TLS context for https caches from ``ssl-cert-file``'s CAs.

:func:`.http_backend.open_http_backend` gathers them for an HTTP cache (:mod:`.s3_backend`
has credentials of its own, and takes only the TLS context).
"""

from __future__ import annotations

import os

from ..errors import CacheError


def token_problem(token: bytes) -> str | None:
    """What makes ``token`` (a token file's bytes, white space at its ends stripped) unfit to be
    sent as ``Authorization: Bearer TOKEN``, said so that it follows the token's source
    ("... is empty"); None when it is fit.  The message never quotes the token."""
    if not token:
        return "is empty"
    if b"\n" in token or b"\r" in token:
        return "has several lines: a token is one line"
    bad = next((i for i, b in enumerate(token) if not 0x21 <= b <= 0x7e), None)
    if bad is not None:
        return (f"has a character an HTTP header cannot carry as a token (byte {bad + 1}): a token is "
                "printable ASCII characters without spaces")
    return None


def read_token_file(path: str, what: str) -> tuple[str, int]:
    """The token in the file ``path`` and the file's mode; :class:`CacheError` when it cannot be
    read or the token is unfit (:func:`token_problem`), naming it as ``what`` token file."""
    try:
        with open(path, "rb") as f:
            raw = f.read().strip()
            mode = os.fstat(f.fileno()).st_mode
    except OSError as e:
        raise CacheError(f"cannot read {what} token file {path!r}: {e.strerror}") from e
    problem = token_problem(raw)
    if problem:
        raise CacheError(f"{what} token file {path!r} {problem}")
    return raw.decode("ascii"), mode


def netrc_login(netrc_file: str | None, host: str) -> tuple[str, str] | None:
    """The (login, password) for ``host`` in the netrc file (its ``machine HOST`` entry, else its
    ``default`` one), as Nix's ``netrc-file`` gives curl; None when the file or an entry is
    missing.  A file that cannot be read or parsed is an error that says where."""
    if not netrc_file or not os.path.lexists(netrc_file):  # the usual case: no module to import
        return None
    import netrc

    from ._netrc import missing_value
    hint = "the format is 'machine HOST login NAME password SECRET' (see netrc-file in docs/caches.md)"
    try:
        entry = netrc.netrc(netrc_file).authenticators(host)
        with open(netrc_file, encoding="utf-8") as f:
            missing = missing_value(f.read())
    except FileNotFoundError:
        return None
    except netrc.NetrcParseError as e:
        raise CacheError(f"netrc file {netrc_file!r}, line {e.lineno}: {e.msg}", hint=hint) from None
    except OSError as e:
        raise CacheError(f"cannot read netrc file {netrc_file!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise CacheError(f"netrc file {netrc_file!r} is not UTF-8 text (byte {e.start})",
                         hint="logins and passwords in it must be UTF-8") from None
    if missing is not None:
        raise CacheError(f"netrc file {netrc_file!r}, line {missing[0]}: {missing[1]}", hint=hint)
    if entry is None or not entry[0]:
        return None
    login, _account, password = entry
    return login, password or ""


def _ssl_context(ssl_cert_file: str | None):
    """The TLS context for https caches: the system's CAs, or those of ``ssl_cert_file``."""
    if not ssl_cert_file:
        return None
    import ssl
    try:
        return ssl.create_default_context(cafile=ssl_cert_file)
    except FileNotFoundError:
        raise CacheError(f"CA certificate file {ssl_cert_file!r} (ssl-cert-file) does not exist") from None
    except ssl.SSLError as e:
        from .http import ssl_message
        raise CacheError(f"cannot load CA certificates from {ssl_cert_file!r} (ssl-cert-file): {ssl_message(e)}",
                         hint="ssl-cert-file names a file of PEM certificates") from None
    except OSError as e:
        reason = e.strerror or str(e)
        raise CacheError(f"cannot load CA certificates from {ssl_cert_file!r} (ssl-cert-file): {reason}",
                         hint="ssl-cert-file names a file of PEM certificates") from None
