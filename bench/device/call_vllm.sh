#!/usr/bin/env bash
# The vLLM call (issue 15), the last of five: calls 1-4 ran vllm-install.sh with .vllm1 ... .vllm4
# (back to back); this one carries the project, copied with a small site of its needs, in .gpuproj:
#   cd .gpuproj && GIT_REV=<rev> bash bench/device/call_vllm.sh
# Two vLLM servers side by side: a peaked 2-layer bf16 model (--enforce-eager, 25% of the GPU) for the
# golden tests, run while the random 20B in MXFP4 (55%) starts; then the golden server is stopped and
# our API (uvicorn app.main:app_from_env with GPTOSS_ENGINE=vllm) is benchmarked beside vLLM direct
# (bench/vllm_bench.py). Results in $OUT.
source bench/device/vllm_env.sh
python3 scripts/make_full_model.py --out $M/peaked --layers 2 --lm-head-std 0.5 > $RUN/make_peaked.log 2>&1; log "peaked model rc=$?"
python3 bench/vllm_adapters.py --model $M/peaked --out $M/pad --count 4 > /dev/null 2>&1; log "peaked adapters rc=$?"
vllm_serve $M/peaked 8101 $RUN/vllm_peaked.log --enforce-eager --gpu-memory-utilization 0.25 --enable-sleep-mode
python3 scripts/make_full_model.py --out $M/mx20b --mxfp4 > $RUN/make_mx20b.log 2>&1; log "mxfp4 20b rc=$?"
vllm_serve $M/mx20b 8001 $RUN/vllm_mx20b.log --gpu-memory-utilization 0.55
python3 bench/vllm_adapters.py --model $M/mx20b --out $M/ad --count 6 > /dev/null 2>&1; log "20b adapters rc=$?"
wait_up 8101 90; log "peaked vllm up rc=$?"
GPTOSS_TEST_VLLM_URL=http://127.0.0.1:8101 GPTOSS_TEST_VLLM_MODEL=$M/peaked GPTOSS_TEST_VLLM_ADAPTERS=$M/pad \
  timeout 240 python3 -m pytest -p no:cacheprovider --noconftest -m gpu -v -s -rA tests/test_gpu_vllm.py > $RUN/gpu-tests.txt 2>&1
log "golden tests rc=$?"
export GPTOSS_BASE_MODEL=$M/mx20b GPTOSS_DATA_DIR=/tmp/apidata GPTOSS_AUTH=none GPTOSS_VLLM_URL=http://127.0.0.1:8001
export GPTOSS_MAX_CONCURRENT_GENERATIONS=256 GPTOSS_RATE_LIMIT_PER_MINUTE=0 GPTOSS_VLLM_MAX_CPU_LORAS=8
# the bench is one client address sending 64 at once: keep the API's load shedding out of the figures
export GPTOSS_MAX_REQUESTS_IN_FLIGHT=256 GPTOSS_MAX_REQUESTS_IN_FLIGHT_PER_CLIENT=256
for i in 0 1 2 3; do python3 bench/vllm_api.py register --id ad_a$i --name a$i --folder $M/ad/a$i >> $RUN/register.log 2>&1; done
log "registered rc=$?"  # ad_a4 and ad_a5 are registered by the bench (success-to-answer)
wait_up 8001 150; log "20b vllm up rc=$?"
kill $(cat /tmp/vllm-8101.pid) 2>/dev/null; sleep 3  # the golden server: done, and out of the way
nvidia-smi --query-gpu=memory.used --format=csv >> $RUN/nvidia-smi.csv
(GPTOSS_ENGINE=vllm setsid python3 -m uvicorn --factory app.main:app_from_env --port 8000 --log-level warning > $RUN/api.log 2>&1 &)
for i in 0 1 2 3; do curl -s -XPOST http://127.0.0.1:8001/v1/load_lora_adapter -H 'content-type: application/json' \
  -d "{\"lora_name\":\"ad_a$i\",\"lora_path\":\"$M/ad/a$i\"}" >> $RUN/register.log; done
wait_up 8000 30 /readyz; log "api up (ready: vLLM reached) rc=$?"
timeout $((${DEADLINE:-440} - SECONDS)) python3 bench/vllm_bench.py --vllm-url http://127.0.0.1:8001 --api-url http://127.0.0.1:8000 \
  --adapters ad_a0,ad_a1,ad_a2,ad_a3 --fresh ad_a4=$M/ad/a4,ad_a5=$M/ad/a5 --label "mxfp4 20b random, rank 16" \
  --out $RUN/vllm_bench.json > $RUN/bench.log 2>&1
log "bench rc=$?"
# The same API on uvicorn's pure-Python loop and HTTP parser (what it runs without uvloop/httptools), for
# their share of the figures; only if the call has the time left.
if [ $((${DEADLINE:-440} - SECONDS)) -gt 90 ]; then
  (GPTOSS_ENGINE=vllm setsid python3 -m uvicorn --factory app.main:app_from_env --port 8002 --loop asyncio --http h11 \
    --log-level warning > $RUN/api_asyncio.log 2>&1 &)
  wait_up 8002 30 /readyz
  timeout $((${DEADLINE:-440} - SECONDS)) python3 bench/vllm_bench.py --vllm-url http://127.0.0.1:8001 \
    --api-url http://127.0.0.1:8002 --adapters ad_a0,ad_a1,ad_a2,ad_a3 --repeats 2 \
    --only one_request_adapter,c32_over_4_adapters,c64_over_4_adapters --label "uvicorn --loop asyncio --http h11 (the engine thread still on uvloop)" \
    --out $RUN/vllm_bench_asyncio_h11.json > $RUN/bench_asyncio.log 2>&1
  log "bench (asyncio, h11) rc=$?"
fi
ps -eo pid,etime,cputime,args | grep -E "uvicorn|vllm.entrypoints" | grep -v grep > $RUN/ps.txt
grep -iE "memory|KV cache|Marlin|backend|LoRA" $RUN/vllm_mx20b.log | head -30 > $RUN/vllm_notes.txt
logs="vllm_peaked.log vllm_mx20b.log api.log api_asyncio.log register.log make_peaked.log make_mx20b.log bench.log bench_asyncio.log"
(cd $RUN && tar czf logs.tgz $(ls $logs 2>/dev/null) && rm -f $logs)
ls -la $RUN
