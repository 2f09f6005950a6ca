#!/usr/bin/env bash
# GPU call 2: the training benchmark, three loops side by side on one config (the API that call 1
# left running sits idle meanwhile; every loop's peak memory is its own process's).
CALL=2; source bench/device/common.sh
FULL=$GPU_MODELS/gpt-oss-20b-random
export GIT_REV
[ -f "$FULL/config.json" ] || stage build 200 python3 scripts/make_full_model.py --out "$FULL" --models_dir "$GPU_MODELS"
stage train 600 python3 -m bench.train_bench --model "$FULL" --models-dir "$GPU_MODELS" --out "$RUN/train" \
  --loops ${LOOPS:-service,unsloth,hf} --batch 4 --seq 1024 --rank 16 --steps 6 --warmup 2
cp "$RUN/train/"*.json "$RUN/" 2>/dev/null
tail -c 3000 "$RUN/train.log"
