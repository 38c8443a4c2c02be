#!/usr/bin/env bash
# Healing's learning rate and token budget on the CPU: the quality study on the tiny teacher (the README's
# main job's recipe: 600 steps of 16 x 128 tokens on the stdlib corpus), full-attention layers at the
# default 81.25% less cache, decompressed and rorope2, healed at each learning rate on 100 and 1,000 steps
# of 8 x 128 tokens. One study file per (learning rate, steps): OUT/lr{LR}_steps{STEPS}.{json,md}.
# The teacher (trained by the first study when missing, about 5 min on 2 CPU cores) and the compilation
# cache live in WORK, apart from the results.
#   bash eval/experiments/healing_lr.sh OUT_DIR [WORK_DIR]
set -euo pipefail
OUT=$1
WORK=${2:-${TMPDIR:-/tmp}/healing_lr}
mkdir -p "$OUT" "$WORK"
for steps in 100 1000; do
  for lr in ${LRS:-1e-4 3e-4 1e-3 3e-3}; do
    name="$OUT/lr${lr}_steps${steps}"
    python -m eval.experiments.quality_study --teacher "$WORK/teacher" --data stdlib --teacher-config tiny \
      --train-steps 600 --seq-len 128 --long-seq-len 512 --eval-windows 64 --calib-tokens 8192 \
      --tokenizer-chars 3000000 --layers full --modes decompressed,rorope2 --reductions 0.8125 --inits pca \
      --distill-steps "$steps" --distill-lr "$lr" --compile-cache "$WORK/xla-cache" --out "$name" >> "$name.log" 2>&1
    rm -f "$name.png" "$name.calib.npz"
  done
done
python - "$OUT" << 'PY'
import glob, json, sys
rows = []
for f in sorted(glob.glob(f"{sys.argv[1]}/lr*_steps*.json")):
    r = json.load(open(f))
    for row in r["rows"]:
        worse = lambda s: 100 * (s["ppl"] / s["teacher_ppl"] - 1)
        c, h = row["converted"], row["distilled"]
        rows.append((r["distill"]["steps"], r["distill"]["lr"], row["mode"], worse(c), worse(h), worse(h["long"]), c["kl"], h["kl"]))
lines = ["| healing steps | lr | mode | PPL converted vs teacher | healed | healed at 512 | KL converted -> healed |", "|---|---|---|---|---|---|---|"]
for s, lr, mode, c, h, hl, kc, kh in sorted(rows):
    lines.append(f"| {s} | {lr:g} | {mode} | {c:+.2f}% | {h:+.2f}% | {hl:+.2f}% | {kc:.4f} -> {kh:.4f} |")
open(f"{sys.argv[1]}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
