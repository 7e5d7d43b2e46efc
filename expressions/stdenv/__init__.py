"""The standard build environment: ``mk_derivation`` runs ``setup.sh`` (unpack, patch, configure,
build, check, install, fixup) with the bootstrap shell, the zig C toolchain and BSD make on PATH.

    from pkgs.stdenv import mk_derivation
    hello = mk_derivation("hello-2.10", hello_src, configure_flags=["--disable-nls"])

``mk_derivation(name, src=None, *, build_inputs=(), configure_flags=(), make_flags=(),
patches=(), outputs=("out",), do_check=False, **attrs)``: ``attrs`` go into the derivation's
environment verbatim, so phases are overridden the Nix way (``buildPhase="..."``,
``preConfigure="..."``, ``dontFixup=True``).  ``stdenv.stage0`` offers the same without make
(used to build make itself).
"""

from pkgs.stdenv.generic import make_mk_derivation, setup_script, SYSTEM  # noqa: F401
from pkgs.stdenv.stage0 import mk_derivation as mk_derivation_nomake, toolchain as toolchain0
from pkgs.bmake import bmake

#: What every stdenv build has on PATH, in order.
toolchain = [toolchain0[0], bmake, *toolchain0[1:]]

mk_derivation = make_mk_derivation(toolchain)

default = bmake
