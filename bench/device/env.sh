# Sourced first by every command sent to the GPU machine (see bench/README.md): unpacks the
# packages the image lacks (.devsite/site.tgz, carried with the call) and keeps everything offline.
set -o pipefail
mkdir -p /tmp/site && tar xzf .devsite/site.tgz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
# One folder for generated models that outlives a call while the machine stays warm.
export GPU_MODELS=/tmp/gptoss-models
mkdir -p "$GPU_MODELS" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/nvidia-smi.csv" 2>&1
# The device's copy of the tree can carry a stale .git (session 5's results said 311f573, the commit
# the session started at): only a GIT_REV passed with the command names the code that ran.
export GIT_REV=${GIT_REV:-"unknown (GIT_REV not passed; the device copy's git HEAD can be stale)"}
