#!/usr/bin/env bash
# What every vLLM call script starts with (sourced from .gpuproj, after the four vllm-install.sh
# calls): vLLM from /tmp/vsite, the project's small site in /tmp/psite, offline settings, $RUN = $OUT,
# log (a timestamped line in stages.txt), vllm_serve (a vLLM OpenAI server with run-time LoRA and the
# dev routes /sleep and /wake_up, in its own session) and wait_up (its /health, or another path).
set -uo pipefail
bash vllm-install.sh || exit 1
mkdir -p /tmp/psite && tar xzf site.tgz -C /tmp/psite
export PYTHONPATH=/tmp/psite:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GPTOSS_MODELS_DIR=/tmp/gmodels GPTOSS_LOG_JSON=false GPTOSS_BACKEND=hf
RUN=$OUT; SECONDS=0; M=/tmp/vmodels; mkdir -p $M
log() { echo "[$SECONDS s] $*" | tee -a $RUN/stages.txt; }
vllm_serve() {  # vllm_serve MODEL PORT LOG EXTRA...
  local model=$1 port=$2 logf=$3; shift 3
  (cd /tmp && PYTHONPATH=/tmp/vsite VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 VLLM_SERVER_DEV_MODE=1 \
    setsid python3 -m vllm.entrypoints.openai.api_server --model $model --port $port --enable-lora \
      --max-lora-rank 16 --max-loras 4 --max-cpu-loras 8 --max-model-len 4096 "$@" > $logf 2>&1 &
    echo $! > /tmp/vllm-$port.pid)
}
wait_up() { for _ in $(seq 1 $2); do curl -sf http://127.0.0.1:$1${3:-/health} >/dev/null && return 0; sleep 2; done; return 1; }  # PORT TRIES [PATH]
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $RUN/nvidia-smi.csv
log "start rev=${GIT_REV:-unknown}"
