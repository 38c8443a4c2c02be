#!/usr/bin/env bash
# The grouped-matmul measurements in device calls of under 10 minutes, on up to two GPUs (with one GPU the
# lanes run one after the other, so no timing shares a card). Lane "kernels": the bf16 agreement check and
# the launch sweep; lane "table": the kernel table; lane "model": full-size distillation MFU and eval.ppl
# throughput; lane "prefill": a 32K prefill on both grouped paths and on the wide-batch MXFP4 kernel. The distillation needs grain's wheels
# in .whl (carried with the call).
#   bash eval/experiments/moe_gpu.sh OUT_DIR [kernels|table|model|prefill|both]   (both: kernels and model)
set -uo pipefail
OUT=${1:?usage: bash eval/experiments/moe_gpu.sh OUT_DIR [kernels|table|model|prefill|both]}
LANES=${2:-both}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
step() {  # step GPU LIMIT_S NAME MODULE ARGS...: one process, its log appended to OUT/NAME-lane.log
  local gpu=$1 limit=$2 name=$3
  shift 3
  echo "==> $name: $*" >> "$OUT/$LANE.log"
  CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 -m "$@" >> "$OUT/$LANE.log" 2>&1 || echo "$name: exit $?" >> "$OUT/$LANE.log"
}
kernels() {
  LANE=kernels
  step "$1" 150 check eval.bench.moe --check --tokens 4096 --out "$OUT/bench_moe_check.json"
  step "$1" 300 sweep eval.bench.moe --sweep --tokens 4096 --repeats 5 --out "$OUT/bench_moe_sweep.json"
}
table() {
  LANE=table
  step "$1" 240 table eval.bench.moe --tokens 4096 16384 --repeats 5 --out "$OUT/bench_moe.json"
}
model() {
  LANE=model
  # setup (teacher, PCA conversion) about 70 s, then compiling the kernels and the remat'd step
  step "$1" 420 distill eval.experiments.fullsize_distill --batch 2 --steps 8 --seq-len 2048 --out "$OUT/fullsize_distill.json"
  step "$1" 150 ppl eval.bench.ppl --tokens 65536 --out "$OUT/bench_ppl.json"
}
prefill() {
  LANE=prefill
  step "$1" 480 prefill eval.bench.moe --prefill 32768 --out "$OUT/prefill.json"
}
gpus=$(nvidia-smi -L | wc -l)
case "$LANES" in
  kernels) kernels 0 ;;
  table) table 0 ;;
  prefill) prefill 0 ;;
  table+distill) if [ "$gpus" -gt 1 ]; then table 0 & (LANE=model; step 1 420 distill eval.experiments.fullsize_distill --batch 2 --steps 8 --seq-len 2048 --out "$OUT/fullsize_distill.json") & wait; else table 0; fi ;;
  model) model 0 ;;
  *) if [ "$gpus" -gt 1 ]; then kernels 0 & model 1 & wait; else kernels 0; model 0; fi ;;
esac
grep -h "best\|mfu\|tokens_per_s\|exit" "$OUT"/*.log
