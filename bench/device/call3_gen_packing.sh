#!/usr/bin/env bash
# GPU call 3: the generation benchmark on the API call 1 left running (4 adapters; batch 1, 8 and 32
# concurrent requests), then that API is stopped and packing off vs on is measured.
CALL=3; source bench/device/common.sh
FULL=$GPU_MODELS/gpt-oss-20b-random
export GIT_REV
[ -f "$FULL/config.json" ] || stage build 200 python3 scripts/make_full_model.py --out "$FULL" --models_dir "$GPU_MODELS"
if [ -f /tmp/gptoss-e2e-state.json ]; then
  stage gen ${GEN_S:-260} python3 -m bench.gpu_e2e --model "$FULL" --models-dir "$GPU_MODELS" --out "$RUN/gen" \
    --attach --stop-api --new-tokens ${NEW_TOKENS:-64} --concurrency 8,32 --max-batch-size 32
  cp "$RUN/gen/gen_bench.json" "$RUN/" 2>/dev/null
else
  echo "SKIPPED gen: no API left by call 1" >> "$RUN/stages.txt"
fi
stage packing 600 python3 -m bench.packing_bench --model "$FULL" --models-dir "$GPU_MODELS" --out "$RUN/packing" \
  --backend unsloth --rows 256 --min-len 64 --max-len 1024 --batch 4 --steps 8 --warmup 3
cp "$RUN/packing/"*.json "$RUN/" 2>/dev/null
tail -c 2000 "$RUN/packing.log"
