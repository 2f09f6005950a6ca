"""Our API with the vLLM engine, for bench/vllm_bench.py on a GPU host (until the engine seam picks
it from settings, this factory swaps it in): the same routes, auth, limits and harmony handling, with
generation sent to the vLLM server at $GPTOSS_VLLM_URL.

    python bench/vllm_api.py register --id ad_a0 --name a0 --folder /tmp/adapters/a0
    uvicorn --factory bench.vllm_api:create_app_with_vllm --port 8000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vllm_options() -> Any:
    from app.inference.vllm_engine import VllmOptions
    from app.ml.modeling import config_fingerprint

    model = os.environ["GPTOSS_BASE_MODEL"]
    config = json.loads((Path(model) / "config.json").read_text())
    return VllmOptions(
        url=os.environ["GPTOSS_VLLM_URL"],
        served_model=os.environ.get("GPTOSS_VLLM_SERVED_MODEL", model),
        max_resident=int(os.environ.get("GPTOSS_VLLM_MAX_RESIDENT", "8")),
        max_lora_rank=int(os.environ.get("GPTOSS_VLLM_MAX_LORA_RANK", "16")),
        base_fingerprint=config_fingerprint(config),
    )


def create_app_with_vllm() -> Any:
    import app.main as main
    from app.config import Settings
    from app.inference.vllm_engine import VllmEngine

    main.create_engine = lambda settings: VllmEngine(settings, vllm_options())  # type: ignore[assignment,return-value,misc]
    return main.create_app(Settings())


def register(adapter_id: str, name: str, folder: Path) -> None:
    from app.config import Settings
    from app.db import make_engine, make_sessionmaker, upgrade_to_head
    from app.registry import register_adapter

    settings = Settings()
    upgrade_to_head(settings)
    with make_sessionmaker(make_engine(settings))() as session:
        register_adapter(session, adapter_id=adapter_id, name=name, folder=folder, job_id=None)


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
    register(args.id, args.name, args.folder)
