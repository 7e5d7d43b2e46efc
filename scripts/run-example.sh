#!/usr/bin/env bash
# The demo: add a tree to a rooted store under ./.pure-demo, show what the store records for it,
# and check the store.  Safe to run repeatedly (adding is idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PURE=.venv/bin/pure
export PURE_STORE="$PWD/.pure-demo"
mkdir -p "$PURE_STORE"
echo "== adding expressions/ to the store at $PURE_STORE"
p=$($PURE store add expressions)
echo "$p"
echo "== its path info"
$PURE store path-info --json --closure-size "$p"
echo "== the same tree as a Nix store path (--store-dir /nix/store), without copying"
$PURE --store-dir /nix/store store add --dry-run expressions
echo "== verifying the store"
$PURE store verify --check-contents
