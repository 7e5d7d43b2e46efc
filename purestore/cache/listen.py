"""Running a cache server: the ``--listen`` address, the TLS certificate and key, hypercorn.

- :func:`parse_listen` reads ``HOST:PORT`` (``[::1]:PORT`` for IPv6);
- :func:`check_listen_and_tls` checks an address and a certificate with its key before a
  server starts, with errors that say which file is wrong and how (OpenSSL only says
  ``PEM lib``);
- :func:`run_app` runs an ASGI application (:func:`.http_server.asgi_app`) with hypercorn on
  trio until cancelled, and reports the bound URLs through ``task_status``.
"""

from __future__ import annotations

import logging
import re

import trio

from ..errors import CacheError
from .http_server import _digits


def _check_tls(cert: str, key: str) -> None:
    """Load the certificate and key as the server will, for an error that names them and says
    what is wrong with which (OpenSSL itself only says ``PEM lib``)."""
    import ssl

    def no_password():
        raise _EncryptedKey

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=no_password)
    except FileNotFoundError as e:
        raise CacheError(f"TLS certificate or key file {e.filename or cert!r} does not exist") from None
    except _EncryptedKey:
        raise CacheError(f"the TLS key {key!r} is encrypted with a passphrase; the server cannot ask for it",
                         hint=f"write it out unencrypted: openssl pkey -in {key} -out KEYFILE") from None
    except ssl.SSLError as e:
        raise CacheError(f"cannot use the TLS certificate {cert!r} with the key {key!r}: "
                         f"{_tls_problem(cert, key) or _tls_words(e)}",
                         hint="--tls-cert is a PEM certificate (chain), --tls-key its PEM private key") from None
    except OSError as e:
        raise CacheError(f"cannot read the TLS certificate {cert!r} or key {key!r}: {e.strerror or e}") from None


class _EncryptedKey(Exception):
    pass


def _tls_problem(cert: str, key: str) -> str | None:
    """Which file OpenSSL did not like, when it can be told from their PEM headers."""
    try:
        with open(cert, "rb") as f:
            cert_text = f.read(1 << 20)
        with open(key, "rb") as f:
            key_text = f.read(1 << 20)
    except OSError:
        return None
    if b"-----BEGIN CERTIFICATE-----" not in cert_text:
        return f"{cert!r} holds no PEM certificate (no '-----BEGIN CERTIFICATE-----' line)"
    if not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", key_text):
        return f"{key!r} holds no PEM private key (no '-----BEGIN … PRIVATE KEY-----' line)"
    return None


def _tls_words(e) -> str:
    from .http import ssl_message
    text = ssl_message(e)
    if "key values mismatch" in text:
        return "the key is not the certificate's (key values mismatch)"
    return text


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → (host, port); raise :class:`CacheError`."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not _digits(port):
        raise CacheError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    if host.startswith("["):
        host = host[1:-1] if host.endswith("]") else ""
    if not host or "[" in host or "]" in host:
        raise CacheError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080",
                         hint="an IPv6 address is written between '[' and ']': [::1]:8080")
    if int(port) > 65535:
        raise CacheError(f"--listen {listen!r}: port {int(port)} is out of range (0 to 65535)")
    return host, int(port)


def check_listen_and_tls(listen: str, tls: tuple[str, str] | None) -> None:
    """Raise :class:`CacheError` for an address or a TLS certificate and key that cannot be used."""
    parse_listen(listen)
    if tls:
        _check_tls(*tls)


async def run_app(app, listen: str, *, tls: tuple[str, str] | None = None,
                  task_status=trio.TASK_STATUS_IGNORED, shutdown_trigger=None) -> None:
    """Run the ASGI ``app`` with hypercorn on ``listen`` (``HOST:PORT``) until cancelled;
    ``task_status.started(urls)``.  Raises :class:`CacheError` when the address or the TLS
    certificate cannot be used."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    host, port = parse_listen(listen)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # the app logs requests itself (asgi_app's access_log)
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    config.h11_max_incomplete_size = 64 * 1024
    config.include_server_header = False
    if tls:
        _check_tls(*tls)
        config.certfile, config.keyfile = tls
    try:
        await serve(app, config, task_status=task_status, shutdown_trigger=shutdown_trigger)
    except OSError as e:
        raise CacheError(f"cannot listen on {listen!r}: {e.strerror}") from e
    except BaseExceptionGroup as eg:  # hypercorn binds inside its own nursery
        bind = eg.subgroup(lambda e: isinstance(e, OSError))
        if bind is None:
            raise
        while isinstance(bind, BaseExceptionGroup):
            bind = bind.exceptions[0]
        raise CacheError(f"cannot listen on {listen!r}: {bind.strerror or bind}") from eg
