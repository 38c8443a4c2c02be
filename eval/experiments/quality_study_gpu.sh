#!/usr/bin/env bash
# The quality study within one time-limited allocation: GPU 0 trains the teacher, then rows of the matrix
# run (full-attention layers converted on GPU 0, all layers on GPU 1; with one GPU, the sets of $LAYER_SETS
# one after the other); the results and the teacher live in $STUDY, so a rerun on the same machine
# continues where this one stopped.
# $STUDY_ARGS goes to every process (e.g. "--teacher-config 20b-attention --modes rorope1,partial8").
# $RESUME: a folder of an earlier call's results (its OUT_DIR, committed), copied into $STUDY first: the
# teacher, retrained bit for bit, finds its rows done and its calibration windows chosen (LAYERS.calib.npz).
# $SUFFIX names the results LAYERS$SUFFIX.* (e.g. "_heal10x" with "--distill-steps 1000" in $STUDY_ARGS): rows
# healed on another budget or window length, on the same teacher and calibration windows, in one call.
# Distillation needs grain: its wheels in .whl, carried with the call, are installed first.
#   [LAYER_SETS="full all"] [RESUME=DIR] [SUFFIX=S] bash eval/experiments/quality_study_gpu.sh OUT_DIR [SECONDS]
set -uo pipefail
OUT=$1
BUDGET=${2:-570}
STUDY=${STUDY:-/tmp/study}
LAYER_SETS=${LAYER_SETS:-full all}
END=$((SECONDS + BUDGET))
mkdir -p "$STUDY" "$OUT"
if [ -n "${RESUME:-}" ]; then
  cp "$RESUME"/*.json "$RESUME"/*.calib.npz "$STUDY"/ 2> /dev/null || true
fi
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
# The teacher is trained by a process of its own with deterministic XLA (no atomics, no timed autotuning), so
# every fresh machine of the same kind trains the same weights (the results' teacher fingerprint says so)
# and one study can grow over several allocations; rows are then computed with the usual fast flags.
if [ ! -d "$STUDY/teacher" ]; then
  XLA_FLAGS="--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0" python -m eval.experiments.quality_study \
    --teacher "$STUDY/teacher" --time-limit 1 --layers full --out "$STUDY/teacher_header" ${STUDY_ARGS:-} \
    >> "$STUDY/teacher.log" 2>&1
  cp "$STUDY/teacher.log" "$OUT/"
fi
run() {  # run GPU LAYERS: one process, ending by END
  local left=$((END - SECONDS)) out="$STUDY/$2${SUFFIX:-}"
  [ "$left" -gt 100 ] || return
  [ -f "$out.calib.npz" ] || [ ! -f "$STUDY/$2.calib.npz" ] || cp "$STUDY/$2.calib.npz" "$out.calib.npz"
  CUDA_VISIBLE_DEVICES=$1 timeout $((left - 5)) python -m eval.experiments.quality_study --teacher "$STUDY/teacher" \
    --compile-cache "$STUDY/xla-cache" --time-limit $((left - 80)) --layers "$2" --out "$out" ${STUDY_ARGS:-} \
    >> "$out.log" 2>&1
  cp "$out".* "$OUT/"
}
if [ "$(nvidia-smi -L | wc -l)" -lt 2 ]; then
  for layers in $LAYER_SETS; do run 0 "$layers"; done
  tail -n 3 "$STUDY"/*.log
  exit
fi
# Two GPUs: GPU 1 takes "all" once GPU 0 has trained the teacher and written the header (cross-check
# included).
run 0 full &
(
  while [ ! -f "$STUDY/full${SUFFIX:-}.json" ]; do sleep 3; done
  [ -f "$STUDY/all${SUFFIX:-}.json" ] || python -c "import json, sys; r = json.load(open(sys.argv[1])); r['rows'] = []; \
json.dump(r, open(sys.argv[2], 'w'))" "$STUDY/full${SUFFIX:-}.json" "$STUDY/all${SUFFIX:-}.json"
  run 1 all
) &
wait
tail -n 3 "$STUDY"/*.log
