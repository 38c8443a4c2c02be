"""Full-size distillation throughput: a gpt-oss-20b-shaped teacher with random bf16 weights, converted to
MLA with the default settings (decompressed, latent 192, PCA on all layers), distilled with
`train.distill.run` at seq-len 2048 on one GPU.

    python -m eval.fullsize_distill [--batch 2] [--steps 20] [--seq-len 2048] [--out RESULTS.json]

Reports peak device memory, tokens/s and MFU (model FLOPs of teacher forward + student forward and
backward, `train.flops`, over the card's dense bf16 peak) from the median step after the first two.
Random weights make the loss meaningless; the point is that the step fits and how fast it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_mla_jax.config import GPT_OSS_20B
from gptoss_mla_jax.model import init_params
from train.data import pack
from train.distill import run
from weights.to_mla import DEFAULT_LATENT_DIM, convert


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--loss", default="kl")
    parser.add_argument("--out", default="eval/results/fullsize_distill.json")
    args = parser.parse_args(argv)
    config = GPT_OSS_20B
    t0 = time.perf_counter()
    teacher = init_params(config, jax.random.key(0), jnp.bfloat16)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, config.vocab_size, (2, 512))
    student_config, student, _ = convert(
        teacher, config, DEFAULT_LATENT_DIM, "decompressed", init="pca", calib_tokens=calib
    )
    setup_s = time.perf_counter() - t0
    sequences = pack(rng.integers(0, config.vocab_size, 64 * (args.seq_len + 1)), args.seq_len + 1)
    with tempfile.TemporaryDirectory() as out_dir:
        history, _ = run(
            teacher, config, student, student_config, sequences, out_dir, "1x1", args.batch, args.steps,
            lr=1e-4, warmup=2, loss=args.loss, ckpt_every=10**9, dtype=jnp.bfloat16, progress=False,
        )  # fmt: skip
        with open(os.path.join(out_dir, "summary.json")) as f:
            summary = json.load(f)
    result = {
        "command": f"python -m eval.fullsize_distill --batch {args.batch} --steps {args.steps} "
        f"--seq-len {args.seq_len} --loss {args.loss}",
        "model": "gpt-oss-20b shape, random bf16 weights; student: decompressed MLA, latent "
        f"{DEFAULT_LATENT_DIM}, PCA init, all {config.num_hidden_layers} layers",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "setup_s": setup_s,
        "jax": jax.__version__,
        **summary,
        "step_s": [h["step_s"] for h in history],
        "kl": [h["kl"] for h in history],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("step_s", "kl")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
