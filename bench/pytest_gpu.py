"""`pytest` with Unsloth imported first (its patches must precede transformers), as the service's
entry points do:  python -m bench.pytest_gpu -m gpu tests/test_gpu.py"""

from __future__ import annotations

import sys

from app.ml.modeling import import_unsloth_first

import_unsloth_first()

import pytest  # noqa: E402

if __name__ == "__main__":
    sys.exit(pytest.main(sys.argv[1:]))
