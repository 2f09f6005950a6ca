#!/usr/bin/env bash
# Install, then every check CI runs: lint, format, types, the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k metrics). .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate

ruff check .
ruff format --check .
mypy app workers
status=0
pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  # pytest's "no tests collected": for this project that is a broken suite, never a pass.
  echo "test: pytest collected no tests (exit 5); failing" >&2
fi
exit "$status"
