#!/usr/bin/env bash
# From a fresh machine to GNU hello built by purestore:
#   1. obtain the bootstrap seeds (static busybox, the zig compiler) and the GNU hello and BSD make
#      release tarballs with the package clients (apt-get, pip), each checked against its pin in
#      bootstrap/seeds.lock;
#   2. grow the toolchain from the seeds and build GNU hello 2.10 from its tarball, every step in
#      the build sandbox with nothing from the host;
#   3. run ./result/bin/hello.
#
# Environment: PURE_STORE=ROOT to use a rooted store (default: the system store /pure/store when
# we may write there, else ~/.cache/purestore/root); VERBOSE=1 to show the build logs;
# PURE_SEED_CACHE=DIR to keep downloaded seeds between stores (optional).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*" >&2; }
t0=$(date +%s)

PURE=${PURE:-}
if [ -z "$PURE" ]; then
    if [ ! -x .venv/bin/pure ]; then
        step "installing purestore into .venv"
        python3 -m venv .venv
        .venv/bin/pip install -q -e .
    fi
    PURE=.venv/bin/pure
fi

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "error: '$tool' is needed to obtain the seeds (Debian's package client)" >&2; exit 1; }
done

if [ -z "${PURE_STORE:-}" ]; then
    if [ "$(id -u)" != 0 ] && ! { mkdir -p /pure 2>/dev/null && [ -w /pure ]; }; then
        export PURE_STORE="$HOME/.cache/purestore/root"
        mkdir -p "$PURE_STORE"
    fi
fi
echo "store: ${PURE_STORE:-/ (system store)}, store dir /pure/store" >&2

log=()
[ "${VERBOSE:-}" = 1 ] && log=(-L)

step "1/3 obtaining the seeds and sources (apt-get, pip; pinned in bootstrap/seeds.lock)"
"$PURE" build --no-link "${log[@]}" expressions/seeds.py

step "2/3 building the toolchain, BSD make and GNU hello 2.10 from source in the sandbox"
"$PURE" build "${log[@]}" expressions/hello.py

step "3/3 running ./result/bin/hello"
./result/bin/hello
./result/bin/hello --version | head -n 1

echo >&2
echo "done in $(( $(date +%s) - t0 )) s: $(readlink result)" >&2
