#!/usr/bin/env bash
# The main job: set up .venv, then obtain the pinned seeds, grow the toolchain, build GNU hello
# 2.10 from its release tarball in the sandbox, and run it (scripts/run-hello.sh).
# scripts/run-example.sh is a quicker tour of the store commands alone.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
PURE="$PWD/.venv/bin/pure" exec bash scripts/run-hello.sh "$@"
