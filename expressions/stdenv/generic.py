"""``make_mk_derivation(toolchain)``: the generic stdenv derivation builder (no package imports)."""

import os

from purestore.expr import derivation, source

SYSTEM = "x86_64-linux"
_HERE = os.path.dirname(os.path.abspath(__file__))

#: The generic builder script (phases), added to the store once and shared by every package.
setup_script = source(os.path.join(_HERE, "setup.sh"), name="stdenv-setup.sh")


def _words(xs) -> list:
    return [x for x in xs]


def make_mk_derivation(toolchain):
    """Return ``mk_derivation`` for a toolchain: store paths whose ``bin/`` form PATH, in order.

    The last element must provide ``bin/sh`` (the bootstrap tools): it runs the setup script."""
    toolchain = list(toolchain)
    shell = f"{toolchain[-1]}/bin/sh"

    def mk_derivation(name, src=None, *, build_inputs=(), configure_flags=(), make_flags=(),
                      patches=(), outputs=("out",), do_check=False, **attrs):
        env = dict(
            name=name,
            system=SYSTEM,
            builder=shell,
            args=["-e", setup_script],
            stdenvPath=list(toolchain),
            buildInputs=_words(build_inputs),
            configureFlags=_words(configure_flags),
            makeFlags=_words(make_flags),
            patches=_words(patches),
            outputs=list(outputs),
            doCheck=bool(do_check),
        )
        if src is not None:
            env["src"] = src
        env.update(attrs)
        return derivation(**env)

    return mk_derivation
