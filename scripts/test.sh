#!/usr/bin/env bash
# Runs the test suite (creating .venv and installing what it needs first).
# System packages the tests use, installed when we are root on Debian and they are missing:
#   busybox-static  a static shell + core utilities used as the builder in sandbox tests
#   nix-bin         Nix 2.8, the oracle for live format comparisons (tests skip without it)
#   nginx-light     a static web server that must serve a cache written by `pure copy` (and
#                   behind basic authentication, over TLS); not started as a service
#   openssl         makes the self-signed certificates of the TLS tests
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
want=()
dpkg -s busybox-static >/dev/null 2>&1 || want+=(busybox-static)
command -v nix-store >/dev/null || want+=(nix-bin)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || want+=(nginx-light)
command -v openssl >/dev/null || want+=(openssl)
if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${want[*]} (apt)"
    apt-get update -qq || true
    # no service is started by the packages' scripts (nginx would take port 80): the tests
    # run their own servers on 127.0.0.1
    policy=/usr/sbin/policy-rc.d made=
    if [ ! -e "$policy" ] && printf '#!/bin/sh\nexit 101\n' 2>/dev/null >"$policy"; then
      chmod +x "$policy"; made=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >/dev/null \
      || echo "warning: could not install ${want[*]}; tests needing them will be skipped"
    [ -z "$made" ] || rm -f "$policy"
  else
    echo "note: ${want[*]} missing and not root; tests needing them will be skipped"
  fi
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
