"""Binary caches (layer 3): backends, push, substitution, the cache server.

Public API (re-exported here; the modules behind it are private to this package):

- :func:`substitute` (builder), :func:`substitute_report`, :func:`copy_from`, :func:`fetch_path`
- :func:`copy_to`, :func:`extra_files_for`, :func:`load_secret_key`
- :func:`open_backend`, :func:`parse_url`, :class:`Backend`
- :func:`serve_cache`, :func:`make_app`
- :class:`Progress`, :class:`TextProgress`
"""

from .backend import Backend as Backend, open_backend as open_backend, parse_url as parse_url
from .progress import Progress as Progress, TextProgress as TextProgress
from .push import (
    copy_to as copy_to, extra_files_for as extra_files_for, load_secret_key as load_secret_key,
    PushResult as PushResult,
)
from .substituter import (
    substitute as substitute, substitute_report as substitute_report, copy_from as copy_from,
    fetch_path as fetch_path, SubstituteReport as SubstituteReport,
)
from .server import serve_cache as serve_cache, make_app as make_app
