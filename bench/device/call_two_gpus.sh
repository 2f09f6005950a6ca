#!/usr/bin/env bash
# GPU call (kind nvidia-h200-x2): two jobs train at once, one per GPU, through the real API and two
# worker processes pinned with --gpu 0 / --gpu 1 (bench/two_gpus.py), after one job alone for the
# single-GPU baseline. SQLite: that machine has no PostgreSQL server (PostgreSQL is tested on CPU).
# Builds the random-weight gpt-oss-20b first (about 75 s, 39 GB), unless a warm machine kept it.
#   GIT_REV=<rev> STEPS=60 bash bench/device/call_two_gpus.sh     (carry .devsite)
CALL=two-gpus; source bench/device/common.sh
FULL=$GPU_MODELS/gpt-oss-20b-random
{ header; nvidia-smi -L; echo; } > "$RUN/header.txt" 2>&1
stage build 240 bash -c "[ -f '$FULL/config.json' ] || python3 scripts/make_full_model.py --out '$FULL' --models_dir '$GPU_MODELS'"
stage two_gpus $(( $(left) - 15 )) python3 -m bench.two_gpus --model "$FULL" --models-dir "$GPU_MODELS" \
  --out "$RUN/two" --data-dir /tmp/two-gpus-data --backend unsloth --steps "${STEPS:-60}" --skip "${SKIP:-5}" \
  --batch "${BATCH:-8}" --seq "${SEQ:-1024}" --job-timeout "${JOB_TIMEOUT:-200}"
cp "$RUN/two/two_gpus.json" "$RUN/header.txt" "$OUT/" 2>/dev/null
tail -c 600 "$RUN/build.log"; tail -c 3500 "$RUN/two_gpus.log"
