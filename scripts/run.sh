#!/usr/bin/env bash
# Set up a virtual environment with Python >= 3.12 and run ring_jax's main job or its tests.
#
#   bash scripts/run.sh train [train.py flags]   # install, then train configs/default.py on the embedded data
#   bash scripts/run.sh test  [pytest args]      # install with the dev, torch and plot extras, then run the test suite
#
# Python is taken from $PYTHON, else the first of python3.12 / python3.13 / python3 that is >= 3.12, else a
# pyenv-installed 3.12+ (pyenv shims only answer for the active version), else `uv python find`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

usable() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.12 python3.13 python3; do
    [ -n "$candidate" ] && usable "$candidate" && { command -v "$candidate"; return; }
  done
  if command -v pyenv >/dev/null 2>&1; then
    for candidate in $(ls -d "$(pyenv root)"/versions/3.1[2-9]*/bin/python 2>/dev/null | sort -V); do
      usable "$candidate" && { echo "$candidate"; return; }
    done
  fi
  if command -v uv >/dev/null 2>&1 && candidate=$(uv python find '>=3.12' 2>/dev/null) && usable "$candidate"; then
    echo "$candidate"; return
  fi
  echo "ring_jax needs Python >= 3.12 (JAX >= 0.11 does); install one or set PYTHON=/path/to/python3.12" >&2
  exit 1
}

install() {  # $1: pip extras, e.g. "[dev,torch]"
  if [ ! -x "$VENV/bin/python" ]; then
    "$(find_python)" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".$1"
}

command=${1:-}
shift || true
case "$command" in
  train)
    install ""
    exec "$VENV/bin/python" train.py "$@"
    ;;
  test)
    install "[dev,torch,plot]"
    status=0
    "$VENV/bin/python" -m pytest -q "$@" || status=$?
    if [ "$status" -eq 5 ]; then
      echo "pytest collected no tests: treating as a failure" >&2
      exit 1
    fi
    exit "$status"
    ;;
  *)
    echo "usage: bash scripts/run.sh {train|test} [args]" >&2
    exit 2
    ;;
esac
