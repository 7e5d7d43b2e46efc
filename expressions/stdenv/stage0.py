"""Stage 0 of the stdenv: the bootstrap tools and the zig C toolchain, but no make yet."""

from pkgs.stdenv.generic import make_mk_derivation
from pkgs.toolchain import bootstrap_tools, untar, zig_cc

toolchain = [zig_cc, untar, bootstrap_tools]
mk_derivation = make_mk_derivation(toolchain)
