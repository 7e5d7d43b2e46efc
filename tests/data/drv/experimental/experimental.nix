# Derivations of Nix 2.8's experimental features, which purestore does not support: their .drv
# files (next to this file) must be refused as such, not taken for damaged ones; usesca.json is
# `nix show-derivation` of the one with a deferred output path, which is shown as Nix shows it.
# nix-instantiate --store <tmp> experimental.nix -A <attr>, with
# NIX_CONFIG=$'substituters =\nexperimental-features = nix-command ca-derivations impure-derivations'
rec {
  cafloat = derivation { name = "cafloat"; system = "x86_64-linux"; builder = "/bin/sh"; __contentAddressed = true;
                         outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputs = [ "out" "dev" ]; };
  imp = derivation { name = "imp"; system = "x86_64-linux"; builder = "/bin/sh"; __impure = true; };
  # an input-addressed derivation with a floating input: its output path is deferred ("")
  usesca = derivation { name = "usesca"; system = "x86_64-linux"; builder = "/bin/sh"; x = cafloat; };
}
