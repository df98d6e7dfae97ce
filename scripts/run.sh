#!/usr/bin/env bash
# Create the project environment if missing, then run a job in it.
#   bash scripts/run.sh train [args]  the main job: ulysses-dtensor train (4 ranks, retrieval task)
#   bash scripts/run.sh demo [args]   a 4-rank Ulysses attention run, checked against one process
#   bash scripts/run.sh test [args]   the whole test suite (pytest args pass through)
#   bash scripts/run.sh <cmd> [args]  any command inside the environment
# VENV=/path overrides the environment location (default: .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-test,hf,torchtitan,plot}"
stamp="$VENV/.ulysses-installed"
want="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)-$EXTRAS"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo ">> setting up $VENV (torch 2.13.0 CPU from the local wheel; extras: $EXTRAS)" >&2
  python3 -m venv "$VENV"
  log="$VENV/install.log"
  if ! { "$VENV/bin/python" -m pip install --upgrade pip \
         && "$VENV/bin/python" -m pip install -c scripts/constraints.txt torch==2.13.0 \
         && "$VENV/bin/python" -m pip install -c scripts/constraints.txt -e ".[$EXTRAS]"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo ">> environment setup failed; full log: $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
  echo ">> environment ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2
fi

job="${1:-train}"; shift || true
case "$job" in
  train) exec "$VENV/bin/ulysses-dtensor" train "$@" ;;
  demo) exec "$VENV/bin/ulysses-dtensor" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  *)    exec "$VENV/bin/$job" "$@" ;;
esac
