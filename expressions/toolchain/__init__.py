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

_UNTAR_BUILD = r"""
PATH="$cc/bin:$tools/bin"
mkdir -p "$out/bin"
cc -O2 -o "$out/bin/untar" "$src"
# Self-test: a round trip through busybox tar (ustar) must give back the same tree.
cd "$TMPDIR" && mkdir -p t/a/b x && echo hi > t/a/b/f && chmod +x t/a/b/f && ln -s b/f t/a/l
tar cf t.tar t && "$out/bin/untar" -C x < t.tar
[ "$(cat x/t/a/b/f)" = hi ] && [ -x x/t/a/b/f ] && [ "$(readlink x/t/a/l)" = b/f ]
echo "untar: ok"
"""

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
