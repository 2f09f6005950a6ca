# Helpers for the call scripts: a deadline inside the device tool's 600 s limit, and packing the
# run's folder into $OUT (the tool returns at most 8 files) even when a stage is cut short.
source bench/device/env.sh
RUN=/tmp/run-$CALL
# A warm machine keeps the last call's $RUN: start empty so no earlier result is taken for this call's.
rm -rf "$RUN" && mkdir -p "$RUN"
DEADLINE=${DEADLINE:-575}
left() { echo $((DEADLINE - SECONDS)); }
stage() {  # stage NAME SECONDS CMD... : run with a time limit, log to $RUN/NAME.log, never abort the call
  local name=$1 limit=$2; shift 2
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -le 5 ]; then echo "SKIPPED $name: no time left" | tee -a "$RUN/stages.txt"; return 0; fi
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$RUN/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit took=$((SECONDS - t0))s" | tee -a "$RUN/stages.txt"
  return 0
}
header() {  # date, revision, GPU and library versions: the first lines of every kept log
  python3 -c "import json; from bench.common import run_header; print(json.dumps(run_header(), indent=1))"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
}
finish() {
  # The tool returns at most 8 files: the summaries, and everything else inside the tarball.
  for f in "$RUN"/{stages.txt,gpu-tests.txt,train_bench.json,b*-train_bench.json,e2e.json,gen_bench.json,gen_baseline.json,packing_bench.json}; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  tar czf "$OUT/run-$CALL.tgz" --exclude='*.safetensors' --exclude='*.jsonl' --exclude='*.pt' --exclude='*.bin' \
    --exclude='tokenizer.json' --exclude='checkpoint-*' --exclude='data' -C "$RUN" . 2>/dev/null
  ls -la "$OUT"; cat "$RUN/stages.txt"
}
trap finish EXIT
