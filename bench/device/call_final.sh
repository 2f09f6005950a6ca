#!/usr/bin/env bash
# GPU call: one GPU test (`-k $TESTS`) while the full-size random gpt-oss-20b is built, then the service
# end to end with the generation benchmark (4 adapters resident; results saved after every scenario),
# then, with the API stopped, the plain-`generate` baseline on the same base, adapter and prompts.
CALL=final; source bench/device/common.sh
FULL=$GPU_MODELS/gpt-oss-20b-random
export GPTOSS_TEST_CACHE=/tmp/gptoss-test-cache
( [ -f "$FULL/config.json" ] || python3 scripts/make_full_model.py --out "$FULL" --models_dir "$GPU_MODELS" ) > "$RUN/build.log" 2>&1 &
build=$!
{ header; echo; } > "$RUN/gpu-tests.txt"
stage pytest 150 python3 -m bench.pytest_gpu -m gpu tests/test_gpu.py -k "${TESTS:-hot_loaded}" -v -rA -p no:cacheprovider
grep -v "DEBUG\|torch.__trace" "$RUN/pytest.log" >> "$RUN/gpu-tests.txt"
wait $build; echo "build rc=$? at ${SECONDS}s" >> "$RUN/stages.txt"
stage e2e $(( $(left) - 100 )) python3 -m bench.gpu_e2e --model "$FULL" --models-dir "$GPU_MODELS" --out "$RUN/e2e" \
  --data-dir /tmp/e2e-data --backend unsloth --steps ${STEPS:-3} --gen-bench --new-tokens ${NEW_TOKENS:-64} \
  --concurrency 8,32 --one-adapter-concurrency 32 --batch1-rounds 3 --max-batch-size 32
cp "$RUN/e2e/"*.json "$RUN/" 2>/dev/null
adapter=$(ls -d /tmp/e2e-data/adapters/* 2>/dev/null | grep -v adp_bench | head -1)
stage baseline 100 python3 -m bench.gen_baseline --model "$FULL" --models-dir "$GPU_MODELS" --out "$RUN" \
  --adapter "$adapter" --new-tokens ${NEW_TOKENS:-64} --rounds 2
tail -n 15 "$RUN/gpu-tests.txt"; tail -c 2500 "$RUN/e2e.log"; tail -c 600 "$RUN/baseline.log"
