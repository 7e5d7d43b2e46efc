#!/usr/bin/env bash
# Regenerates golden.json and golden/*.drv from cases.nix with Nix (2.8 was used):
#   bash tests/data/drv/gen-golden.sh
# For every derivation attribute of cases.nix: its .drv path, its output paths, and the bytes of
# every .drv in its closure (golden/<base name>).  Runs in a throwaway chroot store.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
store="$(mktemp -d)"
trap 'chmod -R u+w "$store"; rm -rf "$store"' EXIT
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command'
attrs=$(nix-instantiate --store "$store" --eval --json -E "builtins.attrNames (builtins.removeAttrs (import $here/cases.nix) [\"text_a\" \"text_b\"])" | tr -d '[]"' | tr ',' ' ')
rm -rf "$here/golden"; mkdir -p "$here/golden"
{
  echo "{"
  first=1
  for a in $attrs; do
    drv=$(nix-instantiate --store "$store" "$here/cases.nix" -A "$a" 2>/dev/null)
    drv="${drv%%!*}"  # "path!output" when the first output is not out
    outs=$(nix-store --store "$store" -q --outputs "$drv" | tr '\n' ' ')
    for d in $(nix-store --store "$store" -qR "$drv" | grep '\.drv$'); do
      cp "$store$d" "$here/golden/$(basename "$d")"
    done
    [ $first = 1 ] || echo ","
    first=0
    printf '  "%s": {"drv": "%s", "outputs": "%s"}' "$a" "$drv" "${outs% }"
  done
  for a in text_a text_b; do
    p=$(nix-instantiate --store "$store" --eval "$here/cases.nix" -A "$a" | tr -d '"')
    printf ',\n  "%s": {"text": "%s"}' "$a" "$p"
  done
  echo
  echo "}"
} > "$here/golden.json"
chmod 644 "$here"/golden/*
echo "wrote $here/golden.json and $(ls "$here/golden" | wc -l) .drv files"
