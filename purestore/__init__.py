"""purestore: a hermetic, reproducible build system and package store, modelled on Nix."""

__version__ = "0.1.0"
