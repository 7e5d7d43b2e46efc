# A derivation whose strings hold control characters, for `show-derivation`'s JSON escapes:
# nix-instantiate --store <tmp> control.nix; nix show-derivation --store <tmp> <drv> > control.json
derivation {
  name = "control"; system = "x86_64-linux"; builder = "/bin/sh";
  s = builtins.fromJSON "\"a\\bb\\fc\\u0001d\\u007fe\\n\\r\\t\\\\b\\\\\\f\"";
  args = [ (builtins.fromJSON "\"\\b\"") ];
}
