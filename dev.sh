#!/usr/bin/env bash
# One entry point for a fresh machine with only Python >= 3.10:
#   bash dev.sh demo    -> set up .venv if needed, then run `qlora demo`
#   bash dev.sh test    -> set up .venv if needed, then run the whole test suite
#   bash dev.sh <args>  -> run `qlora <args>` inside the environment
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# Reinstall only when pyproject.toml changed since the last setup.
stamp=$(sha1sum pyproject.toml | cut -c1-40)
if [ "$(cat .dev-stamp 2>/dev/null)" != "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first, pinned to a known-good release: an unpinned requirement can
  # drag in a multi-GB build we do not need for CPU tests.
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  echo "$stamp" > .dev-stamp
fi

cmd=${1:-demo}
shift || true
case "$cmd" in
  test) exec "$VENV/bin/python" -m pytest tests "$@" ;;
  *)    exec "$VENV/bin/qlora" "$cmd" "$@" ;;
esac
