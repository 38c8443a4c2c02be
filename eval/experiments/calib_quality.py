"""Does a chosen calibration set beat a random one? KL right after conversion, per selection rule.

    python -m eval.experiments.calib_quality [--teacher CKPT] [--calib-tokens 2048]
        [--out eval/results/calib_quality]

The teacher defaults to the embedded one that `python -m train.distill` trains and caches. Every layer
(sliding and full) is converted, decompressed at 75% less cache, PCA init, from calibration sets of the
same token budget taken from the stdlib validation split by `weights.calib`: `first` (the split's first
tokens), `random` (several seeds), `kmeans` (diverse windows by the model's own hidden states), each with
one set of long windows for all layers and with short windows (the sliding window) for sliding layers.
Scored on held-out test windows: mean per-token KL(teacher || converted) and perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from tokenizers import Tokenizer

from eval.experiments.quality_study import latent_dim_for, score, teacher_scores
from support.corpora import corpus_ids
from train.embedded import embedded_teacher_dir
from weights.calib import calibration_set
from weights.load import load_model
from weights.to_mla import convert


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--teacher", default=embedded_teacher_dir(), help="trained teacher (HF folder or Orbax)"
    )
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--long-len", type=int, default=256)
    parser.add_argument("--pool-tokens", type=int, default=65536, help="validation tokens to select from")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seeds", type=int, default=3, help="sets drawn per random / k-means rule")
    parser.add_argument("--out", default="eval/results/calib_quality")
    args = parser.parse_args(argv)
    if not os.path.exists(args.teacher):
        print(
            f"error: --teacher {args.teacher} does not exist (run python -m train.distill once)",
            file=sys.stderr,
        )
        return 1
    config, teacher, tokenizer_dir = load_model(args.teacher, progress=False)
    tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    stream = corpus_ids(tokenizer, "stdlib", "validation", args.pool_tokens)
    held_out = corpus_ids(tokenizer, "stdlib", "test", args.eval_tokens)
    windows = held_out[: len(held_out) // args.long_len * args.long_len].reshape(-1, args.long_len)
    latent = latent_dim_for(0.75, "decompressed", config.num_key_value_heads, config.head_dim)
    layers = tuple(range(config.num_hidden_layers))
    reference = teacher_scores(teacher, config, windows)
    rows = []
    runs = [("first", 0)] + [(how, s) for how in ("random", "kmeans") for s in range(args.seeds)]
    for how, seed in runs:
        for split in (False, True):
            sets = calibration_set(
                teacher, config, stream, args.calib_tokens, how, args.long_len,
                config.sliding_window if split else args.long_len, seed=seed,
            )  # fmt: skip
            mla_config, student, _ = convert(
                teacher, config, latent, "decompressed", layers, init="pca", calib_tokens=sets
            )
            row = {"selection": how, "seed": seed, "short_sliding_windows": split}
            row |= score(student, mla_config, windows, reference)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "teacher": args.teacher,
        "converted": f"all {len(layers)} layers, decompressed, latent {latent} (75% less cache), pca",
        "calib_tokens": args.calib_tokens,
        "long_len": args.long_len,
        "short_len": config.sliding_window,
        "pool_tokens": len(stream),
        "eval_tokens": int(windows.size),
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    kl = lambda how, split: [
        r["kl"] for r in rows if r["selection"] == how and r["short_sliding_windows"] == split
    ]
    result["kl_mean_std"] = {
        f"{how}_{'short' if split else 'same'}_sliding_windows": [
            np.mean(kl(how, split)),
            np.std(kl(how, split)),
        ]
        for how in ("random", "kmeans")
        for split in (False, True)
    }
    with open(os.path.join(args.out, "calib_quality.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| selection | sliding layers' windows | KL(teacher ‖ converted) | PPL |", "|---|---|---|---|"]
    for r in rows:
        name = r["selection"] + (f" (seed {r['seed']})" if r["selection"] != "first" else "")
        short = (
            f"{config.sliding_window} tokens" if r["short_sliding_windows"] else f"{args.long_len} (same set)"
        )
        lines.append(f"| {name} | {short} | {r['kl']:.5f} | {r['ppl']:.3f} |")
    teacher_ppl = rows[0]["teacher_ppl"]
    lines.append(
        f"\nTeacher PPL {teacher_ppl:.3f} on {windows.size} held-out tokens; budget {args.calib_tokens}."
    )
    for name, (mean, std) in result["kl_mean_std"].items():
        lines.append(f"- {name}: KL {mean:.5f} +- {std:.5f} over {args.seeds} seeds")
    with open(os.path.join(args.out, "calib_quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
