#!/usr/bin/env bash
# The golden tests alone (issue 15, calls 4 and 16; the sleep test needs the server's sleep mode): after the four vllm-install.sh calls, one call that
# carries .gpuproj (the project and its small site) and runs tests/test_gpu_vllm.py against a vLLM
# server of the peaked 2-layer model (--enforce-eager), no 20B:
#   cd .gpuproj && GIT_REV=<rev> bash bench/device/call_vllm_golden.sh
# Results (gpu-tests.txt with the routing margins of every comparison, stages.txt) in $OUT.
set -uo pipefail
bash vllm-install.sh || exit 1
mkdir -p /tmp/psite && tar xzf site.tgz -C /tmp/psite
export PYTHONPATH=/tmp/psite:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GPTOSS_MODELS_DIR=/tmp/gmodels GPTOSS_LOG_JSON=false GPTOSS_BACKEND=hf
RUN=$OUT; SECONDS=0; M=/tmp/vmodels; mkdir -p $M
log() { echo "[$SECONDS s] $*" | tee -a $RUN/stages.txt; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $RUN/nvidia-smi.csv
log "start rev=${GIT_REV:-unknown}"
python3 scripts/make_full_model.py --out $M/peaked --layers 2 --lm-head-std 0.5 > $RUN/make_peaked.log 2>&1; log "peaked model rc=$?"
# --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (/sleep, /wake_up): the last test puts it to sleep.
(cd /tmp && PYTHONPATH=/tmp/vsite VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 \
  VLLM_SERVER_DEV_MODE=1 setsid python3 -m vllm.entrypoints.openai.api_server --model $M/peaked --port 8101 --enable-lora \
    --max-lora-rank 16 --max-loras 4 --max-cpu-loras 8 --max-model-len 4096 --enforce-eager \
    --gpu-memory-utilization 0.25 --enable-sleep-mode > $RUN/vllm_peaked.log 2>&1 &)
python3 bench/vllm_adapters.py --model $M/peaked --out $M/pad --count 4 > /dev/null 2>&1; log "peaked adapters rc=$?"
for _ in $(seq 1 120); do curl -sf http://127.0.0.1:8101/health >/dev/null && break; sleep 1; done; log "peaked vllm up"
GPTOSS_TEST_VLLM_URL=http://127.0.0.1:8101 GPTOSS_TEST_VLLM_MODEL=$M/peaked GPTOSS_TEST_VLLM_ADAPTERS=$M/pad \
  timeout $((${DEADLINE:-250} - SECONDS)) python3 -m pytest -p no:cacheprovider --noconftest -m gpu -v -s -rA \
  tests/test_gpu_vllm.py > $RUN/gpu-tests.txt 2>&1
log "golden tests rc=$?"
grep -iE "lora|error|sleep|wake|memory" $RUN/vllm_peaked.log | tail -40 > $RUN/vllm_notes.txt
rm -f $RUN/make_peaked.log; gzip -f $RUN/vllm_peaked.log
ls -la $RUN
