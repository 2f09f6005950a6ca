#!/usr/bin/env bash
# GPU call: the full-size random gpt-oss-20b is built with the project's command, then the packing
# benchmark (real tokens/s on rows of uneven length, packing off vs on) through the service's trainer
# on the hf backend (Unsloth 2026.10.9 ignores packing for gpt_oss, so the service refuses it there).
CALL=packing; source bench/device/common.sh
FULL=$GPU_MODELS/gpt-oss-20b-random
( [ -f "$FULL/config.json" ] || python3 scripts/make_full_model.py --out "$FULL" --models_dir "$GPU_MODELS" ) > "$RUN/build.log" 2>&1
echo "build rc=$? at ${SECONDS}s" >> "$RUN/stages.txt"
timeout 90 sync; echo "sync done at ${SECONDS}s" >> "$RUN/stages.txt"
{ header; echo; } > "$RUN/gpu-tests.txt"
stage packing 600 python3 -m bench.packing_bench --model "$FULL" --models-dir "$GPU_MODELS" --out "$RUN/packing" \
  --backend ${BACKEND:-hf} --rows ${ROWS:-256} --min-len 64 --max-len 1024 --batch 4 --steps ${STEPS:-12} --warmup 3
cp "$RUN/packing/"*.json "$RUN/" 2>/dev/null
tail -c 3000 "$RUN/packing.log"
