#!/usr/bin/env bash
# The quality study on a 2-GPU machine, within one time-limited allocation: GPU 0 trains the teacher, then
# both GPUs run rows of the matrix (full-attention layers converted on GPU 0, all layers on GPU 1); the
# results and the teacher live in $STUDY, so a rerun on the same machine continues where this one stopped.
#   bash eval/experiments/quality_study_gpu.sh OUT_DIR [SECONDS]
set -uo pipefail
OUT=$1
BUDGET=${2:-570}
STUDY=${STUDY:-/tmp/study}
END=$((SECONDS + BUDGET))
mkdir -p "$STUDY" "$OUT"
run() {  # run GPU LAYERS: one process, ending by END
  local left=$((END - SECONDS))
  CUDA_VISIBLE_DEVICES=$1 timeout $((left - 5)) python -m eval.experiments.quality_study --teacher "$STUDY/teacher" \
    --compile-cache "$STUDY/xla-cache" --time-limit $((left - 80)) --layers "$2" --out "$STUDY/$2" \
    >> "$STUDY/$2.log" 2>&1
  cp "$STUDY/$2".* "$OUT/"
}
run 0 full &
# GPU 1 starts once GPU 0 has trained the teacher and written the header (cross-check included).
(
  while [ ! -f "$STUDY/full.json" ]; do sleep 3; done
  [ -f "$STUDY/all.json" ] || python -c "import json, sys; r = json.load(open(sys.argv[1])); r['rows'] = []; \
json.dump(r, open(sys.argv[2], 'w'))" "$STUDY/full.json" "$STUDY/all.json"
  run 1 all
) &
wait
tail -n 3 "$STUDY"/*.log
