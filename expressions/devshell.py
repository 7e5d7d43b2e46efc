"""A toolchain environment: one ``bin/`` with the C compiler wrappers, make and the shell tools.

    pure build expressions/devshell.py && PATH=$PWD/result/bin:$PATH cc --version
    pure shell expressions/devshell.py --pure --command 'cc --version && make --version'

Built by the bootstrap shell: a directory of symlinks, earlier inputs winning (so ``ar`` is zig's
and ``make`` is bmake).  The shell of ``pure shell`` is busybox's, which runs its own applets
before PATH (its ``ar`` cannot write archives): the shell hook makes ``ar`` a function calling
zig's and exports ``AR`` (for make and configure scripts), as the stdenv does in builds.
``make --version`` prints an empty line: bmake has no ``--version`` (it reads ``-v ersion``, the
value of a variable ``ersion``); ``make -V MAKE_VERSION`` prints its version (docs/environments.md).
"""

from purestore.expr import derivation

from pkgs.stdenv import toolchain
from pkgs.toolchain import bootstrap_tools, zig_cc as _zig_cc

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
    shellHook=f'ar() {{ "{_zig_cc}/bin/ar" "$@"; }}; export AR="{_zig_cc}/bin/ar"',
)

default = devshell
