"""Layer 7: the `pure` command line.  Parsing and presentation only; commands call library code."""
