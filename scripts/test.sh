#!/usr/bin/env bash
# Runs the test suite (creating .venv and installing what it needs first).
# System packages the tests use, installed when we are root on Debian and they are missing:
#   busybox-static  a static shell + core utilities used as the builder in sandbox tests
#   nix-bin         Nix 2.8, the oracle for live format comparisons (tests skip without it)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
want=()
dpkg -s busybox-static >/dev/null 2>&1 || want+=(busybox-static)
command -v nix-store >/dev/null || want+=(nix-bin)
if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${want[*]} (apt)"
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >/dev/null \
      || echo "warning: could not install ${want[*]}; tests needing them will be skipped"
  else
    echo "note: ${want[*]} missing and not root; tests needing them will be skipped"
  fi
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
