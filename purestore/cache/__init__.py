"""Binary caches (layer 3): backends, push, substitution, the cache server.

Public API (re-exported here, imported when first used, so that a command that only substitutes
does not load the push and server modules; the modules behind it are private to this package):

- :func:`substitute` (builder), :func:`substitute_report`, :func:`copy_from`, :func:`fetch_path`
- :func:`copy_to`, :func:`extra_files_for`, :func:`load_secret_key`
- :func:`open_backend`, :func:`parse_url`, :class:`Backend`
- :func:`serve_cache`, :func:`make_app`
- :class:`Progress`, :class:`TextProgress`
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Backend": "backend", "open_backend": "backend", "parse_url": "backend",
    "Progress": "progress", "TextProgress": "progress",
    "copy_to": "push", "extra_files_for": "push", "load_secret_key": "push", "PushResult": "push",
    "substitute": "substituter", "substitute_report": "substituter", "copy_from": "substituter",
    "fetch_path": "substituter", "SubstituteReport": "substituter",
    "serve_cache": "server", "make_app": "server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
