"""Layer 1: the formats purestore shares with Nix.  Pure functions and frozen values; no I/O
beyond file objects passed in, no trio, no store."""
