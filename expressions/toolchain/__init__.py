"""The first stage grown from the seeds: busybox's applets as a tool directory, and a C
toolchain (zig cc/ld/ar/ranlib wrappers) that runs inside the sandbox with nothing from the host.

Attributes: ``bootstrap_tools`` (``bin/sh`` and the core utilities), ``zig_cc`` (``bin/cc``,
``c++``, ``ld``, ``ar``, ``ranlib``, ``objcopy``, ``strip``), ``untar`` (``bin/untar``), ``TARGET``; ``default`` is
``zig_cc``.
"""

import os

from purestore.expr import derivation, source

import pkgs.seeds as seeds

SYSTEM = seeds.SYSTEM
#: What the C toolchain produces: static x86_64 Linux binaries against musl.
TARGET = "x86_64-linux-musl"

_HERE = os.path.dirname(os.path.abspath(__file__))

bootstrap_tools = derivation(
    name="bootstrap-tools-busybox-1.35.0",
    system=SYSTEM,
    builder=f"{seeds.busybox}/bin/busybox",
    args=["sh", "-e", source(os.path.join(_HERE, "bootstrap-tools.sh"))],
    busybox=seeds.busybox,
)

zig_cc = derivation(
    name="zig-cc-0.17.0",
    system=SYSTEM,
    builder=f"{bootstrap_tools}/bin/sh",
    args=["-e", source(os.path.join(_HERE, "zig-cc.sh"))],
    tools=bootstrap_tools,
    zig=seeds.zig,
    target=TARGET,
)

# The build script is passed inline (-c) and kept in a file so that benchmarks/hello.nix can use
# the very same text.
with open(os.path.join(_HERE, "untar-build.sh")) as _f:
    _UNTAR_BUILD = _f.read()

#: A small tar extractor (``bin/untar``, reads stdin): busybox's tar refuses pre-POSIX archives
#: such as GNU hello 2.10's release tarball.
untar = derivation(
    name="untar-1.0",
    system=SYSTEM,
    builder=f"{bootstrap_tools}/bin/sh",
    args=["-e", "-c", _UNTAR_BUILD],
    src=source(os.path.join(_HERE, "untar.c")),
    cc=zig_cc,
    tools=bootstrap_tools,
)

default = zig_cc
