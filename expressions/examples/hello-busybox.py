"""Hello world with nothing but the busybox seed: the smallest real derivation.

    pure eval expressions/examples/hello-busybox.py --json     # paths, nothing written
    pure instantiate expressions/examples/hello-busybox.py     # the .drv path
    pure build expressions/examples/hello-busybox.py && ./result/bin/hello
"""

from purestore.expr import derivation

from pkgs.seeds import busybox

sh = f"{busybox}/bin/busybox"

hello = derivation(
    name="hello-busybox-1.0",
    system="x86_64-linux",
    builder=sh,
    args=["sh", "-c", """
        set -e
        $busybox mkdir -p $out/bin
        printf '#!%s sh\\necho "Hello, world!"\\n' "$busybox" > $out/bin/hello
        $busybox chmod +x $out/bin/hello
    """],
    busybox=sh,   # every other keyword becomes an environment variable of the build
)

default = hello
