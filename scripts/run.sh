#!/usr/bin/env bash
# Create the project environment if missing, then run a job in it.
#   bash scripts/run.sh demo [args]   the main job (a 4-rank Ulysses attention run, checked)
#   bash scripts/run.sh test [args]   the whole test suite (pytest args pass through)
#   bash scripts/run.sh <cmd> [args]  any command inside the environment
# VENV=/path overrides the environment location (default: .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-test}"
stamp="$VENV/.ulysses-installed"
want="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)-$EXTRAS"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo ">> setting up $VENV (torch 2.13.0 CPU from the local wheel; extras: $EXTRAS)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c scripts/constraints.txt torch==2.13.0
  "$VENV/bin/python" -m pip install --quiet -c scripts/constraints.txt -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi

job="${1:-demo}"; shift || true
case "$job" in
  demo) exec "$VENV/bin/ulysses-dtensor" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  *)    exec "$VENV/bin/$job" "$@" ;;
esac
