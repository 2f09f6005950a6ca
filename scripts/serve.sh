#!/usr/bin/env bash
# Install (first run only), migrate, then run the worker in the background and the API in front.
# Ctrl-C stops both. Without a GPU this serves the embedded tiny model; settings come from GPTOSS_*
# variables or .env (see the README's configuration table).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate

# Local default: no API keys, bound to loopback only. Set GPTOSS_AUTH=keys (and create a key with
# scripts/create_api_key.py) before exposing the port anywhere else.
export GPTOSS_AUTH="${GPTOSS_AUTH:-none}"
export GPTOSS_HOST="${GPTOSS_HOST:-127.0.0.1}"
export GPTOSS_PORT="${GPTOSS_PORT:-8000}"

alembic upgrade head

python -m workers.worker &
worker_pid=$!
stop_worker() {
  # SIGTERM lets the worker checkpoint a running job and requeue it; wait so nothing is left behind.
  kill -TERM "$worker_pid" 2>/dev/null || true
  wait "$worker_pid" 2>/dev/null || true
}
trap stop_worker EXIT

uvicorn app.main:app_from_env --factory --host "$GPTOSS_HOST" --port "$GPTOSS_PORT" &
api_pid=$!
trap 'kill -TERM "$api_pid" 2>/dev/null || true' INT TERM
# Either process ending ends the service: an API without its worker would queue jobs forever.
wait -n "$api_pid" "$worker_pid" || true
kill -TERM "$api_pid" 2>/dev/null || true
wait "$api_pid" 2>/dev/null || true
