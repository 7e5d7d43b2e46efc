"""A tour of derivation(): multiple outputs, passAsFile, sources, to_file, dependencies.

    pure show-derivation expressions/examples/features.py -A app -r
"""

from purestore.expr import derivation, source, to_file

from pkgs.seeds import busybox

sh = f"{busybox}/bin/busybox"
greeting = source("files/greeting.txt")          # a file next to this one, added as a source path
script = to_file("install-lib.sh", f"""
set -e
$bb mkdir -p $out/share $dev/include $doc
$bb cp {greeting} $out/share/greeting.txt
echo '#define GREETING "hi"' > $dev/include/greet.h
$bb cp $notesPath $doc/NOTES
""")                                               # its references: the greeting source

lib = derivation(
    name="greet-lib-0.1",
    system="x86_64-linux",
    builder=sh,
    args=["sh", script],
    outputs=["out", "dev", "doc"],                   # three outputs, three store paths
    bb=sh,
    passAsFile=["notes"],                            # the builder gets $notesPath, a file
    notes="Long text is better passed as a file.\n",
    enableDebug=False,                               # becomes "" (True would be "1")
    jobs=4,                                          # becomes "4"
    flags=["-O2", "-g"],                             # becomes "-O2 -g"
)

app = derivation(
    name="greet-app-0.1",
    system="x86_64-linux",
    builder=sh,
    # mentioning lib's dev output makes lib an input (with just that output)
    args=["sh", "-c", f"$bb mkdir -p $out && $bb cp {lib.outputs['dev']}/include/greet.h $out/"],
    bb=sh,
)

default = {"lib": lib, "app": app}
