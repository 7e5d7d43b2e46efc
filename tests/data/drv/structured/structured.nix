# A derivation with structured attributes: Nix 2.8 writes its attributes as JSON in the
# environment variable __json (nix-instantiate --store <tmp> structured.nix). purestore shows it
# and substitutes its outputs, but does not build it (it writes no .attrs.json/.attrs.sh).
derivation { name = "sa"; system = "x86_64-linux"; builder = "/bin/sh"; __structuredAttrs = true;
             args = [ "-c" "true" ]; xs = [ 1 "a" true null ]; outputs = [ "out" "lib" ]; }
