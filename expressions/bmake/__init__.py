"""BSD make 20200710 (Debian's ``bmake`` orig tarball), the first make: it builds with its own
``boot-strap`` shell script and a C compiler, so it needs no make.  Installed also as ``make``
(automake's Makefiles call ``make`` for recursion), with its ``mk`` files as the default sys path
and the store's shell as the default shell of its commands (no ``/bin/sh`` in the sandbox)."""

import os

from purestore.expr import source

from pkgs.seeds import bmake_src
from pkgs.stdenv.stage0 import mk_derivation

_HERE = os.path.dirname(os.path.abspath(__file__))

bmake = mk_derivation(
    "bmake-20200710",
    bmake_src,
    bmakeBuild=source(os.path.join(_HERE, "build.sh"), name="bmake-build.sh"),
    configurePhase='. "$bmakeBuild"; bmake_configure',
    buildPhase='. "$bmakeBuild"; bmake_build',
    installPhase='. "$bmakeBuild"; bmake_install',
)

default = bmake
