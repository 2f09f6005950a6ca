#!/usr/bin/env bash
# GPU call: `pytest -m gpu` (skipped with PYTEST=0; PYTEST_K passes -k) while the full-size random
# gpt-oss-20b is built with the project's command, then the training benchmark: loops in $LOOPS
# (default service,unsloth,hf); PROFILE_STEPS=n adds n steps per loop under torch.profiler ->
# profile_<run>_<loop>.txt; STEPS and WARMUP set the timed and untimed steps (default 6 and 2);
# LOOPS may name `interleaved`: the service's job and the bare Unsloth loops in $INTERLEAVE_WITH
# stepping in turn in one process; OPTIM is every loop's optimizer (adamw8bit by default, or adamw /
# adamw-fused); BATCH and SEQ set every loop's micro-batch (default 4 x 1,024); BATCHES="8 4" runs
# the benchmark once per batch size (files prefixed b8-, b4-).
CALL=tests-train; source bench/device/common.sh
FULL=$GPU_MODELS/gpt-oss-20b-random
export GPTOSS_TEST_CACHE=/tmp/gptoss-test-cache
( [ -f "$FULL/config.json" ] || python3 scripts/make_full_model.py --out "$FULL" --models_dir "$GPU_MODELS" ) > "$RUN/build.log" 2>&1 &
build=$!
{ header; echo; } > "$RUN/gpu-tests.txt"
{ lscpu | head -20; cat /proc/loadavg; nvidia-smi topo -m; } > "$RUN/host.txt" 2>&1
[ "${PYTEST:-1}" = 1 ] && stage pytest ${PYTEST_S:-300} python3 -m bench.pytest_gpu -m gpu tests/test_gpu.py -v -rA --durations=0 -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"}
grep -v "DEBUG\|torch.__trace" "$RUN/pytest.log" >> "$RUN/gpu-tests.txt" 2>/dev/null
wait $build; echo "build rc=$? at ${SECONDS}s" >> "$RUN/stages.txt"
# the build wrote 39 GB: flush it now so the kernel's writeback does not share the CPU with the timed steps
timeout 90 sync; echo "sync done at ${SECONDS}s" >> "$RUN/stages.txt"
du -sh "$FULL" >> "$RUN/stages.txt"
# BATCHES="8 4" runs the whole benchmark once per micro-batch size, each into its own folder.
for B in ${BATCHES:-${BATCH:-4}}; do
  [ "${BATCHES:-}" ] && tag=-b$B || tag=
  stage train$tag 600 python3 -m bench.train_bench --model "$FULL" --models-dir "$GPU_MODELS" --out "$RUN/train$tag" \
    --loops ${LOOPS:-service,unsloth,hf} --batch $B --seq ${SEQ:-1024} --rank 16 --steps ${STEPS:-6} --warmup ${WARMUP:-2} \
    --profile-steps ${PROFILE_STEPS:-0} ${PROFILE_STACKS:+--profile-stacks} --interleave-with ${INTERLEAVE_WITH:-unsloth} \
    --optim ${OPTIM:-adamw8bit}
  for f in "$RUN/train$tag/"*.json "$RUN/train$tag/"*.txt; do [ -f "$f" ] && cp "$f" "$RUN/${tag:+b$B-}$(basename "$f")"; done
done
tail -n 40 "$RUN/pytest.log" 2>/dev/null
for f in "$RUN"/train*.log; do echo "== $f"; tail -c 2000 "$f"; done
