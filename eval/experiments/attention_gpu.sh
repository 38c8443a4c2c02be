#!/usr/bin/env bash
# The flash-attention kernel's measurements in one device call of under 10 minutes, on up to two GPUs (with
# one GPU the lanes run one after the other). Lane "kernel": the bf16 agreement check, the table against the
# jnp path and the launch sweep; lane "model": where a full-size forward's time goes, then full-size
# distillation MFU. The distillation needs grain's wheels in .whl (carried with the call).
#   bash eval/experiments/attention_gpu.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage: bash eval/experiments/attention_gpu.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
step() {  # step GPU LIMIT_S LANE MODULE ARGS...: one process, its log appended to OUT/LANE.log
  local gpu=$1 limit=$2 lane=$3
  shift 3
  echo "==> $*" >> "$OUT/$lane.log"
  CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 -m "$@" >> "$OUT/$lane.log" 2>&1 || echo "$1: exit $?" >> "$OUT/$lane.log"
}
kernel() {
  step "$1" 90 kernel eval.bench.attention --check --shapes 2x2048 --out "$OUT/bench_attention_check.json"
  step "$1" 150 kernel eval.bench.attention --repeats 5 --out "$OUT/bench_attention.json"
  step "$1" 200 kernel eval.bench.attention --sweep --shapes 2x2048 --repeats 5 --out "$OUT/bench_attention_sweep.json"
}
model() {
  step "$1" 150 model eval.experiments.fullsize_distill --breakdown --out "$OUT/fullsize_distill_breakdown.json"
  step "$1" 330 model eval.experiments.fullsize_distill --batch 2 --steps 8 --seq-len 2048 --out "$OUT/fullsize_distill.json"
}
if [ "$(nvidia-smi -L | wc -l)" -gt 1 ]; then kernel 0 & model 1 & wait; else kernel 0; model 0; fi
grep -h "best\|mfu\|exit\|Error" "$OUT"/*.log
