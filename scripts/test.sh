#!/usr/bin/env bash
# Runs the test suite from the project venv.  Optional oracles (Nix) are installed when we are
# root on Debian and they are missing; tests that need them are skipped when absent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && ! command -v nix-store >/dev/null && command -v apt-get >/dev/null; then
  echo "installing nix-bin (test oracle; optional)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null) \
    || echo "warning: could not install nix-bin; Nix comparison tests will be skipped"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
