"""The three-derivation graph of tests/data/drv/mini-graph.md, in Python.

    pure --store-dir /nix/store instantiate expressions/examples/mini-graph.py -A top

prints /nix/store/lchmkny4jliss67w78hfw9xhgy07skhn-top.drv, exactly what nix-instantiate gives.
It is for instantiating only: the builder /bin/sh does not exist in the build sandbox.
"""

from purestore.expr import derivation

fod = derivation(name="fod", system="x86_64-linux", builder="/bin/sh",
                 args=["-c", "printf hello > $out"], outputHashMode="flat", outputHashAlgo="sha256",
                 outputHash="2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
dep = derivation(name="dep", system="x86_64-linux", builder="/bin/sh", args=["-c", "echo dep > $out"])
top = derivation(name="top", system="x86_64-linux", builder="/bin/sh", args=["-c", f"cat {fod} {dep} > $out"])
default = top
