# The same two derivations as compat.nix, for purestore.  ./bb/bin/busybox is a static busybox.
from purestore.expr import derivation, source

B = f"{source('bb')}/bin/busybox"
dep = derivation(
    name="dep", system="x86_64-linux", builder=B, B=B,
    args=["sh", "-c", "$B mkdir $out; echo dep > $out/f; $B ln -s $out/f $out/self; $B chmod 755 $out/f"],
)
top = derivation(
    name="top", system="x86_64-linux", builder=B, B=B, outputs=["out", "dev"],
    args=["sh", "-c", f"$B mkdir $out $dev; echo {dep} > $out/dep; echo $dev > $out/devref; echo d > $dev/d"],
)
