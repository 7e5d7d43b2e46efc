"""The expression API: what build expression files import.

    from purestore.expr import derivation, source, to_file, fetchurl

See docs/expressions.md.  The loader (pure evaluation, instantiation) is
:mod:`purestore.expr.loader`.
"""

from .api import derivation as derivation
from .api import evaluating as evaluating
from .api import fetchurl as fetchurl
from .api import source as source
from .api import to_file as to_file
from .values import Drv as Drv
from .values import Output as Output
from .values import Source as Source

__all__ = ["derivation", "source", "to_file", "fetchurl", "evaluating", "Drv", "Output", "Source"]
