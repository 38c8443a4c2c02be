#!/usr/bin/env bash
# The decode measurements in one call of under 10 minutes. GPU 0: each Pallas kernel against its
# jnp path (float32 check, then the bf16 table), then where a batch-1 step's time goes (the MoE on jnp and
# on the MXFP4 kernel). The last GPU: the whole gpt-oss-20b-shaped model's decode step off and on the
# kernels (GQA, MLA, MLA partial; batch 1 and 64 at 32K). With three GPUs or more, GPU 1 sweeps the MXFP4
# expert kernel's launch settings (batch 1, 8 and 64 at top-4). With one GPU the first two run one after
# the other, so that no timing shares the card.
#   bash eval/experiments/decode_gpu.sh OUT_DIR [CONTEXTS]
set -uo pipefail
OUT=${1:?usage: bash eval/experiments/decode_gpu.sh OUT_DIR [CONTEXTS]}
CONTEXTS=${2:-32768}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOGS=$(mktemp -d)
bench() {  # bench GPU NAME ARGS...: one benchmark process; its JSON in OUT, its log appended to OUT/decode_gpu.log
  # (one log file: the device tool brings back at most 8 files)
  local gpu=$1 name=$2
  shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout 560 python -m eval.bench.decode "$@" --out "$OUT/$name.json" \
    > "$LOGS/$name.log" 2>&1 || echo "$name: exit $?" >&2
  { echo "==> $name <=="; cat "$LOGS/$name.log"; } >> "$OUT/decode_gpu.log"
}
kernels() {
  bench 0 decode_kernels --kernels --batches 1,8,64 --contexts 4096,32768,131072
  bench 0 decode_breakdown --breakdown 1,32768 --repeats 8
}
model() {
  bench "$1" decode_e2e_kernels --decode-kernels both --partial --batches 1,64 --contexts "$CONTEXTS"
}
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -gt 1 ]; then
  kernels &
  model $((gpus - 1)) &
  if [ "$gpus" -gt 2 ]; then
    bench 1 decode_experts --experts 4,32,256 --repeats 8 &
  fi
  wait
else
  kernels
  model 0
fi
tail -n 2 "$LOGS"/*.log
