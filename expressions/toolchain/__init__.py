"""The first stage grown from the seeds: busybox's applets as a tool directory, and a C
toolchain (zig cc/ld/ar/ranlib wrappers) that runs inside the sandbox with nothing from the host.

Attributes: ``bootstrap_tools`` (``bin/sh`` and the core utilities), ``zig_cc`` (``bin/cc``,
``c++``, ``ld``, ``ar``, ``ranlib``, ``objcopy``, ``strip``), ``TARGET``; ``default`` is
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

default = zig_cc
