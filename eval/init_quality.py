"""How good is each MLA initialisation before any healing? Teacher vs converted KL and perplexity.

    python -m eval.init_quality --teacher runs/teacher [--train-steps 400] [--out eval/results/init_quality]

Trains the teacher first (`train.pretrain`'s recipe) when --teacher does not exist yet. Then converts
the full-attention layers with {svd, pca} x {decompressed, partial (2 RoPE pairs per kv head)} at
latent sizes giving 50%, 75% and 87.5% less cache on those layers, and scores every model on held-out
windows of the corpus' test split: perplexity, and mean per-token KL(teacher || converted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from tokenizers import Tokenizer

from eval.ppl import perplexity
from gptoss_mla_jax.cache import values_per_token
from train.data import token_windows
from weights.load import load_model
from weights.to_mla import convert

REDUCTIONS = (0.5, 0.75, 0.875)
ROPE_PAIRS = 2


def score(teacher, teacher_config, student, student_config, windows: np.ndarray) -> dict:
    """PPL of teacher and student and mean KL(teacher || student) over disjoint held-out windows."""
    length = windows.shape[1]
    out = perplexity(
        student,
        student_config,
        windows.reshape(-1),
        length,
        length,
        teacher=(teacher, teacher_config),
        progress=False,
    )
    return {"teacher_ppl": out["teacher_ppl"], "ppl": out["ppl"], "kl": out["kl"]}


def latent_dim_for(reduction: float, mode: str, G: int, d: int) -> int:
    """Latent width that leaves (1 - reduction) of a GQA layer's 2Gd cached values per token."""
    budget = round((1 - reduction) * 2 * G * d)
    return budget - (G * 2 * ROPE_PAIRS if mode == "partial" else 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (trained here if missing)")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--data", default="stdlib")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--out", default="eval/results/init_quality", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)

    if not os.path.exists(args.teacher):
        from train import pretrain

        t0 = time.perf_counter()
        pretrain.main(["--out", args.teacher, "--steps", str(args.train_steps), "--data", args.data])
        print(f"teacher trained in {time.perf_counter() - t0:.0f} s")
    config, params, tokenizer_dir = load_model(args.teacher)
    tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    held_out = token_windows(
        tokenizer, args.data, args.eval_windows * (args.seq_len + 1), args.seq_len + 1, "test"
    )
    calib = token_windows(tokenizer, args.data, args.calib_tokens, args.seq_len, "validation")
    G, d = config.num_key_value_heads, config.head_dim
    rows = []
    for mode in ("decompressed", "partial"):
        for reduction in REDUCTIONS:
            r = latent_dim_for(reduction, mode, G, d)
            for init in ("svd", "pca"):
                t0 = time.perf_counter()
                student_config, student, _ = convert(params, config, r, mode, None, ROPE_PAIRS, init, calib)
                seconds = time.perf_counter() - t0
                layer = student_config.mla.layers[0]
                row = {
                    "mode": mode,
                    "init": init,
                    "latent_dim": r,
                    "values_per_token": values_per_token(student_config, layer),
                    "layer_reduction": 1 - values_per_token(student_config, layer) / (2 * G * d),
                    "convert_seconds": seconds,
                    **score(params, config, student, student_config, held_out),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "command": " ".join(sys.argv),
        "device": jax.devices()[0].device_kind,
        "teacher": os.path.abspath(args.teacher),
        "config": config.to_hf(),
        "held_out_tokens": int(held_out.shape[0] * (held_out.shape[1] - 1)),
        "calibration_tokens": int(calib.size),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(f"{args.out}.json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        f"Teacher PPL {rows[0]['teacher_ppl']:.3f} on {result['held_out_tokens']} held-out tokens "
        f"({result['device']}).",
        "",
        "| mode | cache reduction (converted layers) | latent r | init | PPL | KL(teacher‖converted) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["mode"],
            f"{r['layer_reduction']:.1%}",
            r["latent_dim"],
            r["init"],
            f"{r['ppl']:.3f}",
            f"{r['kl']:.4f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    with open(f"{args.out}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
