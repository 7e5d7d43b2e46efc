#!/usr/bin/env bash
# The main job: demonstrate the store on a rooted store under ./.pure-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PURE=.venv/bin/pure
export PURE_STORE="$PWD/.pure-demo"
mkdir -p "$PURE_STORE"
echo "== adding examples/ to the store at $PURE_STORE"
p=$($PURE store add expressions)
echo "$p"
$PURE store path-info --json "$p"
