# Sourced by the run and test scripts: make sure .venv exists and holds purestore with its
# dependencies (and the test extras).  Re-installs only when setup.cfg changed.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtualenv $VENV"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "== installing python3-venv (apt)"
      apt-get update -qq || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      "$PYTHON" -m venv "$VENV"
    else
      echo "error: '$PYTHON -m venv' failed; install python3-venv" >&2
      exit 1
    fi
  fi
fi
stamp="$VENV/.installed"  # compat editable mode: a plain .pth entry, no import hook at start-up
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing purestore and its dependencies into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[test]' --config-settings editable_mode=compat
  touch "$stamp"
fi
# Byte-compile purestore now: with PYTHONDONTWRITEBYTECODE set (as on some machines) every `pure`
# command would otherwise compile its modules again (~50 ms each time).  Quick when up to date.
"$VENV/bin/python" -m compileall -q purestore >/dev/null || true
