# The same two derivations as compat.py, for Nix.  ./bb/bin/busybox is a static busybox.
let
  B = "${./bb}/bin/busybox";
  dep = derivation {
    name = "dep"; system = "x86_64-linux"; builder = B; inherit B;
    args = [ "sh" "-c" "$B mkdir $out; echo dep > $out/f; $B ln -s $out/f $out/self; $B chmod 755 $out/f" ];
  };
  top = derivation {
    name = "top"; system = "x86_64-linux"; builder = B; inherit B;
    outputs = [ "out" "dev" ];
    args = [ "sh" "-c" "$B mkdir $out $dev; echo ${dep} > $out/dep; echo $dev > $out/devref; echo d > $dev/d" ];
  };
in { inherit dep top; }
