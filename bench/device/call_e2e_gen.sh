#!/usr/bin/env bash
# GPU call: the service end to end on the full-size random gpt-oss-20b (API + worker processes, Unsloth
# 4-bit, real HTTP), the generation benchmark on that API (4 adapters resident), then, with the API
# stopped, the plain-`generate` baseline on the same base, adapter and prompts (side by side).
CALL=e2e-gen; source bench/device/common.sh
FULL=$GPU_MODELS/gpt-oss-20b-random
export GIT_REV
[ -f "$FULL/config.json" ] || stage build 200 python3 scripts/make_full_model.py --out "$FULL" --models_dir "$GPU_MODELS"
stage e2e ${E2E_S:-430} python3 -m bench.gpu_e2e --model "$FULL" --models-dir "$GPU_MODELS" --out "$RUN/e2e" \
  --data-dir /tmp/e2e-data --backend unsloth --steps ${STEPS:-10} --gen-bench --new-tokens ${NEW_TOKENS:-64} \
  --concurrency 8,32 --max-batch-size 32
cp "$RUN/e2e/"*.json "$RUN/" 2>/dev/null
adapter=$(ls -d /tmp/e2e-data/adapters/* 2>/dev/null | grep -v adp_bench | head -1)
stage baseline 150 python3 -m bench.gen_baseline --model "$FULL" --models-dir "$GPU_MODELS" --out "$RUN" \
  --adapter "$adapter" --new-tokens ${NEW_TOKENS:-64} --rounds 3
nvidia-smi >> "$RUN/stages.txt"
tail -c 3000 "$RUN/e2e.log"; tail -c 800 "$RUN/baseline.log"
