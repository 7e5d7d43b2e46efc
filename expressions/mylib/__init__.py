"""A small C library (libgreet: ``lib/libgreet.a``, ``include/greet.h``) and a program that links
it (``greet``), both built with the stdenv from sources in this directory.

    pure build expressions/mylib/__init__.py -A greet && ./result/bin/greet you    # Hello, you!
"""

import os

from purestore.expr import source

from pkgs.stdenv import mk_derivation

_HERE = os.path.dirname(os.path.abspath(__file__))

libgreet = mk_derivation(
    "libgreet-1.0",
    source(os.path.join(_HERE, "libgreet"), name="libgreet-1.0-source"),
    # No -g (BSD make's default CFLAGS has it): a static archive is not stripped at link time,
    # and debug info would name the compiler's headers, a needless run-time reference.
    make_flags=["CFLAGS=-O2"],
    preInstall='makeFlags="$makeFlags PREFIX=$out"',
    do_check=True,
)

greet = mk_derivation(
    "greet-1.0",
    source(os.path.join(_HERE, "greet"), name="greet-1.0-source"),
    build_inputs=[libgreet],
    make_flags=[f"GREET={libgreet}"],
    preInstall='makeFlags="$makeFlags PREFIX=$out"',
    do_check=True,
)

default = greet
