#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its dev tools, CPU-only.
# Used by scripts/serve.sh and scripts/test.sh; safe to run again (a stamp skips an unchanged install).
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "install: Python 3.11 or newer is needed (none found on PATH)" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(pick_python)" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: left to the resolver, an unpinned torch pulls a multi-GB CUDA build.
python -m pip install --quiet 'torch==2.13.0'
python -m pip install --quiet -e '.[dev]'
rm -f .venv/.installed-*
touch "$stamp"
echo "install: done ($(python -c 'import torch; print("torch", torch.__version__)'))"
