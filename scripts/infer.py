"""Generate with a base model and (optionally) a LoRA adapter; prints the reasoning and the answer.

    python scripts/infer.py --adapter outputs --user "What is the capital of France?" \
        --reasoning_effort medium --max_new_tokens 128 [--base unsloth/gpt-oss-20b]

--base takes a hub id, a local folder or `tiny-gpt-oss`. Without --base the adapter's manifest names
the base it was trained on (so `--adapter outputs` alone works); without either, Settings' default.
A hub id that is neither cached nor reachable is reported as such, with what to pass instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ml.modeling import import_unsloth_first  # noqa: E402

import_unsloth_first()

from app import adapter_folder  # noqa: E402
from app.config import Settings  # noqa: E402
from app.ml.export import check_fits  # noqa: E402
from app.ml.generation import generate_ids  # noqa: E402
from app.ml.harmony import REASONING_EFFORTS, parse_completion, render_prompt  # noqa: E402
from app.ml.modeling import LoadedBase, cuda_available, load_base  # noqa: E402


def _load(base: str, args: argparse.Namespace, models_dir: Path) -> LoadedBase:
    try:
        return load_base(base, backend=args.backend, models_dir=models_dir, for_training=False)
    except OSError as exc:
        where = "there is no CUDA GPU here and " if not cuda_available() else ""
        raise SystemExit(
            f"cannot load base {base!r}: {where}it is not a local folder and the hub cannot be reached "
            f"({exc.__class__.__name__}). Pass --base tiny-gpt-oss or a local model folder."
        ) from None


def _with_adapter(loaded: LoadedBase, adapter: Path | None) -> Any:
    if adapter is None:
        return loaded.model
    from peft import PeftModel

    check_fits(adapter, loaded.model.config, loaded.model_id)
    return PeftModel.from_pretrained(loaded.model, str(adapter)).eval()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=None)
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--user", required=True, help="the user message")
    parser.add_argument("--developer", default=None, help="developer instructions")
    parser.add_argument("--reasoning_effort", default="medium", choices=REASONING_EFFORTS)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--backend", default="auto", choices=["auto", "unsloth", "hf"])
    args = parser.parse_args()
    settings = Settings()
    if args.base or not args.adapter:
        base = args.base or settings.resolved_base_model()
    else:
        base = adapter_folder.read_manifest(args.adapter)["base_model"]
    loaded = _load(base, args, settings.models_path)
    model = _with_adapter(loaded, args.adapter)
    prompt = render_prompt(
        [{"role": "user", "content": args.user}],
        developer=args.developer,
        reasoning_effort=args.reasoning_effort,
    )
    ids = generate_ids(
        model,
        loaded.tokenizer,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    parsed = parse_completion(ids)
    print(f"[base {base} | backend {loaded.backend} | {len(ids)} tokens | finish {parsed.finish_reason}]")
    print(f"reasoning: {parsed.reasoning}")
    print(f"answer: {parsed.content}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
