#!/usr/bin/env bash
# The main job: set up .venv, then build and run the example.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec bash scripts/run-example.sh "$@"
