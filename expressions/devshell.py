"""A toolchain environment: one ``bin/`` with the C compiler wrappers, make and the shell tools.

    pure build expressions/devshell.py && PATH=$PWD/result/bin:$PATH cc --version
    pure shell expressions/devshell.py --pure --command 'cc --version && make --version'

Built by the bootstrap shell: a directory of symlinks, earlier inputs winning (so ``ar`` is zig's
and ``make`` is bmake).
"""

from purestore.expr import derivation

from pkgs.stdenv import toolchain
from pkgs.toolchain import bootstrap_tools

_BUILD = r"""
PATH="$tools/bin"
mkdir -p "$out/bin"
for p in $paths; do
    for f in "$p"/bin/*; do
        n=$(basename "$f")
        [ -e "$out/bin/$n" ] || [ -L "$out/bin/$n" ] || ln -s "$f" "$out/bin/$n"
    done
done
cat > "$out/env.sh" <<EOS
# Source this to use the devshell: PATH, and zig's cache in a fixed per-user place.
export PATH="$out/bin\${PATH:+:\$PATH}"
export ZIG_GLOBAL_CACHE_DIR="\${ZIG_GLOBAL_CACHE_DIR:-\${TMPDIR:-/tmp}/.zig-cache-\$(id -u)}"
EOS
echo "devshell: $(ls "$out/bin" | wc -l) commands"
"""

devshell = derivation(
    name="devshell",
    system="x86_64-linux",
    builder=f"{bootstrap_tools}/bin/sh",
    args=["-e", "-c", _BUILD],
    tools=bootstrap_tools,
    paths=list(toolchain),
)

default = devshell
