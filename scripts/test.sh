#!/usr/bin/env bash
# Install, then every check CI runs: lint, format, types, the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k metrics). .ci/run calls exactly this.
# Every check runs even after one fails, so one run shows everything to fix; any failure fails it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
scripts/install-system.sh  # Debian packages the tests need (chromium for the console, postgresql, docker-compose)
# shellcheck disable=SC1091
. .venv/bin/activate

failed=()
ruff check . || failed+=("ruff check")
ruff format --check . || failed+=("ruff format")
mypy app workers scripts bench || failed+=("mypy")
status=0
# Two processes, one per core (the tests pin torch to one thread each); a file's tests stay together
# so its session fixtures (trained adapters, a live server) are built once.
pytest -n 2 --dist loadfile "$@" || status=$?
if [ "$status" -eq 5 ]; then
  # pytest's "no tests collected": for this project that is a broken suite, never a pass.
  echo "test: pytest collected no tests (exit 5)" >&2
fi
[ "$status" -eq 0 ] || failed+=("pytest (exit $status)")

if [ "${#failed[@]}" -gt 0 ]; then
  echo "test: FAILED: ${failed[*]}" >&2
  [ "$status" -ne 0 ] && exit "$status"
  exit 1
fi
echo "test: all checks passed"
