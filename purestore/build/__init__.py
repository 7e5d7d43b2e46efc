"""Layer 5: the builder (trio scheduler, Linux sandbox, outputs, logs, checks, builtins)."""
