#!/usr/bin/env bash
# GPU call 1: build the full-size random gpt-oss-20b with the project's command while `pytest -m gpu`
# runs, then the service end to end (API + worker processes, Unsloth 4-bit, real HTTP). The API is
# left running (own session) for call 2's generation benchmark.
CALL=1; source bench/device/common.sh
FULL=$GPU_MODELS/gpt-oss-20b-random
export GIT_REV GPTOSS_TEST_CACHE=/tmp/gptoss-test-cache
( [ -f "$FULL/config.json" ] || python3 scripts/make_full_model.py --out "$FULL" --models_dir "$GPU_MODELS" ) > "$RUN/build.log" 2>&1 &
build=$!
{ header; echo; } > "$RUN/gpu-tests.txt"
stage pytest 300 python3 -m bench.pytest_gpu -m gpu tests/test_gpu.py -v -rA --durations=0 -p no:cacheprovider
cat "$RUN/pytest.log" >> "$RUN/gpu-tests.txt"
wait $build; echo "build rc=$? at ${SECONDS}s" >> "$RUN/stages.txt"
du -sh "$FULL" >> "$RUN/stages.txt"
stage e2e 600 python3 -m bench.gpu_e2e --model "$FULL" --models-dir "$GPU_MODELS" --out "$RUN/e2e" \
  --data-dir /tmp/e2e-data --backend unsloth --steps 20 --keep-api --state /tmp/gptoss-e2e-state.json
cp "$RUN/e2e/e2e.json" "$RUN/" 2>/dev/null
nvidia-smi >> "$RUN/stages.txt"
tail -c 4000 "$RUN/e2e.log"
