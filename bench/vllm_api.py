"""Register adapters in our registry for bench/vllm_bench.py on a GPU host, as the worker does when a
job succeeds (app.registry.register_adapter: the folder checked, its LoRA layout normalized once).

Our API in front of vLLM needs no code of its own: the settings pick the vLLM engine.

    python bench/vllm_api.py register --id ad_a0 --name a0 --folder /tmp/adapters/a0
    GPTOSS_ENGINE=vllm GPTOSS_VLLM_URL=http://127.0.0.1:8001 \
        uvicorn --factory app.main:app_from_env --port 8000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def register(adapter_id: str, name: str, folder: Path) -> float:
    """Add the registry row (what makes the adapter servable); returns the seconds it took."""
    from app.config import Settings
    from app.db import make_engine, make_sessionmaker, upgrade_to_head
    from app.registry import register_adapter

    settings = Settings()
    upgrade_to_head(settings)
    with make_sessionmaker(make_engine(settings))() as session:
        started = time.monotonic()
        register_adapter(session, adapter_id=adapter_id, name=name, folder=folder, job_id=None)
        return time.monotonic() - started


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    reg = sub.add_parser("register")
    reg.add_argument("--id", required=True)
    reg.add_argument("--name", required=True)
    reg.add_argument("--folder", type=Path, required=True)
    args = parser.parse_args()
    print(f"registered {args.id} in {register(args.id, args.name, args.folder):.3f} s")
