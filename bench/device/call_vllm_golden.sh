#!/usr/bin/env bash
# The golden tests alone (issue 15, calls 4 and 20): after the four vllm-install.sh calls, one call
# that carries .gpuproj (the project and its small site) and runs tests/test_gpu_vllm.py against a vLLM
# server of the peaked 2-layer model (--enforce-eager, and sleep mode for the last test), no 20B:
#   cd .gpuproj && GIT_REV=<rev> bash bench/device/call_vllm_golden.sh
# Results (gpu-tests.txt with the routing margins of every comparison, stages.txt) in $OUT.
source bench/device/vllm_env.sh
python3 scripts/make_full_model.py --out $M/peaked --layers 2 --lm-head-std 0.5 > $RUN/make_peaked.log 2>&1; log "peaked model rc=$?"
vllm_serve $M/peaked 8101 $RUN/vllm_peaked.log --enforce-eager --gpu-memory-utilization 0.25 --enable-sleep-mode
python3 bench/vllm_adapters.py --model $M/peaked --out $M/pad --count 4 > /dev/null 2>&1; log "peaked adapters rc=$?"
wait_up 8101 60; log "peaked vllm up rc=$?"
GPTOSS_TEST_VLLM_URL=http://127.0.0.1:8101 GPTOSS_TEST_VLLM_MODEL=$M/peaked GPTOSS_TEST_VLLM_ADAPTERS=$M/pad \
  timeout $((${DEADLINE:-250} - SECONDS)) python3 -m pytest -p no:cacheprovider --noconftest -m gpu -v -s -rA \
  tests/test_gpu_vllm.py > $RUN/gpu-tests.txt 2>&1
log "golden tests rc=$?"
grep -iE "lora|error|sleep|wake|memory" $RUN/vllm_peaked.log | tail -40 > $RUN/vllm_notes.txt
rm -f $RUN/make_peaked.log; gzip -f $RUN/vllm_peaked.log
ls -la $RUN
